"""Compare hadapeft's adapters with peft's methods on real data: accuracy, trainable parameters, time, memory.

    python -m scripts.compare --preset llm-cpu              # the causal-LM tables: docs/results_llm.{json,png}
    python -m scripts.compare --preset llm-ci --out /tmp/cmp # tiny version run by tests/test_compare_llm.py
    python -m scripts.compare --preset llm-manytask-cpu     # many tasks in words: docs/results_manytask.{json,png}
    python -m scripts.compare --preset llm-cpu --tune 1e-3,3e-3,1e-2,3e-2,1e-1,3e-1  # docs/tuned_lrs_llm.json
    python -m scripts.compare --preset cpu-small            # the encoder / ViT tables: docs/results.{json,png}
    python -m scripts.compare --preset ci --out /tmp/cmp     # tiny version run by tests/test_compare.py
    python -m scripts.compare --preset cpu-small --tune 1e-3,3e-3,1e-2,3e-2  # rates for docs/tuned_lrs.json
    python -m scripts.compare --preset ci --tasks text --tune 1e-3,3e-3,1e-2,3e-2 --out docs/ci  # the CI's text rates
    python -m scripts.compare --tasks text --methods frozen,lora-r16,gated-lora-r16 --seeds 0,1,2,3,4 \\
        --text-model sentence-transformers/all-mpnet-base-v2 --text-dataset SetFit/sst2 --device cuda

Each run writes its family's results file into ``--out`` and renders ``results.md`` there from every results file
in the folder, the causal-LM tables first (``docs/results.md`` shows both families).

Causal LM (``scripts/_compare_llm.py``)
---------------------------------------
The real SmolLM2-135M-Instruct (offline, ``recipes/models.py``) fine-tuned through the recipes' SFT trainer
(``hadapeft.SFTTrainer``, TRL's) on BBC News chat rows (``recipes/data_llm.py``): ``llm-topic`` (single-task SFT: the
article's section in one word) and ``llm-multitask`` (section or headline over the same prompt, told apart by
``task_ids`` alone). Scored on held-out articles by greedy exact match and held-out loss from one teacher-forced pass
(``_compare_llm.score``). Baselines: peft LoRA r=4 and r=16, DoRA, LoHa, HiRA and IA3; on the multi-task problem one
peft LoRA per task and one LoRA / HiRA with the task's instruction in the prompt. Learning rates per method and task
are picked on a validation split by ``--tune`` (a window of the grid around the kind's default, widened while the best
is at its edge: ``Preset.tune_window``) and read from ``docs/tuned_lrs_llm.json``. ``llm-manytask`` (presets
``llm-manytask-cpu`` / ``llm-manytask-ci``): 11 tasks described in words, scored on the trained tasks, under reworded
descriptions and on 5 unseen tasks; FiLM / HyperMod conditioned on the descriptions (``*-desc``) and on ids,
multi-task HadaIA3, one LoRA per task, LoRA / HiRA with the description in the prompt; its own results file
(``results_manytask.json``), each method at its rate tuned on ``llm-multitask`` (``Preset.borrow_lrs``). ``--merge``
re-measures some rows of a published table in place (e.g. after a default changed:
``--preset llm-cpu --methods hypermod --merge --out docs``).

Encoders and ViTs: protocol
---------------------------
Tasks (``scripts/_compare_tasks.py``; each one a frozen pretrained encoder + a fresh linear head per task):

* ``text``: the real all-MiniLM-L6-v2 (offline package) on real review sentiment: Rotten Tomatoes critics' snippets,
  fresh or rotten, cut to 24 tokens, split by film (no film on both sides). Chosen so that adaptation matters: the
  encoder was trained for semantic similarity, and a linear probe on its frozen features reaches only ~0.72 here.
  (BBC News sections, the earlier task, are topical: the frozen features already give what short windows of the
  articles allow, and no adapter could separate from the frozen base; ``--text-dataset bbc-news`` runs them.)
* ``vision``: a small ViT, pretrained here (deterministically, cached) on the real handwritten digits 0-4, adapted
  to digits 5-9. No pretrained ViT installs offline; ``--vit-model`` takes a Hub id or folder instead.
* ``multitask``: the same ViT on all ten digits labelled three ways (digit, parity, digit mod 3), tasks mixed in
  every batch. Task-conditioned methods (FiLM, HyperMod, HadaIA3 with ``num_tasks``) train ONE adapter, routed per
  sample by ``task_ids``; single-task methods train one adapter + head per task, each for steps / 3, and report the
  sum of their parameters.

Methods (``METHODS``): the frozen base (the encoder frozen, only the head trained: the floor every adapter must
beat; it trains on the encoder's pooled features, computed once for the linear probe, so its s/step and memory are
the head's alone), peft LoRA r=4 and r=16 and peft IA3, and hadapeft Gated LoRA (r=4 and r=16 with a gate per
feature, r=16 with one gate per layer), HadaIA3 (single and multi-task), FiLM and HyperMod (``num_tasks=1`` on
single-task problems). Same layers per family, from hadapeft's per-model defaults: low-rank methods and HyperMod
on the attention query / value, and so is FiLM; IA3 and HadaIA3 on key / value / MLP down projection
(input-scaled). ``film-blocks`` is FiLM on the attention and MLP sub-block outputs instead (it runs on the ViT
tasks: the evidence for FiLM's default). On text, where a step costs ~10 ViT steps, cpu-small runs one option set
per hadapeft family (``_TEXT_METHODS``).

Training, identical for every method, through transformers' ``Trainer`` (``_compare_tasks.make_trainer``, which the
ViT's pretraining uses too): heads start from the linear probe (logistic regression fit to convergence on the frozen
encoder's pooled training features; LP-FT), so every run starts from what the frozen features allow; no dropout; the
same steps and batch size over (sample, task) pairs in the Trainer's seeded order, AdamW (no weight decay) with the head
and the adapter as two parameter groups, 10% linear warm-up then linear decay, gradient clipping at 1.0. Learning rates:
the head 1e-2 for every method (see ``LEARNING_RATES``; the ci preset's text task, at half the steps, uses 1e-3:
``Preset.task_learning_rates``). Each adapter's rate is picked per task from one shared grid on a validation split of
the training data (``--tune``: 20% of the training texts or images held out, first seed, the same budget; ties go to the
smaller rate), so no method is judged at a rate that suits another (FiLM wants a low vector rate, multi-task HadaIA3 a
high one). The cpu-small preset reads the published choice, ``docs/tuned_lrs.json``, and so does ci except on text
(``docs/ci/tuned_lrs.json``, tuned at its own budget);
``--method-lrs none`` falls back to fixed rates per kind:
adapter matrices (LoRA, Gated LoRA, HyperMod's hypernetwork) 2e-3, adapter vectors (IA3, HadaIA3, FiLM) 5e-3 (``--lr
KIND=VALUE`` changes one; ``--head-init random`` starts heads from a seeded random init instead). Seeds change the
adapter init and the batch order; the train / held-out split is fixed. Reported: held-out accuracy (mean ± sample
std over seeds), trainable parameters (adapter + heads; the adapter alone in a second column), seconds per step
(median of the optimizer steps of all seeds, timed by a Trainer callback: batch collation and evaluation excluded),
peak memory of one training step's forward and backward (``Trainer.training_step`` under ``scripts/memory.py``,
measured once per method after the first seed's training, never inside the timed steps), and the linear probe's own
held-out accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

# libgomp's default busy-wait makes torch's threads several times slower when another process shares the cores (see
# recipes/__init__.py); only takes effect before torch is imported, as under ``python -m scripts.compare``.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from scripts import _compare_llm as llm  # noqa: E402
from scripts import _compare_report as report  # noqa: E402
from scripts import _compare_tasks as tasks  # noqa: E402
from scripts.memory import peak_bytes  # noqa: E402

ENCODER_TASKS = ("text", "vision", "multitask")
TASKS = ENCODER_TASKS + llm.ALL_TASKS
REPO = Path(__file__).resolve().parents[1]
# The adapter learning rates the published table uses, per task and method, picked on a validation split (first
# seed) by ``--preset cpu-small --tune``: the ViT tasks' from the grid 1e-3 to 1e-1, the text task's from 1e-3 to
# 3e-2 (``--tasks text``); the file's ``commands`` say which run wrote which task.
TUNED_LRS = REPO / "docs" / "tuned_lrs.json"
# The CI version's text rates, tuned the same way at its own budget (``--preset ci --tasks text --tune``, written by
# ``--out docs/ci``); its ViT tasks read TUNED_LRS.
CI_TUNED_LRS = REPO / "docs" / "ci" / "tuned_lrs.json"
# Heads start from the linear probe (LP-FT). From there the frozen base's held-out accuracy was flat in the head's rate
# (150 steps, mean over the tasks: 1e-3 0.825, 5e-3 0.826, 2e-2 0.826, 5e-2 0.823), so the middle of that range is
# used. Before the probe start (random heads) 5e-2 was needed and a first draft's 5e-3 left the frozen base far below
# its own probe (vision 0.48 vs 0.82).
LEARNING_RATES = {"head": 1e-2, "matrix": 2e-3, "vector": 5e-3}


# ---------------------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Budget:
    steps: int  # optimizer steps per run (split over the tasks for single-task methods on multitask)
    batch_size: int


@dataclass(frozen=True)
class Preset:
    seeds: tuple[int, ...]
    budgets: dict  # task -> Budget
    text_max_length: int = 16
    text_windows: int = 1
    text_offset: int = 0  # the text task reads each text from this word on
    text_pool: str = "mean"  # the text task's features: "mean" over tokens or the "cls" token
    text_test_size: int = 400
    about: str = ""
    learning_rates: dict = field(default_factory=lambda: dict(LEARNING_RATES))
    task_learning_rates: dict = field(default_factory=dict)  # task -> {kind: rate} over learning_rates
    methods: dict = field(default_factory=dict)  # task -> the only methods run on it (default: all asked for)
    method_lrs: dict = field(default_factory=dict)  # task -> method -> adapter learning rate (from --tune)
    # read into method_lrs, in order (a later file's tasks replace an earlier one's), unless --method-lrs is given
    method_lrs_files: tuple[Path, ...] = ()
    tasks: tuple[str, ...] = ENCODER_TASKS  # what runs without --tasks
    # causal-LM tasks: article words after the headline, training articles (rows are drawn from these), held-out
    # articles
    llm_max_words: int = 8
    llm_train_articles: int = 600
    llm_test_articles: int = 100
    # --tune: None tries every grid value; N starts from the N grid values around the method's default rate and
    # extends the window one value at a time while the best is at its edge (the causal-LM runs are too costly to
    # try every rate for every method, and their best rates span two decades: HyperMod diverges where HiRA barely
    # moves)
    tune_window: Optional[int] = None
    # task -> the task whose tuned rates it takes where it has none of its own (a problem too costly to tune apart)
    borrow_lrs: dict = field(default_factory=dict)

    def task_rates(self, task: str) -> dict:
        """The rate per parameter kind on ``task``: the preset's, with the task's own where it has them."""
        return {**self.learning_rates, **self.task_learning_rates.get(task, {})}

    def learning_rates_for(self, task: str, method: "Method", lr: Optional[float] = None) -> dict:
        """The task's rates, with the method's adapter rate replaced by ``lr`` (a rate ``--tune`` tries) or else
        by its tuned one for ``task`` if any."""
        lr = self.tuned_lr(task, method) if lr is None else lr
        rates = self.task_rates(task)
        return rates if lr is None else {**rates, method.kind: lr}

    def tuned_lr(self, task: str, method: "Method") -> Optional[float]:
        """``method``'s tuned rate on ``task``; else on the task it borrows from (``borrow_lrs``); each time its
        own rate first, then that of the method it takes its rate from (``Method.lr_of``)."""
        for t in (task, self.borrow_lrs.get(task)):
            for name in (method.name, method.lr_of):
                rate = self.method_lrs.get(t, {}).get(name)
                if rate is not None:
                    return rate
        return None

    def skips(self, method: "Method", task: str) -> bool:
        """The preset leaves ``method`` out of ``task`` (its ``methods`` list for the task does not name it)."""
        allowed = self.methods.get(task)
        return allowed is not None and method.name not in allowed

    def runs_on(self, method: "Method", task: str, num_tasks: int) -> bool:
        return not self.skips(method, task) and (num_tasks > 1 or not method.multitask_only)


# ---------------------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str  # CLI and table name
    library: str  # "peft", "hadapeft" or "" (the frozen base)
    kind: str  # which learning rate the adapter gets (LEARNING_RATES)
    config: Optional[Callable] = None  # (model_type, num_tasks) -> peft config; None: no adapter
    conditioned: bool = False  # one adapter for all tasks, routed per sample by task_ids
    multitask_only: bool = False  # identical to another method when there is one task
    task_in_prompt: bool = False  # one adapter for all tasks, told the task by an instruction in the prompt (LLM)
    on_descriptions: bool = False  # conditioned on the sentence embedding of each row's task_description (LLM)
    lr_of: Optional[str] = None  # the method whose tuned learning rate this one takes where it has none of its own


def _targets(table: str, model_type: str):
    from hadapeft.core import targets

    try:
        return getattr(targets, table)[model_type]
    except KeyError:
        raise SystemExit(f"error: hadapeft has no default {table} target modules for model type {model_type!r}; "
                         f"this comparison supports {sorted(targets.ATTENTION)}") from None


def _lora(r, **kw):
    def make(model_type, num_tasks):
        from peft import LoraConfig

        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=_targets("ATTENTION", model_type), **kw)
    return make


def _gated_lora(r, gate):
    def make(model_type, num_tasks):
        import hadapeft

        return hadapeft.GatedLoraConfig(r=r, lora_alpha=2 * r, gate=gate,
                                        target_modules=_targets("ATTENTION", model_type))
    return make


def _ia3(hada: bool, per_task: bool = False):
    def make(model_type, num_tasks):
        import hadapeft
        from peft import IA3Config

        kw = dict(target_modules=_targets("IA3", model_type), feedforward_modules=_targets("IA3_FEEDFORWARD",
                                                                                              model_type))
        if not hada:
            return IA3Config(**kw)
        return hadapeft.HadaIA3Config(**kw, num_tasks=num_tasks if per_task else None)
    return make


def _film(table):
    """FiLM on hadapeft's default layers for it (``ATTENTION``, query/value) or on the sub-block outputs
    (``BLOCK_OUTPUT``)."""
    def make(model_type, num_tasks):
        import hadapeft

        return hadapeft.FiLMConfig(target_modules=_targets(table, model_type), num_tasks=num_tasks)
    return make


def _dora(r):
    return _lora(r, use_dora=True)


def _hira(r):
    """peft's HiRA: ``W0 + W0 * (B A)``, a multiplicative update (the closest peft method to HyperMod)."""
    def make(model_type, num_tasks):
        from peft import HiraConfig

        return HiraConfig(r=r, target_modules=_targets("ATTENTION", model_type))
    return make


