"""Per-layer and end-to-end benchmarks of hadapeft against the frozen base layer and PEFT LoRA / IA3.

    python -m scripts.bench                       # preset by device: "gpu" on CUDA (bf16), "cpu" otherwise (fp32)
    python -m scripts.bench --op gated_lora film  # only these hadapeft ops (the baselines always run)
    python -m scripts.bench --adapter all         # also each registered adapter's benchmark option sets, as layers
    python -m scripts.bench --e2e                 # training tokens/s + peak memory on a Llama-shaped model
    python -m scripts.bench --e2e --compile       # the same, eager and torch.compile'd steps interleaved

Layer mode: one linear layer, forward + backward (gradients of the input and of the adapter parameters; the base
weight is frozen), for each case:

    base          the frozen nn.Linear alone (every ratio is taken against this, measured in the same run)
    peft_lora     peft LoRA r=16 (lora.Linear from get_peft_model on a one-layer module, adapters in the base dtype)
    peft_ia3      peft IA3 on the output; peft_ia3_ff: IA3 as a feedforward module (scales the input)
    gated_lora    hadapeft gated LoRA, vector gate, r=16               (each on each available backend:
    ia3           modulate, out-scale (one table row)                   "torch" everywhere, "triton" on CUDA)
    ia3_ff        modulate, in-scale
    film          modulate, out-scale + shift, per-sample index, 4 tasks
    hypermod      modulate, rank-1 in + out scale, scale_bias=False, per-sample tables T = B, index = arange(B)

    <option>      with --adapter: a registered adapter type's option set (``hadapeft.registry``, its
                  ``bench_options``) through its peft layer, conditioned per sample on tasks 0..3

hadapeft ops are called at the op level (``hadapeft.ops``), peft and --adapter cases through their layer; x is
(4, tokens / 4, d_in).
Time: median over many repeats after a warm-up, cycling through several preallocated inputs and output gradients
(so no case runs from a warm cache); CUDA events on GPU, ``time.perf_counter`` on CPU, where the cases of a shape take
turns repeat by repeat so that a slow spell of a shared machine slows every case alike.
Memory, two figures:
    peak   the most memory allocated at any moment of one forward + backward beyond what existed before it (inputs,
           weights): the output, saved activations, temporaries and gradients (``scripts/memory.py``: the CUDA
           allocator's peak on GPU, the allocations and frees the profiler records on CPU).
    saved  both devices: bytes held between forward and backward: the output plus every tensor autograd saves
           (``torch.autograd.graph.saved_tensors_hooks``; unique storages; the input and the weights, which the
           caller keeps alive anyway, are not counted).

Results go to ``benchmarks/results/<date>-<device>[-e2e].{json,md}`` with device name and library versions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from scripts.memory import peak_bytes

HADAPEFT_OPS = ("gated_lora", "ia3", "ia3_ff", "film", "hypermod")
BASELINES = ("base", "peft_lora", "peft_ia3", "peft_ia3_ff")
RANK, ALPHA, BATCH, NUM_TASKS = 16, 32, 4, 4

PRESETS = {
    # (d_in, d_out) shapes, token counts, dtype, warm-up, repeats, rotating input sets
    "gpu": dict(shapes=[(4096, 4096), (4096, 11008), (768, 3072)], tokens=[2048, 8192, 16384],
                dtype="bfloat16", warmup=10, repeats=50, rotate=4),
    "cpu": dict(shapes=[(768, 3072), (1024, 1024)], tokens=[2048], dtype="float32", warmup=2, repeats=8, rotate=2),
}


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------


class _OneLayer(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def _peft_layer(kind, base: nn.Linear):
    """The peft tuner layer wrapping ``base`` (LoRA r=16, or IA3 on the output / as a feedforward module)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    module = _OneLayer(base.in_features, base.out_features)
    module.proj = base
    if kind == "peft_lora":
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
    else:
        cfg = IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if kind == "peft_ia3_ff" else [])
    # Adapters in the base dtype, as hadapeft's here (peft would otherwise upcast them to fp32 and cast x).
    model = get_peft_model(module, cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    params = [p for p in layer.parameters() if p.requires_grad]
    if kind == "peft_lora":  # peft inits B = 0; random B keeps the work realistic (same as below)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer, params


def registered_options() -> dict:
    """option set -> adapter type, for the option sets each registered adapter type benchmarks."""
    from hadapeft import registry

    return {o: t for t in registry.ADAPTER_TYPES.values() for o in t.benchmarked}


def conditioning_kwargs(config, batch, device) -> dict:
    """Per-sample conditioning for a conditioned config (tasks 0, 1, ... in one batch), else nothing."""
    spec = config.conditioning_spec()
    if spec is None:
        return {}
    if spec.num_tasks:
        return {"task_ids": torch.arange(batch, device=device) % spec.num_tasks}
    return {"task_embeds": torch.randn(batch, spec.task_embed_dim, generator=torch.Generator().manual_seed(0)
                                       ).to(device)}


def _adapter_layer(option, base: nn.Linear, backend):
    """A registered adapter's option set on a one-layer module: (fn(x) -> y, its trainable parameters)."""
    import hadapeft
    from peft import get_peft_model

    module = _OneLayer(base.in_features, base.out_features)
    module.proj = base
    config = registered_options()[option].make_config(option, target_modules=["proj"], init_weights=False,
                                                      backend=backend)
    model = get_peft_model(module, config, autocast_adapter_dtype=False)
    model.to(base.weight.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = conditioning_kwargs(config, BATCH, base.weight.device)

    def fn(x):
        if not kwargs:
            return model(x)
        with hadapeft.conditioning(model, **kwargs):
            return model(x)
    return fn, params


def make_case(name, backend, d_in, d_out, dtype, device):
    """Returns (fn(x) -> y, trainable params, frozen tensors)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, offset=0.0, grad=True):
        t = (torch.randn(*shape, generator=gen) * scale + offset).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    base = nn.Linear(d_in, d_out, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    if name == "base":
        return base, [], [base.weight]
    if name.startswith("peft_"):
        layer, params = _peft_layer(name, base)
        return layer, params, [base.weight]
    if name in registered_options():
        fn, params = _adapter_layer(name, base, backend)
        return fn, params, [base.weight]

    from hadapeft.ops import gated_lora_linear, modulated_linear

    W = base.weight
    if name == "gated_lora":
        A, B = rand(RANK, d_in, scale=d_in ** -0.5), rand(d_out, RANK, scale=0.02)
        gate = torch.rand(d_out, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        return (lambda x: gated_lora_linear(x, W, None, A, B, gate, ALPHA / RANK, backend=backend)), [A, B, gate], [W]
    tables = {
        "ia3": dict(out_scale=rand(1, d_out, scale=0.1, offset=1.0)),
        "ia3_ff": dict(in_scale=rand(1, d_in, scale=0.1, offset=1.0)),
        "film": dict(out_scale=rand(NUM_TASKS, d_out, scale=0.1, offset=1.0), shift=rand(NUM_TASKS, d_out, scale=0.1),
                     index=torch.tensor([2, 0, 3, 1], device=device)),
        "hypermod": dict(in_scale=rand(BATCH, d_in, scale=0.1, offset=1.0),
                         out_scale=rand(BATCH, d_out, scale=0.1, offset=1.0),
                         index=torch.arange(BATCH, device=device), scale_bias=False),
    }[name]
    params = [t for k, t in tables.items() if k != "index" and isinstance(t, torch.Tensor)]
    return (lambda x: modulated_linear(x, W, None, backend=backend, **tables)), params, [W]


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device, model, opt):
    """Bytes held by live tensors between steps: the CUDA allocator's count, or on CPU (no allocator statistics) the
    unique storages of the model's parameters, buffers and gradients and the optimizer's state."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if opt is not None:
        tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _graph_time(step, rotate, repeats):
    """Median time per step replaying CUDA graphs of it (one graph per rotating input set): the GPU time alone,
    without the host's launch overhead. None if the step cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs a warm-up on a side stream
            for i in range(3):
                step(i)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for k in range(rotate):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step(k)
            graphs.append(g)
        for g in graphs:
            g.replay()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        events[0].record()
        for i in range(repeats):
            graphs[i % rotate].replay()
            events[i + 1].record()
        events[-1].synchronize()
        return statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(repeats))
    except Exception as e:  # noqa: BLE001 - report eager numbers regardless
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {e})")
        torch.cuda.synchronize()
        return None
    finally:
        graphs = None
        torch.cuda.empty_cache()


def make_step(fn, params, d_in, d_out, tokens, dtype, device, rotate):
    """(step, inputs): ``step(i)`` runs one forward + backward of ``fn`` on the i-th of ``rotate`` preallocated
    input / output-gradient sets."""
    L = tokens // BATCH
    xs = [torch.randn(BATCH, L, d_in, device=device, dtype=dtype).requires_grad_() for _ in range(rotate)]
    dys = [torch.randn(BATCH, L, d_out, device=device, dtype=dtype) for _ in range(rotate)]

    def step(i):
        x = xs[i % rotate]
        y = fn(x)
        torch.autograd.grad(y, [x] + params, dys[i % rotate])
    return step, xs


def interleaved_cpu_times(steps, warmup, repeats, clock=time.perf_counter):
    """Per step function, the milliseconds of each repeat, the functions taking turns repeat by repeat: a machine
    that slows down for a while (another tenant, clock changes) slows every case alike, so the ratios of one run
    hold even when its absolute times drift. ``clock``: wall time by default; ``time.thread_time`` with one torch
    thread counts only this thread's CPU time (what a shared machine's other tenants cannot add to)."""
    for step in steps:
        for i in range(warmup):
            step(i)
    times = [[] for _ in steps]
    for i in range(repeats):
        for k, step in enumerate(steps):
            t0 = clock()
            step(i)
            times[k].append((clock() - t0) * 1e3)
    return times


def sequential_times(step, device, warmup, repeats):
    """(ms per repeat, host ms per repeat or []) of one case timed alone, after its warm-up."""
    for i in range(warmup):
        step(i)
    _sync(device)
    times, cpu_times = [], []
    if device.type == "cuda":
        # Steps back to back, an event between each two: a layer inside a model runs while the CPU is already
        # queueing the next ones, so per-step launch latency is hidden but a CPU-bound step still shows.
        events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        events[0].record()
        for i in range(repeats):
            t0 = time.perf_counter()
            step(i)
            cpu_times.append((time.perf_counter() - t0) * 1e3)
            events[i + 1].record()
        events[-1].synchronize()
        times = [events[i].elapsed_time(events[i + 1]) for i in range(repeats)]
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return times, cpu_times


def measure(fn, params, frozen, step, xs, device, warmup, repeats, rotate, profile=None, graphs=True, times=None):
    """Time (unless ``times`` were taken already), peak memory and saved bytes of one case."""
    times, cpu_times = (times, []) if times else sequential_times(step, device, warmup, repeats)

    graph_ms = None
    if device.type == "cuda" and graphs:
        graph_ms = _graph_time(step, rotate, repeats)

    # Extra memory during one forward + backward beyond the inputs and weights (which exist before the step).
    peak = peak_bytes(lambda: step(0), device) / 2**20

    # Bytes held between forward and backward: the output and what autograd saves, minus caller-owned tensors.
    owned = {t.untyped_storage().data_ptr() for t in [xs[0]] + params + frozen}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(xs[0])
    saved.setdefault(y.untyped_storage().data_ptr(), y.untyped_storage().nbytes())
    del y
    res = dict(ms=statistics.median(times), ms_min=min(times), peak_mib=peak, saved_mib=sum(saved.values()) / 2**20,
               cpu_ms=statistics.median(cpu_times) if cpu_times else None, graph_ms=graph_ms)
    if profile is not None:  # per-kernel breakdown of a few steps, for finding where the time goes
        from torch.profiler import ProfilerActivity, profile as _profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with _profile(activities=acts) as prof:
            for i in range(3):
                step(i)
            _sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile.append(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
    return res


def backends_available(device):
    return ["torch", "triton"] if device.type == "cuda" else ["torch"]


def _measure_group(cases, args, d_in, d_out, tokens, dtype, device, warmup, repeats, rotate) -> dict:
    """{(name, backend): measurement} for cases built side by side; a case that fails reports its error."""
    built, results = [], {}
    for name, backend in cases:
        try:
            fn, params, frozen = make_case(name, backend, d_in, d_out, dtype, device)
            built.append((name, backend, fn, params, frozen, *make_step(fn, params, d_in, d_out, tokens, dtype,
                                                                         device, rotate)))
        except Exception as e:  # keep the sweep going; the table says what failed
            results[name, backend] = dict(ms=None, error=f"{type(e).__name__}: {e}"[:200])
    times = {}
    if device.type == "cpu" and len(built) > 1:
        try:
            times = dict(zip([b[:2] for b in built], interleaved_cpu_times([b[5] for b in built], warmup, repeats)))
        except Exception:  # a case fails: time them one after another, so the others still report
            times = {}
    for name, backend, fn, params, frozen, step, xs in built:
        try:
            prof = [] if args.profile else None
            results[name, backend] = measure(fn, params, frozen, step, xs, device, warmup, repeats, rotate, prof,
                                             times=times.get((name, backend)))
            if prof:
                with open(args.profile, "a") as f:
                    f.write(f"\n### {d_in}x{d_out} {tokens} {name} {backend}\n{prof[0]}\n")
        except Exception as e:  # keep the sweep going; the table says what failed
            results[name, backend] = dict(ms=None, error=f"{type(e).__name__}: {e}"[:200])
    return results


def run_layers(args, device, dtype):
    preset = PRESETS[args.preset]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else preset["shapes"]
    tokens_list = args.tokens or preset["tokens"]
    warmup, repeats = args.warmup or preset["warmup"], args.repeats or preset["repeats"]
    rotate = preset["rotate"]
    backends = args.backends or backends_available(device)
    rows = []
    for d_in, d_out in shapes:
        for tokens in tokens_list:
            cases = [(b, None) for b in BASELINES] + [(op, be) for op in args.op for be in backends]
            cases += [(o, be) for o in args.adapter for be in backends]
            results = {}
            # On CPU the cases are built together and take turns repeat by repeat (interleaved_cpu_times); on GPU
            # one at a time, so only one case's inputs occupy memory.
            for group in [cases] if device.type == "cpu" else [[c] for c in cases]:
                results.update(_measure_group(group, args, d_in, d_out, tokens, dtype, device, warmup, repeats,
                                              rotate))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            base_res = None
            for name, backend in cases:
                res = results[name, backend]
                if name == "base":
                    base_res = res
                row = dict(shape=f"{d_in}x{d_out}", d_in=d_in, d_out=d_out, tokens=tokens, case=name,
                           backend=backend or "-", **res)
                if res.get("ms") and base_res and base_res.get("ms"):
                    row["x_base"] = res["ms"] / base_res["ms"]
                    if res.get("graph_ms") and base_res.get("graph_ms"):
                        row["graph_x_base"] = res["graph_ms"] / base_res["graph_ms"]
                    if res.get("peak_mib") is not None and base_res.get("peak_mib"):
                        row["peak_x_base"] = res["peak_mib"] / base_res["peak_mib"]
                rows.append(row)
                print(_fmt_row(row), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------

E2E = {
    "gpu": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000, seq=2048, batch=4, warmup=3, steps=10),
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=1000, seq=128, batch=2, warmup=2, steps=5),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IA3_TARGETS, IA3_FF = ["k_proj", "v_proj", "down_proj"], ["down_proj"]


def _e2e_methods(device):
    """(label, backend or None, config factory or a reason it is skipped)."""
    from peft import IA3Config, LoraConfig

    methods = [("peft_lora", None, lambda: LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=ALL_LINEAR)),
               ("peft_ia3", None, lambda: IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF))]
    try:
        import hadapeft  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report and benchmark what exists
        why = f"import hadapeft failed: {type(e).__name__}: {e}"
        return methods + [("hadapeft", None, why)]
    for option, adapter_type in registered_options().items():
        # Gated LoRA on all linear layers like peft LoRA; the others on their model-family defaults.
        kw = dict(r=RANK, lora_alpha=ALPHA, target_modules=ALL_LINEAR) if adapter_type.name == "GATED_LORA" else {}
        for backend in backends_available(device):
            methods.append((f"hadapeft_{option}", backend,
                            lambda o=option, t=adapter_type, kw=kw: t.make_config(o, **kw)))
    return methods


def measure_steps(built, device, warmup, steps, tokens=None, peak=True):
    """Time the cases ``built`` = [(row, step, model, opt or None)] and write into each row ``step_ms`` (median),
    ``tokens_per_s`` (with ``tokens``) and ``peak_gib`` (``peak``: the most memory held during one step, the
    model's tensors and the optimizer state included). On CPU the cases take turns step by step
    (``interleaved_cpu_times``); on CUDA they run one after another, each alone on the device, and are dropped from
    ``built`` once measured. A case that fails gets an ``error`` and the others go on."""
    groups = [list(built)] if device.type == "cpu" else [[b] for b in built]
    if device.type == "cuda":
        built.clear()  # the groups hold the only references: a measured model is freed before the next is timed
    for group in groups:
        try:
            for row, step, model, opt in group:  # warm-up (compiles), then the whole step's peak memory
                for i in range(warmup):
                    step(i)
                if peak:
                    row["peak_gib"] = (peak_bytes(lambda: step(0), device) + _allocated(device, model, opt)) / 2**30
            if device.type == "cpu":
                times = interleaved_cpu_times([b[1] for b in group], 0, steps)
            else:
                times = [sequential_times(group[0][1], device, 0, steps)[0]]
            for (row, *_), t in zip(group, times):
                row["step_ms"] = statistics.median(t)
                row["steps_timed"] = len(t)
                if tokens:
                    row["tokens_per_s"] = tokens / row["step_ms"] * 1e3
        except Exception as e:  # noqa: BLE001 - keep going; the table says what failed
            for row, *_ in group:
                row.setdefault("error", f"{type(e).__name__}: {e}"[:300])
        if device.type == "cuda":
            group.clear()
            torch.cuda.empty_cache()


def run_e2e(args, device, dtype):
    """Every method's training step (eager, and compiled with ``--compile``) on one Llama-shaped model. On CPU the
    cases are built side by side and take turns step by step (``interleaved_cpu_times``); on GPU one at a time."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(E2E[args.preset])
    seq, batch, warmup, steps = (spec.pop(k) for k in ("seq", "batch", "warmup", "steps"))
    steps = args.repeats or steps
    cfg = LlamaConfig(max_position_embeddings=seq, tie_word_embeddings=False, **spec)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device) for _ in range(2)]
    modes = ("eager", "compiled") if args.compile else ("eager",)
    rows, built = [], []
    for label, backend, make in _e2e_methods(device):
        for mode in modes:
            row = dict(method=label, backend=backend or "-", mode=mode, tokens_per_step=batch * seq, model=spec)
            rows.append(row)
            if isinstance(make, str):
                row["skipped"] = make
                continue
            try:
                torch.manual_seed(0)
                model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
                config = make()
                model = get_peft_model(model, config, autocast_adapter_dtype=False)
                cond = conditioning_kwargs(config, batch, device) if hasattr(config, "conditioning_spec") else {}
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                forward = torch.compile(model) if mode == "compiled" else model
                row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                built.append((row, _e2e_step(forward, opt, batches, cond, backend), model, opt))
            except Exception as e:  # noqa: BLE001 - keep going; the table says what failed
                row["error"] = f"{type(e).__name__}: {e}"[:300]
    measure_steps(built, device, warmup, steps, tokens=batch * seq)
    for mode in modes:
        ref = next((r for r in rows if r["method"] == "peft_lora" and r["mode"] == mode and r.get("tokens_per_s")),
                   None)
        for r in rows:
            if r["mode"] == mode and ref and r.get("tokens_per_s"):
                r["speed_x_peft_lora"] = r["tokens_per_s"] / ref["tokens_per_s"]
                r["time_x_peft_lora"] = r["step_ms"] / ref["step_ms"]
                if r.get("peak_gib") and ref.get("peak_gib"):
                    r["peak_x_peft_lora"] = r["peak_gib"] / ref["peak_gib"]
    for r in rows:
        eager = next((e for e in rows if e["method"] == r["method"] and e["backend"] == r["backend"]
                      and e["mode"] == "eager" and e.get("step_ms")), None)
        if r["mode"] == "compiled" and eager and r.get("step_ms"):
            r["compiled_x_eager"] = r["step_ms"] / eager["step_ms"]
        print(f"e2e {r['method']:24s} {r['backend']:7s} {r['mode']:8s} " + json.dumps(
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
             if k in ("tokens_per_s", "step_ms", "peak_gib", "time_x_peft_lora", "peak_x_peft_lora",
                      "compiled_x_eager", "error", "skipped")}), flush=True)
    return rows


