"""Multi-task conditioned fine-tuning: one task-conditioned adapter (FiLM, HyperMod, multi-task HadaIA3) for several
tasks, each sample routed by its task id: the SFT recipe plus a task column, which ``hadapeft.SFTTrainer`` carries
into ``model(**batch, task_ids=LongTensor[B])``.

Rows in any SFT format with a ``task`` field (``task_column``), or ``dataset: bbc_news_multitask`` (offline, real: each
BBC News article twice, answered with its section or its headline, see :func:`recipes.data_llm.multitask_dataset`;
by default both rows carry the same prompt, so the task id is the only signal). Task names map to ids in sorted
order (or the order of ``tasks``; the built-in set's own order: section 0, headline 1); the adapter's ``num_tasks``
is filled in from the data. Evaluation reports the loss of each task (``eval_<task>_loss``). Merge one task into a
plain model afterwards with ``python -m scripts.merge OUT --task-id K``.

    .venv/bin/python -m recipes.multitask --config recipes/configs/multitask_smollm2_bbc.yaml
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


# Built-in offline data sets (``dataset:``), as sft.DATASETS: name -> (train rows, held-out rows), each row naming its
# task in ``task_column``; TASKS: their task names in id order.
def _bbc_news_multitask(d: "MultiTaskDataArguments", seed: int) -> tuple[list[dict], list[dict]]:
    from recipes import data_llm

    held = sft.held_out_articles(d)

    def rows(split):
        data = data_llm.multitask_dataset(split, seed=seed, eval_size=held, max_words=d.max_words,
                                          instructions=d.instructions)
        return [{"prompt": r["prompt"], "completion": r["completion"], d.task_column: BBC_TASKS[r["task_ids"]]}
                for r in data.to_list()]

    return rows("train"), rows("test")


DATASETS = {"bbc_news_multitask": _bbc_news_multitask}
TASKS = {"bbc_news_multitask": BBC_TASKS}


@dataclass
class MultiTaskDataArguments(sft.SFTDataArguments):
    dataset: Optional[str] = field(default=None, metadata={
        "help": "A built-in offline data set instead of train_file: bbc_news_multitask (each BBC News article twice, "
                "task section: its section in one word, task headline: its headline; eval_size articles held out, "
                "see recipes/data_llm.py)."})
    max_words: int = field(default=32, metadata={"help": "bbc_news_multitask: article words after the headline."})
    instructions: bool = field(default=False, metadata={
        "help": "bbc_news_multitask: each prompt starts with its task's instruction (a system turn); default: both "
                "tasks see the same prompt, so the task id is the only signal."})
    task_column: str = field(default="task", metadata={"help": "The column naming each row's task."})
    tasks: Optional[list[str]] = field(default=None, metadata={
        "help": "Task names in id order; default: the built-in data set's order, else the training data's distinct "
                "tasks, sorted."})


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
                                 f"task_embeds vector; remove task_embed_dim (vectors: docs/guides/task_descriptions.md)")
    n = block.get("num_tasks")
    if n is not None and n != len(tasks):
        raise common.ConfigError(f"adapter.num_tasks={n}, but the data has {len(tasks)} tasks {tasks} (task_column "
                                 f"{column!r}): remove num_tasks (the recipe fills it in from the data), or list "
                                 f"{n} task names in `tasks`")


def build_trainer(model_args, adapter: Optional[dict], data_args: MultiTaskDataArguments, args):
    """(``hadapeft.SFTTrainer``, RunInfo) with a task-conditioned adapter of ``num_tasks`` = the data's tasks."""
    block = common.adapter_block(adapter, DEFAULT_ADAPTER)
    fields = {f.name for f in dataclasses.fields(common.adapter_class(block.get("type", "")))}
    if "num_tasks" not in fields:
        raise common.ConfigError(f"adapter type {block.get('type')!r} takes no task ids; the multitask recipe needs a "
                                 f"task-conditioned adapter (film, hypermod, or hada_ia3 with num_tasks)")
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
    names = [_row_task(r, n, d.task_column, "train") for n, r in enumerate(train)]
    tasks = [str(t) for t in (d.tasks or TASKS.get(d.dataset) or sorted(set(names)))]
    check_adapter(block, tasks, d.task_column)
    train = with_task_ids(train, tasks, d.task_column, "train")
    held = with_task_ids(held, tasks, d.task_column, "eval")
    per_task = {t: [r for r in held if r["task_ids"] == k] for k, t in enumerate(tasks)}
    return sft.build_trainer(model_args, block, d, args, train, per_task, {"num_tasks": len(tasks)},
                             DEFAULT_ADAPTER, NAME, {"tasks": tasks})


def parse(argv=None) -> tuple:
    """(ModelArguments, AdapterArguments, MultiTaskDataArguments, trl.SFTConfig) from ``--config`` and flags."""
    return sft.parse(argv, MultiTaskDataArguments, NAME)


def main(argv=None) -> common.Result:
    model_args, adapter_args, data_args, args = parse(argv)
    trainer, run = build_trainer(model_args, adapter_args.adapter, data_args, args)
    return common.fit(trainer, run)


if __name__ == "__main__":
    main()