def _loha(r):
    def make(model_type, num_tasks):
        from peft import LoHaConfig

        return LoHaConfig(r=r, alpha=2 * r, target_modules=_targets("ATTENTION", model_type))
    return make


def _hypermod(model_type, num_tasks):
    """HyperMod on hadapeft's default layers for it (``HYPERMOD``: key / value / MLP down projection on Llama-like
    models, the attention query / value elsewhere)."""
    import hadapeft

    return hadapeft.HyperModConfig(target_modules=_targets("HYPERMOD", model_type), num_tasks=num_tasks, r=1)


def _described(make):
    """``make``'s adapter conditioned on ``task_embeds`` of the default description encoder instead of task ids."""
    def described(model_type, num_tasks):
        from hadapeft.descriptions import get_encoder

        config = make(model_type, num_tasks)
        config.num_tasks, config.task_embed_dim = None, get_encoder().dim
        config.validate()
        return config
    return described


METHODS = {m.name: m for m in [
    Method("frozen", "", "head"),
    Method("lora-r4", "peft", "matrix", _lora(4)),
    Method("lora-r16", "peft", "matrix", _lora(16)),
    Method("ia3", "peft", "vector", _ia3(hada=False)),
    Method("gated-lora-r4", "hadapeft", "matrix", _gated_lora(4, "vector")),
    Method("gated-lora-r16", "hadapeft", "matrix", _gated_lora(16, "vector")),
    Method("gated-lora-r16-scalar", "hadapeft", "matrix", _gated_lora(16, "scalar")),
    Method("hada-ia3", "hadapeft", "vector", _ia3(hada=True)),
    Method("hada-ia3-tasks", "hadapeft", "vector", _ia3(hada=True, per_task=True), conditioned=True,
           multitask_only=True),
    Method("film", "hadapeft", "vector", _film("ATTENTION"), conditioned=True),
    Method("film-blocks", "hadapeft", "vector", _film("BLOCK_OUTPUT"), conditioned=True),
    Method("hypermod", "hadapeft", "matrix", _hypermod, conditioned=True),
    # peft's other methods, run on the causal-LM tasks: DoRA, LoHa (a Hadamard product of two low-rank matrices;
    # r=8 has LoRA r=16's parameter count), HiRA; and on the multi-task problem one LoRA / HiRA for both tasks with
    # the task's instruction in the prompt (the usual way to multi-task without task ids)
    Method("dora-r16", "peft", "matrix", _dora(16)),
    Method("loha-r8", "peft", "matrix", _loha(8)),
    Method("hira-r16", "peft", "matrix", _hira(16)),
    Method("lora-r16-prompt", "peft", "matrix", _lora(16), multitask_only=True, task_in_prompt=True),
    Method("hira-r16-prompt", "peft", "matrix", _hira(16), multitask_only=True, task_in_prompt=True),
    # llm-manytask: FiLM and HyperMod conditioned on the all-MiniLM-L6-v2 embedding of each task's description
    Method("film-desc", "hadapeft", "vector", _described(_film("ATTENTION")), conditioned=True, multitask_only=True,
           on_descriptions=True, lr_of="film"),
    Method("hypermod-desc", "hadapeft", "matrix", _described(_hypermod), conditioned=True, multitask_only=True,
           on_descriptions=True, lr_of="hypermod"),
]}

