"""Train conditioned adapters on transformers' ``Trainer`` and TRL's trainers from a dataset column.

A dataset gives each example its task as a ``task_ids`` column (an int), a ``task_embeds`` column (a list of
``task_embed_dim`` floats) or a ``task_description`` column (a sentence, embedded into ``task_embeds`` by a
:class:`hadapeft.DescriptionEncoder`). Getting it from the dataset into ``model(**batch)`` takes three things the
trainers lack:

* the column must survive ``remove_unused_columns`` (TRL keeps a fixed column list, not the model's signature);
* the collator must put it into the batch as a tensor (TRL's collators emit only the token columns);
* packed rows must hold one task each (a row has one conditioning), and TRL's packing drops every other column.

:class:`ConditionedTrainerMixin` does all three for any trainer class, and checks every row of the task column when
the trainer is built (a ``None``, a string id, a vector of the wrong width is named with its row, before the model is
touched); ``hadapeft.SFTTrainer`` and ``hadapeft.DPOTrainer`` (in ``hadapeft.trl``) are TRL's trainers with it.
:class:`ConditioningCollator` alone is the collator part, for a training loop of your own.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch

from .core.conditioning import CONDITIONING_KWARGS, STATE_ATTR
from .descriptions import DESCRIPTION_COLUMN, DescriptionEncoder, check_descriptions, encoder_for, record_encoder
from .distributed import check_engine
from .errors import ConditioningError
from .seam.hooks import attn_implementation
from .seam.trainer import SeamTrainer

# dtype of each conditioning column in the batch
_DTYPES = {"task_ids": torch.long, "task_embeds": torch.float32}
TASK_COLUMNS = (*CONDITIONING_KWARGS, DESCRIPTION_COLUMN)  # the dataset columns that say a row's task


def _specs(model, peft_config=None) -> list:
    specs = []
    state = getattr(model, STATE_ATTR, None)  # a model (or PeftModel) holding hadapeft adapters
    if state is not None:
        specs += state.needed().values()
    spec_of = getattr(peft_config, "conditioning_spec", None)  # hadapeft configs only
    if spec_of is not None and spec_of() is not None:
        specs.append(spec_of())
    return specs


def conditioning_columns(model, peft_config=None) -> tuple[str, ...]:
    """The conditioning columns (``task_ids`` and/or ``task_embeds``) that ``model``'s active conditioned adapters,
    or the adapter ``peft_config`` will add, take; () when none is conditioned."""
    specs = _specs(model, peft_config)
    takes = {"task_ids": any(s.num_tasks for s in specs), "task_embeds": any(s.task_embed_dim for s in specs)}
    return tuple(c for c in CONDITIONING_KWARGS if takes[c])


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)  # None for an IterableDataset of unknown features
    return list(names) if names is not None else list(next(iter(dataset)))


def _is_id(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_finite(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def conditioning_tensor(column: str, values: Sequence, num_tasks: Optional[int] = None,
                        task_embed_dim: Optional[int] = None, rows: Optional[Sequence] = None) -> torch.Tensor:
    """A task column's values as the batch tensor (``task_ids`` LongTensor[B], ``task_embeds`` FloatTensor[B, d]),
    after checking each value: a :class:`ConditioningError` names the column, the row (``rows[i]``, default
    ``row i``) and what was expected, instead of torch's own error from ``torch.tensor``."""
    def where(i):
        return rows[i] if rows is not None else f"row {i}"

    # tensors and numpy values (a dataset in torch / numpy format) as plain Python numbers and lists
    values = [v.tolist() if hasattr(v, "tolist") else v for v in values]
    if column == "task_ids":
        expected = f"an int in [0, {num_tasks - 1}] (num_tasks={num_tasks})" if num_tasks else "an int task id"
        for i, v in enumerate(values):
            if not _is_id(v) or (num_tasks and not 0 <= v < num_tasks):
                hint = (": task names must be mapped to ids first (the multitask recipe does it), or describe the "
                        "tasks in a task_description column with an adapter of task_embed_dim"
                        if isinstance(v, str) else "")
                raise ConditioningError(f"task_ids column, {where(i)}: {v!r}; expected {expected}{hint}")
        return torch.tensor(values, dtype=torch.long)
    try:  # the common case, fast (a column of 10,000 x 384 floats): one conversion, checked as a whole
        embeds = torch.tensor([list(v) for v in values], dtype=torch.float32)
        if embeds.dim() == 2 and (not task_embed_dim or embeds.shape[1] == task_embed_dim) and \
                bool(torch.isfinite(embeds).all()):
            return embeds
    except (TypeError, ValueError, RuntimeError):
        pass
    size = f"{task_embed_dim} " if task_embed_dim else ""
    expected = f"a list of {size}finite floats" + (f" (task_embed_dim={task_embed_dim})" if task_embed_dim else "")
    widths = {len(v) for v in values if isinstance(v, (list, tuple))}
    for i, v in enumerate(values):
        if not isinstance(v, (list, tuple)):
            got = repr(v)
        elif (task_embed_dim and len(v) != task_embed_dim) or (not task_embed_dim and len(widths) > 1):
            got = f"{len(v)} values"
        else:
            bad = [x for x in v if not _is_finite(x)]
            if not bad:
                continue
            got = f"{bad[0]!r}, which is not a finite number"
        raise ConditioningError(f"task_embeds column, {where(i)}: {got}; expected {expected}")
    raise ConditioningError(f"task_embeds column: expected {expected} per row")


