"""transformers' ``Trainer`` and TRL's trainers with the private hooks hadapeft needs mapped onto named methods.

``hadapeft.trainer`` / ``hadapeft.trl`` subclass these mixins and override only the public-named methods; which private
trainer method calls which is written here, once (the names are in :data:`hooks.PRIVATE_HOOKS`). Put a mixin before
the trainer class in the bases: it calls ``super()``.
"""

from __future__ import annotations

from typing import Callable


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

