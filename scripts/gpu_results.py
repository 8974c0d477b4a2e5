"""Every GPU result in one command, for the day a GPU is lent: about 8 minutes on one H100 / H200.

    python -m scripts.gpu_results              # run every step, write benchmarks/results/<date>-<gpu>.{md,json}
    python -m scripts.gpu_results --dry-run    # list the steps and check that what they run imports (CPU; CI)
    python -m scripts.gpu_results --only kernel-parity layer-bench

Steps, in priority order (each a subprocess with its own time limit inside a total ``--budget``, so a step that hangs
or fails leaves the others their time; a step that cannot start is reported as skipped, with the reason):

    cuda-tests     tests/test_gpu_adapters.py: every adapter option set on a bf16 base, Triton vs PyTorch backend
    kernel-parity  tests/test_kernels.py on CUDA: each op's forward and every gradient, fp32 / fp16 against fp64,
                   bf16 on real layer sizes, every adapter's kernels launched (counted), torch.compile through them
    layer-bench    python -m scripts.bench --preset gpu: one layer vs the frozen base, peft LoRA and peft IA3,
                   eager and replayed from CUDA graphs, peak memory (4096x4096 and 4096x11008, 8192 tokens)
    e2e-smollm2    python -m scripts.bench_llm: SmolLM2-135M-Instruct training step (tokens/s, peak memory) vs peft
                   LoRA, eager and compiled, both gate_grad options; greedy generate unmerged
    serving        python -m scripts.bench_serving --device cuda: SmolLM2, 1..64 tasks in a batch of 64

The summary (``<date>-<gpu>.md`` / ``.json``) holds each step's status, time and output tail, and the tables the
benchmark steps wrote next to it (``<date>-<gpu>-layers.*``, ``<date>-<gpu>-smollm2.*``, the serving files).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Step:
    name: str
    what: str
    args: list  # after `python`; "{gpu}" is replaced by the device tag
    timeout: int  # seconds, at most (the total budget may leave less)
    imports: tuple = ()  # modules the step runs: checked by --dry-run
    files: tuple = ()  # files the step needs
    optional: str | None = None  # a module whose absence makes the step a skip, not a failure
    env: dict = field(default_factory=dict)


PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
STEPS = [
    Step("cuda-tests", "every adapter option set on a bf16 base: Triton vs PyTorch backend, forward and gradients",
         PYTEST + ["tests/test_gpu_adapters.py"], 120, ("pytest", "hadapeft.kernels.gated_lora",
                                                        "hadapeft.kernels.modulate"), ("tests/test_gpu_adapters.py",),
         env={"HADAPEFT_AUTOTUNE": "0"}),
    Step("kernel-parity", "each op vs fp64: forward and every gradient in fp32 / fp16 / bf16, every adapter's kernel "
         "launches counted", PYTEST + ["tests/test_kernels.py"], 120, ("pytest", "triton"), ("tests/test_kernels.py",)),
    Step("layer-bench", "one layer vs frozen base, peft LoRA / IA3: eager and CUDA graphs, peak memory",
         ["-m", "scripts.bench", "--preset", "gpu", "--shapes", "4096x4096", "4096x11008", "--tokens", "8192",
          "--warmup", "5", "--repeats", "30", "--tag", "{gpu}-layers"], 150, ("scripts.bench",)),
    Step("e2e-smollm2", "SmolLM2-135M-Instruct training step vs peft LoRA (tokens/s, peak memory), eager and "
         "compiled; greedy generate unmerged", ["-m", "scripts.bench_llm", "--modes", "eager", "compiled", "--steps",
                                                "20", "--warmup", "3", "--gen-repeats", "10", "--tag", "{gpu}"],
         180, ("scripts.bench_llm", "recipes.models")),
    Step("serving", "many tasks in one batch: per-sample conditioning vs peft's mixed-adapter batches",
         ["-m", "scripts.bench_serving", "--device", "cuda", "--repeats", "5", "--tag", "{gpu}-serving"], 120,
         ("scripts.bench_serving", "recipes.models"), optional="scripts.bench_serving"),
]


def gpu_tag() -> tuple[str, str]:
    """(device name, file tag) of CUDA device 0."""
    import torch

    from scripts.bench import device_tag

    name = torch.cuda.get_device_name(0)
    return name, device_tag(name, "cuda")


def check(step: Step) -> tuple[str, list]:
    """("ok" | "skip" | "fail", notes): can the step start here? Imports what it runs (``--dry-run``)."""
    notes = []
    if step.optional and importlib.util.find_spec(step.optional) is None:
        return "skip", [f"{step.optional.replace('.', '/')}.py is not in this checkout: step skipped"]
    status = "ok"
    for path in step.files:
        if not (ROOT / path).is_file():
            status = "fail"
            notes.append(f"missing file {path}")
    for module in step.imports:
        try:
            importlib.import_module(module)
            notes.append(f"import {module}: ok")
        except Exception as e:  # noqa: BLE001 - report every broken import, not only the first
            status = "fail"
            notes.append(f"import {module}: {type(e).__name__}: {e}")
    return status, notes


def run_step(step: Step, tag: str, limit: int, log_dir: Path) -> dict:
    args = [a.replace("{gpu}", tag) for a in step.args]
    row = dict(step=step.name, what=step.what, command="python " + " ".join(args), limit_s=limit)
    status, notes = check(step)
    if status != "ok":
        return dict(row, status="skipped" if status == "skip" else "failed", notes=notes, seconds=0.0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **step.env)
    log = log_dir / f"{step.name}.log"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        out, code = proc.stdout + proc.stderr, proc.returncode
        status = "passed" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = f"timed out after {limit} s"
    log.write_text(out)
    tail = "\n".join(out.strip().splitlines()[-25:])
    return dict(row, status=status, seconds=round(time.perf_counter() - t0, 1), tail=tail, log=str(log))


def markdown(env: dict, rows: list, written: list) -> str:
    lines = [f"# hadapeft GPU results — {env['device']}", "",
             f"Date {env['date']}; torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, transformers "
             f"{env['transformers']}, CUDA {env.get('cuda')}. Command: `python -m scripts.gpu_results` "
             f"({sum(r['seconds'] for r in rows):.0f} s).", "",
             "| step | status | s | what |", "| --- | --- | ---: | --- |"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['what']} |" for r in rows]
    for r in rows:
        lines += ["", f"## {r['step']}: {r['status']}", "", f"`{r['command']}`", ""]
        if r.get("notes"):
            lines += [f"- {n}" for n in r["notes"]]
        if r.get("tail"):
            lines += ["```text", r["tail"], "```"]
    for path in written:  # the tables the benchmark steps wrote
        lines += ["", f"## {path.name}", "", path.read_text()]
    return "\n".join(lines) + "\n"


def dry_run(steps: list, budget: int) -> int:
    import torch

    cuda = torch.cuda.is_available()
    print(f"CUDA: {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available here'} "
          f"(a real run needs one; it writes benchmarks/results/<date>-<gpu>.md and .json)")
    failed = 0
    for k, step in enumerate(steps, 1):
        status, notes = check(step)
        failed += status == "fail"
        print(f"{k}. {step.name} [{ {'ok': 'would run', 'skip': 'would skip', 'fail': 'BROKEN'}[status] }, "
              f"≤ {step.timeout} s]: {step.what}")
        print(f"   python {' '.join(step.args)}")
        for note in notes:
            print(f"   {note}")
    print(f"time limits: {sum(s.timeout for s in steps)} s for the steps together, cut to --budget {budget} s")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the steps and check their imports; run nothing")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run only these steps")
    p.add_argument("--budget", type=int, default=480, help="seconds for all steps together")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    if args.dry_run:
        return dry_run(steps, args.budget)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: scripts.gpu_results needs a CUDA device (none here); "
                         "`python -m scripts.gpu_results --dry-run` lists what it would run")
    from scripts.bench import environment

    env = environment(torch.device("cuda"))
    _, tag = gpu_tag()
    out = Path(args.out_dir)
    log_dir = out / f"{env['date']}-{tag}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    start, rows = time.time(), []
    deadline = time.perf_counter() + args.budget
    for step in steps:
        left = int(deadline - time.perf_counter())
        if left < 20:
            rows.append(dict(step=step.name, what=step.what, command="python " + " ".join(step.args),
                             status=f"not run: the {args.budget} s budget was spent", seconds=0.0))
            continue
        rows.append(run_step(step, tag, min(step.timeout, left), log_dir))
        print(f"{step.name}: {rows[-1]['status']} ({rows[-1]['seconds']} s)", flush=True)
    written = sorted(f for f in out.glob(f"{env['date']}-{tag}-*.md") if f.stat().st_mtime >= start)
    stem = out / f"{env['date']}-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, steps=rows, tables=[f.name for f in written]),
                                                    indent=1))
    stem.with_suffix(".md").write_text(markdown(env, rows, written))
    print(f"wrote {stem}.md and .json")
    return 0 if all(r["status"] in ("passed", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
