"""Causal-LM supervised fine-tuning with a hadapeft adapter on ``hadapeft.SFTTrainer`` (TRL's, with conditioning).

Data (JSONL/JSON/CSV or a Hub data set), one format per file, as TRL reads it:

* chat: ``{"messages": [{"role": ..., "content": ...}, ...]}``: loss on the assistant turns (TRL's
  ``assistant_only_loss``, on by default here; the chat template needs ``{% generation %}`` markers, or one TRL can
  patch; ``chat_template`` sets one inline);
* prompt/completion: ``{"prompt": ..., "completion": ...}``: loss on the completion and EOS (``completion_only_loss``);
* instruction (Alpaca): ``{"instruction": ..., "input": ..., "output": ...}``, turned into prompt/completion with
  ``prompt_template``;
* text: ``{"text": ...}``: plain language modelling.

Any other ``SFTConfig`` field works as a flag or YAML key (``max_length``, ``packing``, ...)::

    .venv/bin/accelerate launch -m recipes.sft --config recipes/configs/sft_smoke.yaml
    .venv/bin/python -m recipes.sft --config recipes/configs/sft_smoke.yaml --adapter hada_ia3 --output_dir runs/x
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import hadapeft
from recipes import common

NAME = "sft"
# Per-row columns hadapeft.SFTTrainer carries to the model (a task_description is embedded into task_embeds).
CONDITIONING_COLUMNS = ("task_ids", "task_embeds", "task_description")
DEFAULT_ADAPTER = {"type": "gated_lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
ALPACA = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# Built-in offline data sets (``dataset:``): name -> (train rows, held-out rows) from the data arguments and seed.
def _bbc_news_sections(d: "SFTDataArguments", seed: int) -> tuple[list[dict], list[dict]]:
    from recipes import data_llm

    held = held_out_articles(d)
    return tuple(data_llm.topic_dataset(split, seed=seed, eval_size=held, max_words=d.max_words).to_list()
                 for split in ("train", "test"))


DATASETS = {"bbc_news_sections": _bbc_news_sections}


def held_out_articles(d: "SFTDataArguments") -> int:
    """The BBC data sets' held-out articles: ``eval_size`` (a count), 200 when unset."""
    if d.eval_size and (d.eval_size < 1 or d.eval_size != int(d.eval_size)):
        raise common.ConfigError(f"eval_size={d.eval_size}: with dataset={d.dataset} it counts held-out articles "
                                 f"(a whole number; 0: 200)")
    if d.max_words < 1:
        raise common.ConfigError(f"max_words={d.max_words}: at least 1 word of each article")
    return int(d.eval_size) or 200


