"""``python -m scripts.gpu_results --dry-run`` (what CI runs): it lists every step with its command and checks that
what the steps run imports; without CUDA a real run stops with a clear error instead of writing empty results."""

from __future__ import annotations

import pytest

from scripts import gpu_results


def test_dry_run_lists_every_step_and_checks_imports(capsys):
    assert gpu_results.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for k, step in enumerate(gpu_results.STEPS, 1):
        assert f"{k}. {step.name} [" in out, step.name
        assert "python " + " ".join(step.args) in out
    assert "import scripts.bench_llm: ok" in out and "import hadapeft.kernels.gated_lora: ok" in out
    assert "BROKEN" not in out


def test_dry_run_reports_a_broken_import_and_skips_an_absent_optional_step(monkeypatch, capsys):
    steps = [gpu_results.Step("broken", "x", ["-c", "pass"], 1, imports=("hadapeft.no_such_module",)),
             gpu_results.Step("absent", "y", ["-m", "scripts.no_such_script"], 1, imports=("scripts.no_such_script",),
                              optional="scripts.no_such_script")]
    monkeypatch.setattr(gpu_results, "STEPS", steps)
    assert gpu_results.main(["--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "1. broken [BROKEN" in out and "ModuleNotFoundError" in out
    assert "2. absent [would skip" in out and "scripts/no_such_script.py is not in this checkout" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_real_run_without_cuda_is_a_clear_error():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_results.main(["--only", "kernel-parity"])