# On text, where a run costs ~10 ViT runs, cpu-small runs one option set per adapter family next to peft's LoRA
# (two ranks) and IA3: the ViT tables cover the rest. FiLM's placement is settled there, HadaIA3 without task
# conditioning is peft IA3's maths (identical accuracies in every ViT run), and Gated LoRA r=16 (vector or scalar
# gate) is an option set of the r=4 run kept here.
_TEXT_METHODS = ("frozen", "lora-r4", "lora-r16", "ia3", "gated-lora-r4", "film", "hypermod")
# The CI version (tests/test_compare.py), one seed: on the ViT tasks the frozen base, peft's LoRA and IA3, and every
# hadapeft adapter at its defaults. On text, where each run costs ~20 s, the frozen base and hadapeft's adapters
# only (CI guards this package's adapters; peft's text rows are in the published table); as in cpu-small, without
# HadaIA3 (peft IA3's maths).
_CI_METHODS = ("frozen", "lora-r4", "ia3", "gated-lora-r4", "hada-ia3", "hada-ia3-tasks", "film", "hypermod")
_CI_TEXT_METHODS = ("frozen", "gated-lora-r4", "film", "hypermod")

# The causal-LM tasks (SmolLM2-135M-Instruct, ~2 s per step of 8 rows on 2 cores). Single-task: peft's LoRA at two
# ranks, DoRA, LoHa, HiRA and IA3 against Gated LoRA, FiLM and HyperMod (HadaIA3 without task conditioning is peft
# IA3's maths). Multi-task: the conditioned adapters against one LoRA per task and one LoRA / HiRA with the task in
# the prompt.
_LLM_TOPIC_METHODS = ("frozen", "lora-r4", "lora-r16", "dora-r16", "loha-r8", "hira-r16", "ia3", "gated-lora-r16",
                      "film", "hypermod")