def read_rows(d: "SFTDataArguments", seed: int, builtin: Optional[dict] = None) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows: the built-in data set ``d.dataset`` (a name in ``builtin``, default :data:`DATASETS`), or
    ``train_file`` and ``eval_file`` / ``eval_size``; each cut to ``max_*_samples``."""
    builtin = DATASETS if builtin is None else builtin
    if not d.dataset:
        return common.read_splits(d, seed)
    if d.dataset not in builtin:
        raise common.ConfigError(f"dataset={d.dataset!r}: the built-in data sets here are {sorted(builtin)} "
                                 f"(or set train_file){common._suggest(d.dataset, builtin)}")
    if d.train_file or d.eval_file:
        raise common.ConfigError(f"dataset={d.dataset!r} and train_file / eval_file are both set: use one")
    return common.read_splits(d, seed, *builtin[d.dataset](d, seed))


@dataclass
class SFTDataArguments(common.DataArguments):
    dataset: Optional[str] = field(default=None, metadata={
        "help": "A built-in offline data set instead of train_file: bbc_news_sections (the BBC section of a news "
                "article, answered in one word; eval_size articles held out, see recipes/data_llm.py)."})
    max_words: int = field(default=32, metadata={"help": "bbc_news_sections: article words after the headline."})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "Jinja chat template for tokenizers without one (or to replace theirs)."})
    prompt_template: Optional[str] = field(default=None, metadata={
        "help": "Instruction rows: str.format template over the row's fields; default: Alpaca."})


def to_trl_rows(rows: list[dict], d: SFTDataArguments, where: str) -> list[dict]:
    """Rows in a format TRL reads: instruction rows become prompt/completion; the others pass as they are."""
    out = []
    for n, row in enumerate(rows):
        if "messages" in row or ("prompt" in row and "completion" in row) or "text" in row:
            out.append(row)
        elif "instruction" in row and "output" in row:
            template = d.prompt_template or (ALPACA_INPUT if row.get("input") else ALPACA)
            try:
                prompt = template.format(**row)
            except KeyError as e:
                raise common.ConfigError(f"prompt_template uses {e}, which {where} row {n} {sorted(row)} lacks") \
                    from None
            rest = {k: v for k, v in row.items() if k not in ("instruction", "input", "output")}
            out.append({**rest, "prompt": prompt, "completion": row["output"]})
        else:
            raise common.ConfigError(f"{where} row {n} has the columns {sorted(row)}: expected messages, "
                                     f"prompt+completion, instruction+output or text")
    return out


class SFTTrainer(common.WholeBatchesMixin, hadapeft.SFTTrainer):
    """``hadapeft.SFTTrainer`` (TRL's, with conditioning) with the recipes' batches (``common.WholeBatchesMixin``)."""


def build_trainer(model_args: common.ModelArguments, adapter: Optional[dict], data_args: SFTDataArguments, args,
                  train_rows: Optional[list] = None, eval_data=None, adapter_defaults: Optional[dict] = None,
                  default_adapter: Optional[dict] = None, recipe: str = NAME, data_info: Optional[dict] = None):
    """(``hadapeft.SFTTrainer``, RunInfo) for the rows of ``data_args`` (or the given ``train_rows`` and
    ``eval_data``: a list of rows or a {name: rows} dict, evaluated apart). ``adapter_defaults`` fill adapter
    fields the config leaves out (``num_tasks``)."""
    import datasets

    if train_rows is None:
        train_rows, eval_data = read_rows(data_args, args.seed)
    block = common.adapter_block(adapter, default_adapter or DEFAULT_ADAPTER)
    # what the adapter will be: the config's fields over the data's defaults (task_embed_dim from descriptions)
    filled = {**block, **{k: v for k, v in (adapter_defaults or {}).items() if block.get(k) is None}}
    common.check_conditioning(filled, recipe,
                              common.row_columns(train_rows, CONDITIONING_COLUMNS, "train"))
    peft_config = common.adapter_config(block, "CAUSAL_LM", adapter_defaults)
    tok = common.load_tokenizer(model_args, args)
    if data_args.chat_template:
        tok.chat_template = data_args.chat_template
    train_rows = to_trl_rows(train_rows, data_args, "train")
    chat = "messages" in train_rows[0]
    if args.assistant_only_loss is None:  # loss on the answers, as for prompt/completion rows
        args.assistant_only_loss = chat
    if not chat and args.eos_token is None and tok.eos_token is None:  # TRL appends it to each completion / text
        raise common.ConfigError(f"the tokenizer of {model_args.tokenizer_name_or_path or model_args.model_name_or_path}"
                                 f" has no EOS token: set eos_token to one of its tokens (e.g. [SEP] for BERT's)")

    def dataset(rows, where):
        return datasets.Dataset.from_list(to_trl_rows(rows, data_args, where)) if rows else None

    if isinstance(eval_data, dict):
        eval_dataset = {k: dataset(v, f"eval/{k}") for k, v in eval_data.items() if v} or None
    else:
        eval_dataset = dataset(eval_data, "eval")
    if eval_dataset is None:
        args.eval_strategy = "no"
    overrides = {"pad_token_id": tok.pad_token_id}
    if model_args.random_init:  # a model built here gets an embedding row for every token
        overrides["vocab_size"] = len(tok)
    model, overrides = common.load_base_model(model_args, args, "AutoModelForCausalLM", overrides)
    model = common.add_adapter(model, peft_config, args.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train_rows),
                         eval_dataset=eval_dataset, processing_class=tok)
    run = common.RunInfo(recipe, "AutoModelForCausalLM", model_args, block, data_args, overrides,
                         data_info=data_info or {})
    return trainer, run


def parse(argv=None, data_cls=SFTDataArguments, name: str = NAME) -> tuple:
    """(ModelArguments, AdapterArguments, ``data_cls``, trl.SFTConfig) from ``--config`` and flags."""
    from trl import SFTConfig

    # assistant_only_loss: None until the data says (chat rows: on)
    return common.parse(name, data_cls, SFTConfig, argv, {"assistant_only_loss": None})


def main(argv=None) -> common.Result:
    model_args, adapter_args, data_args, args = parse(argv)
    trainer, run = build_trainer(model_args, adapter_args.adapter, data_args, args)
    return common.fit(trainer, run)


if __name__ == "__main__":
    main()
