"""Causal-LM supervised fine-tuning with a hadapeft adapter; the loss is on the responses only.

Data (JSONL/JSON/CSV or a Hub data set), one format per file, detected from the first row (``data.format: auto``):

* chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``, rendered
  with the tokenizer's chat template (or ``data.chat_template``); the loss covers every assistant turn, its
  end-of-turn tokens included;
* prompt/completion: ``{"prompt": ..., "completion": ...}``; the loss covers the completion and EOS;
* instruction (Alpaca): ``{"instruction": ..., "input": ..., "output": ...}`` rendered with ``data.prompt_template``;
* text: ``{"text": ...}``: plain language modelling, loss on every token.

    accelerate launch recipes/sft.py --config recipes/configs/sft_smoke.yaml
    accelerate launch recipes/sft.py --config recipes/configs/sft_llama_qlora.yaml   # 4-bit base (QLoRA)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file (accelerate launch recipes/sft.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recipes.common import ConfigError, Data, DataArgs, Recipe, main, pad_stack  # noqa: E402

IGNORE = -100  # label of positions without loss (prompts, padding)
ALPACA = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FORMATS = ("chat", "prompt_completion", "instruction", "text")


@dataclass
class SFTData(DataArgs):
    format: str = "auto"  # auto | chat | prompt_completion | instruction | text
    max_length: int = 512  # tokens per example (longer ones are cut on the right)
    chat_template: Optional[str] = None  # Jinja chat template for tokenizers without one (or to replace theirs)
    prompt_template: Optional[str] = None  # instruction format: str.format template over the row's fields;
    #                                        default: Alpaca (with an "### Input:" block when the row has an input)
    train_on_prompt: bool = False  # loss on every token, prompts included


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "instruction"
    if "text" in row:
        return "text"
    raise ConfigError(f"cannot tell the data format from the columns {sorted(row)}: expected messages, "
                      f"prompt+completion, instruction+output or text (or set data.format)")


def encode_chat(tok, messages: list[dict], max_length: int, train_on_prompt: bool = False) -> dict:
    """Token ids of the rendered conversation and labels that keep only the assistant turns.

    Each assistant turn spans the characters between the conversation rendered up to it with the generation prompt
    and the conversation rendered through it; tokens starting inside a span keep their label.
    """
    def render(msgs, generation_prompt):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ConfigError("the chat template does not render conversations prefix by prefix, so assistant turns "
                              "cannot be located; set data.chat_template to one that does")
        spans.append((len(before), len(through)))
    if not spans:
        raise ConfigError("a conversation has no assistant message to train on")
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = [t if train_on_prompt or any(s <= a < e for s, e in spans) else IGNORE
              for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return {"input_ids": enc["input_ids"], "labels": labels}


def encode_prompt_completion(tok, prompt: str, completion: str, max_length: int, train_on_prompt=False) -> dict:
    """Prompt and completion tokenized apart (no merge across the boundary); EOS ends the completion."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        c = c + [tok.eos_token_id]
    ids = (p + c)[:max_length]
    labels = (list(p) if train_on_prompt else [IGNORE] * len(p)) + c
    return {"input_ids": ids, "labels": labels[:max_length]}


class SFTRecipe(Recipe):
    """Causal-LM supervised fine-tuning (loss on responses only)."""

    name = "sft"
    task_type = "CAUSAL_LM"
    auto_class = "AutoModelForCausalLM"
    data_args = SFTData
    default_adapter = {"type": "gated_lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}

    def load_processor(self, cfg):
        tok = super().load_processor(cfg)
        if cfg.data.chat_template:
            tok.chat_template = cfg.data.chat_template
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        return tok

    def encode(self, row: dict, fmt: str, tok, d: SFTData) -> dict:
        if fmt == "chat":
            if not tok.chat_template:
                raise ConfigError("the tokenizer has no chat template: set data.chat_template")
            return encode_chat(tok, row["messages"], d.max_length, d.train_on_prompt)
        if fmt == "prompt_completion":
            return encode_prompt_completion(tok, row["prompt"], row["completion"], d.max_length, d.train_on_prompt)
        if fmt == "instruction":
            template = d.prompt_template or (ALPACA_INPUT if row.get("input") else ALPACA)
            try:
                prompt = template.format(**row)
            except KeyError as e:
                raise ConfigError(f"data.prompt_template uses {e}, which the row {sorted(row)} lacks") from None
            return encode_prompt_completion(tok, prompt, row["output"], d.max_length, d.train_on_prompt)
        ids = tok(row["text"], add_special_tokens=True, truncation=True, max_length=d.max_length)["input_ids"]
        return {"input_ids": ids, "labels": list(ids)}

    def encode_rows(self, rows: list[dict], tok, d: SFTData, where: str) -> list[dict]:
        if not rows:
            return []
        fmt = detect_format(rows[0]) if d.format == "auto" else d.format
        if fmt not in FORMATS:
            raise ConfigError(f"data.format={d.format!r} is not one of auto, {', '.join(FORMATS)}")
        out, empty = [], 0
        for n, row in enumerate(rows):
            try:
                ex = self.encode(row, fmt, tok, d)
            except KeyError as e:
                raise ConfigError(f"{where} row {n}: missing column {e} for the {fmt} format") from None
            if all(label == IGNORE for label in ex["labels"][1:]):
                empty += 1  # nothing left to learn after truncation
                continue
            out.append(ex)
        if empty:
            print(f"[{self.name}] {where}: skipped {empty} example(s) with no response tokens within "
                  f"max_length={d.max_length}", file=sys.stderr)
        return out

    def load_data(self, cfg, tok) -> Data:
        train, held = self.read_splits(cfg)
        return Data(self.encode_rows(train, tok, cfg.data, "train"), self.encode_rows(held, tok, cfg.data, "eval"))

    def model_overrides(self, cfg, data, tok) -> dict:
        over = {"pad_token_id": self.pad_id}
        if cfg.model.random_init:  # a model built here gets an embedding row for every token
            over["vocab_size"] = len(tok)
        return over

    def collate(self, examples: list[dict]) -> dict:
        ids = pad_stack([e["input_ids"] for e in examples], self.pad_id)
        mask = pad_stack([[1] * len(e["input_ids"]) for e in examples], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": pad_stack([e["labels"] for e in examples], IGNORE)}

    def token_losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token losses (B, T-1), zero where there is no label, and the mask of labelled positions (B, T-1)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="none")
        return loss.view(labels.shape), labels != IGNORE

    def loss(self, model, batch):
        losses, mask = self.token_losses(model, batch)
        return losses.sum(), mask.sum()

    def metrics(self, sums):
        loss = sums["loss_sum"] / max(sums["count"], 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


if __name__ == "__main__":
    main(SFTRecipe)
