"""The model card (README.md) of a hadapeft adapter folder: Hub metadata in YAML front matter and how to load it.

Written by every recipe next to its final adapter and again by ``scripts/push_to_hub.py`` with the repo id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from recipes.loading import AUTO_CLASS_FOR_TASK, read_training_info

PIPELINE_TAG = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification",
                "TOKEN_CLS": "token-classification", "image_cls": "image-classification"}
# Adapter fields worth a row in the card (the others are defaults nobody looks up).
SHOWN_FIELDS = ("r", "lora_alpha", "lora_dropout", "gate", "target_modules", "feedforward_modules",
                "fused_qkv_modules", "num_tasks", "task_embed_dim", "modules_to_save", "layers_to_transform")


def _is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and not Path(name).exists() and not name.startswith((".", "/")) and name.count("/") <= 1


def render_model_card(adapter_dir, repo_id: Optional[str] = None, base_model_id: Optional[str] = None) -> str:
    """README.md text for ``adapter_dir``. ``base_model_id``: the base's Hub id, when the adapter config names a local
    folder (the ``base_model`` metadata must be a Hub id; a local path is only mentioned in the text)."""
    import peft
    import torch
    import transformers
    from huggingface_hub import ModelCardData

    import hadapeft

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    info = read_training_info(adapter_dir)
    kind = str(cfg.get("peft_type", "")).lower()
    task = cfg.get("task_type")
    base = base_model_id or cfg.get("base_model_name_or_path")
    hub_base = base if _is_hub_id(base) else None
    auto_class = info.get("auto_class") or AUTO_CLASS_FOR_TASK.get(task or "", "AutoModel")
    shown = ("num_labels", "pad_token_id") if task == "SEQ_CLS" else ("num_labels",)
    overrides = {k: v for k, v in (info.get("model_config_overrides") or {}).items() if k in shown}
    name = repo_id or adapter_dir.resolve().name
    tags = ["hadapeft", kind, "peft"] + ([f"base_model:adapter:{hub_base}"] if hub_base else [])
    meta = ModelCardData(base_model=hub_base, library_name="peft", tags=tags,
                         pipeline_tag=PIPELINE_TAG.get(task or info.get("recipe", "")))

    conditioned = cfg.get("num_tasks") or cfg.get("task_embed_dim")
    load_args = "".join(f", {k}={v!r}" for k, v in overrides.items())
    lines = [
        "---", meta.to_yaml(), "---", "",
        f"# {name}", "",
        f"A **{kind}** adapter from [hadapeft](https://pypi.org/project/hadapeft/) (Hadamard-product adapters for "
        f"HuggingFace PEFT) on " + (f"[`{hub_base}`](https://huggingface.co/{hub_base})" if hub_base
                                     else f"the base model `{base}` (a local folder)") + ".",
        "",
        "## How to load", "",
        "```bash", "pip install hadapeft", "```", "",
        "```python",
        *(["import torch"] if conditioned else []),
        "import hadapeft  # registers hadapeft's adapter types with peft: needed before loading",
        "from peft import PeftModel",
        f"from transformers import {auto_class}", "",
        f"base = {auto_class}.from_pretrained({(hub_base or base)!r}{load_args})",
        f"model = PeftModel.from_pretrained(base, {(repo_id or str(adapter_dir))!r})",
    ]
    if conditioned:
        lines += ["", "# conditioned adapter: one task id per sample",
                  "out = model(**inputs, task_ids=torch.tensor([0, 1]))",
                  "merged = model.merge_and_unload(task_id=0)  # a plain transformers model for one task"]
    else:
        lines += ["merged = model.merge_and_unload()  # a plain transformers model, no adapter overhead"]
    lines += ["```", "", "## Adapter", "", "| field | value |", "| --- | --- |", f"| peft_type | `{kind}` |",
              f"| task_type | `{task}` |"]
    lines += [f"| {k} | `{_show(cfg[k])}` |" for k in SHOWN_FIELDS if cfg.get(k) not in (None, [], {})]
    tasks = (info.get("data_info") or {}).get("tasks")
    if tasks:
        lines += ["", "Task ids: " + ", ".join(f"`{i}` = {t}" for i, t in enumerate(tasks)) + "."]
    if info:
        train = info.get("config", {}).get("train", {})
        lines += ["", "## Training", "",
                  f"Trained with the hadapeft recipe `{info.get('recipe')}` for {info.get('steps')} optimizer steps "
                  f"(global batch {train.get('batch_size')}, lr {train.get('lr')}, {train.get('lr_scheduler')} "
                  f"schedule)."]
        labels = (info.get("data_info") or {}).get("labels")
        if labels:
            lines += ["", "Labels: " + ", ".join(f"`{i}` = {l}" for i, l in enumerate(labels)) + "."]
        if info.get("metrics"):
            lines += ["", "Final evaluation on the held-out data: "
                      + ", ".join(f"{k} = {v:.4f}" for k, v in info["metrics"].items()) + "."]
    lines += ["", "## Framework versions", "",
              f"- hadapeft {hadapeft.__version__}", f"- peft {peft.__version__}",
              f"- transformers {transformers.__version__}", f"- torch {torch.__version__}", ""]
    return "\n".join(lines)


def _show(value) -> str:
    if not isinstance(value, (list, set, tuple)):
        return str(value)
    names = sorted({str(v).rsplit(".", 1)[-1] for v in value})  # "all-linear" expands to full module paths
    return ", ".join(names)


def write_model_card(adapter_dir, repo_id: Optional[str] = None, base_model_id: Optional[str] = None,
                     path=None) -> Path:
    path = Path(path or Path(adapter_dir) / "README.md")
    path.write_text(render_model_card(adapter_dir, repo_id, base_model_id))
    return path
