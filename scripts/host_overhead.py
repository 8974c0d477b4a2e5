"""Host overhead per adapted layer: the Python / dispatcher time an adapter adds to each layer call, on tiny tensors.

    python -m scripts.host_overhead                   # every registered adapter's bench option sets vs peft
    python -m scripts.host_overhead --repeats 400 --layers 16

A stack of ``--layers`` × ``nn.Linear(64, 64)`` (so the arithmetic is negligible and the host path is what is timed)
runs forward + backward of a (4, 8, 64) batch, with one torch thread. Cases — the frozen stack alone, peft LoRA
(r = 16), peft IA3 (on the output and as a feedforward module) and each registered hadapeft option set
(``hadapeft.registry``: ``bench_options``; conditioned ones on a mixed batch through ``task_ids`` / ``task_embeds``
kwargs) — are built side by side and take turns repeat by repeat; each step is timed in thread CPU time
(``time.thread_time``, unaffected by other processes), and the median is taken. The overhead per layer is
``(case − frozen) / layers``; ratios are taken against peft LoRA's and peft IA3's overhead in the same run. Also
counted: aten ops dispatched per layer per step (profiler), and whether a forward calls ``aten::_local_scalar_dense``
(``.item()``: a device sync on CUDA).

Results go to ``benchmarks/results/<date>-<tag>-host.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from scripts.bench import conditioning_kwargs, environment, registered_options

D, BATCH, SEQ, RANK = 64, 4, 8, 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)


class Stack(nn.Module):
    """``layers.<i>.proj``: numbered layers of one module kind, as a transformer's (HyperMod's table sees both)."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer.proj(x)
        return x


def build_cases(layers: int) -> dict:
    """name -> (model, call kwargs)."""
    import hadapeft  # noqa: F401
    from peft import IA3Config, LoraConfig, get_peft_model

    targets = ["proj"]
    torch.manual_seed(0)
    cases = {"frozen": (Stack(layers).requires_grad_(False), {})}
    peft_configs = {"peft_lora": LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets),
                    "peft_ia3": IA3Config(target_modules=targets, feedforward_modules=[]),
                    "peft_ia3_ff": IA3Config(target_modules=targets, feedforward_modules=targets)}
    for option, adapter_type in registered_options().items():
        kw = {"r": RANK, "lora_alpha": 2 * RANK} if adapter_type.name == "GATED_LORA" else {}
        peft_configs[option] = adapter_type.make_config(option, target_modules=targets, init_weights=False,
                                                        backend="torch", **kw)
    for name, config in peft_configs.items():
        torch.manual_seed(0)
        model = get_peft_model(Stack(layers), config)
        kwargs = conditioning_kwargs(config, BATCH, torch.device("cpu")) if hasattr(config, "conditioning_spec") \
            else {}
        cases[name] = (model, kwargs)
    return cases


def make_step(model, kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(BATCH, SEQ, D, requires_grad=True)

    def step():
        y = model(x, **kwargs)
        torch.autograd.grad(y.sum(), [x, *params])
    return step


def aten_ops(step) -> tuple[int, bool]:
    """(aten ops dispatched in one step, whether one of them was _local_scalar_dense)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = [e.name for e in prof.events() if e.name.startswith("aten::")]
    return len(names), "aten::_local_scalar_dense" in names


def measure(layers: int, warmup: int, repeats: int) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = build_cases(layers)
        steps = {name: make_step(model, kw) for name, (model, kw) in cases.items()}
        for step in steps.values():
            for _ in range(warmup):
                step()
        times = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():  # cases take turns repeat by repeat
                t0 = time.thread_time()
                step()
                times[name].append((time.thread_time() - t0) * 1e6)
        ops = {name: aten_ops(step) for name, step in steps.items()}
    finally:
        torch.set_num_threads(threads)
    med = {name: statistics.median(t) for name, t in times.items()}
    per_layer = {name: (med[name] - med["frozen"]) / layers for name in med}
    rows = []
    for name in steps:
        baseline = "peft_ia3" if name == "ia3" else "peft_lora"
        rows.append(dict(case=name, step_us=med[name], overhead_us_per_layer=per_layer[name],
                         x_peft_lora=per_layer[name] / per_layer["peft_lora"] if name != "frozen" else None,
                         x_baseline=per_layer[name] / per_layer[baseline] if name != "frozen" else None,
                         baseline=baseline, aten_ops_per_layer=(ops[name][0] - ops["frozen"][0]) / layers,
                         item_in_step=ops[name][1]))
    return rows


def markdown(env, rows, args) -> str:
    lines = [f"# hadapeft host overhead per adapted layer — {env['device']}", "",
             f"Date {env['date']}; torch {env['torch']}, peft {env['peft']}; {args.layers} × Linear({D}, {D}), "
             f"forward + backward of a ({BATCH}, {SEQ}, {D}) batch, one torch thread, thread CPU time, median of "
             f"{args.repeats} interleaved repeats after {args.warmup} warm-up. Overhead per layer = (case − frozen) "
             f"/ layers. Baseline: peft IA3 for `ia3`, peft LoRA for the rest (targets: DESIGN.md / issue #19).",
             f"Command: `python -m scripts.host_overhead --layers {args.layers} --repeats {args.repeats}`", "",
             "| case | step µs | overhead µs/layer | × peft LoRA | × baseline | aten ops/layer | .item() |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        f = (lambda v: "–" if v is None else f"{v:.2f}")
        lines.append(f"| {r['case']} | {r['step_us']:.0f} | {r['overhead_us_per_layer']:.1f} | {f(r['x_peft_lora'])} "
                     f"| {f(r['x_baseline'])} ({r['baseline']}) | {r['aten_ops_per_layer']:.1f} | "
                     f"{'yes' if r['item_in_step'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args(argv)
    env = environment(torch.device("cpu"))
    rows = measure(args.layers, args.warmup, args.repeats)
    md = markdown(env, rows, args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date']}-{args.tag}-host"
    (out / f"{stem}.json").write_text(json.dumps(dict(env=env, args=vars(args), rows=rows), indent=1))
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