_LLM_MULTI_METHODS = ("frozen", "lora-r16", "lora-r16-prompt", "hira-r16-prompt", "hada-ia3-tasks", "film",
                      "hypermod")
# The many-task problem: description-conditioned FiLM / HyperMod against the same adapters on ids, multi-task
# HadaIA3 on ids, one LoRA with the description in the prompt (the natural baseline), one LoRA per task and HiRA
# with the description in the prompt.
_LLM_MANY_METHODS = ("frozen", "film-desc", "hypermod-desc", "film", "hypermod", "hada-ia3-tasks", "lora-r16-prompt",
                     "lora-r16", "hira-r16-prompt")
TUNED_LRS_LLM = REPO / "docs" / "tuned_lrs_llm.json"

PRESETS = {
    "cpu-small": Preset(seeds=(0, 1, 2), budgets={"text": Budget(200, 16), "vision": Budget(150, 32),
                                                  "multitask": Budget(150, 32)}, text_max_length=24,
                        text_test_size=1500, method_lrs_files=(TUNED_LRS,), methods={"text": _TEXT_METHODS},
                        about="the published table: under 20 min on 2 CPU cores (a text step costs ~10 ViT steps, "
                              "hence one option set per hadapeft family on text)"),
    # A text step costs ~10 ViT steps, so the CI version halves cpu-small's text budget. At 100 steps the head's
    # 1e-2 moves the frozen base by about a point either way (seed noise as large as the adapters' gains); at 1e-3
    # it stays at the probe. Held out, 3 seeds: frozen 0.727 ± 0.003, and each of the 15 adapter runs above each
    # frozen run (LoRA r=4 0.746, IA3 0.740, Gated LoRA r=4 0.747, FiLM 0.740, HyperMod 0.739).
    "ci": Preset(seeds=(0,), budgets={"text": Budget(100, 16), "vision": Budget(100, 32),
                                      "multitask": Budget(150, 32)}, text_max_length=24,
                 text_test_size=1500, task_learning_rates={"text": {"head": 1e-3}},
                 method_lrs_files=(TUNED_LRS, CI_TUNED_LRS),
                 about="the CI version: one seed; the text task and split of cpu-small with half its steps, "
                       "head rate 1e-3 and adapter rates tuned for that, hadapeft's adapters only; shorter ViT runs",
                 methods={"text": _CI_TEXT_METHODS, "vision": _CI_METHODS, "multitask": _CI_METHODS}),
    "llm-cpu": Preset(seeds=(0, 1, 2), budgets={"llm-topic": Budget(16, 8), "llm-multitask": Budget(16, 8)},
                      tasks=llm.TASKS, methods={"llm-topic": _LLM_TOPIC_METHODS, "llm-multitask": _LLM_MULTI_METHODS},
                      method_lrs_files=(TUNED_LRS_LLM,), llm_test_articles=80, tune_window=3,
                      learning_rates={**LEARNING_RATES, "matrix": 1e-2, "vector": 3e-2},
                      about="the published causal-LM table: SmolLM2-135M-Instruct, 51 min on 2 idle CPU cores (45 runs of "
                            "~1 min: 16 steps of ~3 s, then scoring)"),
    # tests/test_compare_llm.py: a few steps of a few methods on a few articles (the real model all the same)
    "llm-ci": Preset(seeds=(0,), budgets={"llm-topic": Budget(4, 4), "llm-multitask": Budget(4, 4)},
                     tasks=llm.TASKS, llm_train_articles=40, llm_test_articles=8,
                     methods={"llm-topic": ("frozen", "lora-r4", "gated-lora-r16", "hypermod"),
                              "llm-multitask": ("frozen", "lora-r16", "lora-r16-prompt", "film")},
                     learning_rates={**LEARNING_RATES, "matrix": 1e-2, "vector": 3e-2},
                     # HyperMod on its default layers (k, v, down) diverges at the matrix rate 1e-2 on llm-topic
                     # (docs/tuned_lrs_llm.json: validation loss 13.97); its tuned rate there
                     method_lrs={"llm-topic": {"hypermod": 3e-3}},
                     about="the CI version of llm-cpu: 4 steps, 8 held-out articles, one seed"),
    # Many tasks in words (issue #28): 25 runs (the frozen base once) on 2 cores, written to results_manytask.json;
    # sized to stay under an hour there: a run is ~6 s of loading, ~3.3 s a step and ~1.3 s per 16 scored rows
    # (8 held-out articles x (11 seen + 11 reworded + 5 unseen) = 216 rows).
    # Not tuned apart (9 methods x 3 rates would double its cost): each method takes its rate tuned on llm-multitask,
    # the same model, prompts and batch (borrow_lrs; a *-desc method its ids twin's: Method.lr_of).
    "llm-manytask-cpu": Preset(seeds=(0, 1, 2), budgets={"llm-manytask": Budget(24, 8)}, tasks=("llm-manytask",),
                               methods={"llm-manytask": _LLM_MANY_METHODS}, llm_train_articles=200,
                               llm_test_articles=8, learning_rates={**LEARNING_RATES, "matrix": 1e-2, "vector": 3e-2},
                               method_lrs_files=(TUNED_LRS_LLM,), borrow_lrs={"llm-manytask": "llm-multitask"},
                               about="many tasks in words on SmolLM2-135M-Instruct: 11 trained tasks, reworded "
                                     "descriptions, 5 unseen tasks"),
    "llm-manytask-ci": Preset(seeds=(0,), budgets={"llm-manytask": Budget(2, 4)}, tasks=("llm-manytask",),
                              methods={"llm-manytask": ("frozen", "film-desc", "film", "lora-r16-prompt")},
                              llm_train_articles=8, llm_test_articles=1,
                              learning_rates={**LEARNING_RATES, "matrix": 1e-2, "vector": 3e-2},
                              about="the CI version of llm-manytask-cpu: 2 steps, one held-out article"),
    "full": Preset(seeds=(0, 1, 2, 3, 4), budgets={"text": Budget(1000, 32), "vision": Budget(600, 64),
                                                   "multitask": Budget(1200, 64)},
                   text_max_length=64, text_test_size=2000, about="a longer run for a GPU (not measured here)"),
}


