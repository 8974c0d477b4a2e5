"""Train conditioned adapters on transformers' ``Trainer`` and TRL's trainers from a dataset column.

A dataset gives each example its task as a ``task_ids`` column (an int) or a ``task_embeds`` column (a list of
``task_embed_dim`` floats). Getting it from the dataset into ``model(**batch)`` takes three things the trainers lack:

* the column must survive ``remove_unused_columns`` (TRL keeps a fixed column list, not the model's signature);
* the collator must put it into the batch as a tensor (TRL's collators emit only the token columns);
* packed rows must hold one task each (a row has one conditioning), and TRL's packing drops every other column.

:class:`ConditionedTrainerMixin` does all three for any trainer class; ``hadapeft.SFTTrainer`` and
``hadapeft.DPOTrainer`` (in ``hadapeft.trl``) are TRL's trainers with it. :class:`ConditioningCollator` alone is the
collator part, for a training loop of your own.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Optional

import torch

from .core.conditioning import CONDITIONING_KWARGS, STATE_ATTR
from .distributed import check_engine
from .errors import ConditioningError
from .seam.hooks import attn_implementation
from .seam.trainer import SeamTrainer

# dtype of each conditioning column in the batch
_DTYPES = {"task_ids": torch.long, "task_embeds": torch.float32}


def conditioning_columns(model, peft_config=None) -> tuple[str, ...]:
    """The conditioning columns (``task_ids`` and/or ``task_embeds``) that ``model``'s active conditioned adapters,
    or the adapter ``peft_config`` will add, take; () when none is conditioned."""
    specs = []
    state = getattr(model, STATE_ATTR, None)  # a model (or PeftModel) holding hadapeft adapters
    if state is not None:
        specs += state.needed().values()
    spec_of = getattr(peft_config, "conditioning_spec", None)  # hadapeft configs only
    if spec_of is not None and spec_of() is not None:
        specs.append(spec_of())
    takes = {"task_ids": any(s.num_tasks for s in specs), "task_embeds": any(s.task_embed_dim for s in specs)}
    return tuple(c for c in CONDITIONING_KWARGS if takes[c])


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)  # None for an IterableDataset of unknown features
    return list(names) if names is not None else list(next(iter(dataset)))


@dataclasses.dataclass
class ConditioningCollator:
    """Wrap a data collator so that each example's ``task_ids`` (int) / ``task_embeds`` (list of floats) becomes a
    batch tensor: ``task_ids`` LongTensor[B], ``task_embeds`` FloatTensor[B, task_embed_dim]. The wrapped collator
    never sees these keys.

    ``columns``: the keys to carry; each must be in every example (None: whichever of the two the examples have).
    ``pairs``: the wrapped collator puts every example into the batch twice, all chosen rows then all rejected rows
    (TRL's preference collators), so each sample's conditioning is repeated in that order.

    A padding-free collator (TRL's, ``padding_free=True``) would flatten the batch into one row, and one row has one
    conditioning. It is switched to padded rows with ``position_ids`` that restart at each packed sequence and no
    ``attention_mask``: from those, transformers' sdpa / eager / flex attention masks the sequences of a row apart,
    as padding-free training does (flash attention needs the flattened row: ``ConditionedTrainerMixin`` refuses it).
    TRL's ``num_tokens`` metric then counts one row per batch (it reads the length of ``position_ids``).
    """

    collator: Callable
    columns: Optional[tuple[str, ...]] = None
    pairs: bool = False

    def __post_init__(self):
        self.padded_packed_rows = bool(getattr(self.collator, "padding_free", False))
        if self.padded_packed_rows:
            self.collator = dataclasses.replace(self.collator, padding_free=False, return_position_ids=True)

    def __call__(self, examples: list[dict]) -> dict:
        columns = self.columns if self.columns is not None else [c for c in CONDITIONING_KWARGS if c in examples[0]]
        for column in columns:
            lacking = [ex for ex in examples if column not in ex]
            if lacking:
                raise ConditioningError(f"the model's conditioned adapters take {column!r} per sample, but an "
                                        f"example has no {column!r} column (its keys: {sorted(lacking[0])}); add "
                                        f"it to the dataset")
        values = {c: torch.tensor([ex[c] for ex in examples], dtype=_DTYPES[c]) for c in columns}
        batch = self.collator([{k: v for k, v in ex.items() if k not in CONDITIONING_KWARGS} for ex in examples])
        if self.padded_packed_rows:
            batch.pop("attention_mask", None)  # with it, attention would cross the sequences packed into a row
        for column, value in values.items():
            batch[column] = torch.cat([value, value]) if self.pairs else value
        return batch


class ConditionedTrainerMixin(SeamTrainer):
    """Put before a ``transformers.Trainer`` class (TRL's included) in the bases: the model's conditioned adapters
    get each sample's ``task_ids`` / ``task_embeds`` from the dataset column of that name, in training, evaluation
    and prediction. Which columns is read from the model (or from ``peft_config``, for trainers that build the
    PeftModel themselves); for an unconditioned adapter the trainer is unchanged (the columns are dropped as usual).
    A launch that asked for FSDP or DeepSpeed but would run another engine is refused (``hadapeft.check_engine``).
    """

    pairs = False  # see ConditioningCollator.pairs: True for preference trainers

    def __init__(self, model=None, *args, **kwargs):
        # Before the trainer's __init__: TRL prepares the datasets in it (see hadapeft.trl.SFTTrainer).
        self.conditioning_columns = conditioning_columns(model, kwargs.get("peft_config"))
        super().__init__(model, *args, **kwargs)
        # An FSDP / DeepSpeed launch that accelerate turned into plain DDP (e.g. on CPU) stops here, saying why.
        check_engine(self.accelerator, self.args)
        if self.conditioning_columns:
            self.data_collator = ConditioningCollator(self.data_collator, self.conditioning_columns, self.pairs)
            if self.data_collator.padded_packed_rows and "flash" in attn_implementation(self.model):
                raise ConditioningError(
                    f"padding-free batches (TRL's padding_free=True, or packing with a 'bfd' strategy) are run as "
                    f"padded rows with conditioned adapters (one row has one task), and "
                    f"{attn_implementation(self.model)} cannot keep the packed sequences of such rows apart: use "
                    f"attn_implementation='sdpa', or packing_strategy='wrapped', or no packing")

    def kept_columns(self) -> tuple[str, ...]:
        return self.conditioning_columns

    def pack_per_task(self, dataset, pack: Callable):
        """``pack(part)`` for the examples of each task (each distinct conditioning) apart, concatenated: every packed
        row then holds one task, and gets its conditioning columns back (packing keeps only the token columns)."""
        columns = [c for c in self.conditioning_columns if c in _column_names(dataset)]
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
