"""Per-layer statistics of a hadapeft adapter's gates and scales, as a table and as PNG plots.

    python -m scripts.inspect_adapter ADAPTER_DIR [--base-model X] [--out-dir DIR] [--top-k 5]

What is measured, per adapted layer (and per task for task-conditioned adapters), is the element-wise modulation the
adapter applies to the frozen weight, ``W' = W0 ∘ M + W_add`` (the same terms a merge folds in):

* Gated LoRA: M = γ, the gate per output feature (1: the frozen path only; 1 − γ is the share the low-rank branch
  gets, i.e. how far the gate *opens*); ``‖ΔW‖`` is the norm of the gated low-rank update (1 − γ) ∘ s·BA;
* HadaIA3: M = l, the scale per output feature (or per input feature for feed-forward modules);
* FiLM: M = γ_k, the scale per output feature for task k (and ``‖β‖``, its shift);
* HyperMod: M = Σ u_i v_iᵀ for task k, a full matrix; its row means are shown per output feature.

Writes to ``--out-dir`` (default ``ADAPTER_DIR/inspect``): ``gate_histograms.png`` (a histogram per layer),
``mean_per_layer.png`` (mean and spread per layer, a line per task), ``open_features.png`` (|1 − M| per feature
and layer: which features each gate opens) and ``stats.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # python scripts/inspect_adapter.py: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402



def quantity(kind: str) -> str:
    """What the adapter type reports per feature (declared with its registration in ``hadapeft.registry``)."""
    from hadapeft import registry

    adapter_type = registry.ADAPTER_TYPES.get(kind)
    return adapter_type.quantity if adapter_type else "modulation"


_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class LayerStats:
    module: str  # full module name
    label: str  # short name for plots: "3.q_proj"
    task: int | None  # task id for conditioned adapters
    side: str  # "out": one value per output feature, "in": per input feature, "layer": one scalar gate
    values: torch.Tensor  # (features,) the modulation per feature (1 = unchanged)
    extra: dict = field(default_factory=dict)  # ‖ΔW‖ (gated LoRA), ‖β‖ (FiLM/HyperMod)

    def summary(self, top_k: int) -> dict:
        v = self.values
        opened = (1 - v).abs()
        top = torch.topk(opened, min(top_k, v.numel()))
        return {"module": self.module, "task": self.task, "side": self.side, "features": v.numel(),
                "mean": v.mean().item(), "std": v.std().item() if v.numel() > 1 else 0.0,
                "min": v.min().item(), "max": v.max().item(),
                "open_frac": (opened > 0.01).float().mean().item(),
                "top_features": [[int(i), round(v[i].item(), 4)] for i in top.indices], **self.extra}


def short_label(module: str) -> str:
    m = _INDEX.search(f".{module}.")
    return f"{m.group(1)}.{module.rsplit('.', 1)[-1]}" if m else module.rsplit(".", 1)[-1]


def collect(model) -> tuple[str, list[LayerStats]]:
    """(peft type, stats per adapted layer and task) of the model's active adapter."""
    import hadapeft
    from hadapeft.core.layer import HadaLayer

    name = model.active_adapter
    cfg = model.peft_config[name]
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if getattr(cfg, "task_embed_dim", None):
        raise SystemExit("error: this adapter is conditioned on task_embeds (task_embed_dim); inspect a task-id "
                         "adapter, or call layer.merge_terms under hadapeft.conditioning(model, task_embeds=...)")
    tasks = list(range(cfg.num_tasks)) if getattr(cfg, "num_tasks", None) else [None]
    layers = [(k, m) for k, m in model.named_modules() if isinstance(m, HadaLayer) and m.owns(name)]
    if not layers:
        raise SystemExit(f"error: the adapter {name!r} ({kind}) has no hadapeft layers to inspect")
    stats = []
    with torch.no_grad():
        for task in tasks:
            for key, layer in layers:
                if task is None:
                    terms = layer.merge_terms(name)
                else:
                    with hadapeft.conditioning(model, task_ids=torch.tensor([task])):
                        terms = layer.merge_terms(name)
                stats.append(layer_stats(key, task, terms))
    return kind, stats


def layer_stats(key: str, task, terms) -> LayerStats:
    M = terms.M.float().cpu()
    if M.shape == (1, 1):
        side, values = "layer", M.flatten()
    elif M.shape[-1] == 1:
        side, values = "out", M[:, 0]
    elif M.shape[0] == 1:
        side, values = "in", M[0]
    else:
        side, values = "out", M.mean(dim=1)
    extra = {}
    if terms.W_add is not None:
        extra["delta_norm"] = terms.W_add.float().norm().item()
    if terms.b_add is not None:
        extra["shift_norm"] = terms.b_add.float().norm().item()
    return LayerStats(key.removeprefix("base_model.model."), short_label(key), task, side, values, extra)


