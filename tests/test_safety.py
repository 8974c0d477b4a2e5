"""Reliability and safety: crash-consistent saves, safetensors-only loading, configs that cannot run code,
safe_merge refusing non-finite weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model

import hadapeft
from hadapeft.errors import AdapterCheckpointError
from conftest import build_model, logits, make_inputs
from test_contract import make_config

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter ("zygote") builds a small llama whose adapter file is a few MB, saves the base model and the two
# reference adapters A and B, then on each line read from stdin forks a child that saves A, B, A, B, ... into the
# target folder forever and reports the child's pid. The test SIGKILLs that child at a random moment. Forking from a
# single-threaded zygote makes each round cheap (no interpreter start-up) while the kill stays a real SIGKILL.
ZYGOTE = r"""
import os, signal, sys, torch, transformers as tf
torch.set_num_threads(1)
import hadapeft
from peft import get_peft_model
base_dir, ref_a, ref_b, target = sys.argv[1:5]
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
base = tf.LlamaForCausalLM(cfg).eval()
base.save_pretrained(base_dir)
model = get_peft_model(base, hadapeft.GatedLoraConfig(r=64, lora_alpha=16, target_modules="all-linear",
                                                      init_weights=False, task_type="CAUSAL_LM"))
params = {k: p for k, p in model.named_parameters() if p.requires_grad}
states = []
for seed in (1, 2):
    torch.manual_seed(seed)
    states.append({k: torch.randn_like(p) * 0.02 for k, p in params.items()})
