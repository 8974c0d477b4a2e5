"""The PyTorch path of the ops (``hadapeft/ops``: custom autograd Functions, what every CPU user runs) against the
fp64 formula, forward and backward.

Same rule as the kernel tests: ``|op − ref64| ≤ 2 · |eager − ref64| + floor``, eager = the same formula in the input
dtype through plain autograd. Shapes cover the branches of the Functions: a single input/output scale folded into W
(rows ≥ d_out, rows ≥ d_in) or applied to the activations, per-sample task rows, and the blocked reductions with
more than one block (``reduce._BLOCK_ELEMENTS`` made small).
"""

import itertools

import pytest
import torch
from conftest import check_against_fp64, op_eager_fp64

from hadapeft.ops import reduce
from hadapeft.ops.gated_lora import gated_lora_ref, gated_lora_torch, unit_gate
from hadapeft.ops.modulate import modulated_linear_ref, modulated_linear_torch

DTYPES = {"fp32": (torch.float32, 16), "bf16": (torch.bfloat16, 4)}


@pytest.fixture(params=[None, 96], ids=["one-block", "many-blocks"])
def block(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(reduce, "_BLOCK_ELEMENTS", request.param)
    return request.param


def _compare(fn, ref_fn, inputs, dy, dtype, ulps, names):
    for name, out, eager, ref in zip(["y"] + names, *op_eager_fp64(fn, ref_fn, inputs, dy)):
        check_against_fp64(name, out, eager, ref, dtype, ulps)


def _rand(*shape, dtype, scale=1.0, offset=0.0, grad=True):
    return (torch.randn(*shape) * scale + offset).to(dtype).requires_grad_(grad)


# (leading dims, d_in, d_out, r, gate kind, separate lora_x, bias)
GATED = [((7,), 48, 200, 4, "vector", False, True), ((3, 43), 200, 48, 16, "scalar", False, False),
         ((129,), 48, 48, 8, "vector", True, True), ((1,), 20, 30, 2, "scalar", True, False),
         ((4,), 20, 30, 2, "scalar", False, True)]


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
def test_gate_parameter_is_reflected_forward_and_backward(recompute):
    """The op takes the gate parameter g: γ = unit_gate(g) in the forward, dg = ±Σ dy ∘ (h − l) with the
    reflection's slope (+1 on [0, 1], the kinks g = 0 and g = 1 included: no dead start at γ = 1)."""
    torch.manual_seed(0)
    x, w, A, B = torch.randn(5, 8), torch.randn(7, 8), torch.randn(2, 8), torch.randn(7, 2)
    gate = torch.tensor([1.0, 0.0, 0.3, 1.25, -0.5, 2.5, 3.0], requires_grad=True)
    y = gated_lora_torch(x, w, None, A, B, gate, 0.5, recompute=recompute)
    gamma = torch.tensor([1.0, 0.0, 0.3, 0.75, 0.5, 0.5, 1.0])
    h, low = x @ w.t(), x @ A.t() @ B.t() * 0.5
    torch.testing.assert_close(y, gamma * h + (1 - gamma) * low)
    (dgate,) = torch.autograd.grad(y, gate, torch.ones_like(y))
    slope = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0])  # as unit_gate: +1 where g mod 2 <= 1
    torch.testing.assert_close(dgate, slope * (h - low).sum(0))
    with torch.no_grad():  # inference: the same output without an autograd node
        y_inf = gated_lora_torch(x, w, None, A, B, gate, 0.5, recompute=recompute)
    assert y_inf.grad_fn is None
    torch.testing.assert_close(y_inf, y.detach())