# ------------------------------------------------------------------------------------------------------------ model
def build_model(problem: tasks.Problem, method: Method, task_set: list[int], seed: int, device,
                probe_heads: Optional[list] = None):
    """A deep copy of the frozen encoder + heads for ``task_set`` (+ the method's adapter): (model, params of the
    adapter, params of the heads). Heads start from ``probe_heads`` (the linear probe's weights per task) when
    given, else from a seeded random init."""
    from peft import get_peft_model

    import hadapeft  # noqa: F401  (registers hadapeft's adapter types with peft)

    torch.manual_seed(seed)
    model = tasks.Classifier(copy.deepcopy(problem.encoder), [problem.num_labels[t] for t in task_set], problem.pool)
    model.encoder.requires_grad_(False)
    for m in model.encoder.modules():  # no dropout: runs differ only by init and batch order (the ViT has none)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if probe_heads is not None:
        with torch.no_grad():
            model.head.weight.copy_(torch.cat([probe_heads[t][0] for t in task_set]))
            model.head.bias.copy_(torch.cat([probe_heads[t][1] for t in task_set]))
    if method.config is not None:
        model = get_peft_model(model, method.config(problem.model_type, len(task_set)))
    head = (model.get_base_model() if method.config is not None else model).head
    head.requires_grad_(True)  # peft froze it; every method trains the same head
    head_ids = {id(p) for p in head.parameters()}
    adapter = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return model.to(device), adapter, list(head.parameters())


def _numel(params) -> int:
    return sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------------------------- training
def batches(problem, split, method, task_set) -> tasks.Batches:
    """The collator of ``split``'s (sample, task) pairs for ``method`` (``task_ids`` for a task-conditioned one)."""
    return tasks.Batches(split, task_set, problem.transform, method.conditioned)


