"""Every adapter type under DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (gloo) equals the
1-process run of the same global batch; an engine the launch asked for either runs or the launch stops saying why.

The engines run at the layer below accelerate — torch's ``DistributedDataParallel``, ``fully_shard`` on a gloo
DeviceMesh, ``FullyShardedDataParallel(device_id=cpu, use_orig_params=True)`` and ``deepspeed.initialize`` with
DeepSpeed's CPU accelerator — because accelerate starts FSDP and DeepSpeed only on GPU-type devices (on CPU it runs
DDP instead, which ``hadapeft.check_engine`` refuses: tested below through a real ``accelerate launch``). One
``torchrun`` launch per engine trains every case of ``tests/distributed_worker.py`` (4 adapter types, each also with
gradient clipping that bites, and HyperMod under other FSDP wrap policies); the 1-process reference runs in this
process. For each case: every saved adapter tensor is within ``ATOL`` of the reference's, the saved key set is the
model's adapter key set, and the adapter reloaded with ``PeftModel.from_pretrained`` gives the reference's logits.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hadapeft
from hadapeft.errors import EngineError
from peft import PeftModel, get_peft_model_state_dict

import distributed_worker as worker

ROOT = Path(__file__).resolve().parents[1]
# fp32, 4 AdamW steps: the engines sum the same per-sample gradients in another order (all-reduce, reduce-scatter,
# DeepSpeed's flat buffers), a few ulp apart; Adam turns that into parameter differences of ~1e-7 here.
ATOL = 1e-5
LOGITS_ATOL = 1e-4
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
MAX_DIFF: dict = {}  # (engine, case) -> max abs difference, printed at the end of the module (pytest -s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                       os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    for key in [k for k in env if k.startswith("ACCELERATE_")]:
        del env[key]
    return env


def torchrun(script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _errors(run: subprocess.CompletedProcess) -> str:
    """The end of a launch's output without the warnings that fill it."""
    noise = ("Warning", "warnings.warn", "return func(")
    lines = [line for line in (run.stdout + run.stderr).splitlines() if not any(n in line for n in noise)]
    return "\n".join(lines[-80:])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run of every case (the same global batch), in this process."""
    out = tmp_path_factory.mktemp("single")
    worker.main(["--engine", "single", "--out", str(out)])
    return out


def _adapter_keys(kind: str) -> set:
    return set(get_peft_model_state_dict(worker.build(kind)))


def _logits(model, kind):
    with torch.no_grad():
        return model.eval()(**worker.eval_inputs(kind)).logits


ENGINES = [pytest.param(e, marks=[pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")]
                        if e.startswith("zero") else []) for e in ("ddp", "fsdp2", "fsdp1", "zero2", "zero3")]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_one_process(engine, reference, tmp_path):
    run = torchrun(Path(worker.__file__), "--engine", engine, "--out", str(tmp_path))
    assert run.returncode == 0, f"{engine} launch failed:\n{_errors(run)}"
    keys = {kind: _adapter_keys(kind) for kind in worker.KINDS}
    for name, kind, clip, wrap in worker.cases(engine):
        ref_name = name if wrap == "hadapeft" else kind  # other wrap policies: the same training as `kind`
        ref = load_file(reference / ref_name / "adapter_model.safetensors")
        got = load_file(tmp_path / name / "adapter_model.safetensors")
        assert set(got) == set(ref) == keys[kind], f"{engine}/{name}: saved keys differ from the model's adapter keys"
        diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
        MAX_DIFF[(engine, name)] = diff
        assert diff <= ATOL, f"{engine}/{name}: max abs difference {diff:.3g} from the 1-process run"
        if clip:  # the clipping bit: the clipped run ended elsewhere than the unclipped one
            unclipped = load_file(reference / kind / "adapter_model.safetensors")
            assert max((unclipped[k] - ref[k]).abs().max().item() for k in ref) > 100 * ATOL, name
        reloaded = PeftModel.from_pretrained(worker.base_model(), tmp_path / name)
        expected = PeftModel.from_pretrained(worker.base_model(), reference / ref_name)
        # adapter tensors ≤ ATOL apart move logits of magnitude ~1 by up to ~1.5e-5 (measured) through the layers
        torch.testing.assert_close(_logits(reloaded, kind), _logits(expected, kind), atol=LOGITS_ATOL, rtol=0)


def teardown_module(module):
    if MAX_DIFF:
        print("\nmax |adapter - 1-process adapter| per engine and case:")
        for (engine, name), diff in sorted(MAX_DIFF.items()):
            print(f"  {engine:6s} {name:24s} {diff:.3g}")


# --- wrapped module paths -------------------------------------------------------------------------------------------
def test_save_removes_wrapper_segments_anywhere_in_a_key(tmp_path):
    """Module paths under activation checkpointing (``_checkpoint_wrapped_module``), torch.compile (``_orig_mod``)
    and nested FSDP1 units (``_fsdp_wrapped_module``, the slow FSDP1 case above) hold wrapper segments mid-key, which
    peft's selection misses: the saved adapter has the plain keys and reloads into an unwrapped model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = worker.build("gated_lora")
    plain = set(get_peft_model_state_dict(model))
    layers = model.base_model.model.model.layers
    layers[0] = torch.compile(layers[0])  # lazy: nothing is compiled unless it runs
    layers[1] = checkpoint_wrapper(layers[1])
    names = [n for n, _ in model.named_modules()]
    assert any("._orig_mod." in n for n in names) and any("._checkpoint_wrapped_module." in n for n in names)
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == plain
    reloaded = PeftModel.from_pretrained(worker.base_model(), tmp_path)
    torch.testing.assert_close(_logits(reloaded, "gated_lora"), _logits(worker.build("gated_lora"), "gated_lora"))


