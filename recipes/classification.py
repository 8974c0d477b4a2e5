"""What sequence and image classification share, on ``transformers.Trainer``: the label map from the data, one head
definition (the base model's auto class with a fresh ``num_labels``-way head, trained and saved with the adapter),
accuracy, and the trainer. ``seq_cls.py`` and ``image_cls.py`` add only their data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from transformers import Trainer, TrainingArguments

import hadapeft
from recipes import common

DEFAULT_ADAPTER = {"type": "gated_lora", "r": 8, "lora_alpha": 16}
FROM_PRETRAINED_KWARGS = {"ignore_mismatched_sizes": True}  # a pretrained head of another size is replaced


@dataclass
class ClassificationDataArguments(common.DataArguments):
    dataset: Optional[str] = field(default=None, metadata={
        "help": "A built-in offline data set instead of train_file (see the recipe)."})
    label_column: str = "label"
    labels: Optional[list[str]] = field(default=None, metadata={
        "help": "Label names in id order; default: the training data's distinct labels, sorted."})


def _natural(name: str):
    """Sort key that puts "2" before "10"."""
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def label_names(values: list, labels: Optional[list] = None) -> list[str]:
    """Label names in id order: ``labels`` if given, else the sorted distinct values."""
    return [str(v) for v in (labels or sorted({str(v) for v in values}, key=_natural))]


def label_ids(names: list[str], values: list, where: str) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise common.ConfigError(f"{where}: labels {unknown[:5]} are not among {names}")
    return [index[str(v)] for v in values]


def head_config(names: list[str]) -> dict:
    """The model config fields of a ``len(names)``-way head."""
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}}


def accuracy(eval_pred) -> dict:
    """``compute_metrics`` of the Trainer: the share of argmax predictions equal to the label."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def build_classifier(model_args: common.ModelArguments, args, auto_class: str, names: list[str],
                     overrides: Optional[dict] = None):
    """The base model with a fresh ``len(names)``-way head: (model, config overrides to rebuild it)."""
    return common.load_base_model(model_args, args, auto_class, {**head_config(names), **(overrides or {})},
                                  FROM_PRETRAINED_KWARGS)


class ClassificationTrainer(common.WholeBatchesMixin, hadapeft.ConditionedTrainerMixin, Trainer):
    """``transformers.Trainer`` with the recipes' batches (``common.WholeBatchesMixin``), told that the heads' loss is
    a mean over the process's samples; ``hadapeft.ConditionedTrainerMixin`` refuses an FSDP / DeepSpeed launch that
    accelerate would run as plain DDP (``hadapeft.check_engine``) and carries a task column for conditioned adapters.

    The classification models' ``forward`` takes ``**kwargs``, so the Trainer takes their loss for one normalized by
    ``num_items_in_batch`` (a sum over the global batch's tokens): it multiplies it by the number of processes and
    skips its division by ``gradient_accumulation_steps``. Their cross-entropy is a plain mean and ignores that count,
    so the gradients came out N (processes) x accumulation steps too large (measured: exactly 2x on 2 processes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # per-sample mean: DDP's average and the 1/accumulation are right


def build_trainer(model_args, adapter: Optional[dict], data_args, args, *, recipe: str, auto_class: str,
                  names: list[str], train: list[dict], held: list[dict], collator: Callable,
                  task_type: Optional[str] = None, adapter_defaults: Optional[dict] = None, processor=None,
                  overrides: Optional[dict] = None, trainer_cls=None):
    """(``transformers.Trainer``, RunInfo) training an adapter and a fresh head on encoded examples (dicts with
    ``labels``), evaluated with loss and accuracy."""
    if not held:
        args.eval_strategy = "no"
    block = common.adapter_block(adapter, DEFAULT_ADAPTER)
    common.check_conditioning(block, recipe)
    peft_config = common.adapter_config(block, task_type, adapter_defaults)
    model, overrides = build_classifier(model_args, args, auto_class, names, overrides)
    model = common.add_adapter(model, peft_config, args.seed)
    trainer = (trainer_cls or ClassificationTrainer)(
        model=model, args=args, train_dataset=train, eval_dataset=held or None, data_collator=collator,
        processing_class=processor, compute_metrics=accuracy)
    run = common.RunInfo(recipe, auto_class, model_args, block, data_args, overrides, FROM_PRETRAINED_KWARGS,
                         {"labels": names})
    return trainer, run


@dataclass
class ClassificationTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``trust_remote_code`` (which TRL's SFTConfig has, for the model and tokenizer)."""

    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


def parse(name: str, data_cls: type, argv=None) -> tuple:
    return common.parse(name, data_cls, ClassificationTrainingArguments, argv)