def train(problem, method, model, adapter, head, task_set, budget, lrs, seed, device, measure_memory):
    """Train for ``budget.steps`` on (sample, task) pairs of ``task_set`` in the Trainer's order seeded by ``seed``;
    returns (per-step seconds, peak bytes of one extra forward and backward or None)."""
    groups = [{"params": head, "lr": lrs["head"]}]
    if adapter:
        groups.append({"params": adapter, "lr": lrs[method.kind]})
    trainer, times = tasks.make_trainer(model, tasks.TaskPairs(len(problem.train), len(task_set)),
                                        batches(problem, problem.train, method, task_set), groups, budget.steps,
                                        budget.batch_size, seed, device,
                                        warmup_steps=max(1, budget.steps // 10))  # 10%; the rate starts from 0
    trainer.train()
    peak = None
    if measure_memory:  # after training, so the profiler never touches the measured run
        batch = next(iter(trainer.get_train_dataloader()))
        peak = peak_bytes(lambda: trainer.training_step(model, batch), device)
        model.zero_grad(set_to_none=True)
    return times, peak


@torch.inference_mode()
def evaluate(problem, method, model, task_set, device, batch_size=256) -> list[float]:
    """Held-out accuracy of each task in ``task_set``."""
    model.eval()
    accs, order, collate = [], tasks.in_length_order(problem.test), batches(problem, problem.test, method, task_set)
    for pos in range(len(task_set)):
        correct = 0
        for i in range(0, len(order), batch_size):
            batch = {k: v.to(device) for k, v in collate([(int(k), pos) for k in order[i:i + batch_size]]).items()}
            labels = batch.pop("labels")
            _, logits = model(**batch)
            correct += int((model_predict(model, logits, batch["head_ids"]) == labels).sum())
        accs.append(correct / len(problem.test))
    return accs


def model_predict(model, logits, head_ids):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.predict(logits, head_ids)


def run(problem, method, seed, budget, lrs, device, measure_memory, probe_heads=None) -> dict:
    """One (task, method, seed): one model for all tasks, or one per task for a single-task method on a
    multi-task problem (each trained for steps / T, the step budget is shared). Causal-LM problems run in
    ``_compare_llm``."""
    if isinstance(problem, llm.LMProblem):
        return llm.run(problem, method, seed, budget, lrs, device, measure_memory)
    all_tasks = list(range(problem.num_tasks))
    one_per_task = problem.num_tasks > 1 and method.config is not None and not method.conditioned
    task_sets = [[t] for t in all_tasks] if one_per_task else [all_tasks]
    sub = replace(budget, steps=budget.steps // len(task_sets))
    accs, times, peaks, n_adapter, n_head = [], [], [], 0, 0
    for task_set in task_sets:
        model, adapter, head = build_model(problem, method, task_set, seed, device, probe_heads)
        n_adapter, n_head = n_adapter + _numel(adapter), n_head + _numel(head)
        t, peak = train(problem, method, model, adapter, head, task_set, sub, lrs, seed, device,
                        measure_memory and not peaks)
        times += t
        peaks += [peak] if peak is not None else []
        accs += evaluate(problem, method, model, task_set, device)
    return {"task": problem.name, "method": method.name, "seed": seed, "accuracy": statistics.fmean(accs),
            "task_accuracy": dict(zip(problem.task_names, accs)), "adapter_params": n_adapter,
            "trainable_params": n_adapter + n_head, "steps": sub.steps * len(task_sets),
            "s_per_step": statistics.median(times), "step_times": times,
            "peak_mib": peaks[0] / 2**20 if peaks else None}


@dataclass
class Probe:
    """Logistic regression fit to convergence on the frozen encoder's pooled training features, one per task: the
    held-out accuracy it reaches (mean over tasks) and its weights, the head every run starts from."""
    accuracy: float
    scores: list  # held-out accuracy per task
    heads: list  # per task: (weight (C, H), bias (C,)) float32 tensors, ready for the task's rows of the head
    # The problem on those pooled features (train and held out), computed once: the frozen base trains its head here,
    # as it would on the encoder itself (the same features up to float rounding) without running it at every step.
    features: tasks.Problem


def pooled_features(problem, split, device, batch_size=256) -> torch.Tensor:
    """The frozen encoder's pooled features of ``split`` (in the split's order), pooled as the classifier pools
    them."""
    encoder, order = problem.encoder.to(device).eval(), tasks.in_length_order(split)
    out, collate = torch.empty(len(split), problem.encoder.config.hidden_size), tasks.Batches(split, [0],
                                                                                               problem.transform)
    with torch.inference_mode():
        for i in range(0, len(split), batch_size):
            idx = order[i:i + batch_size]
            inputs = {k: v.to(device) for k, v in collate.inputs(idx).items()}
            out[idx] = tasks.pool(encoder(**inputs).last_hidden_state, inputs.get("attention_mask"),
                                  problem.pool).cpu()
    return out


def linear_probe(problem, device) -> Probe:
    from sklearn.linear_model import LogisticRegression

    features = [pooled_features(problem, s, device) for s in (problem.train, problem.test)]
    train, test = (f.double().numpy() for f in features)
    scores, heads = [], []
    for t in range(problem.num_tasks):
        lr = LogisticRegression(max_iter=5000).fit(train, problem.train.labels[:, t].numpy())
        scores.append(lr.score(test, problem.test.labels[:, t].numpy()))
        w, b = torch.tensor(lr.coef_, dtype=torch.float32), torch.tensor(lr.intercept_, dtype=torch.float32)
        if len(lr.classes_) == 2:  # sklearn keeps one logit for two classes: softmax([0, z]) == sigmoid(z)
            w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
        heads.append((w, b))
    return Probe(statistics.fmean(scores), scores, heads, tasks.on_features(problem, *features))


# ------------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.compare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small", help="steps, batch sizes and seeds")
    p.add_argument("--out", default="docs",
                   help="folder for results.json and results.png (causal-LM tasks: results_llm.json and "
                        "results_llm.png; llm-manytask: results_manytask.json and .png) and results.md, rendered from "
                        "every results file in the folder")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated, from {', '.join(ENCODER_TASKS)} or from {', '.join(llm.ALL_TASKS)} "
                        f"(default: the preset's)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {', '.join(METHODS)} (default: all; each preset runs its own subset "
                        f"per task)")
    p.add_argument("--seeds", default=None, help="comma-separated ints (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run on every task (default: preset)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="text task: tokens kept from each text, [CLS] and [SEP] included (default: the preset's)")
    p.add_argument("--text-windows", type=int, default=None,
                   help="text task: consecutive word windows taken from each text (default: the preset's)")
    p.add_argument("--text-offset", type=int, default=None,
                   help="text task: words skipped at the start of each text (default: the preset's)")
    p.add_argument("--text-pool", choices=("cls", "mean"), default=None,
                   help="text task: features from the [CLS] token or the mean over tokens (default: the preset's)")
    p.add_argument("--lr", action="append", default=[], metavar="KIND=VALUE",
                   help=f"override a learning rate, KIND in {sorted(LEARNING_RATES)}")
    p.add_argument("--tune", default=None, metavar="LR,LR,...",
                   help="instead of the table: pick each adapter's learning rate for each task from this grid on a "
                        "validation split of the training data (first seed), and write tuned_lrs.json to --out")
    p.add_argument("--method-lrs", default=None, metavar="FILE|none",
                   help="tuned_lrs.json from --tune: each method's adapter learning rate per task (default: the "
                        "preset's, docs/tuned_lrs.json for cpu-small and ci; none: the fixed rates per kind)")
    p.add_argument("--head-init", choices=("probe", "random"), default="probe",
                   help="heads start from the linear probe on the frozen features (LP-FT) or from random")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (the first visible GPU: pick another with CUDA_VISIBLE_DEVICES)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--text-model", default=None,
                   help="text encoder: local folder, installed model package or Hub id (default: the offline "
                        "all-MiniLM-L6-v2)")
    p.add_argument("--text-dataset", default=None,
                   help="rotten-tomatoes or bbc-news (offline), or a local .jsonl/.csv or Hub data set with 'text' and "
                        "'label' columns (default: rotten-tomatoes)")
    p.add_argument("--vit-model", default=None,
                   help="vision encoder: local folder or Hub id, e.g. google/vit-base-patch16-224-in21k (default: "
                        "a small ViT pretrained here on digits 0-4)")
    p.add_argument("--llm-model", default=llm.MODEL,
                   help="causal LM of the llm-* tasks: the offline alias smollm2-135m-instruct, a local folder or a Hub "
                        "id (recipes/models.py)")
    p.add_argument("--cache-dir", default="~/.cache/hadapeft/compare", help="where the pretrained small ViT is kept")
    p.add_argument("--merge", action="store_true",
                   help="re-measure rows in place: this run's (task, method) rows replace those of the results file "
                        "already in --out (same preset and seeds), the rest stay; with --tune, its picks replace "
                        "those of the tuned_lrs file there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _pick(given: str, known, what: str) -> list[str]:
    names = [s.strip() for s in given.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise SystemExit(f"error: unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def resolve(args):
    """Check every argument before anything runs or is written: (tasks, methods, seeds, preset)."""
    preset = PRESETS[args.preset]
    task_names = _pick(args.tasks or ",".join(preset.tasks), TASKS, "task")
    if set(task_names) & set(llm.ALL_TASKS) and set(task_names) & set(ENCODER_TASKS):
        raise SystemExit(f"error: --tasks {','.join(task_names)}: the causal-LM tasks "
                         f"({', '.join(llm.ALL_TASKS)}) and the encoder tasks ({', '.join(ENCODER_TASKS)}) are compared in separate runs (each writes its "
                         f"own results file)")
    if "llm-manytask" in task_names and len(task_names) > 1:
        raise SystemExit(f"error: --tasks {','.join(task_names)}: llm-manytask is compared in a run of its own (it "
                         f"writes results_manytask.json)")
    method_names = _pick(args.methods or ",".join(METHODS), list(METHODS), "method")
    if "frozen" not in method_names:
        method_names.insert(0, "frozen")  # the floor every row is read against
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise SystemExit(f"error: --seeds must be comma-separated integers, got {args.seeds!r}") from None
    if seeds:
        preset = replace(preset, seeds=tuple(seeds))
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit(f"error: --steps must be positive, got {args.steps}")
        preset = replace(preset, budgets={k: replace(b, steps=args.steps) for k, b in preset.budgets.items()})
    if args.text_tokens is not None:
        if args.text_tokens < 3:
            raise SystemExit(f"error: --text-tokens must be at least 3 ([CLS], a token, [SEP]), got {args.text_tokens}")
        preset = replace(preset, text_max_length=args.text_tokens)
    if args.text_windows is not None:
        if args.text_windows < 1:
            raise SystemExit(f"error: --text-windows must be at least 1, got {args.text_windows}")
        preset = replace(preset, text_windows=args.text_windows)
    if args.text_offset is not None:
        if args.text_offset < 0:
            raise SystemExit(f"error: --text-offset must be 0 or more, got {args.text_offset}")
        preset = replace(preset, text_offset=args.text_offset)
    if args.text_pool is not None:
        preset = replace(preset, text_pool=args.text_pool)
    lrs, per_task = dict(preset.learning_rates), {t: dict(r) for t, r in preset.task_learning_rates.items()}
    for item in args.lr:
        kind, _, value = item.partition("=")
        try:
            if kind not in lrs:
                raise ValueError
            lrs[kind] = float(value)
        except ValueError:
            raise SystemExit(f"error: --lr {item!r}: expected KIND=VALUE with KIND in {sorted(lrs)}") from None
        for rates in per_task.values():  # the command line's rate holds on every task
            rates.pop(kind, None)
    preset = replace(preset, learning_rates=lrs, task_learning_rates=per_task)
    if args.method_lrs is not None:
        preset = replace(preset, method_lrs_files=(args.method_lrs,) if args.method_lrs not in ("", "none") else ())
    if preset.method_lrs_files and not args.tune:
        method_lrs = {}
        for f in preset.method_lrs_files:
            method_lrs.update(read_method_lrs(f))
        preset = replace(preset, method_lrs=method_lrs)
    args.tune_grid = None
    if args.tune:
        try:
            args.tune_grid = sorted({float(v) for v in args.tune.split(",") if v.strip()})
            if not args.tune_grid or min(args.tune_grid) <= 0:
                raise ValueError
        except ValueError:
            raise SystemExit(f"error: --tune must be comma-separated positive learning rates, got {args.tune!r}") \
                from None
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {args.device!r}: {e}") from None
    if device.type == "cuda" and device.index not in (None, 0):  # the Trainer trains on its process's GPU
        raise SystemExit(f"error: --device {args.device!r}: training runs on the first visible GPU; pick the GPU "
                         f"with CUDA_VISIBLE_DEVICES={device.index} and --device cuda")
    return task_names, [METHODS[m] for m in method_names], preset


def read_method_lrs(path) -> dict:
    """task -> method -> learning rate, from a tuned_lrs.json written by ``--tune``."""
    try:
        data = json.loads(Path(path).read_text())
        out = {task: {m: float(v["lr"]) for m, v in methods.items()} for task, methods in data["choice"].items()}
    except FileNotFoundError:
        raise SystemExit(f"error: --method-lrs {path!r} does not exist") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: --method-lrs {path!r} is not a tuned_lrs.json from --tune ({e!r})") from None
    unknown = sorted({m for methods in out.values() for m in methods} - set(METHODS))
    if unknown or not set(out) <= set(TASKS):
        raise SystemExit(f"error: --method-lrs {path!r} names unknown tasks or methods: "
                         f"{sorted(set(out) - set(TASKS)) + unknown}")
    return out


def tune(problems, methods, preset, grid, args, device, log) -> dict:
    """Each adapter method's learning rate per task: the grid value with the best validation accuracy (first seed,
    the preset's budget; ties go to the smaller rate). The frozen base keeps the head's rate."""
    choice = {}
    for problem in problems:
        is_llm = isinstance(problem, llm.LMProblem)
        val = llm.validation_problem(problem) if is_llm else tasks.validation_problem(problem)
        heads = None if is_llm or args.head_init != "probe" else linear_probe(val, device).heads
        for method in methods:
            if method.config is None or not preset.runs_on(method, problem.name, problem.num_tasks):
                continue
            scores, losses = {}, {}

            def score_of(lr):
                row = run(val, method, preset.seeds[0], preset.budgets[problem.name],
                          preset.learning_rates_for(problem.name, method, lr), device, False, heads)
                scores[lr], losses[lr] = row["accuracy"], row.get("eval_loss")
                log(f"tune {problem.name:9s} {method.name:22s} lr {lr:g}: validation accuracy {scores[lr]:.4f}"
                    + (f", loss {losses[lr]:.4f}" if losses[lr] is not None else ""))
                # ties (exact match on a small validation set ties often) go to the lower loss, then the smaller rate
                return scores[lr], -(losses[lr] or 0.0), -lr

            start = preset.learning_rates_for(problem.name, method)[method.kind]
            best = search(grid, score_of, start, preset.tune_window)
            tried = sorted(scores)
            choice.setdefault(problem.name, {})[method.name] = {
                "lr": best, "kind": method.kind, "validation_accuracy": {f"{lr:g}": scores[lr] for lr in tried}}
            if is_llm:
                choice[problem.name][method.name]["validation_loss"] = {f"{lr:g}": losses[lr] for lr in tried}
    return choice


def search(grid: list[float], score_of: Callable[[float], tuple], start: float, window: Optional[int]) -> float:
    """The grid value with the best ``score_of``. ``window`` None: every value. Else the ``window`` values around
    the one nearest ``start`` first, then one more value beyond the best while the best is at the edge of what was
    tried (and the grid goes on): a line search that stops where the score turns down on both sides."""
    if window is None or window >= len(grid):
        return max(grid, key=score_of)
    i = min(range(len(grid)), key=lambda j: abs(math.log(grid[j] / start)))
    lo = max(0, min(i - window // 2, len(grid) - window))
    tried = {j: score_of(grid[j]) for j in range(lo, lo + window)}
    while True:
        best = max(tried, key=tried.get)
        step = -1 if best == min(tried) else 1 if best == max(tried) else 0
        if step == 0 or not 0 <= best + step < len(grid):
            return grid[best]
        tried[best + step] = score_of(grid[best + step])


def load_problems(task_names, args, preset, log) -> list:
    problems = []
    if set(task_names) & set(llm.ALL_TASKS):
        from recipes.models import resolve_model

        path = resolve_model(args.llm_model)  # the offline alias: converted once, then cached
        problems += [llm.load_problem(name, path, preset.llm_max_words, preset.llm_train_articles,
                                      preset.llm_test_articles, model_name=args.llm_model)
                     for name in llm.ALL_TASKS if name in task_names]
    if "text" in task_names:
        problems.append(tasks.text_problem(args.text_model, args.text_dataset, preset.text_max_length,
                                           preset.text_test_size, preset.text_offset, preset.text_windows,
                                           preset.text_pool))
    if {"vision", "multitask"} & set(task_names):
        encoder, name = tasks.vit_encoder(args.vit_model, Path(args.cache_dir), log)
        if "vision" in task_names:
            problems.append(tasks.vision_problem(encoder, name))
        if "multitask" in task_names:
            problems.append(tasks.multitask_problem(encoder, name))
    return problems


def main(argv=None) -> dict:
    args = parse_args(argv)
    task_names, methods, preset = resolve(args)
    import transformers
    from tqdm.auto import tqdm

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if set(task_names) & set(llm.ALL_TASKS):
        import datasets

        datasets.disable_progress_bars()  # TRL's dataset preparation, once per run
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    problems = load_problems(task_names, args, preset, print)
    device = torch.device(args.device)
    family = ("encoder" if not isinstance(problems[0], llm.LMProblem) else
              "llm-manytask" if task_names == ["llm-manytask"] else "llm")
    llm_family = report.is_llm(family)
    if args.tune_grid:
        out = Path(args.out)
        path = out / ("tuned_lrs_llm.json" if llm_family else "tuned_lrs.json")
        if args.merge and not path.is_file():
            raise SystemExit(f"error: --merge: {path} does not exist; tune the whole preset into {out} first")
        choice = tune(problems, methods, preset, args.tune_grid, args, device, print)
        result = {"command": report.command(argv), "grid": args.tune_grid, "seed": preset.seeds[0],
                  "validation": ("as many training articles as the held-out set has" if llm_family else
                                 "20% of the training sources"), "choice": choice}
        if args.merge:  # these (task, method) picks replace the file's; the rest stay
            old = json.loads(path.read_text())
            for task, picks in choice.items():
                old["choice"].setdefault(task, {}).update(picks)
            old.setdefault("updates", []).append({"command": result["command"], "grid": args.tune_grid,
                                                  "picks": {t: sorted(c) for t, c in choice.items()}})
            result = old
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        return result
    # the frozen LLM is scored once: it does not train, so every seed would give the same numbers
    jobs = [(p, m, s) for p in problems for m in methods if preset.runs_on(m, p.name, p.num_tasks)
            for s in (preset.seeds[:1] if llm_family and m.config is None else preset.seeds)]
    rows = []
    probes = {p.name: None if llm_family else linear_probe(p, device) for p in problems}
    bar = tqdm(jobs, desc="compare", unit="run", dynamic_ncols=True, disable=args.no_progress)
    for problem, method, seed in bar:
        bar.set_postfix_str(f"{problem.name} {method.name} seed {seed}")
        lrs = preset.learning_rates_for(problem.name, method)
        probe = probes[problem.name]
        on = probe.features if probe and method.config is None else problem  # the head alone: cached features
        row = run(on, method, seed, preset.budgets[problem.name], lrs, device, seed == preset.seeds[0],
                  probe.heads if probe and args.head_init == "probe" else None)
        row["learning_rate"] = lrs[method.kind] if family == "encoder" or method.config is not None else None
        rows.append(row)
        bar.write(f"{problem.name:9s} {method.name:22s} seed {seed}: accuracy {row['accuracy']:.4f}"
                  + (f", loss {row['eval_loss']:.4f}" if "eval_loss" in row else "")
                  + (f", {row['s_per_step'] * 1e3:.0f} ms/step" if row["s_per_step"] is not None else ""))
    bar.close()
    # methods asked for by name that the preset leaves out of a task (by default every method is asked for, and the
    # preset's own subset per task is no news)
    not_run = {p.name: [m.name for m in methods if args.methods and preset.skips(m, p.name)] for p in problems}
    meta = report.metadata(args, argv, preset, problems, {k: v and v.accuracy for k, v in probes.items()},
                           time.perf_counter() - t_start, not_run, family)
    order, library = [m.name for m in methods], {m.name: m.library for m in methods}
    if args.merge:
        rows, meta, order, library = report.merge(Path(args.out), rows, meta, order, library)
    return report.write_all(Path(args.out), rows, meta, order, library)


if __name__ == "__main__":
    main()
