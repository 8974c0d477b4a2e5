"""Triton kernels (``hadapeft/kernels``) against the fp64 reference, forward and backward.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32/fp16 only: bf16 ``tl.dot`` is
wrong there), so shapes stay small. The error allowed is relative to the eager same-dtype error, as flash-attn's
tests do: ``|kernel − ref64| ≤ 2 · |eager − ref64| + floor``, floor = a few ulps of the output's magnitude.
Every buffer the launchers allocate starts as NaN (``POISON_OUTPUTS``), so an unwritten element fails.
"""

import contextlib
import itertools
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# Without CUDA the interpreter must be on before triton is first imported: triton decorates its own standard library
# (tl.sum, ...) at import, as compiled or interpreted functions. If something imported triton earlier in this
# process (peft does), the tests here are skipped and test_in_interpreter_subprocess reruns this file in a fresh
# process with TRITON_INTERPRET=1.
SUBPROCESS = False
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    SUBPROCESS = "triton" in sys.modules
    if not SUBPROCESS:
        os.environ["TRITON_INTERPRET"] = "1"
in_process = pytest.mark.skipif(SUBPROCESS, reason="triton was imported without the interpreter; "
                                                   "runs in test_in_interpreter_subprocess")

triton = pytest.importorskip("triton")

import hadapeft.kernels as kernels  # noqa: E402
from conftest import check_against_fp64, op_eager_fp64  # noqa: E402
from hadapeft.kernels.gated_lora import gated_lora_triton  # noqa: E402
from hadapeft.kernels.modulate import modulated_linear_triton  # noqa: E402
from hadapeft.ops.gated_lora import gated_lora_ref  # noqa: E402
from hadapeft.ops.modulate import modulated_linear_ref  # noqa: E402

# (dtype, ulps of the output magnitude allowed on top of 2× the eager error)
DTYPES = [(torch.float32, 16), (torch.float16, 4)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch, request):
    monkeypatch.setattr(kernels, "POISON_OUTPUTS", True)
    if request.cls is None:  # small shapes: default configs (the CUDA class below runs the tuned kernels)
        monkeypatch.setattr(kernels, "AUTOTUNE", False)


@pytest.mark.skipif(not SUBPROCESS, reason="the tests of this file run in this process")
def test_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def _check(name, out, eager, ref, dtype, ulps):
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    check_against_fp64(name, out, eager, ref, dtype, ulps)


def _compare(fn, ref_fn, inputs, dy, dtype, ulps, names):
    """Kernel vs eager vs fp64 reference, forward and backward, on the same inputs."""
    for name, out, eager, ref in zip(["y"] + names, *op_eager_fp64(fn, ref_fn, inputs, dy)):
        _check(name, out, eager, ref, dtype, ulps)


def _mod_fns(weight, bias, index, scale_bias, has):
    """Kernel and reference closures over x and the present tables (has = (in, out, shift) flags), in that order."""
    def split(args):
        it = iter(args[1:])
        return args[0], *(next(it) if h else None for h in has)

    def fn(*args):
        x, i, o, s = split(args)
        return modulated_linear_triton(x, weight, bias, i, o, s, index, scale_bias)

    def ref_fn(*args, upcast):
        x, i, o, s = split(args)
        return modulated_linear_ref(x, weight, bias, i, o, s, index, scale_bias, upcast)

    return fn, ref_fn


def _rand(*shape, dtype, scale=1.0, offset=0.0, grad=True):
    t = (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale + offset).to(dtype)
    return t.requires_grad_(grad)


# --------------------------------------------------------------------------------------------------------------
# Gated LoRA
# --------------------------------------------------------------------------------------------------------------

# (leading dims, d_in, d_out, r, gate "vector"/"scalar", lora_x given, bias)
GATED_CASES = [
    ((1,), 48, 48, 1, "vector", False, True),
    ((7,), 48, 200, 4, "scalar", True, True),
    ((129,), 200, 48, 16, "vector", True, False),
    ((7,), 200, 48, 16, "scalar", False, False),
    ((3, 43), 48, 200, 4, "vector", False, True),  # 129 rows from (B, L)
    ((1, 7), 200, 200, 1, "scalar", True, True),
    ((129,), 48, 48, 64, "vector", False, True),  # the largest rank the kernels take
]