# --- an engine that would not run is refused ----------------------------------------------------------------------
def _accelerator(distributed_type, device="cpu", fsdp_plugin=None):
    state = types.SimpleNamespace(distributed_type=distributed_type, device=torch.device(device), num_processes=2,
                                  fsdp_plugin=fsdp_plugin)
    return types.SimpleNamespace(state=state)


def test_check_engine_refuses_an_engine_accelerate_did_not_start():
    from accelerate.utils import DistributedType

    for env, name in (({"ACCELERATE_USE_FSDP": "true"}, "FSDP"), ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed")):
        with pytest.raises(EngineError, match=rf"{name} was requested .* only on GPU-type devices .* silently be "
                                              rf"MULTI_CPU"):
            hadapeft.check_engine(_accelerator(DistributedType.MULTI_CPU), environ=env)
    with pytest.raises(EngineError, match="DeepSpeed was requested"):  # TrainingArguments(deepspeed=...)
        hadapeft.check_engine(_accelerator(DistributedType.NO), args=types.SimpleNamespace(deepspeed="ds.json"),
                              environ={})
    # what was asked for runs, or nothing was asked for: no error
    hadapeft.check_engine(_accelerator(DistributedType.MULTI_CPU), environ={})
    plugin = types.SimpleNamespace(fsdp_version=2, use_orig_params=False)
    hadapeft.check_engine(_accelerator(DistributedType.FSDP, "cuda", plugin), environ={"ACCELERATE_USE_FSDP": "1"})
    hadapeft.check_engine(_accelerator(DistributedType.DEEPSPEED, "cuda"), environ={"ACCELERATE_USE_DEEPSPEED": "1"})


def test_check_engine_refuses_fsdp1_without_orig_params():
    from accelerate.utils import DistributedType

    plugin = types.SimpleNamespace(fsdp_version=1, use_orig_params=False)
    with pytest.raises(EngineError, match="use_orig_params"):
        hadapeft.check_engine(_accelerator(DistributedType.FSDP, "cuda", plugin), environ={"ACCELERATE_USE_FSDP": "1"})


TRAINER_SCRIPT = '''
import sys
import transformers as tf
from hadapeft.trainer import ConditionedTrainerMixin
import distributed_worker as worker

class Trainer(ConditionedTrainerMixin, tf.Trainer):
    pass

data = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "task_ids": i % 3} for i in range(8)]
args = tf.TrainingArguments(output_dir=sys.argv[1], use_cpu=True, per_device_train_batch_size=2, max_steps=1,
                            report_to=[], save_strategy="no")
Trainer(model=worker.build("film"), args=args, train_dataset=data)
print("ENGINE STARTED")
'''

# A loop of one's own (the recipes): accelerate on the CPU skips the DeepSpeed the launch asked for.
LOOP_SCRIPT = '''
import accelerate
import hadapeft

hadapeft.check_engine(accelerate.Accelerator(cpu=True))
print("ENGINE STARTED")
'''


@pytest.mark.slow
@pytest.mark.parametrize("config,script", [("fsdp.yaml", TRAINER_SCRIPT), ("deepspeed_zero3.yaml", LOOP_SCRIPT)],
                         ids=["fsdp-trainer", "deepspeed-loop"])
def test_launch_with_an_engine_cpu_cannot_start_stops_with_a_clear_error(config, script, tmp_path):
    """``accelerate launch --config_file recipes/accelerate/<config>`` with 2 processes on this CPU machine, where
    accelerate would silently train plain DDP (MULTI_CPU): a Trainer with ``ConditionedTrainerMixin`` (FSDP config)
    and a loop calling ``hadapeft.check_engine`` (DeepSpeed config, ``Accelerator(cpu=True)``) stop with an
    EngineError that says why. (A Trainer with ``use_cpu=True`` does start DeepSpeed's CPU accelerator when deepspeed
    is installed: that engine runs, and check_engine lets it.)"""
    if config.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (accelerate launch needs it for a DeepSpeed config)")
    path = tmp_path / "train.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / config), "--num_processes", "2", "--main_process_port",
           str(_free_port()), str(path), str(tmp_path / "out")]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode != 0 and "ENGINE STARTED" not in out, out[-4000:]
    name = "FSDP" if config.startswith("fsdp") else "DeepSpeed"
    assert f"EngineError: {name} was requested" in out and "would silently be MULTI_CPU" in out, out[-4000:]