def use(state):
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
use(states[0]); model.save_pretrained(ref_a)
use(states[1]); model.save_pretrained(ref_b)
use(states[0]); model.save_pretrained(target)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
print("READY", os.path.getsize(os.path.join(target, "adapter_model.safetensors")), flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        i = 1
        while True:
            use(states[i % 2]); model.save_pretrained(target); i += 1
    print(pid, flush=True)
"""


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not die")


def _load_logits(base_dir, adapter_dir, inputs):
    model = PeftModel.from_pretrained(tf.LlamaForCausalLM.from_pretrained(base_dir), str(adapter_dir))
    return logits(model.eval(), inputs)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_save_killed_at_random_moments_leaves_old_or_new(tmp_path):
    base_dir, ref_a, ref_b, target = (str(tmp_path / n) for n in ("base", "ref_a", "ref_b", "target"))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, base_dir, ref_a, ref_b, target], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        ready = zygote.stdout.readline().split()
        assert ready and ready[0] == "READY", ready
        assert int(ready[1]) > 2_000_000  # big enough that a kill lands mid-write
        Path(target, "notes.txt").write_text("user file")
        inputs = {"input_ids": torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))}
        expected = [_load_logits(base_dir, ref, inputs) for ref in (ref_a, ref_b)]
        assert not torch.equal(*expected)
        # Calibrate: how long one save takes in the child, so that kills spread over a few saves.
        t0 = time.perf_counter()
        model = PeftModel.from_pretrained(tf.LlamaForCausalLM.from_pretrained(base_dir), ref_a)
        model.save_pretrained(str(tmp_path / "calibrate"))
        save_s = time.perf_counter() - t0
        rng = random.Random(1234)
        seen, interrupted = [], 0
        for _ in range(20):
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0, 3 * save_s))
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
            interrupted += any(n.startswith(".hadapeft") for n in os.listdir(target))
            got = _load_logits(base_dir, target, inputs)
            which = [i for i, e in enumerate(expected) if torch.equal(got, e)]
            assert which, "the folder holds neither the old nor the new adapter"
            seen.append(which[0])
            assert Path(target, "notes.txt").read_text() == "user file"
        print("kept old/new:", seen, "killed mid-save:", interrupted, "save_s:", save_s)
        assert set(seen) == {0, 1} and interrupted >= 3, (seen, interrupted)  # the kills did land inside saves
        # Leftovers of killed saves are cleaned up by the next save.
        model.save_pretrained(target)
        left = [n for n in os.listdir(target) if n.startswith(".hadapeft")]
        assert left == [], left
        assert torch.equal(_load_logits(base_dir, target, inputs), expected[0])
    finally:
        zygote.kill()
        zygote.wait()


def _small_peft(option="gated_vector", family="llama", seed=0):
    torch.manual_seed(seed)
    return get_peft_model(build_model(family), make_config(option, family, init_weights=False))


def test_atomic_save_keeps_user_files_and_sub_adapters(tmp_path):
    model = _small_peft()
    model.add_adapter("other", make_config("gated_vector", "llama", init_weights=False))
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# my notes\n")
    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / ".hadapeft-tmp-999999999-dead").mkdir()  # leftover of a killed save (pid does not exist)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert "my notes" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".hadapeft")]
    inputs = make_inputs("llama")
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_interrupted_commit_is_rolled_forward_on_load(tmp_path):
    old, new = _small_peft(seed=0), _small_peft(seed=1)
    inputs = make_inputs("llama")
    old.save_pretrained(tmp_path)
    # Simulate a crash after the commit rename and after the weights were moved in, before the config was.
    new.save_pretrained(tmp_path / "staged")
    commit = tmp_path / ".hadapeft-commit"
    commit.mkdir()
    os.replace(tmp_path / "staged" / "adapter_config.json", commit / "adapter_config.json")
    os.replace(tmp_path / "staged" / "adapter_model.safetensors", tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(new, inputs))
    assert not commit.exists()


def test_failed_save_leaves_old_adapter(tmp_path, monkeypatch):
    model = _small_peft()
    model.save_pretrained(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    import peft.peft_model

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _small_peft(seed=3).save_pretrained(tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".hadapeft")]


# --- safe loading ---------------------------------------------------------------------------------------------------
@pytest.fixture
def pickle_adapter(tmp_path):
    model = _small_peft()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    return tmp_path, model


def test_pickle_checkpoint_refused_by_default(pickle_adapter, monkeypatch):
    path, _ = pickle_adapter
    monkeypatch.delenv("HADAPEFT_ALLOW_PICKLE", raising=False)
    base = build_model("llama")
    with pytest.raises(AdapterCheckpointError, match="allow_pickle_checkpoints.*HADAPEFT_ALLOW_PICKLE"):
        PeftModel.from_pretrained(base, path)
    assert not hasattr(base, "peft_config")
    peft_model = _small_peft()
    with pytest.raises(AdapterCheckpointError, match="pickle"):
        peft_model.load_adapter(path, "second")
    assert "second" not in peft_model.peft_config


def test_pickle_checkpoint_opt_in(pickle_adapter, monkeypatch):
    path, model = pickle_adapter
    inputs = make_inputs("llama")
    monkeypatch.delenv("HADAPEFT_ALLOW_PICKLE", raising=False)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k))
    with hadapeft.allow_pickle_checkpoints():
        loaded = PeftModel.from_pretrained(build_model("llama"), path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert calls == [True]
    with pytest.raises(AdapterCheckpointError):  # the opt-in ends with the block
        PeftModel.from_pretrained(build_model("llama"), path)
    monkeypatch.setenv("HADAPEFT_ALLOW_PICKLE", "1")
    loaded = PeftModel.from_pretrained(build_model("llama"), path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def _edit_config(path, **fields):
    cfg_file = Path(path) / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(fields)
    cfg_file.write_text(json.dumps(cfg))


@pytest.mark.parametrize("auto_mapping", [
    {"base_model_class": "system", "parent_library": "os"},
    {"base_model_class": "LlamaForCausalLM", "parent_library": "hadapeft_evil_module"},
    {"base_model_class": "LlamaForCausalLM", "parent_library": "transformersevil"},
    {"base_model_class": "LlamaForCausalLM; import os", "parent_library": "transformers"},
    "transformers",
])
def test_config_auto_mapping_cannot_import(tmp_path, auto_mapping):
    _small_peft().save_pretrained(tmp_path)
    _edit_config(tmp_path, auto_mapping=auto_mapping, task_type=None)
    with pytest.raises(AdapterCheckpointError, match="auto_mapping"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    PeftModel.from_pretrained(build_model("llama"), tmp_path)  # PeftModel ignores auto_mapping: nothing to refuse
    assert "hadapeft_evil_module" not in sys.modules


def test_config_base_model_remote_code_refused(tmp_path):
    _small_peft().save_pretrained(tmp_path)
    _edit_config(tmp_path, base_model_name_or_path="someone/repo-with-code")
    with pytest.raises(AdapterCheckpointError, match="trust_remote_code"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)


def test_autopeft_valid_transformers_auto_mapping_still_loads(tmp_path):
    base_dir = tmp_path / "base"
    build_model("llama").save_pretrained(base_dir)
    model = get_peft_model(tf.LlamaForCausalLM.from_pretrained(base_dir),
                           make_config("gated_vector", "llama", init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    inputs = make_inputs("llama")
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


# --- safe_merge -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_safe_merge_refuses_non_finite(value):
    from hadapeft.core.layer import HadaLayer

    model = _small_peft()
    layer = next(m for m in model.modules() if isinstance(m, HadaLayer))
    weight_before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if value != value and p.requires_grad:
                p.fill_(value)
            elif "lora_A" in name or "lora_B" in name:  # B @ A overflows to +inf; the gate stays finite
                p.fill_(1e30)
    if value == float("inf"):  # the merged weight overflows to inf, not NaN: isnan alone would let it through
        w, _ = layer.frozen_weight(torch.float32)
        t = layer.merge_terms("default")
        merged = w * (t.M if t.M is not None else 1) + (t.W_add if t.W_add is not None else 0)
        assert torch.isinf(merged).any() and not torch.isnan(merged).any()
    with pytest.raises(ValueError, match="broken"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weight_before)
    assert not layer.merged