def _gated_inputs(lead, d_in, d_out, r, gate_kind, with_lora_x, with_bias, dtype):
    x = _rand(*lead, d_in, dtype=dtype)
    weight = _rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5, grad=False)
    bias = _rand(d_out, dtype=dtype, grad=False) if with_bias else None
    lora_A = _rand(r, d_in, dtype=dtype, scale=d_in ** -0.5)
    lora_B = _rand(d_out, r, dtype=dtype, scale=0.5)
    # some gates outside [0, 1]: the kernels clamp on load, the gradient is straight-through (as the reference)
    gate = (torch.rand(d_out if gate_kind == "vector" else 1, device=DEVICE) * 1.6 - 0.3).to(dtype).requires_grad_()
    lora_x = _rand(*lead, d_in, dtype=dtype) if with_lora_x else None
    return x, weight, bias, lora_A, lora_B, gate, lora_x


@in_process
@pytest.mark.parametrize("dtype,ulps", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", GATED_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-r{c[3]}-{c[4]}-lx{int(c[5])}")
def test_gated_lora_matches_reference(case, dtype, ulps):
    lead, d_in, d_out, r, gate_kind, with_lora_x, with_bias = case
    x, weight, bias, lora_A, lora_B, gate, lora_x = _gated_inputs(*case, dtype)
    scaling = 2.0
    inputs = [x, lora_A, lora_B, gate] + ([lora_x] if with_lora_x else [])
    dy = torch.randn(*lead, d_out, device=DEVICE)
    _compare(lambda x, A, B, g, lx=None: gated_lora_triton(x, weight, bias, A, B, g, scaling, lx),
             lambda x, A, B, g, lx=None, upcast=False: gated_lora_ref(x, weight, bias, A, B, g, scaling, lx, upcast),
             inputs, dy, dtype, ulps, ["dx", "dA", "dB", "dgate", "dlora_x"][: len(inputs)])


