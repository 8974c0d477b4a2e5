"""transformers' ``Trainer`` and TRL's trainers with the private hooks hadapeft needs mapped onto named methods.

``hadapeft.trainer`` / ``hadapeft.trl`` subclass these mixins and override only the public-named methods; which private
trainer method calls which is written here, once (the names are in :data:`hooks.PRIVATE_HOOKS`). Put a mixin before
the trainer class in the bases: it calls ``super()``.
"""

from __future__ import annotations

import warnings
from typing import Callable

from packaging.version import Version

# TRL versions the overrides below were checked against: lowest (inclusive), first untested minor (exclusive). Keep in
# sync with pyproject.toml's test extra.
SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))


def check_trl_version(version: str) -> None:
    """Warn (not raise: TRL's private methods change less often than its minor version) outside the tested range."""
    low, high = SUPPORTED_TRL
    if not low <= Version(version) < high:
        warnings.warn(f"hadapeft's TRL trainers were tested with trl >={low},<{high}, but trl {version} is installed: "
                      f"if a task column does not reach the model, install a tested version", stacklevel=3)


class SeamTrainer:
    """For ``transformers.Trainer`` and its subclasses (TRL's ``SFTTrainer`` and ``DPOTrainer`` included)."""

    def kept_columns(self) -> tuple[str, ...]:
        """Dataset columns to keep besides the trainer's own (``remove_unused_columns`` drops the others)."""
        return ()

    # Trainer keeps the columns in ``_signature_columns``: the base model's forward parameters for ``Trainer``, a fixed
    # list for TRL's trainers (which is why a ``task_ids`` column never reaches the model there).
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in self.kept_columns() if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]


class SeamSFTTrainer(SeamTrainer):
    """For ``trl.SFTTrainer``: its dataset preparation (formatting, tokenization, labels, truncation, packing)."""

    def prepare_dataset(self, dataset, packing: bool, prepare: Callable):
        """Prepare ``dataset`` for training; ``prepare(dataset, packing)`` is TRL's own preparation."""
        return prepare(dataset, packing)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        def prepare(part, part_packing):
            return super(SeamSFTTrainer, self)._prepare_dataset(part, processing_class, args, part_packing,
                                                                 formatting_func, dataset_name)

        return self.prepare_dataset(dataset, packing, prepare)