@dataclasses.dataclass
class ConditioningCollator:
    """Wrap a data collator so that each example's ``task_ids`` (int) / ``task_embeds`` (list of floats) becomes a
    batch tensor: ``task_ids`` LongTensor[B], ``task_embeds`` FloatTensor[B, task_embed_dim]. The wrapped collator
    never sees these keys.

    ``columns``: the keys to carry; each must be in every example (None: whichever of the two the examples have).
    ``pairs``: the wrapped collator puts every example into the batch twice, all chosen rows then all rejected rows
    (TRL's preference collators), so each sample's conditioning is repeated in that order.
    ``encoder``: examples give ``task_embeds`` as a ``task_description`` string, embedded by this
    :class:`hadapeft.DescriptionEncoder` (each distinct description once per process).
    ``num_tasks`` / ``task_embed_dim``: what each value is checked against (None: not checked).

    A padding-free collator (TRL's, ``padding_free=True``) would flatten the batch into one row, and one row has one
    conditioning. It is switched to padded rows with ``position_ids`` that restart at each packed sequence and no
    ``attention_mask``: from those, transformers' sdpa / eager / flex attention masks the sequences of a row apart,
    as padding-free training does (flash attention needs the flattened row: ``ConditionedTrainerMixin`` refuses it).
    TRL's ``num_tokens`` metric then counts one row per batch (it reads the length of ``position_ids``).
    """

    collator: Callable
    columns: Optional[tuple[str, ...]] = None
    pairs: bool = False
    encoder: Optional[DescriptionEncoder] = None
    num_tasks: Optional[int] = None
    task_embed_dim: Optional[int] = None

    def __post_init__(self):
        self.padded_packed_rows = bool(getattr(self.collator, "padding_free", False))
        if self.padded_packed_rows:
            self.collator = dataclasses.replace(self.collator, padding_free=False, return_position_ids=True)

    def _source(self, column: str) -> str:
        """The example key a conditioning column is read from."""
        return DESCRIPTION_COLUMN if column == "task_embeds" and self.encoder is not None else column

    def __call__(self, examples: list[dict]) -> dict:
        columns = self.columns if self.columns is not None else [c for c in CONDITIONING_KWARGS if c in examples[0]]
        rows = [f"example {i} of the batch" for i in range(len(examples))]
        values = {}
        for column in columns:
            key = self._source(column)
            lacking = [ex for ex in examples if key not in ex]
            if lacking:
                raise ConditioningError(f"the model's conditioned adapters take {column!r} per sample, but an "
                                        f"example has no {key!r} column (its keys: {sorted(lacking[0])}); add "
                                        f"it to the dataset")
            if key == DESCRIPTION_COLUMN:
                values[column] = self.encoder(check_descriptions([ex[key] for ex in examples], key, rows))
            else:
                values[column] = conditioning_tensor(column, [ex[key] for ex in examples], self.num_tasks,
                                                     self.task_embed_dim, rows)
        batch = self.collator([{k: v for k, v in ex.items() if k not in TASK_COLUMNS} for ex in examples])
        if self.padded_packed_rows:
            batch.pop("attention_mask", None)  # with it, attention would cross the sequences packed into a row
        for column, value in values.items():
            batch[column] = torch.cat([value, value]) if self.pairs else value
        return batch