@in_process
def test_gated_lora_frozen_gate_and_inference():
    """Only the needed gradients are computed (no h saved for a frozen gate); no-grad calls skip autograd."""
    x, weight, bias, lora_A, lora_B, gate, _ = _gated_inputs((7,), 48, 200, 4, "vector", False, True, torch.float32)
    gate.requires_grad_(False)
    dy = torch.randn(7, 200, device=DEVICE)
    got = torch.autograd.grad(gated_lora_triton(x, weight, bias, lora_A, lora_B, gate, 2.0), [x, lora_A, lora_B], dy)
    want = torch.autograd.grad(gated_lora_ref(x, weight, bias, lora_A, lora_B, gate, 2.0), [x, lora_A, lora_B], dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        y = gated_lora_triton(x, weight, bias, lora_A, lora_B, gate, 2.0)
    assert y.grad_fn is None
    torch.testing.assert_close(y, gated_lora_ref(x, weight, bias, lora_A, lora_B, gate, 2.0).detach())


@in_process
def test_gated_lora_noncontiguous_input():
    base = _rand(9, 5, 48, dtype=torch.float32, grad=False)
    x = base.transpose(0, 1).requires_grad_()  # (5, 9, 48), leading dims not contiguous
    _, weight, bias, lora_A, lora_B, gate, _ = _gated_inputs((45,), 48, 40, 4, "vector", False, True, torch.float32)
    dy = torch.randn(5, 9, 40, device=DEVICE)
    y = gated_lora_triton(x, weight, bias, lora_A, lora_B, gate, 0.5)
    got = torch.autograd.grad(y, [x, lora_A], dy)
    y_ref = gated_lora_ref(x, weight, bias, lora_A, lora_B, gate, 0.5)
    want = torch.autograd.grad(y_ref, [x, lora_A], dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@in_process
def test_gated_lora_rank_above_limit_is_a_clear_error():
    x, weight, bias, lora_A, lora_B, gate, _ = _gated_inputs((7,), 48, 48, 65, "vector", False, True, torch.float32)
    with pytest.raises(ValueError, match="r <= 64"):
        gated_lora_triton(x, weight, bias, lora_A, lora_B, gate, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Modulated linear
# --------------------------------------------------------------------------------------------------------------

MOD_SHAPES = [(1, 7, 48, 200), (3, 43, 200, 48), (4, 1, 48, 48)]  # (B, L, d_in, d_out); rows 7, 129, 4
NUM_TASKS = 3
# every combination of: index None / mixed ids, which of in/out/shift exist, scale_bias
MOD_FLAGS = [f for f in itertools.product([False, True], [False, True], [False, True], [False, True], [True, False])
             if f[1] or f[2] or f[3]]
MOD_CASES = [(MOD_SHAPES[k % len(MOD_SHAPES)], flags, dt)
             for k, (flags, dt) in enumerate(itertools.product(MOD_FLAGS, DTYPES))]


def _task_index(B, T):
    # repeated and mixed ids, not sorted, and not every task present when B < T
    return torch.tensor([2, 0, 2, 1, 0, 1][:B], device=DEVICE) % T


def _mod_inputs(B, L, d_in, d_out, use_index, has_in, has_out, has_shift, dtype, T=NUM_TASKS):
    T = T if use_index else 1
    x = _rand(B, L, d_in, dtype=dtype)
    weight = _rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5, grad=False)
    bias = _rand(d_out, dtype=dtype, grad=False)
    in_scale = _rand(T, d_in, dtype=dtype, scale=0.5, offset=1.0) if has_in else None
    out_scale = _rand(T, d_out, dtype=dtype, scale=0.5, offset=1.0) if has_out else None
    shift = _rand(T, d_out, dtype=dtype, scale=0.5) if has_shift else None
    index = _task_index(B, T) if use_index else None
    return x, weight, bias, in_scale, out_scale, shift, index


@in_process
@pytest.mark.parametrize(
    "shape,flags,dtype_ulps", MOD_CASES,
    ids=[f"B{s[0]}L{s[1]}-{s[2]}x{s[3]}-idx{int(f[0])}-i{int(f[1])}o{int(f[2])}s{int(f[3])}-sb{int(f[4])}-"
         f"{'fp32' if d[0] == torch.float32 else 'fp16'}" for s, f, d in MOD_CASES])
def test_modulated_linear_matches_reference(shape, flags, dtype_ulps):
    dtype, ulps = dtype_ulps
    use_index, has_in, has_out, has_shift, scale_bias = flags
    x, weight, bias, in_scale, out_scale, shift, index = _mod_inputs(*shape, *flags[:4], dtype)
    tables = {"din": in_scale, "dout": out_scale, "dshift": shift}
    names = ["dx"] + [k for k, t in tables.items() if t is not None]
    inputs = [x] + [t for t in tables.values() if t is not None]
    dy = torch.randn(*shape[:2], shape[3], device=DEVICE)
    _compare(*_mod_fns(weight, bias, index, scale_bias, flags[1:4]), inputs, dy, dtype, ulps, names)


@in_process
def test_modulated_linear_hypermod_per_sample_tables():
    """HyperMod shape: one table row per sample (T = B, index = arange), in + out scales, bias not scaled."""
    B, L, d_in, d_out = 4, 9, 48, 200
    x, weight, bias, in_scale, out_scale, _, _ = _mod_inputs(B, L, d_in, d_out, True, True, True, False,
                                                              torch.float32, T=B)
    index = torch.arange(B, device=DEVICE)
    dy = torch.randn(B, L, d_out, device=DEVICE)
    _compare(*_mod_fns(weight, bias, index, False, (True, True, False)), [x, in_scale, out_scale], dy,
             torch.float32, 16, ["dx", "din", "dout"])


@in_process
def test_modulated_linear_is_deterministic():
    x, weight, bias, in_scale, out_scale, shift, index = _mod_inputs(3, 43, 200, 48, True, True, True, True,
                                                                      torch.float32)
    dy = torch.randn(3, 43, 48, device=DEVICE)
    runs = [torch.autograd.grad(modulated_linear_triton(x, weight, bias, in_scale, out_scale, shift, index),
                                [x, in_scale, out_scale, shift], dy) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@in_process
def test_modulated_linear_single_row_tables_required_without_index():
    x, weight, bias, _, out_scale, _, _ = _mod_inputs(2, 3, 48, 48, True, False, True, False, torch.float32)
    with pytest.raises(ValueError, match="single-row"):
        modulated_linear_triton(x, weight, bias, out_scale=out_scale, index=None)


# --------------------------------------------------------------------------------------------------------------
# Every adapter option set through its layers: the kernels ran (launches counted) and agree with the PyTorch path.
# A parity test alone cannot tell a kernel from the torch path it is compared with (FiLM and HyperMod agree with it
# to exactly 0.0), so each launch of a kernel is counted; a dispatch that falls back to torch fails here.
# --------------------------------------------------------------------------------------------------------------


class _Counted:
    """A Triton kernel (``JITFunction`` / ``Autotuner``) whose ``kernel[grid](...)`` launches are counted."""

    def __init__(self, kernel, key, counts):
        self.kernel, self.key, self.counts = kernel, key, counts

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counts[self.key] += 1
            return launch(*args, **kwargs)
        return counted

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def _count_launches(monkeypatch) -> "collections.Counter":
    """Count every launch of the kernels of ``hadapeft.kernels`` by (op file, kernel name)."""
    import collections

    import hadapeft.kernels.gated_lora as gated_module
    import hadapeft.kernels.modulate as modulate_module

    counts = collections.Counter()
    for module in (gated_module, modulate_module):
        op = module.__name__.rsplit(".", 1)[-1]
        for name, kernel in list(vars(module).items()):
            if name.endswith(("_kernel", "_tuned")) and hasattr(kernel, "__getitem__"):
                monkeypatch.setattr(module, name, _Counted(kernel, (op, name), counts))
    return counts


def _option_sets():
    import hadapeft
    from hadapeft import registry

    assert hadapeft  # registers the adapter types
    return [(t, o) for t in registry.ADAPTER_TYPES.values() for o in t.option_sets]


class _Stack(torch.nn.Module):
    """``layers.<i>.proj``: numbered layers of one kind (HyperMod's layer table sees both)."""

    def __init__(self, d=32, layers=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": torch.nn.Linear(d, d)}) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer["proj"](x)
        return x


@in_process
@pytest.mark.parametrize("adapter_type,option", _option_sets(), ids=[o for _, o in _option_sets()])
def test_every_adapter_launches_its_kernels(adapter_type, option, monkeypatch):
    import hadapeft
    from peft import get_peft_model
    from scripts.bench import conditioning_kwargs

    kwargs = adapter_type.option_sets[option].kwargs
    overrides = dict(target_modules=["proj"], init_weights=False, backend="triton")
    if "feedforward_modules" in kwargs:  # the option's feedforward (input-scale) path, on this model's layers
        overrides["feedforward_modules"] = ["proj"]
    if "fused_qkv_modules" in kwargs:
        overrides["fused_qkv_modules"] = None
    config = adapter_type.make_config(option, **overrides)
    torch.manual_seed(0)
    model = get_peft_model(_Stack(), config).to(DEVICE).eval()  # eval: no dropout, the same output on both paths
    cond = conditioning_kwargs(config, 2, torch.device(DEVICE)) if hasattr(config, "conditioning_spec") else {}
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    params = [x] + [p for p in model.parameters() if p.requires_grad]
    op = "gated_lora" if adapter_type.name == "GATED_LORA" else "modulate"
    counts = _count_launches(monkeypatch)

    def run():
        with hadapeft.conditioning(model, **cond) if cond else contextlib.nullcontext():
            y = model(x)
            forward = sum(counts.values())
            grads = torch.autograd.grad(y.square().sum(), params)
        return y, grads, forward

    y, grads, forward = run()
    backward = sum(counts.values()) - forward
    assert forward >= 2 and backward >= 2, f"{option}: {dict(counts)} (a kernel per adapted layer and direction)"
    assert {key[0] for key in counts} == {op}, f"{option}: kernels of another op ran: {dict(counts)}"
    counts.clear()
    with hadapeft.use_backend("torch"):
        y_ref, grads_ref, _ = run()
    assert not counts, f"{option}: the torch backend launched kernels {dict(counts)}"
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# torch.compile traces through the custom ops (fake impls), forward and backward
# --------------------------------------------------------------------------------------------------------------


@in_process
def test_torch_compile_traces_custom_ops():
    torch._dynamo.reset()
    x, weight, bias, lora_A, lora_B, gate, _ = _gated_inputs((2, 5), 48, 40, 4, "vector", False, True,
                                                             torch.float32)
    _, w2, b2, in_scale, out_scale, shift, index = _mod_inputs(2, 5, 40, 24, True, True, True, True, torch.float32)

    def block(x):
        h = gated_lora_triton(x, weight, bias, lora_A, lora_B, gate, 2.0)
        return modulated_linear_triton(torch.relu(h), w2, b2, in_scale, out_scale, shift, index)

    params = [x, lora_A, lora_B, gate, in_scale, out_scale, shift]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    y_c = compiled(x)
    g_c = torch.autograd.grad(y_c.square().sum(), params)
    y_e = block(x)
    g_e = torch.autograd.grad(y_e.square().sum(), params)
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------------------
# CUDA only: bf16 on realistic shapes
# --------------------------------------------------------------------------------------------------------------


def _rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@in_process
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
class TestBf16Cuda:
    """bf16 kernel error ≤ 2× eager bf16 error against fp64, on layer sizes of real models."""

    @staticmethod
    def _compare_bf16(fn, ref_fn, inputs, dy, names):
        # Relative (norm) error; the floor is one bf16 ulp, for the scalar gate's single-number gradient.
        for name, out, eager, ref in zip(["y"] + names, *op_eager_fp64(fn, ref_fn, inputs, dy)):
            assert torch.isfinite(out).all(), name
            err, eager_err = _rel_err(out, ref), _rel_err(eager, ref)
            assert err <= 2 * eager_err + 2.0 ** -8, f"{name}: kernel {err:.3e} vs eager {eager_err:.3e}"

    @pytest.mark.parametrize("gate_kind", ["vector", "scalar"])
    def test_gated_lora_bf16(self, gate_kind):
        x, weight, bias, lora_A, lora_B, gate, _ = _gated_inputs((2048,), 4096, 4096, 16, gate_kind, False, True,
                                                                 torch.bfloat16)
        dy = torch.randn(2048, 4096, device=DEVICE)
        self._compare_bf16(lambda x, A, B, g: gated_lora_triton(x, weight, bias, A, B, g, 2.0),
                           lambda x, A, B, g, upcast: gated_lora_ref(x, weight, bias, A, B, g, 2.0, None, upcast),
                           [x, lora_A, lora_B, gate], dy, ["dx", "dA", "dB", "dgate"])

    @pytest.mark.parametrize("kind", ["ia3", "ia3_ff", "film", "hypermod"])
    def test_modulated_linear_bf16(self, kind):
        B, L, d_in, d_out = 4, 512, 4096, 4096
        use_index, has_in, has_out, has_shift, scale_bias, T = {
            "ia3": (False, False, True, False, True, 1), "ia3_ff": (False, True, False, False, True, 1),
            "film": (True, False, True, True, True, 3), "hypermod": (True, True, True, False, False, B)}[kind]
        x, weight, bias, in_scale, out_scale, shift, index = _mod_inputs(
            B, L, d_in, d_out, use_index, has_in, has_out, has_shift, torch.bfloat16, T=T)
        if kind == "hypermod":
            index = torch.arange(B, device=DEVICE)
        tables = [t for t in (in_scale, out_scale, shift) if t is not None]
        dy = torch.randn(B, L, d_out, device=DEVICE)
        self._compare_bf16(*_mod_fns(weight, bias, index, scale_bias, (has_in, has_out, has_shift)),
                           [x] + tables, dy, ["dx"] + [f"dtable{k}" for k in range(len(tables))])