def test_identity_at_init_is_exact():
    """γ = 1 (g = 1) and B = 0: the output is the frozen layer's output bit for bit, on a strided input too."""
    torch.manual_seed(0)
    x = torch.randn(9, 5, 48).transpose(0, 1)
    w, b, A = torch.randn(40, 48), torch.randn(40), torch.randn(4, 48)
    B, gate = torch.zeros(40, 4, requires_grad=True), torch.ones(40, requires_grad=True)
    want = torch.nn.functional.linear(x, w, b)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.equal(gated_lora_torch(x, w, b, A, B, gate, 2.0), want)


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GATED, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-r{c[3]}-{c[4]}-lx{int(c[5])}")
def test_gated_lora_torch_matches_fp64(case, dtype, recompute, block):
    dtype, ulps = DTYPES[dtype]
    torch.manual_seed(0)
    lead, d_in, d_out, r, gate_kind, with_lx, with_bias = case
    x = _rand(*lead, d_in, dtype=dtype)
    weight = _rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5, grad=False)
    bias = _rand(d_out, dtype=dtype, grad=False) if with_bias else None
    A, B = _rand(r, d_in, dtype=dtype, scale=d_in ** -0.5), _rand(d_out, r, dtype=dtype, scale=0.5)
    # gate parameters inside and outside [0, 1]: the op reflects them (γ = unit_gate(g), exact here)
    gate = (torch.rand(d_out if gate_kind == "vector" else 1) * 1.6 - 0.3).to(dtype).requires_grad_()
    inputs = [x, A, B, gate] + ([_rand(*lead, d_in, dtype=dtype)] if with_lx else [])
    _compare(lambda x, A, B, g, lx=None: gated_lora_torch(x, weight, bias, A, B, g, 1.5, lx, recompute),
             lambda x, A, B, g, lx=None, upcast=False: gated_lora_ref(x, weight, bias, A, B, unit_gate(g), 1.5, lx,
                                                                      upcast),
             inputs, torch.randn(*lead, d_out), dtype, ulps, ["dx", "dA", "dB", "dgate", "dlora_x"])


# (B, L, d_in, d_out): rows 7 (no fold), 129 ≥ d_out (in-scale folded into W), 200 ≥ d_in and d_out (both folds)
MOD_SHAPES = [(1, 7, 48, 200), (3, 43, 200, 48), (2, 100, 48, 64)]
MOD_FLAGS = [f for f in itertools.product([False, True], [False, True], [False, True], [False, True], [True, False])
             if f[1] or f[2] or f[3]]  # index, in, out, shift, scale_bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MOD_SHAPES, ids=lambda s: "B{}L{}-{}x{}".format(*s))
@pytest.mark.parametrize("flags", MOD_FLAGS, ids=lambda f: "idx{}-i{}o{}s{}-sb{}".format(*map(int, f)))
def test_modulated_linear_torch_matches_fp64(shape, flags, dtype, block):
    dtype, ulps = DTYPES[dtype]
    torch.manual_seed(1)
    B, L, d_in, d_out = shape
    use_index, has_in, has_out, has_shift, scale_bias = flags
    T = 3 if use_index else 1
    x = _rand(B, L, d_in, dtype=dtype)
    weight = _rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5, grad=False)
    bias = _rand(d_out, dtype=dtype, grad=False)
    index = torch.tensor([2, 0, 1])[:B] if use_index else None
    tables = {"din": _rand(T, d_in, dtype=dtype, scale=0.5, offset=1.0) if has_in else None,
              "dout": _rand(T, d_out, dtype=dtype, scale=0.5, offset=1.0) if has_out else None,
              "dshift": _rand(T, d_out, dtype=dtype, scale=0.5) if has_shift else None}
    names = ["dx"] + [k for k, t in tables.items() if t is not None]

    def split(args):
        it = iter(args[1:])
        return (args[0], *(next(it) if t is not None else None for t in tables.values()))

    def fn(*args):
        return modulated_linear_torch(*split(args)[:1], weight, bias, *split(args)[1:], index, scale_bias)

    def ref_fn(*args, upcast):
        return modulated_linear_ref(*split(args)[:1], weight, bias, *split(args)[1:], index, scale_bias, upcast)

    inputs = [x] + [t for t in tables.values() if t is not None]
    _compare(fn, ref_fn, inputs, torch.randn(B, L, d_out), dtype, ulps, names)


def test_sum_of_products_blocks_add_up_in_order(monkeypatch):
    """Blocked reduction = the fp64 column sum, for a row count that leaves a partial last block, bf16 inputs
    accumulated in fp32, and bit-identical on a rerun (fixed order)."""
    monkeypatch.setattr(reduce, "_BLOCK_ELEMENTS", 7 * 5)
    a, b = torch.randn(3, 11, 5).bfloat16(), torch.randn(3, 11, 5).bfloat16()
    got = reduce.sum_of_products(a, b)
    ref = (a * b).double().sum((0, 1))  # the products round to bf16 as in eager; the sums must not
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max() < 1e-5
    assert torch.equal(got, reduce.sum_of_products(a, b))
    per = reduce.per_sample_sum_of_products(a, b)
    assert (per.double() - (a * b).double().sum(1)).abs().max() < 1e-5
    assert ((a * b).sum((0, 1)).double() - ref).abs().max() > 1e-3  # what a bf16 result would lose