def print_table(kind: str, stats: list[LayerStats], top_k: int) -> list[dict]:
    rows = [s.summary(top_k) for s in stats]
    extra = sorted({k for r in rows for k in ("delta_norm", "shift_norm") if k in r})
    head = ["layer", "task", "side", "n", "mean", "std", "min", "max", "open>1%"] + extra + [f"top-{top_k} open"]
    table = []
    for s, r in zip(stats, rows):
        top = " ".join(f"{i}:{v:.3f}" for i, v in r["top_features"])
        table.append([s.module, "-" if r["task"] is None else str(r["task"]), r["side"], str(r["features"]),
                      f"{r['mean']:.4f}", f"{r['std']:.4f}", f"{r['min']:.4f}", f"{r['max']:.4f}",
                      f"{100 * r['open_frac']:.1f}%"] + [f"{r[k]:.4f}" for k in extra] + [top])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    print(f"{kind.lower()}: {quantity(kind)} per feature (1 = unchanged), {len(stats)} rows")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return rows


def plot(kind: str, stats: list[LayerStats], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    quantity_label = quantity(kind)
    tasks = sorted({s.task for s in stats}, key=lambda t: -1 if t is None else t)
    modules = list(dict.fromkeys(s.module for s in stats))
    by = {(s.module, s.task): s for s in stats}
    labels = [by[(m, tasks[0])].label for m in modules]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    task_name = (lambda t: "" if t is None else f"task {t}")
    paths = []

    # 1. one histogram per layer (tasks overlaid)
    cols = min(6, len(modules))
    rows = math.ceil(len(modules) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), squeeze=False)
    for ax, m, label in zip(axes.flat, modules, labels):
        for j, t in enumerate(tasks):
            ax.hist(by[(m, t)].values.numpy(), bins=30, alpha=0.6, color=colors[j % len(colors)],
                    label=task_name(t) or None)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(modules):]:
        ax.axis("off")
    if tasks[0] is not None:
        axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{kind.lower()}: histogram of {quantity_label} per layer")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "gate_histograms.png", plt))

    # 2. mean per layer (± std), a line per task
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(modules)), 3.5))
    x = range(len(modules))
    for j, t in enumerate(tasks):
        mean = [by[(m, t)].values.mean().item() for m in modules]
        std = [by[(m, t)].values.std().item() if by[(m, t)].values.numel() > 1 else 0.0 for m in modules]
        ax.errorbar(x, mean, yerr=std, marker="o", ms=3, capsize=2, color=colors[j % len(colors)],
                    label=task_name(t) or None)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel(f"mean {quantity_label}")
    ax.set_title(f"{kind.lower()}: mean {quantity_label} per layer (± std; dashed: unchanged)")
    if tasks[0] is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "mean_per_layer.png", plt))

    # 3. which features open: |1 − M| per feature (columns) and layer (rows), one panel per task (up to 4)
    shown = tasks[:4]
    width = max(by[(m, t)].values.numel() for m in modules for t in shown)
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 0.3 * len(modules) * len(shown) + 1.5), squeeze=False)
    for ax, t in zip(axes[:, 0], shown):
        grid = torch.full((len(modules), width), float("nan"))
        for i, m in enumerate(modules):
            v = by[(m, t)].values
            grid[i, :v.numel()] = (1 - v).abs()
        im = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(modules)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_xlabel("feature", fontsize=8)
        ax.set_title(f"|1 − {quantity_label}| per feature {task_name(t)}".strip(), fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "open_features.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def inspect_adapter(adapter_dir: str, base_model: str | None = None, out_dir: str | None = None,
                    top_k: int = 5, plots: bool = True) -> dict:
    from recipes.loading import load_adapter_model

    model, _ = load_adapter_model(adapter_dir, base_model)
    kind, stats = collect(model)
    rows = print_table(kind, stats, top_k)
    out = Path(out_dir or Path(adapter_dir) / "inspect")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps({"peft_type": kind, "layers": rows}, indent=1))
    paths = plot(kind, stats, out) if plots else []
    print(f"wrote {', '.join(str(p) for p in paths + [out / 'stats.json'])}")
    return {"peft_type": kind, "layers": rows, "plots": [str(p) for p in paths]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.inspect_adapter", description=__doc__.split("\n")[0])
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--base-model", help="base model folder or Hub id (default: the adapter config's)")
    p.add_argument("--out-dir", help="where the PNGs and stats.json go (default: ADAPTER/inspect)")
    p.add_argument("--top-k", type=int, default=5, help="most opened features listed per layer")
    p.add_argument("--no-plots", action="store_true", help="print the table only")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    return inspect_adapter(a.adapter, a.base_model, a.out_dir, a.top_k, plots=not a.no_plots)


if __name__ == "__main__":
    main()
