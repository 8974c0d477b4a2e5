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


def install_lines(wheel: Optional[str], repo_id: Optional[str]) -> list[str]:
    """How to install hadapeft (it is not on PyPI): the wheel uploaded next to the adapter (``scripts/push_to_hub.py``),
    else the checkout this adapter was trained with."""
    if wheel and repo_id:
        return [f"pip install https://huggingface.co/{repo_id}/resolve/main/{wheel}",
                f"# or, in a download of this repository: pip install ./{wheel}"]
    if wheel:
        return [f"pip install ./{wheel}  # the wheel next to this README"]
    import hadapeft

    checkout = Path(hadapeft.__file__).resolve().parents[1]
    where = str(checkout) if (checkout / "pyproject.toml").is_file() else "path/to/hadapeft-checkout"
    return [f"pip install {where}  # hadapeft is not on PyPI: the checkout it was trained with "
            "(scripts/push_to_hub.py uploads a wheel)"]


def render_model_card(adapter_dir, repo_id: Optional[str] = None, base_model_id: Optional[str] = None,
                      wheel: Optional[str] = None, base_shipped: bool = False) -> str:
    """README.md text for ``adapter_dir``. ``base_model_id``: the base's Hub id, when the adapter config names a local
    folder (the ``base_model`` metadata must be a Hub id; a local path is only mentioned in the text). ``wheel``: the
    file name of a hadapeft wheel next to the adapter. ``base_shipped``: the (randomly built) base model travels in
    the ``base_model/`` sub-folder."""
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
    folder = repo_id or str(adapter_dir)
    if hub_base:
        about_base, fetch, base_src, adapter_src = f"[`{hub_base}`](https://huggingface.co/{hub_base})", [], \
            repr(hub_base), repr(folder)
    elif base_shipped or (adapter_dir / "base_model").is_dir():
        about_base = "a randomly initialised base model, shipped with it in `base_model/`"
        fetch = ([f"folder = snapshot_download({repo_id!r})  # the adapter and its base_model/"] if repo_id
                 else [f"folder = {str(adapter_dir)!r}"])
        base_src, adapter_src = 'f"{folder}/base_model"', "folder"
    else:
        about_base = f"the base model `{base}` (a local folder: name its Hub id with scripts/push_to_hub.py " \
                     f"--base-model-id)"
        fetch, base_src, adapter_src = [], repr(base), repr(folder)
    lines = [
        "---", meta.to_yaml(), "---", "",
        f"# {name}", "",
        f"A **{kind}** adapter from hadapeft (Hadamard-product adapters for HuggingFace PEFT, installed as shown "
        f"below) on {about_base}.",
        "",
        "## How to load", "",
        "```bash", *install_lines(wheel, repo_id), "```", "",
        "```python",
        *(["import torch"] if conditioned else []),
        "import hadapeft  # registers hadapeft's adapter types with peft: needed before loading",
        *(["from huggingface_hub import snapshot_download"] if fetch and repo_id else []),
        "from peft import PeftModel",
        f"from transformers import {auto_class}", "",
        *fetch,
        f"base = {auto_class}.from_pretrained({base_src}{load_args})",
        f"model = PeftModel.from_pretrained(base, {adapter_src})",
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
                  f"(global batch {info.get('global_batch')}, learning rate {train.get('learning_rate')}, "
                  f"{train.get('lr_scheduler_type')} schedule)."]
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
                     path=None, wheel: Optional[str] = None, base_shipped: bool = False) -> Path:
    path = Path(path or Path(adapter_dir) / "README.md")
    path.write_text(render_model_card(adapter_dir, repo_id, base_model_id, wheel, base_shipped))
    return path
