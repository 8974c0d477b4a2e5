"""Serving benchmark: a batch in which every request has its own task, at inference, against the base model and peft.

    python -m scripts.bench_serving                    # SmolLM2-135M-Instruct, batch 64, T = 1, 4, 16, 64 tasks
    python -m scripts.bench_serving --tasks 16 --repeats 5 --new-tokens 16
    python -m scripts.bench_serving --ci --out-dir /tmp/x   # tiny random Llama, T = 4: checks the table, not timings

Cases, each on its own copy of the model, in one process; the batch mixes T tasks (row i has task i mod T):

    base             the model without adapters (every ratio is taken against this, measured in the same run)
    peft_lora        peft LoRA r = 16 on q/v, one adapter per task, ``adapter_names=[...]`` per row (peft runs the
                     base layer once, then one sub-batch per distinct adapter)
    peft_ia3         peft IA3 per task, if peft serves a mixed batch of IA3 adapters (probed on a tiny model at the
                     start; the table says why not otherwise)
    film_ids, ia3_ids, hypermod_ids     hadapeft FiLM / multi-task HadaIA3 / HyperMod, one adapter, ``task_ids``
    film_embeds, hypermod_embeds        the same with ``task_embeds``: a random 384-wide vector per task (standing
                                        for a sentence embedding of the task's description)
    merged_<adapter>                    ``merge_and_unload(task_id=0)`` of the *_ids adapters: one task served at the
                                        base model's cost (the other way to serve)

hadapeft adapters come from the registry (``hadapeft.registry``: each type's option set, on its model-family default
targets), built with ``init_weights=False`` (peft LoRA with ``init_lora_weights=False``) so that none is the identity;
the table gives each case's largest logit difference from the base model as evidence.

Two measures per case: ``prefill`` (one forward of the prompts, the logits of the last position) and ``generate``
(greedy, exactly ``--new-tokens`` new tokens; the prefill included). Time is the CPU time of this thread
(``time.thread_time``) with ``--threads`` torch threads (default 1: then all the work runs on this thread, and other
processes of a shared machine cannot add to it); with ``--device cuda`` (``scripts.gpu_results``) wall time, each
step synchronized. The cases take turns repeat by repeat (``scripts.bench.interleaved_cpu_times``), medians over ``--repeats`` after a warm-up of each model.
Results: ``benchmarks/results/<date>-cpu-serving.{json,md,png}`` (the plot: time over the base model's against the
number of tasks in the batch, one line per method).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from scripts.bench import environment, interleaved_cpu_times

RANK, ALPHA, EMBED_DIM = 16, 32, 384
PEFT_TARGETS = ["q_proj", "v_proj"]
# method -> (registered adapter type, its option set, conditioning by "ids" or "embeds")
HADAPEFT = {
    "film_ids": ("FILM", "film_tasks", "ids"),
    "ia3_ids": ("HADA_IA3", "ia3_tasks", "ids"),
    "hypermod_ids": ("HYPERMOD", "hypermod_r1", "ids"),
    "film_embeds": ("FILM", "film_embeds", "embeds"),
    "hypermod_embeds": ("HYPERMOD", "hypermod_embeds", "embeds"),
}
PEFT = ("peft_lora", "peft_ia3")
MERGED = ("film_ids", "hypermod_ids", "ia3_ids")
PRESETS = {
    # the real model: 16 CPU minutes (measured; ~8.6 s per case: 25 cases x 3 repeats, 4 merged x 3, warm-ups, loading)
    "cpu": dict(model="smollm2-135m-instruct", batch=64, tasks=[1, 4, 16, 64], new_tokens=8, prompt_tokens=16,
                repeats=3),
    "ci": dict(model="tiny", batch=8, tasks=[4], new_tokens=2, prompt_tokens=6, repeats=1),
}
ACCEPT_TASKS, ACCEPT_RATIO = 16, 1.15  # issue #29: each conditioned adapter's generate <= 1.15x base at 16 tasks


# ------------------------------------------------------------------------------------------------------- the model
def tiny_llama():
    """A small random Llama (the --ci model and the peft probe), with no tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def model_loader(name: str, device="cpu") -> Callable:
    """A function returning a fresh copy of the model (the same weights each time) in eval mode, its weights frozen
    as peft leaves a base model. The base model must be frozen too, not only for fairness: with torch 2.13 on CPU,
    ``F.linear`` of a non-contiguous 3-D input with a weight that does not require grad takes a batched-matmul path
    that re-reads the weight per row -- transformers' prefill slices the last position before the lm_head
    (``logits_to_keep=1``), so a frozen SmolLM2 prefills a batch of 64 x 16 tokens in ~3.1 s instead of ~2.7 s."""
    if name == "tiny":
        return lambda: tiny_llama().requires_grad_(False).to(device)
    from recipes.models import load_causal_lm

    return lambda: load_causal_lm(name)[0].eval().requires_grad_(False).to(device)


