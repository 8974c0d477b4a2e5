"""Reliability and safety: crash-consistent saves, safetensors-only loading, configs that cannot run code,
safe_merge refusing non-finite weights."""

from __future__ import annotations

import json
import queue
import os
import random
import signal
import subprocess
import sys
import threading
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


def _reply(zygote) -> list[str]:
    """The zygote's next reply line, split: its lines start with READY or a pid; lines libraries log to stdout on
    import (DeepSpeed's accelerator detection, when it is installed) are skipped."""
    while True:
        line = zygote.stdout.readline()
        if not line or line.split()[0] == "READY" or line.strip().isdigit():
            return line.split()


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
        ready = _reply(zygote)
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
            pid = int(_reply(zygote)[0])
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


# --- concurrent savers (issue 22, class 1; acceptance 2) ------------------------------------------------------------
# Each worker process saves a tiny Gated LoRA adapter into one shared folder when told to; its save in round i has
# every trainable tensor filled with the value v = 1000·worker + i + 1 and lora_alpha = v, so the folder tells which
# save it holds and whether its weights and config come from the same save. The parent releases both workers at once
# each round, reads the folder (under hadapeft's read lock) while they save, and checks after the round that the folder
# holds exactly one of that round's two saves: never a mix, never an older save (a committed save lost).
SAVER = r"""
import importlib, os, sys, time, torch, transformers as tf
torch.set_num_threads(1)
import hadapeft
from peft import get_peft_model
worker, target, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
if delay:  # a slow disk: every fsync takes `delay` seconds (widens every window between the steps of a save)
    atomic_save = importlib.import_module("hadapeft.safety.atomic_save")
    fsync = atomic_save._fsync_path
    def slow_fsync(*args, **kwargs):
        time.sleep(delay)
        fsync(*args, **kwargs)
    atomic_save._fsync_path = slow_fsync
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
model = get_peft_model(tf.LlamaForCausalLM(cfg), hadapeft.GatedLoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
params = [p for p in model.parameters() if p.requires_grad]
print("READY", flush=True)
for line in sys.stdin:
    v = 1000.0 * worker + int(line) + 1
    with torch.no_grad():
        for p in params:
            p.fill_(v)
    model.peft_config["default"].lora_alpha = v
    model.save_pretrained(target)
    print("DONE", int(line), flush=True)
"""


def _folder_holds(target) -> float:
    """The v of the save ``target`` holds (asserting that its weights and config come from that one save)."""
    from safetensors.torch import load_file

    with hadapeft.safety.reading([str(target)]):
        alpha = json.loads((target / "adapter_config.json").read_text())["lora_alpha"]
        tensors = load_file(target / "adapter_model.safetensors")
    values = {float(t.flatten()[0]) for t in tensors.values()} | {float(t.min()) for t in tensors.values()} | \
        {float(t.max()) for t in tensors.values()}
    assert len(tensors) == 12 and values == {alpha}, ("weights and config of different saves", alpha, values)
    return alpha


def _lines(proc, out: queue.Queue):
    for line in proc.stdout:
        out.put(line.split())


@pytest.mark.slow
@pytest.mark.parametrize("fsync_delay", [0.0, 0.004], ids=["fast-disk", "slow-disk"])
def test_concurrent_saves_keep_one_whole_save(tmp_path, fsync_delay):
    target = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}")
    workers, replies = [], queue.Queue()
    for w in (1, 2):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(w), str(target), str(fsync_delay)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                stderr=open(tmp_path / f"saver{w}.err", "w"))
        workers.append(proc)
        threading.Thread(target=_lines, args=(proc, replies), daemon=True).start()
    try:
        assert [replies.get(timeout=300) for _ in workers] == [["READY"], ["READY"]]
        reads = 0
        for i in range(50):
            for proc in workers:
                proc.stdin.write(f"{i}\n")
                proc.stdin.flush()
            done = 0
            while done < 2:
                assert all(proc.poll() is None for proc in workers), \
                    "a saver died: " + "".join((tmp_path / f"saver{w}.err").read_text()[-2000:] for w in (1, 2))
                try:
                    reply = replies.get(timeout=0.001 if target.exists() else 300)
                except queue.Empty:  # both still saving: a reader meanwhile sees one whole save (or the old one)
                    if (target / "adapter_config.json").exists():
                        assert _folder_holds(target) in {1000 * w + j + 1 for w in (1, 2) for j in (i - 1, i)}
                        reads += 1
                    continue
                assert reply == ["DONE", str(i)], reply
                done += 1
            assert _folder_holds(target) in {1001 + i, 2001 + i}, f"round {i}: the folder lost both saves"
            assert not [n for n in os.listdir(target) if n.startswith(".hadapeft")]
        print("reads during saves:", reads)
    finally:
        for proc in workers:
            proc.kill()
            proc.wait()
    loaded = PeftModel.from_pretrained(build_model("llama"), target)
    v = loaded.peft_config["default"].lora_alpha
    assert v in {1050, 2050}
    assert all(bool((p == v).all()) for n, p in loaded.named_parameters() if "gated_lora_" in n)


