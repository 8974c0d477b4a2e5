"""Multi-task conditioned fine-tuning: one task-conditioned adapter (FiLM, HyperMod, multi-task HadaIA3) for several
tasks, each sample routed by its task id (``model(**batch, task_ids=LongTensor[B])``).

The SFT recipe plus a task column: rows in any SFT format with a ``task`` field (``data.task_column``). Task names
map to ids in sorted order (or the order of ``data.tasks``); ``num_tasks`` is filled in from the data. Evaluation
reports the loss per task as well. Merge one task into a plain model afterwards with
``python -m scripts.merge ADAPTER --task-id K``.

    accelerate launch recipes/multitask.py --config recipes/configs/multitask_smoke.yaml
    accelerate launch recipes/multitask.py --config recipes/configs/multitask_smoke.yaml 'adapter={type: hypermod}'
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file (accelerate launch recipes/multitask.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recipes.common import ConfigError, Data, adapter_class, main  # noqa: E402
from recipes.sft import SFTData, SFTRecipe  # noqa: E402


@dataclass
class MultiTaskData(SFTData):
    task_column: str = "task"  # the column naming each row's task
    tasks: Optional[list] = None  # task names in id order; default: the training data's distinct tasks, sorted


class MultiTaskRecipe(SFTRecipe):
    """Multi-task conditioned SFT (a task id per sample)."""

    name = "multitask"
    data_args = MultiTaskData
    default_adapter = {"type": "film"}

    def load_data(self, cfg, tok) -> Data:
        d = cfg.data
        if "num_tasks" not in {f.name for f in fields(adapter_class(cfg.adapter.get("type", "")))}:
            raise ConfigError(f"adapter.type {cfg.adapter.get('type')!r} takes no task ids; the multitask recipe "
                              f"needs a task-conditioned adapter (film, hypermod, or hada_ia3 with num_tasks)")
        train, held = self.read_splits(cfg)
        try:
            tasks = [str(t) for t in (d.tasks or sorted({str(r[d.task_column]) for r in train}))]
        except KeyError:
            raise ConfigError(f"the training rows have no task column {d.task_column!r} (data.task_column)") from None
        index = {t: i for i, t in enumerate(tasks)}
        self.tasks = tasks

        def encode(rows, where):
            unknown = sorted({str(r.get(d.task_column)) for r in rows} - set(index))
            if unknown:
                raise ConfigError(f"{where}: tasks {unknown[:5]} are not among {tasks}")
            # Encode per task so the task id stays with its example when SFT drops empty ones.
            out = []
            for t in tasks:
                mine = [r for r in rows if str(r[d.task_column]) == t]
                out += [{**ex, "task_id": index[t]} for ex in self.encode_rows(mine, tok, d, f"{where}/{t}")]
            return sorted(out, key=lambda ex: ex["task_id"]) if where == "eval" else out

        return Data(encode(train, "train"), encode(held, "eval"), {"tasks": tasks})

    def adapter_defaults(self, cfg, data) -> dict:
        return {"num_tasks": len(data.info["tasks"])}

    def collate(self, examples: list[dict]) -> dict:
        return {**super().collate(examples), "task_ids": torch.tensor([e["task_id"] for e in examples])}

    def eval_keys(self, data):
        return ["loss_sum", "count"] + [f"{k}/{t}" for t in self.tasks for k in ("loss_sum", "count")]

    def eval_sums(self, model, batch):
        losses, mask = self.token_losses(model, batch)
        per_sample, counts = losses.sum(1), mask.sum(1)  # (B,)
        sums = {"loss_sum": per_sample.sum(), "count": counts.sum()}
        for k, t in enumerate(self.tasks):
            mine = batch["task_ids"] == k
            sums[f"loss_sum/{t}"], sums[f"count/{t}"] = per_sample[mine].sum(), counts[mine].sum()
        return sums

    def metrics(self, sums):
        out = super().metrics(sums)
        for t in self.tasks:
            if sums[f"count/{t}"]:
                out[f"eval_loss/{t}"] = sums[f"loss_sum/{t}"] / sums[f"count/{t}"]
        return out


if __name__ == "__main__":
    main(MultiTaskRecipe)
