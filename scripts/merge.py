"""Merge a hadapeft adapter into its base model and save a plain transformers model (``save_pretrained``).

    python -m scripts.merge ADAPTER_DIR --output-dir merged/                 # base from adapter_config.json
    python -m scripts.merge ADAPTER_DIR --output-dir merged/ --task-id 2     # one task of a FiLM/HyperMod adapter
    python -m scripts.merge ADAPTER_DIR --output-dir merged/ --base-model meta-llama/Llama-3.2-1B

The merged model loads with transformers alone (no peft, no hadapeft) and computes what the adapted model computes
(for task ``--task-id`` when the adapter is task-conditioned): the script checks that on a few deterministic inputs
before saving. The tokenizer / image processor saved with the adapter (or the base's) is saved alongside.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # python scripts/merge.py: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# Merged vs adapted logits, relative to the largest logit: fp32 differs by summation order only; half precision
# rounds the merged weights once.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def conditioning_of(model) -> dict:
    """{num_tasks: T} or {task_embed_dim: d} of the active adapter, {} when it is not task-conditioned."""
    cfg = model.peft_config[model.active_adapter]
    return {k: getattr(cfg, k) for k in ("num_tasks", "task_embed_dim") if getattr(cfg, k, None)}


def merge(adapter_dir: str, output_dir: str, base_model: str | None = None, task_id: int | None = None,
          dtype: str = "float32", check: bool = True) -> dict:
    import hadapeft
    from recipes.loading import dummy_inputs, load_adapter_model

    model, base = load_adapter_model(adapter_dir, base_model, dtype=getattr(torch, dtype))
    model.eval()
    cond = conditioning_of(model)
    merge_kwargs = {}
    if cond.get("task_embed_dim"):
        raise SystemExit(f"error: {adapter_dir} is conditioned on task_embeds (task_embed_dim="
                         f"{cond['task_embed_dim']}); this script merges task ids only (use "
                         f"merge_and_unload(task_embeds=...) in Python)")
    if cond.get("num_tasks"):
        if task_id is None:
            raise SystemExit(f"error: {adapter_dir} is a task-conditioned adapter (num_tasks={cond['num_tasks']}): "
                             f"pass --task-id K (0..{cond['num_tasks'] - 1}) to merge one task")
        if not 0 <= task_id < cond["num_tasks"]:
            raise SystemExit(f"error: --task-id {task_id} is outside 0..{cond['num_tasks'] - 1}")
        if "task_id" not in inspect.signature(model.base_model.merge_and_unload).parameters:
            raise SystemExit(f"error: this adapter type's merge_and_unload takes no task_id")
        merge_kwargs["task_id"] = task_id
    elif task_id is not None:
        raise SystemExit(f"error: --task-id given, but {adapter_dir} is not task-conditioned")

    inputs = dummy_inputs(model)
    reference = None
    if check:
        with torch.no_grad():
            if "task_id" in merge_kwargs:
                batch = next(iter(inputs.values())).shape[0]
                with hadapeft.conditioning(model, task_ids=torch.full((batch,), task_id)):
                    reference = model(**inputs).logits.float()
            else:
                reference = model(**inputs).logits.float()
    without_bias = {k.replace(".base_layer", "") for k, m in model.get_base_model().named_modules()
                    if isinstance(m, torch.nn.Linear) and m.bias is None}  # names as they are after unloading
    with warnings.catch_warnings():  # hadapeft warns that a merge added biases: declared below
        warnings.filterwarnings("ignore", message="merging .* added a bias")
        merged = model.merge_and_unload(safe_merge=True, **merge_kwargs)
    gained = sorted(k for k, m in merged.named_modules()
                    if k in without_bias and isinstance(m, torch.nn.Linear) and m.bias is not None)
    flags = declare_biases(merged, gained) if gained else []
    if flags:
        print(f"the merged shift needs biases on {len(gained)} layers: set {', '.join(f'{f}=True' for f in flags)} "
              f"in the config (zero biases where the adapter had none)")

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists and is not empty")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(str(staging), safe_serialization=True)
    result = {"base_model": base, "output_dir": output_dir, "task_id": task_id, "declared": flags}
    if check:
        # Compare what a user gets -- the saved folder loaded by transformers alone -- with the adapted model.
        reloaded = type(merged).from_pretrained(str(staging), dtype=getattr(torch, dtype)).eval()
        with torch.no_grad():
            diff = (reloaded(**inputs).logits.float() - reference).abs().max().item()
        result["max_abs_diff"] = diff
        tol = TOLERANCE[dtype] * max(reference.abs().max().item(), 1.0)
        print(f"merged model reloaded from disk vs adapted model, logits on {len(next(iter(inputs.values())))} "
              f"inputs: max |diff| {diff:.3g}")
        if diff > tol:
            shutil.rmtree(staging)
            raise SystemExit(f"error: the saved merged model differs from the adapted one by {diff:.3g} "
                             f"(> {tol:.3g}); nothing was saved")
    saved_processor = save_processor(adapter_dir, base, staging)
    if out.exists():
        out.rmdir()
    staging.rename(out)
    print(f"saved the merged model to {out}/ ({type(merged).__name__}"
          + (f", task {task_id}" if task_id is not None else "")
          + (f", with its {saved_processor}" if saved_processor else "") + ")")
    return result


# Config flags by which a model family declares biases on all the linear layers of a sub-block (Llama, and families
# built on its code): merging a shift (FiLM's β, HyperMod's) into a layer without a bias has to add one.
BIAS_FLAGS = {"attention_bias": ("self_attn", "attention"), "mlp_bias": ("mlp",)}


def declare_biases(model, gained: list[str]) -> list[str]:
    """Set the config flags that declare the biases a merge added, and give the other layers those flags cover a
    zero bias, so that ``from_pretrained`` rebuilds exactly this model. Returns the flags set."""
    config = model.config
    flags = set()
    for key in gained:
        parts = key.split(".")
        flag = next((f for f, blocks in BIAS_FLAGS.items()
                     if hasattr(config, f) and any(b in parts for b in blocks)), None)
        if flag is None:
            raise SystemExit(f"error: merging added a bias to {key}, which {type(model).__name__}'s config cannot "
                             f"declare (no {'/'.join(BIAS_FLAGS)} flag for it), so a saved model would lose it; "
                             f"use merge_and_unload() in Python and keep the state dict")
        flags.add(flag)
    for flag in sorted(flags):
        setattr(config, flag, True)
        for key, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and m.bias is None and any(b in key.split(".")
                                                                          for b in BIAS_FLAGS[flag]):
                m.bias = torch.nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                            requires_grad=False)
    return sorted(flags)


def save_processor(adapter_dir: str, base: str, out: Path) -> str | None:
    """Save the tokenizer or image processor of the adapter folder (else of the base) next to the merged model."""
    from transformers import AutoImageProcessor, AutoTokenizer

    for source in (adapter_dir, base):
        for cls, what in ((AutoTokenizer, "tokenizer"), (AutoImageProcessor, "image processor")):
            try:
                cls.from_pretrained(source).save_pretrained(str(out))
                return what
            except Exception:  # noqa: BLE001  (no such files there: try the next source)
                continue
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.merge", description=__doc__.split("\n")[0])
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output-dir", required=True, help="where the merged model is saved")
    p.add_argument("--base-model", help="base model folder or Hub id (default: the adapter config's)")
    p.add_argument("--task-id", type=int, help="task to merge, for task-conditioned adapters (FiLM, HyperMod, ...)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the base is loaded and merged in")
    p.add_argument("--no-check", action="store_true", help="skip comparing merged and adapted logits")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    return merge(a.adapter, a.output_dir, a.base_model, a.task_id, a.dtype, check=not a.no_check)


if __name__ == "__main__":
    main()