def prompts(name: str, batch: int, length: int) -> dict:
    """``input_ids`` / ``attention_mask`` (batch, length): real BBC News chat prompts (held-out articles, the chat
    template's generation prompt at the end) cut to their last ``length`` tokens; random ids on the tiny model."""
    if name == "tiny":
        ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(1))
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=0)
    from recipes.data_llm import chat_rows, split_articles
    from recipes.models import load_causal_lm

    tok = load_causal_lm(name)[1]
    _, held_out = split_articles()
    articles = [held_out[i % len(held_out)] for i in range(batch)]
    rows = chat_rows(articles, (0,), max_words=24, instructions=False)
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows["prompt"]]
    enc = tok(texts, return_tensors="pt", padding=True)  # left-padded
    return dict(input_ids=enc.input_ids[:, -length:], attention_mask=enc.attention_mask[:, -length:],
                pad_token_id=tok.pad_token_id)


# ------------------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    method: str
    tasks: Optional[int]  # tasks in the batch; None: base and merged models
    model: torch.nn.Module
    kwargs: dict = field(default_factory=dict)  # per call: task_ids / task_embeds / adapter_names
    row: dict = field(default_factory=dict)


def conditioning(kind: str, tasks: int, batch: int) -> dict:
    """Row i of the batch gets task i mod ``tasks``: its id, or its (fixed, random) 384-wide description vector."""
    ids = torch.arange(batch) % tasks
    if kind == "ids":
        return {"task_ids": ids}
    bank = torch.randn(tasks, EMBED_DIM, generator=torch.Generator().manual_seed(2))
    return {"task_embeds": bank[ids]}


def hadapeft_model(load, method: str, num_tasks: int):
    from peft import get_peft_model

    from hadapeft import registry

    type_name, option, kind = HADAPEFT[method]
    size = dict(num_tasks=num_tasks) if kind == "ids" else dict(task_embed_dim=EMBED_DIM)
    config = registry.ADAPTER_TYPES[type_name].make_config(option, init_weights=False, **size)
    torch.manual_seed(0)
    return get_peft_model(load(), config).eval()


def peft_config(method: str):
    from peft import IA3Config, LoraConfig

    if method == "peft_lora":  # init_lora_weights=False: random B, not the identity
        return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS, init_lora_weights=False)
    return IA3Config(init_ia3_weights=False)  # peft's defaults for Llama: k, v, down (down as feedforward)