def test_a_stage_of_a_live_saver_is_not_deleted(tmp_path):
    """Another saver's staging folder (its owner alive, e.g. another thread of this process) is left alone; one
    whose owner is gone is cleaned up."""
    import importlib

    atomic_save = importlib.import_module("hadapeft.safety.atomic_save")
    model = _small_peft()
    live = tmp_path / f"{atomic_save.STAGE_PREFIX}{os.getpid()}-live"
    dead = tmp_path / f"{atomic_save.STAGE_PREFIX}{os.getpid()}-dead"
    live.mkdir()
    dead.mkdir()
    owner = atomic_save._Flock(str(live))
    owner.acquire(exclusive=True)
    try:
        model.save_pretrained(tmp_path)
        assert live.is_dir() and not dead.exists()
    finally:
        owner.close()


# --- a save verifies what it wrote (class 3) ------------------------------------------------------------------------
@pytest.mark.parametrize("drop", ["one", "all"])
def test_a_save_that_writes_too_little_fails_and_keeps_the_old_adapter(tmp_path, monkeypatch, drop):
    import peft.peft_model

    old = _small_peft(seed=0)
    old.save_pretrained(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    real = peft.peft_model.get_peft_model_state_dict

    def mangled(*args, **kwargs):  # what peft's name filters did to an adapter named "layers"
        state = real(*args, **kwargs)
        return dict(list(state.items())[1:]) if drop == "one" else {}

    monkeypatch.setattr(peft.peft_model, "get_peft_model_state_dict", mangled)
    with pytest.raises(AdapterCheckpointError, match=r"saving adapter 'default' is incomplete: .*missing"):
        _small_peft(seed=1).save_pretrained(tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".hadapeft")]


# --- stale files (class 5) --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_safe", [True, False])
def test_a_save_over_the_other_format_loads_what_was_saved(tmp_path, first_safe):
    """A weights file of the other format left by an earlier save must not be what a load reads (peft reads
    adapter_model.safetensors first): the folder loads exactly the adapter just saved, sub-adapters too."""
    inputs = make_inputs("llama")
    old, new = _small_peft(seed=0), _small_peft(seed=1)
    for m in (old, new):
        m.add_adapter("other", make_config("gated_vector", "llama", init_weights=False))
    old.save_pretrained(tmp_path, safe_serialization=first_safe)
    new.save_pretrained(tmp_path, safe_serialization=not first_safe)
    for folder in (tmp_path, tmp_path / "other"):
        names = sorted(n for n in os.listdir(folder) if n.startswith("adapter_model"))
        assert names == ["adapter_model.bin" if first_safe else "adapter_model.safetensors"], (folder, names)
    with hadapeft.allow_pickle_checkpoints():
        loaded = PeftModel.from_pretrained(build_model("llama"), tmp_path)
        loaded.load_adapter(tmp_path / "other", "other")
    assert torch.equal(logits(loaded, inputs), logits(new, inputs))
    loaded.set_adapter("other")
    new.set_adapter("other")
    assert torch.equal(logits(loaded, inputs), logits(new, inputs))


# --- loading into an existing adapter name (class 6) ----------------------------------------------------------------
def test_loading_into_an_existing_name_with_another_config_is_refused(tmp_path):
    inputs = make_inputs("llama")
    other = get_peft_model(build_model("llama"), make_config("gated_vector", "llama", init_weights=False,
                                                              lora_alpha=16))
    other.save_pretrained(tmp_path / "alpha16")
    model = _small_peft(seed=0)
    before = logits(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterCheckpointError, match=r"existing adapter 'default'.*lora_alpha: 8(\.0)? in the model, "
                                                     r"16(\.0)? in the checkpoint"):
        model.load_adapter(tmp_path / "alpha16", "default")
    assert torch.equal(logits(model, inputs), before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.peft_config["default"].lora_alpha == 8
    # the same config: the weights are replaced, and the model computes the saved adapter
    same = _small_peft(seed=5)
    same.save_pretrained(tmp_path / "same")
    model.load_adapter(tmp_path / "same", "default")
    assert torch.equal(logits(model, inputs), logits(same, inputs))


# --- gates stay in [0, 1] on copies (class 9) -------------------------------------------------------------------------
def _reloaded(model, folder):
    model.save_pretrained(folder)
    return PeftModel.from_pretrained(build_model("llama"), folder, is_trainable=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "reload"])
def test_gates_stay_in_range_on_a_copy(how, tmp_path):
    import copy
    import pickle

    model = _small_peft()
    twin = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
            "reload": lambda m: _reloaded(m, tmp_path)}[how](model)
    del model  # the copy must not depend on the original being alive
    inputs = make_inputs("llama")
    opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=100.0)
    twin.train()
    for _ in range(2):
        twin(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    gates = [m.gate(a) for m in twin.modules() if hasattr(m, "gated_lora_gate") for a in m.gated_lora_gate]
    assert gates and all(bool(((g >= 0) & (g <= 1)).all()) for g in gates)
