"""HyperMod on a causal LM: which option makes it trail (issue #28, item 3). One seed, the validation split of
``llm-multitask`` (as many training articles as the held-out set has: ``_compare_llm.validation_problem``), the
``llm-cpu`` preset's budget, each variant trained and scored by the comparison's own code (``_compare_llm.run``)::

    nice -n 10 .venv/bin/python -m scripts._compare_ablation --out runs/ablation      # ~1-3 min per variant
    .venv/bin/python -m scripts._compare_ablation --variants base,kvd --steps 4 --articles 40,8   # a quick look

Prints a markdown table (validation exact match per task and mean, validation loss, trainable parameters, s/step)
and writes ``hypermod_ablation.json`` into ``--out``.

Measured (16 steps of 8 rows, 80 validation articles x 2 tasks; 2 cores shared with other jobs, so no s/step).
Seed 0, every variant:

| variant | targets | options | lr | exact (mean) | section | headline | val. loss | params |
|---|---|---|---|---|---|---|---|---|
| base (published row) | q, v | r=1, hidden 64 | 1e-2 | 0.612 | 0.275 | 0.950 | 0.672 | 186,208 |
| (docs/tuned_lrs_llm.json) | q, v | | 3e-3 | 0.463 | | | 0.881 | 186,208 |
| (docs/tuned_lrs_llm.json) | q, v | | 3e-2 | 0.000 | | | 10.52 | 186,208 |
| kvd | k, v, down | | 1e-2 | 0.562 | 0.163 | 0.963 | 0.510 | 311,040 |
| kvd-r4 | k, v, down | r=4 | 1e-2 | 0.525 | 0.113 | 0.938 | 0.644 | 1,022,400 |
| kvd-hidden256 | k, v, down | hidden 256 | 1e-2 | 0.000 | 0.000 | 0.000 | 11.99 (diverged) | 1,276,032 |
| kvd-lr3e-3 | k, v, down | | 3e-3 | **0.750** | 0.538 | 0.963 | **0.283** | 311,040 |
| all-lr3e-3 | all 7 linear | | 3e-3 | 0.512 | 0.075 | 0.950 | 0.723 | 1,010,048 |

The three leading variants on seeds 0, 1, 2 (``--variants base,kvd-lr3e-3,kvd --seed 1``, then ``--seed 2``):

| variant | exact per seed | exact (mean ± std) | section | headline | val. loss (mean ± std) |
|---|---|---|---|---|---|
| base: q, v at 1e-2 | 0.612, 0.450, 0.562 | 0.541 ± 0.083 | 0.175 | 0.908 | 0.959 ± 0.373 |
| kvd: k, v, down at 1e-2 | 0.562, 0.613, 0.606 | 0.594 ± 0.028 | 0.238 | 0.950 | 0.641 ± 0.156 |
| kvd-lr3e-3: k, v, down at 3e-3 | 0.750, 0.625, 0.656 | **0.677 ± 0.065** | 0.425 | 0.929 | **0.395 ± 0.101** |

HyperMod on HadaIA3's layers (k, v, down) at 3e-3 is the best on every seed (+0.14 exact on the mean, validation loss
0.96 -> 0.40), the section task gaining most (0.18 -> 0.43); all seven linear layers at 3e-3 are worse (0.512); a
larger rank or a wider hypernetwork at 1e-2 is worse (the wider one diverges: the output of a wider MLP moves faster
at the same rate), so on the LLM HyperMod was misplaced and rate-fragile rather than capacity-starved. Hence
HyperMod's default layers on Llama-like models are k, v, down (``hadapeft.core.targets.HYPERMOD``), and the causal-LM
tables re-tune its rate there (``scripts.compare --methods hypermod --tune ... --merge``). The three-seed rows:
``benchmarks/results/2026-12-07-cpu-hypermod-ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scripts import _compare_llm as llm
from scripts import compare

TARGETS = {"qv": ["q_proj", "v_proj"], "kvd": ["k_proj", "v_proj", "down_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# name: (targets, HyperModConfig options, learning rate). base: the published llm-multitask row's settings.
VARIANTS = {
    "base": ("qv", {}, 1e-2),
    "kvd": ("kvd", {}, 1e-2),
    "all": ("all", {}, 1e-2),
    "qv-lr3e-3": ("qv", {}, 3e-3),
    "kvd-lr3e-3": ("kvd", {}, 3e-3),
    "kvd-lr2e-2": ("kvd", {}, 2e-2),
    "kvd-r4": ("kvd", {"r": 4}, 1e-2),
    "kvd-hidden256": ("kvd", {"hidden_dim": 256}, 1e-2),
    "qv-r4": ("qv", {"r": 4}, 1e-2),
    "all-lr3e-3": ("all", {}, 3e-3),
}


def method(name: str) -> compare.Method:
    targets, options, _ = VARIANTS[name]

    def config(model_type, num_tasks):
        import hadapeft

        return hadapeft.HyperModConfig(target_modules=TARGETS[targets], num_tasks=num_tasks, **options)

    return compare.Method(f"hypermod-{name}", "hadapeft", "matrix", config, conditioned=True)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the llm-cpu preset's")
    p.add_argument("--articles", default=None, help="training,held-out articles (default: the llm-cpu preset's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/hypermod_ablation")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}")
    preset = compare.PRESETS["llm-cpu"]
    budget = preset.budgets["llm-multitask"]
    if args.steps:
        budget = compare.Budget(args.steps, budget.batch_size)
    train_n, test_n = map(int, args.articles.split(",")) if args.articles else \
        (preset.llm_train_articles, preset.llm_test_articles)
    import datasets
    import transformers

    from recipes.models import resolve_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    problem = llm.load_problem("llm-multitask", resolve_model(llm.MODEL), preset.llm_max_words, train_n, test_n)
    val = llm.validation_problem(problem)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        lr = VARIANTS[name][2]
        row = llm.run(val, method(name), args.seed, budget, {"matrix": lr}, "cpu", False)
        row.update(variant=name, targets=VARIANTS[name][0], options=VARIANTS[name][1], learning_rate=lr,
                   wall_s=time.perf_counter() - t0)
        row.pop("step_times", None)
        rows.append(row)
        print(f"{name:15s} exact {row['accuracy']:.3f} {row['task_accuracy']} loss {row['eval_loss']:.3f} "
              f"params {row['trainable_params']:,} {row['s_per_step']:.2f} s/step ({row['wall_s']:.0f} s)",
              flush=True)
        (out / "hypermod_ablation.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| variant | targets | options | lr | exact (mean) | section | headline | loss | params | s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t = r["task_accuracy"]
        print(f"| {r['variant']} | {r['targets']} | {r['options'] or '-'} | {r['learning_rate']:g} | "
              f"{r['accuracy']:.3f} | {t['section']:.3f} | {t['headline']:.3f} | {r['eval_loss']:.3f} | "
              f"{r['trainable_params']:,} | {r['s_per_step']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
