"""The adapter contract on the Triton backend, run in Triton's CPU interpreter (a subprocess, because the interpreter
must be switched on before triton is first imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TRITON_INTERPRET="1", HADAPEFT_BACKEND="triton", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")


def _run(args, timeout=600):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-4000:])
    return res.stdout


def test_kernels_are_the_path_taken():
    out = _run(["-c", """
import sys, torch, hadapeft
from test_contract import peft_model, make_inputs, logits
for option in ("gated_vector", "ia3"):
    m = peft_model(option, "llama"); x = make_inputs("llama")
    m(**x).logits.sum().backward()
    tri = logits(m, x)
    with hadapeft.use_backend("torch"):
        ref = logits(m, x)
    assert (tri - ref).abs().max() < 1e-5, (option, (tri - ref).abs().max())
assert "hadapeft.kernels.gated_lora" in sys.modules and "hadapeft.kernels.modulate" in sys.modules
print("TRITON PATH OK")
"""])
    assert "TRITON PATH OK" in out


@pytest.mark.slow
def test_contract_table_on_triton_backend_llama():
    out = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py", "-k", "llama",
                "tests/test_conditioned.py", "-k", "llama"])
    assert " passed" in out and " failed" not in out
