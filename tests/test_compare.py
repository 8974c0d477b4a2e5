"""scripts/compare.py: the CI-sized comparison (every method beats the frozen base on each task it runs on; the
table, plot and per-seed JSON name every method and task), encoders given by path, and bad input (a clear error
naming it, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="needs the recipes extra (matplotlib)")
pytest.importorskip("sklearn", reason="needs scikit-learn (the digits and the BBC split)")
import torch  # noqa: E402

from scripts import compare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    try:
        result = compare.main(["--preset", "ci", "--out", str(out), "--cache-dir", str(out / "cache"),
                               "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return out, result


CHANCE = {"text": 1 / 5, "vision": 1 / 5, "multitask": (1 / 10 + 1 / 2 + 1 / 3) / 3}


@pytest.mark.slow
def test_every_method_trains_and_adaptation_beats_the_frozen_base(ci_run):
    """What must hold at this budget. Not "every method beats the frozen base": the published cpu-small run
    (docs/results.md) shows that false on this data -- on text the adapters are within the seed spread of the frozen
    base, and on the ViT tasks FiLM, IA3-style and low-rank-r4 adapters are not all above it. So: every method trains (twice chance) without wrecking the encoder (at most 5 points under the
    frozen base), and on the ViT tasks, where the linear probe shows the frozen features fall short, the best
    adapter beats the frozen base by 2 points (cpu-small: +17 on vision, +3 on multitask)."""
    for task in compare.TASKS:
        rows = {s["method"]: s["accuracy_mean"] for s in ci_run[1]["summary"] if s["task"] == task}
        frozen = rows.pop("frozen")
        assert rows, f"{task}: no method ran"
        broken = {m: round(a, 4) for m, a in rows.items() if a < max(2 * CHANCE[task], frozen - 0.05)}
        assert not broken, f"{task}: frozen base {frozen:.4f}; far below it or near chance: {broken}"
        if task != "text":
            assert max(rows.values()) > frozen + 0.02, f"{task}: no adapter clearly beats the frozen base {rows}"


@pytest.mark.slow
def test_table_plot_and_json_name_every_method_and_task(ci_run):
    out, _ = ci_run
    data = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert {s["method"] for s in data["summary"]} == set(compare.METHODS)  # every method appears somewhere
    for task in compare.TASKS:
        assert f"\n## {task}\n" in md
        for name, method in compare.METHODS.items():
            if compare.PRESETS["ci"].runs_on(method, task, 3 if task == "multitask" else 1):
                assert any(s["task"] == task and s["method"] == name for s in data["summary"]), (task, name)
    for s in data["summary"]:
        assert f"| {s['method']} | " in md
        assert 0.0 <= s["accuracy_mean"] <= 1.0 and s["s_per_step"] > 0 and s["peak_mib"] > 0
        assert s["trainable_params"] > s["adapter_params"] >= (0 if s["method"] == "frozen" else 1)
    assert len(data["runs"]) == len(data["summary"]) * len(compare.PRESETS["ci"].seeds)
    assert data["meta"]["command"].startswith("python -m scripts.compare --preset ci")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_single_task_methods_pay_one_adapter_per_task(ci_run):
    """On multitask (3 tasks, same ViT as vision) an unconditioned method trains three adapters: 3x the parameters."""
    _, result = ci_run
    params = {(s["task"], s["method"]): s["adapter_params"] for s in result["summary"]}
    for name, method in compare.METHODS.items():
        if method.config is not None and not method.conditioned and ("vision", name) in params:
            assert params["multitask", name] == 3 * params["vision", name], name


@pytest.mark.slow
def test_vit_given_as_a_folder_is_resized_to(tmp_path):
    """--vit-model takes any ViT (a Hub id, or here a local folder): 8x8 grey digits become 3x32x32 inputs."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64)).save_pretrained(str(tmp_path / "vit"))
    result = compare.main(["--tasks", "vision,multitask", "--methods", "lora-r4,film", "--seeds", "0",
                           "--steps", "3", "--vit-model", str(tmp_path / "vit"), "--out", str(tmp_path / "out"),
                           "--no-progress"])
    assert {(s["task"], s["method"]) for s in result["summary"]} == {
        (t, m) for t in ("vision", "multitask") for m in ("frozen", "lora-r4", "film")}
    assert str(tmp_path / "vit") in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--methods", "lora-r4,lora-r99"], r"unknown method 'lora-r99'; choose from frozen, lora-r4"),
    (["--tasks", "text,audio"], r"unknown task 'audio'; choose from text, vision, multitask"),
    (["--seeds", "0,one"], r"--seeds must be comma-separated integers, got '0,one'"),
    (["--lr", "adapter=1e-3"], r"--lr 'adapter=1e-3': expected KIND=VALUE with KIND in"),
    (["--steps", "0"], r"--steps must be positive, got 0"),
    (["--tasks", "vision", "--vit-model", "/no/such/vit"], r"could not load '/no/such/vit'"),
    (["--tasks", "text", "--text-dataset", "no_such_file.jsonl"], r"data file no_such_file.jsonl does not exist"),
])
def test_bad_input_fails_clearly_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        compare.main([*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_hub_ids_are_accepted_and_fail_clearly_offline(tmp_path):
    """A Hub id is taken as one; offline (HF_HUB_OFFLINE=1) it fails at once with an error naming it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "scripts.compare", "--tasks", "vision", "--vit-model",
                           "google/vit-base-patch16-224-in21k", "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "could not load 'google/vit-base-patch16-224-in21k'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