def _datasets(kwargs) -> dict:
    """{name: dataset} of a trainer's ``train_dataset`` and ``eval_dataset`` (which may be a dict of them)."""
    found = {"train_dataset": kwargs.get("train_dataset")}
    evals = kwargs.get("eval_dataset")
    found.update({f"eval_dataset[{k!r}]": v for k, v in evals.items()} if isinstance(evals, dict)
                 else {"eval_dataset": evals})
    return {k: v for k, v in found.items() if v is not None}


class ConditionedTrainerMixin(SeamTrainer):
    """Put before a ``transformers.Trainer`` class (TRL's included) in the bases: the model's conditioned adapters
    get each sample's ``task_ids`` / ``task_embeds`` from the dataset column of that name, in training, evaluation
    and prediction; an adapter with ``task_embed_dim`` also takes a ``task_description`` column (sentences), embedded
    by ``task_encoder`` (a :class:`hadapeft.DescriptionEncoder` or its name; default: the encoder the adapter recorded,
    else all-MiniLM-L6-v2), which is then recorded in the adapter's config. Which columns is read from the model (or
    from ``peft_config``, for trainers that build the PeftModel themselves); for an unconditioned adapter the trainer is
    unchanged (the columns are dropped as usual). The task column of ``train_dataset`` / ``eval_dataset`` is checked
    row by row before anything else happens. A launch that asked for FSDP or DeepSpeed but would run another engine
    is refused (``hadapeft.check_engine``).
    """

    pairs = False  # see ConditioningCollator.pairs: True for preference trainers

    def __init__(self, model=None, *args, task_encoder=None, **kwargs):
        # Before the trainer's __init__: TRL prepares the datasets in it (see hadapeft.trl.SFTTrainer), and a
        # trainer given peft_config adapts the model there.
        specs = _specs(model, kwargs.get("peft_config"))
        self.conditioning_columns = conditioning_columns(model, kwargs.get("peft_config"))
        self.num_tasks = min((s.num_tasks for s in specs if s.num_tasks), default=None)
        self.task_embed_dim = next((s.task_embed_dim for s in specs if s.task_embed_dim), None)
        self.task_encoder = self._check_task_columns(model, kwargs, task_encoder)
        super().__init__(model, *args, **kwargs)
        # An FSDP / DeepSpeed launch that accelerate turned into plain DDP (e.g. on CPU) stops here, saying why.
        check_engine(self.accelerator, self.args)
        if self.task_encoder is not None:
            record_encoder(self.model, self.task_encoder)  # saved in adapter_config.json
        if self.conditioning_columns:
            self.data_collator = ConditioningCollator(self.data_collator, self.conditioning_columns, self.pairs,
                                                      self.task_encoder, self.num_tasks, self.task_embed_dim)
            if self.data_collator.padded_packed_rows and "flash" in attn_implementation(self.model):
                raise ConditioningError(
                    f"padding-free batches (TRL's padding_free=True, or packing with a 'bfd' strategy) are run as "
                    f"padded rows with conditioned adapters (one row has one task), and "
                    f"{attn_implementation(self.model)} cannot keep the packed sequences of such rows apart: use "
                    f"attn_implementation='sdpa', or packing_strategy='wrapped', or no packing")

    def _check_task_columns(self, model, kwargs, task_encoder) -> Optional[DescriptionEncoder]:
        """Check every value of the datasets' task columns (map-style datasets; an iterable one is checked batch by
        batch by the collator); the description encoder when the data describes tasks in words (else None)."""
        columns = {name: _column_names(ds) if hasattr(ds, "column_names") else None
                   for name, ds in _datasets(kwargs).items()}
        described = any(DESCRIPTION_COLUMN in (c or ()) for c in columns.values())
        if not self.conditioning_columns:
            return None
        if "task_embeds" not in self.conditioning_columns and any(
                DESCRIPTION_COLUMN in c and "task_ids" not in c for c in columns.values() if c is not None):
            raise ConditioningError(f"the dataset describes tasks in a {DESCRIPTION_COLUMN!r} column, but the "
                                    f"adapter takes task_ids (num_tasks={self.num_tasks}): descriptions need an "
                                    f"adapter with task_embed_dim (e.g. task_embed_dim=384 for all-MiniLM-L6-v2), or "
                                    f"give a task_ids column")
        encoder = None
        if (described and "task_embeds" in self.conditioning_columns) or task_encoder is not None:
            encoder = encoder_for(kwargs["peft_config"] if kwargs.get("peft_config") is not None else model,
                                  task_encoder)
        for name, ds in _datasets(kwargs).items():
            names = columns[name]
            if names is None:
                continue
            if DESCRIPTION_COLUMN in names and "task_embeds" in names and "task_embeds" in self.conditioning_columns:
                raise ConditioningError(f"{name} has both a 'task_embeds' and a {DESCRIPTION_COLUMN!r} column: keep "
                                        f"one (descriptions are embedded into task_embeds)")
            for column in self.conditioning_columns:
                if column == "task_embeds" and DESCRIPTION_COLUMN in names:
                    check_descriptions(ds[DESCRIPTION_COLUMN], DESCRIPTION_COLUMN, _RowNames(name))
                elif column in names:
                    conditioning_tensor(column, ds[column], self.num_tasks, self.task_embed_dim,
                                        _RowNames(name))
        return encoder

    def kept_columns(self) -> tuple[str, ...]:
        if self.task_encoder is not None:
            return (*self.conditioning_columns, DESCRIPTION_COLUMN)
        return self.conditioning_columns

    def pack_per_task(self, dataset, pack: Callable):
        """``pack(part)`` for the examples of each task (each distinct conditioning) apart, concatenated: every packed
        row then holds one task, and gets its conditioning columns back (packing keeps only the token columns)."""
        columns = [c for c in self.kept_columns() if c in _column_names(dataset)]
        if not columns:
            return pack(dataset)
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            raise ConditioningError("packing with conditioned adapters packs each task apart, which needs a "
                                    "datasets.Dataset (not an IterableDataset); or set packing=False")
        rows = defaultdict(list)  # conditioning -> indices of its examples
        keys = zip(*([tuple(v) if isinstance(v, list) else v for v in dataset[c]] for c in columns))
        for i, key in enumerate(keys):
            rows[key].append(i)
        parts = []
        for key, indices in rows.items():
            part = pack(dataset.select(indices))
            for column, value in zip(columns, key):
                value = list(value) if isinstance(value, tuple) else value
                part = part.add_column(column, [value] * len(part))
            parts.append(part)
        return datasets.concatenate_datasets(parts)


class _RowNames:
    """``rows[i]`` for messages: ``'train_dataset row i'``."""

    def __init__(self, dataset: str):
        self.dataset = dataset

    def __getitem__(self, i: int) -> str:
        return f"{self.dataset} row {i}"