def peft_per_task_model(load, method: str, num_tasks: int):
    """One peft adapter per task, named task0, task1, ..."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load(), peft_config(method), adapter_name="task0")
    for k in range(1, num_tasks):
        model.add_adapter(f"task{k}", peft_config(method))
    return model.eval()


def peft_mixed_batch_problem(method: str) -> Optional[str]:
    """None when peft serves a batch whose rows use different adapters of this type (``adapter_names``), else what
    goes wrong, probed on a tiny model: two adapters, rows [a, b] against each adapter alone."""
    model = peft_per_task_model(tiny_llama, method, 2)
    x = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            mixed = model(input_ids=x, adapter_names=["task0", "task1"]).logits
        except Exception as e:  # noqa: BLE001 - the reason goes into the table
            return f"peft refuses adapter_names: {type(e).__name__}: {e}"[:200]
        model.set_adapter("task1")
        alone = model(input_ids=x).logits
    if not torch.allclose(mixed[1], alone[1], atol=1e-5):
        return "peft ignores adapter_names for this type (every row ran the active adapter)"
    return None


# ------------------------------------------------------------------------------------------------------- timing
def _synced(fn):
    """On CUDA a step ends when its kernels have run (wall-clock timing), not when the host has queued them."""
    def step(_=0):
        out = fn()
        if out.is_cuda:
            torch.cuda.synchronize()
        return out
    return step


def prefill_step(case: Case, batch: dict):
    def step():
        with torch.no_grad():
            return case.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                              **case.kwargs).logits
    return _synced(step)


def generate_step(case: Case, batch: dict, new_tokens: int):
    def step():
        return case.model.generate(**batch, **case.kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False)
    return _synced(step)


def time_cases(cases: list[Case], batch: dict, args) -> None:
    """A warm-up of each model (its first case, which also records its difference from the first case's model, the
    base), then the cases take turns repeat by repeat; fills each case's row with medians, ratios to the base and
    tokens/s."""
    steps = [(prefill_step(c, batch), generate_step(c, batch, args.new_tokens)) for c in cases]
    ref_logits = ref_tokens = None
    warm = set()
    for case, (prefill, generate) in zip(cases, steps):
        if id(case.model) in warm:
            continue
        warm.add(id(case.model))
        logits, tokens = prefill(), generate()
        if ref_logits is None:
            ref_logits, ref_tokens = logits, tokens
        case.row.update(max_logit_diff_vs_base=(logits - ref_logits).abs().max().item(),
                        new_tokens_differ_vs_base=(tokens != ref_tokens).float()[:, -args.new_tokens:].mean().item())
        print(f"  warm-up {case.method:16s} T={case.tasks}", flush=True)
    clock = time.perf_counter if args.device.startswith("cuda") else time.thread_time  # GPU: wall time, synced
    times = interleaved_cpu_times([s for pair in steps for s in pair], 0, args.repeats, clock=clock)
    rows, tokens = batch["input_ids"].shape
    for k, case in enumerate(cases):
        prefill_ms, generate_ms = statistics.median(times[2 * k]), statistics.median(times[2 * k + 1])
        case.row.update(prefill_ms=prefill_ms, generate_ms=generate_ms,
                        prefill_tokens_per_s=rows * tokens / prefill_ms * 1e3,
                        generate_tokens_per_s=rows * args.new_tokens / generate_ms * 1e3)
    base = cases[0].row
    for case in cases:
        case.row.update(prefill_x_base=case.row["prefill_ms"] / base["prefill_ms"],
                        generate_x_base=case.row["generate_ms"] / base["generate_ms"])


def run(args) -> dict:
    load = model_loader(args.model, args.device)
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v
             for k, v in prompts(args.model, args.batch, args.prompt_tokens).items()}
    num_tasks = max(args.tasks)
    print(f"building the cases (every adapter holds {num_tasks} tasks) ...", flush=True)
    base = Case("base", None, load())
    unsupported = {m: p for m in PEFT if (p := peft_mixed_batch_problem(m))}
    per_task = {m: peft_per_task_model(load, m, num_tasks) for m in PEFT if m not in unsupported}
    ours = {m: hadapeft_model(load, m, num_tasks) for m in HADAPEFT}
    cases = [base]
    for T in args.tasks:
        names = [f"task{i % T}" for i in range(args.batch)]
        cases += [Case(m, T, model, dict(adapter_names=names)) for m, model in per_task.items()]
        for m, model in ours.items():
            kwargs = {k: v.to(args.device) for k, v in conditioning(HADAPEFT[m][2], T, args.batch).items()}
            cases.append(Case(m, T, model, kwargs))
    time_cases(cases, batch, args)
    rows = [dict(method=c.method, tasks=c.tasks, **c.row) for c in cases]
    rows += [dict(method=m, tasks=T, skipped=why) for m, why in unsupported.items() for T in args.tasks]

    # Merged per-task serving: task 0 folded into the weights, a plain transformers model again.
    del per_task, cases
    merged = [Case("base", None, base.model)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="merging .* added a bias")
        for m in MERGED:
            with torch.no_grad():  # the merged model must compute what the adapter computes for task 0
                before = prefill_step(Case(m, 1, ours[m], {"task_ids": torch.zeros(args.batch, dtype=torch.long, device=args.device)}),
                                      batch)()
            model = ours.pop(m).merge_and_unload(task_id=0)
            case = Case(f"merged_{m}", None, model)
            case.row["max_logit_diff_vs_unmerged"] = (prefill_step(case, batch)() - before).abs().max().item()
            merged.append(case)
    ours.clear()
    time_cases(merged, batch, args)
    merged_rows = [dict(method=c.method, **c.row) for c in merged]
    return dict(rows=rows, merged_rows=merged_rows, unsupported=unsupported)


# ------------------------------------------------------------------------------------------------------- reporting
def _ratio(r, measure):
    if r.get("skipped"):
        return "n/a"
    return f"{r[f'{measure}_x_base']:.3f}× ({r[f'{measure}_tokens_per_s']:,.0f} tok/s)"


def acceptance(rows) -> list[tuple[str, float, bool]]:
    return [(f"{r['method']} generate ≤ {ACCEPT_RATIO:.2f}× base at {ACCEPT_TASKS} tasks", r["generate_x_base"],
             r["generate_x_base"] <= ACCEPT_RATIO)
            for r in rows if r["method"] in HADAPEFT and r["tasks"] == ACCEPT_TASKS and not r.get("skipped")]


def markdown(env, result, args) -> str:
    rows, merged = result["rows"], result["merged_rows"]
    base = rows[0]
    cmd = "python -m scripts.bench_serving" + (" --ci" if args.ci else "") + \
        (f" --device {args.device}" if args.device != "cpu" else "")
    lines = [f"# hadapeft serving benchmark — {env['device']}", "",
             f"Date {env['date']}; torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}; "
             f"load average at start {env.get('load_average_1min')}. Model `{args.model}` (fp32), batch "
             f"{args.batch} prompts of {args.prompt_tokens} tokens, greedy generate of {args.new_tokens} new tokens "
             f"(prefill included); T tasks mixed in the batch (row i has task i mod T); {args.threads} torch "
             f"thread(s); {'CPU time of the thread' if args.device == 'cpu' else 'wall time, synchronized'}, median of {args.repeats} repeats after a warm-up, the "
             "cases taking turns repeat by repeat; `× base`: time over the base model's in the same run "
             "(tokens/s in brackets: new tokens for generate, prompt tokens for prefill). "
             f"Adapters hold {max(args.tasks)} tasks, `init_weights=False`; peft LoRA r = {RANK} on q/v, one "
             "adapter per task through `adapter_names`; hadapeft adapters on their defaults for Llama (FiLM: q/v; "
             "HyperMod: k, v, down since 2026-12-07, q/v before; HadaIA3: k, v, down); `*_embeds`: a random "
             f"{EMBED_DIM}-wide vector per task.", "",
             f"Command: `{cmd}`. Base model: prefill {base['prefill_ms']:.0f} ms, generate "
             f"{base['generate_ms']:.0f} ms.", ""]
    tasks = args.tasks
    for measure, title in (("generate", f"Greedy generate of {args.new_tokens} tokens"), ("prefill", "Prefill")):
        lines += [f"## {title}: time × base", "", "| method | " + " | ".join(f"T = {T}" for T in tasks) + " |",
                  "| --- |" + " ---: |" * len(tasks)]
        for method in dict.fromkeys(r["method"] for r in rows if r["tasks"] is not None):
            by_t = {r["tasks"]: r for r in rows if r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(_ratio(by_t[T], measure) for T in tasks) + " |")
        lines.append("")
    for method, why in result["unsupported"].items():
        lines.append(f"`{method}`: not measured — {why} (peft {env['peft']}).")
    lines += ["", "Evidence that no adapter is the identity (at the warm-up, the first T): largest |logit − base "
              "logit| at the prefill, and the share of new tokens that differ from the base model's.", "",
              "| method | T | max logit diff | new tokens differ |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['tasks']} | {r['max_logit_diff_vs_base']:.3f} | "
              f"{r['new_tokens_differ_vs_base']:.2f} |" for r in rows
              if r["tasks"] is not None and "max_logit_diff_vs_base" in r]
    lines += ["", "## Merged per-task serving (`merge_and_unload(task_id=0)`)", "",
              "| model | prefill × base | generate × base | generate tok/s | max logit diff vs unmerged task 0 |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for r in merged:
        diff = r.get("max_logit_diff_vs_unmerged")
        lines.append(f"| {r['method']} | {r['prefill_x_base']:.3f} | {r['generate_x_base']:.3f} | "
                     f"{r['generate_tokens_per_s']:,.0f} | {'–' if diff is None else f'{diff:.1e}'} |")
    checks = acceptance(rows)
    if checks:
        lines += ["", "## Acceptance (issue #29)", "", "| target | measured | met |", "| --- | ---: | --- |"]
        lines += [f"| {name} | {value:.3f} | {'yes' if ok else 'NO'} |" for name, value, ok in checks]
    return "\n".join(lines) + "\n"


def plot(result, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    rows = [r for r in result["rows"] if r["tasks"] is not None and not r.get("skipped")]
    for ax, measure, title in zip(axes, ("generate", "prefill"),
                                  (f"greedy generate, {args.new_tokens} new tokens", "prefill (one forward)")):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["tasks"], r[f"{measure}_x_base"]) for r in rows if r["method"] == method)
            style = dict(linestyle="--", marker="s") if method.startswith("peft") else dict(marker="o")
            ax.plot(*zip(*pts), label=method, **style)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.axhline(ACCEPT_RATIO, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.tasks, [str(t) for t in args.tasks])
        ax.set_xlabel(f"tasks in a batch of {args.batch}")
        ax.set_title(title)
    axes[0].set_ylabel("time × base model")
    axes[0].legend(fontsize=8)
    where = "CPU" if args.device == "cpu" else args.device
    fig.suptitle(f"Serving a mixed-task batch: {args.model}, {where}, {args.threads} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ci", action="store_true", help="tiny random Llama, T = 4, one repeat (checks the table)")
    p.add_argument("--model", help="recipes.models alias or model folder (default: the preset's)")
    p.add_argument("--batch", type=int, help="prompts in the batch")
    p.add_argument("--tasks", type=int, nargs="+", help="numbers of tasks mixed in the batch")
    p.add_argument("--new-tokens", type=int, help="new tokens per generate")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (the last tokens of each chat prompt)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (medians)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (CPU time of this thread) or cuda (wall time, synchronized)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="file name tag (default: cpu-serving, or ci-serving with --ci)")
    args = p.parse_args(argv)
    for key, value in PRESETS["ci" if args.ci else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [T for T in args.tasks if not 1 <= T <= args.batch]
    if bad:
        p.error(f"--tasks {bad}: each must be between 1 and the batch ({args.batch})")

    import transformers

    import hadapeft  # noqa: F401  registers the adapter types

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    env = environment(torch.device(args.device))
    print(json.dumps(env), flush=True)
    t0 = time.perf_counter()
    result = run(args)
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{env['date']}-{args.tag or ('ci-serving' if args.ci else 'cpu-serving')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, args=vars(args), **result), indent=1))
    md = markdown(env, result, args)
    stem.with_suffix(".md").write_text(md)
    plot(result, args, stem.with_suffix(".png"))
    print(md)
    print(f"wrote {stem}.json, .md and .png ({env['wall_s']} s)")


if __name__ == "__main__":
    main()
