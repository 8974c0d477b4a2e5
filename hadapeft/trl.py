"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for conditioned adapters: drop-in subclasses that carry a dataset's
``task_ids`` / ``task_embeds`` / ``task_description`` column to the model (see :mod:`hadapeft.trainer` for what TRL
alone does with it)::

    trainer = hadapeft.SFTTrainer(model, args=SFTConfig(...), train_dataset=ds_with_task_ids_column,
                                  peft_config=hadapeft.FiLMConfig(num_tasks=3))
    trainer = hadapeft.SFTTrainer(model, args=SFTConfig(...), train_dataset=ds_with_task_description_column,
                                  peft_config=hadapeft.FiLMConfig(task_embed_dim=384))  # all-MiniLM-L6-v2's width

Everything else is TRL's: formatting, chat templates, completion-only and assistant-only loss, truncation, packing,
the loop, checkpoints, logging. With an unconditioned adapter (or none) they behave exactly as TRL's classes.

Packing: a row has one conditioning, so the examples of each task are packed apart (every packed row holds one task;
its task column is put back after packing) — see :meth:`ConditionedTrainerMixin.pack_per_task`. TRL's 'bfd' packing
is padding-free (a batch flattened into one row); with conditioned adapters its rows are padded instead, with
position ids that keep the packed sequences apart (see :class:`hadapeft.trainer.ConditioningCollator`).
"""

from __future__ import annotations

import torch
import trl

from .seam.trainer import SeamSFTTrainer, check_trl_version
from .trainer import ConditionedTrainerMixin

check_trl_version(trl.__version__)


class KeepAdaptersFp32Mixin:
    """TRL's ``SFTTrainer`` and ``DPOTrainer`` (1.16) cast every trainable parameter of a quantized (QLoRA) model to
    bf16, the QLoRA paper's choice for LoRA's A and B. hadapeft's gates and scaling vectors start at 1, where bf16's
    spacing is 2^-8, so AdamW steps below ~2e-3 round away: on SmolLM2 with a 4-bit base, Gated LoRA's gate stayed at
    exactly 1 (and B at 0: it gets no gradient while the gate is 1) and the held-out loss did not move. So after
    TRL's setup, a hadapeft adapter's trainable parameters go back to fp32 (the optimizer is built later, in
    ``train()``); peft's own adapters are left as TRL makes them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        configs = getattr(self.model, "peft_config", None) or {}
        if any(type(c).__module__.startswith("hadapeft") for c in configs.values()):
            for p in self.model.parameters():
                if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
                    p.data = p.data.float()


class SFTTrainer(KeepAdaptersFp32Mixin, ConditionedTrainerMixin, SeamSFTTrainer, trl.SFTTrainer):
    """``trl.SFTTrainer`` whose conditioned adapters get each example's ``task_ids`` / ``task_embeds`` column (or
    ``task_description``, embedded by ``task_encoder``: see :class:`hadapeft.ConditionedTrainerMixin`)."""

    def prepare_dataset(self, dataset, packing, prepare):
        if not packing:
            return prepare(dataset, False)  # TRL's tokenization keeps the task column as is
        return self.pack_per_task(dataset, lambda part: prepare(part, True))


class DPOTrainer(KeepAdaptersFp32Mixin, ConditionedTrainerMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` whose conditioned adapters get each example's ``task_ids`` / ``task_embeds`` column; the
    chosen and rejected completions of an example share its task (policy and reference forward alike)."""

    pairs = True  # TRL's preference collator stacks all chosen rows, then all rejected rows