def _e2e_step(model, opt, batches, cond, backend):
    import contextlib

    import hadapeft

    def step(i):
        with hadapeft.use_backend(backend) if backend else contextlib.nullcontext():
            ids = batches[i % len(batches)]
            loss = model(input_ids=ids, labels=ids, **cond).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def _f(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def _fmt_row(r):
    if r.get("error"):
        return f"{r['shape']:>10s} {r['tokens']:6d} {r['case']:12s} {r['backend']:7s} ERROR {r['error']}"
    return (f"{r['shape']:>10s} {r['tokens']:6d} {r['case']:12s} {r['backend']:7s} {r['ms']:9.3f} ms "
            f"{_f(r.get('x_base'), '.3f')}x  peak {_f(r.get('peak_mib'), '.0f')} MiB  saved {r['saved_mib']:.1f} MiB"
            f"  cpu {_f(r.get('cpu_ms'), '.3f')} ms  graph {_f(r.get('graph_ms'), '.3f')} ms "
            f"{_f(r.get('graph_x_base'), '.3f')}x")


def environment(device):
    import peft
    import transformers

    env = dict(date=_dt.date.today().isoformat(), torch=torch.__version__, peft=peft.__version__,
               transformers=transformers.__version__, python=platform.python_version())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        # Other processes on a shared CPU skew timings; the 1-minute load average at the start says how much.
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    return env


def device_tag(name: str, device) -> str:
    """File-name tag of a device: h100, h200, a100, l40, a10, else gpu, or cpu."""
    if torch.device(device).type == "cpu":
        return "cpu"
    return next((t for t in ("h100", "h200", "a100", "l40", "a10") if t in name.lower()), "gpu")


def targets(rows):
    """The DESIGN.md targets, evaluated where the run has the data (4096x4096, 8192 tokens)."""
    out = []

    def get(case, backend, shape="4096x4096", tokens=8192):
        return next((r for r in rows if r["case"] == case and r["backend"] in (backend, "-")
                     and r["shape"] == shape and r["tokens"] == tokens and r.get("ms")), None)

    lora = get("peft_lora", "-")
    timings = [("ms", "x_base", "")] + ([("graph_ms", "graph_x_base", " (graph)")]
                                        if any(r.get("graph_ms") for r in rows) else [])
    for backend in ("triton", "torch"):
        g = get("gated_lora", backend)
        for ms, xb, tag in timings:
            if g and g.get(xb):
                out.append((f"gated_lora[{backend}] ≤ 1.20× base{tag}", g[xb], g[xb] <= 1.20))
                if lora and lora.get(ms):
                    out.append((f"gated_lora[{backend}] ≥ 1.25× faster than peft LoRA{tag}", lora[ms] / g[ms],
                                lora[ms] / g[ms] >= 1.25))
        if g and lora and g.get("peak_mib") is not None:
            out.append((f"gated_lora[{backend}] peak ≤ peft LoRA peak (ratio)", g["peak_mib"] / lora["peak_mib"],
                        g["peak_mib"] <= lora["peak_mib"]))
        for op in ("ia3", "ia3_ff", "film", "hypermod"):
            m = get(op, backend)
            if m:
                for _, xb, tag in timings:
                    if m.get(xb):
                        out.append((f"{op}[{backend}] ≤ 1.10× base{tag}", m[xb], m[xb] <= 1.10))
                if lora and m.get("peak_mib") is not None:
                    out.append((f"{op}[{backend}] peak ≤ peft LoRA peak (ratio)", m["peak_mib"] / lora["peak_mib"],
                                m["peak_mib"] <= lora["peak_mib"]))
    # CPU targets (torch path, every shape measured): gated LoRA ≤ 1.10× peft LoRA's time at equal rank, HadaIA3 ≤
    # peft IA3's time (out-scale against IA3 on the output, in-scale against IA3 as a feedforward module), and peak
    # memory ≤ peft's for each.
    for op, ref, limit in (("gated_lora", "peft_lora", 1.10), ("ia3", "peft_ia3", 1.0), ("ia3_ff", "peft_ia3_ff", 1.0)):
        for r in rows:
            if r["case"] != op or r["backend"] != "torch" or not r.get("ms") or r.get("device_type") != "cpu":
                continue
            q = next((q for q in rows if q["case"] == ref and q["shape"] == r["shape"] and q["tokens"] == r["tokens"]
                      and q.get("ms")), None)
            if q is None:
                continue
            where = f"cpu {op} {r['shape']} {r['tokens']}"
            out.append((f"{where} ≤ {limit:.2f}× {ref} time", r["ms"] / q["ms"], r["ms"] / q["ms"] <= limit))
            if r.get("peak_mib") is not None and q.get("peak_mib"):
                out.append((f"{where} peak ≤ {ref} peak (ratio)", r["peak_mib"] / q["peak_mib"],
                            r["peak_mib"] <= q["peak_mib"]))
    return out


def layer_markdown(env, rows, args):
    lines = [f"# hadapeft layer benchmark — {env['device']}", "",
             f"Date {env['date']}; torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, "
             f"transformers {env['transformers']}; dtype {args.dtype}"
             + (f"; load average at start {env['load_average_1min']}" if "load_average_1min" in env else "")
             + "; forward + backward (grad of x and of the "
             f"adapter parameters, base frozen); batch {BATCH} × tokens/{BATCH}; r = {RANK}. "
             "Median of repeats, rotating inputs (GPU: steps back to back, CUDA events between steps; CPU: the "
             "cases of a shape take turns repeat by repeat). `× base`: time over the frozen nn.Linear alone in the "
             "same run. `graph`: the same step replayed from CUDA graphs, i.e. GPU time without host launch "
             "overhead. `peak`: extra memory during one forward + backward (CUDA allocator peak on GPU, profiler "
             "allocation records on CPU); `saved`: output + tensors saved for backward (see scripts/bench.py); "
             "`CPU ms`: host time to issue one step (a step is CPU-bound when this reaches `ms`).", ""]
    for (shape, tokens) in dict.fromkeys((r["shape"], r["tokens"]) for r in rows):
        lines += [f"## {shape} (d_in x d_out), {tokens} tokens", "",
                  "| case | backend | ms | × base | graph ms | graph × base | peak MiB | peak × base | saved MiB "
                  "| CPU ms |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if (r["shape"], r["tokens"]) != (shape, tokens):
                continue
            if r.get("error"):
                lines.append(f"| {r['case']} | {r['backend']} | error: {r['error']} | | | | | | | |")
                continue
            lines.append(f"| {r['case']} | {r['backend']} | {r['ms']:.3f} | {_f(r.get('x_base'))} | "
                         f"{_f(r.get('graph_ms'))} | {_f(r.get('graph_x_base'))} | "
                         f"{_f(r.get('peak_mib'), '.0f')} | {_f(r.get('peak_x_base'), '.2f')} | {r['saved_mib']:.1f} | "
                         f"{_f(r.get('cpu_ms'))} |")
        lines.append("")
    checks = targets(rows)
    if checks:
        lines += ["## Targets (DESIGN.md)", "", "| target | measured | met |", "| --- | ---: | --- |"]
        lines += [f"| {name} | {value:.3f} | {'yes' if ok else 'NO'} |" for name, value, ok in checks]
        lines.append("")
    return "\n".join(lines)


def e2e_markdown(env, rows, args):
    spec = E2E[args.preset]
    steps = args.repeats or spec["steps"]
    lines = [f"# hadapeft end-to-end training benchmark — {env['device']}", "",
             f"Date {env['date']}; torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, "
             f"transformers {env['transformers']}; dtype {args.dtype}. Llama-shaped model with random weights: "
             f"hidden {spec['hidden_size']}, {spec['num_hidden_layers']} layers, intermediate "
             f"{spec['intermediate_size']}, vocab {spec['vocab_size']}; batch {spec['batch']} × seq {spec['seq']}; "
             f"AdamW; median of {steps} timed steps after {spec['warmup']} warm-up (CPU: all cases built side by "
             f"side, taking turns step by step). LoRA / gated LoRA on all linear layers (r = {RANK}); the other "
             "hadapeft adapters on their model-family defaults, conditioned ones on a mixed batch of tasks; peft "
             "IA3 on k, v, down (down as feedforward). `compiled`: `torch.compile(model)` (inductor). Peak: the most "
             "memory held during one training step, weights, gradients and optimizer state included (CUDA "
             "allocator; on CPU the live tensors plus the step's peak from the profiler's allocation records). "
             "Ratios against peft LoRA in the same mode.", "",
             f"Command: `python -m scripts.bench --e2e{' --compile' if args.compile else ''}"
             f"{f' --repeats {args.repeats}' if args.repeats else ''}`", "",
             "| method | backend | mode | tokens/s | time × peft LoRA | compiled × eager | step ms | peak GiB | "
             "peak × peft LoRA | trainable |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("skipped") or r.get("error"):
            lines.append(f"| {r['method']} | {r['backend']} | {r['mode']} | {r.get('skipped') or 'error: ' + r['error']} "
                         "| | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['backend']} | {r['mode']} | {r['tokens_per_s']:.0f} | "
                     f"{_f(r.get('time_x_peft_lora'))} | {_f(r.get('compiled_x_eager'))} | {r['step_ms']:.1f} | "
                     f"{_f(r.get('peak_gib'), '.3f')} | {_f(r.get('peak_x_peft_lora'))} | {r['trainable']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--op", nargs="+", default=list(HADAPEFT_OPS), choices=HADAPEFT_OPS, help="hadapeft ops to run")
    p.add_argument("--adapter", nargs="+", default=[], metavar="OPTION",
                   help="registered adapter option sets to time as layers ('all': every type's bench options)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, cpu otherwise")
    p.add_argument("--shapes", nargs="+", help="d_inxd_out, e.g. 4096x4096 (overrides the preset)")
    p.add_argument("--tokens", nargs="+", type=int, help="token counts (overrides the preset)")
    p.add_argument("--backends", nargs="+", choices=["torch", "triton"], help="hadapeft backends to run")
    p.add_argument("--dtype", default=None, help="default: the preset's (bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--e2e", action="store_true", help="end-to-end training throughput instead of single layers")
    p.add_argument("--compile", action="store_true", help="with --e2e: also torch.compile'd training steps")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--profile", metavar="FILE", help="append a torch.profiler kernel table per case to FILE")
    p.add_argument("--tag", default=None, help="file name device tag (default: h100, h200, a100, ... or cpu)")
    args = p.parse_args(argv)
    known = registered_options()
    args.adapter = list(known) if args.adapter == ["all"] else args.adapter
    unknown = sorted(set(args.adapter) - set(known))
    if unknown:
        p.error(f"--adapter {unknown}: not a benchmarked option set; choose from {sorted(known)} or 'all'")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    args.dtype = args.dtype or PRESETS[args.preset]["dtype"]
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    tag = args.tag or device_tag(env["device"], device)
    print(json.dumps(env), flush=True)

    if args.e2e:
        rows = run_e2e(args, device, dtype)
        md = e2e_markdown(env, rows, args)
        stem = f"{env['date']}-{tag}-e2e"
    else:
        rows = run_layers(args, device, dtype)
        for r in rows:
            r["device_type"] = device.type
        md = layer_markdown(env, rows, args)
        stem = f"{env['date']}-{tag}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(dict(env=env, args=vars(args), rows=rows), indent=1, default=str))
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
