"""Saving and loading across processes and entry points, and what happens with bad checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import hadapeft
from hadapeft.core.layer import HadaLayer
from conftest import build_model, logits, make_inputs
from test_contract import make_config

ROOT = Path(__file__).resolve().parents[1]
FRESH_CASES = [("gated_vector", "llama"), ("gated_scalar_all_linear", "gpt2"), ("ia3", "qwen2"),
               ("ia3_fused_qkv", "gpt2"), ("gated_vector", "bert"), ("ia3", "vit")]


def _run_fresh(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _save_pretrained_base(family, path):
    model = build_model(family)
    model.save_pretrained(path)
    return model


@pytest.mark.slow
def test_fresh_process_reproduces_logits(tmp_path):
    """Acceptance: a new python process reloads each adapter — through PeftModel.from_pretrained, the
    AutoPeftModelFor* classes and transformers' load_adapter — and gets the same logits (fp32, ≤ 1e-6)."""
    table = []
    for i, (option, family) in enumerate(FRESH_CASES):
        base_dir, adapter_dir = tmp_path / f"base{i}", tmp_path / f"adapter{i}"
        _save_pretrained_base(family, base_dir)
        auto_cls = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM",
                    "bert": "AutoModelForSequenceClassification", "vit": "AutoModelForImageClassification"}[family]
        import transformers

        base = getattr(transformers, auto_cls).from_pretrained(base_dir).eval()
        torch.manual_seed(i)
        model = get_peft_model(base, make_config(option, family, init_weights=False))
        inputs = make_inputs(family)
        torch.save({"inputs": inputs, "logits": logits(model, inputs)}, tmp_path / f"expected{i}.pt")
        model.save_pretrained(adapter_dir)
        table.append((family, auto_cls, str(base_dir), str(adapter_dir), str(tmp_path / f"expected{i}.pt")))
    out = _run_fresh(f"""
        import torch, transformers, hadapeft
        from peft import PeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
        auto_peft = {{"AutoModelForCausalLM": AutoPeftModelForCausalLM,
                     "AutoModelForSequenceClassification": AutoPeftModelForSequenceClassification}}
        for family, auto_cls, base_dir, adapter_dir, expected in {table!r}:
            exp = torch.load(expected)
            def check(model, how):
                with torch.no_grad():
                    diff = (model.eval()(**exp["inputs"]).logits - exp["logits"]).abs().max().item()
                print(family, how, diff)
                assert diff <= 1e-6, (family, how, diff)
            base = getattr(transformers, auto_cls).from_pretrained(base_dir)
            check(PeftModel.from_pretrained(base, adapter_dir), "PeftModel")
            if auto_cls in auto_peft:
                check(auto_peft[auto_cls].from_pretrained(adapter_dir), "AutoPeftModel")
            plain = getattr(transformers, auto_cls).from_pretrained(base_dir)
            plain.load_adapter(adapter_dir)
            check(plain, "transformers.load_adapter")
        print("ALL OK")
    """)
    assert "ALL OK" in out
    assert out.count("AutoPeftModel") == 5 and out.count("transformers.load_adapter") == len(FRESH_CASES)


def test_loading_without_import_names_hadapeft(tmp_path):
    """adapter_config.json records hadapeft's version; a process that did not `import hadapeft` gets an error saying
    it should (from the hadapeft_peft_hint.pth hook a regular install puts into site-packages)."""
    import importlib.util
    import site

    model = get_peft_model(build_model("llama"), make_config("gated_vector", "llama"))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "GATED_LORA" and cfg["hadapeft_version"] == hadapeft.__version__
    if not any(os.path.exists(os.path.join(d, "hadapeft_peft_hint.pth")) for d in site.getsitepackages()):
        pytest.skip("hadapeft is not installed here (scripts/setup_env.sh installs it with the hint hook)")
    assert importlib.util.find_spec("_hadapeft_peft_hint") is not None
    out = _run_fresh(f"""
        import sys
        from peft import PeftModel, PeftConfig
        from conftest import build_model
        for load in (lambda: PeftModel.from_pretrained(build_model("llama"), {str(tmp_path)!r}),
                     lambda: PeftConfig.from_pretrained({str(tmp_path)!r})):
            try:
                load()
            except ValueError as e:
                print("ERROR:", e)
        assert "hadapeft" not in sys.modules
    """)
    assert out.count("ERROR: this adapter is a hadapeft GATED_LORA adapter: run `import hadapeft`") == 2


# --- bad checkpoints: a clear error, and the model as it was --------------------------------------------------------
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [type(m) for m in model.modules()] == types
    assert not any(isinstance(m, HadaLayer) for m in model.modules()) or any(t is not None for t in types)
    assert not hasattr(model, "peft_config")


@pytest.fixture
def saved_adapter(tmp_path):
    model = get_peft_model(build_model("llama"), make_config("gated_vector", "llama", init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _load_into_fresh(path, family="llama", **kw):
    base = build_model(family, **kw)
    snap = _snapshot(base)
    return base, snap


def test_missing_weights_file(saved_adapter):
    (saved_adapter / "adapter_model.safetensors").unlink()
    base, snap = _load_into_fresh(saved_adapter)
    with pytest.raises(hadapeft.AdapterCheckpointError, match="no adapter_model.safetensors"):
        PeftModel.from_pretrained(base, saved_adapter)
    _assert_unchanged(base, snap)


def test_corrupt_weights_file(saved_adapter):
    f = saved_adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    base, snap = _load_into_fresh(saved_adapter)
    with pytest.raises(hadapeft.AdapterCheckpointError, match=str(saved_adapter)):
        PeftModel.from_pretrained(base, saved_adapter)
    _assert_unchanged(base, snap)


def test_checkpoint_for_another_base_shape(saved_adapter):
    import transformers as tf

    base = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    snap = _snapshot(base)
    with pytest.raises(hadapeft.AdapterCheckpointError, match=r"shapes that do not fit.*\(4, 32\) vs model \(4, 48\)"):
        PeftModel.from_pretrained(base, saved_adapter)
    _assert_unchanged(base, snap)


def test_checkpoint_missing_tensors(saved_adapter):
    f = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, f)
    base, snap = _load_into_fresh(saved_adapter)
    with pytest.raises(hadapeft.AdapterCheckpointError, match="missing from the checkpoint"):
        PeftModel.from_pretrained(base, saved_adapter)
    _assert_unchanged(base, snap)


def test_load_adapter_failure_keeps_existing_adapters(saved_adapter, tmp_path):
    model = get_peft_model(build_model("llama"), make_config("gated_vector", "llama", init_weights=False))
    inputs = make_inputs("llama")
    before = logits(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (saved_adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(hadapeft.AdapterCheckpointError):
        model.load_adapter(saved_adapter, adapter_name="second")
    assert set(model.peft_config) == {"default"}
    assert model.state_dict().keys() == state.keys()
    assert torch.equal(logits(model, inputs), before)
