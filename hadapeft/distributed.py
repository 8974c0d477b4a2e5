"""Multi-device training: which FSDP units to make, and a refusal to train silently with another engine.

* :func:`fsdp_auto_wrap_policy` — the wrap policy for torch FSDP1 (``FullyShardedDataParallel(auto_wrap_policy=...)``,
  accelerate's ``FullyShardedDataParallelPlugin(auto_wrap_policy=...)``) and FSDP2 (``policy(module)`` as a predicate:
  ``fully_shard`` each module it selects, then the root; or :func:`fsdp_units`).
* :func:`check_engine` — accelerate starts FSDP / DeepSpeed only on GPU-type devices: launched with an FSDP or
  DeepSpeed config on CPU (``Accelerator(cpu=True)``, ``TrainingArguments(use_cpu=True)``, no GPU) it trains plain
  DDP and says nothing. ``ConditionedTrainerMixin`` (so ``hadapeft.SFTTrainer`` / ``DPOTrainer``) calls it; a
  training loop of your own calls it after creating its ``Accelerator``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from torch import nn

from .errors import EngineError
from .seam.hooks import no_split_class_names

_TRUE = ("1", "true", "yes", "on")


def _units(model: nn.Module) -> tuple[type, ...]:
    """Module classes that get an FSDP unit of their own: the transformer blocks (``_no_split_modules``) and every
    model-level module a hadapeft tuner shares between its layers (HyperMod's hypernetwork)."""
    from .core.model import HadaModel

    names = no_split_class_names(model)
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    for tuner in (m for m in model.modules() if isinstance(m, HadaModel)):
        # read without creating (the shared_modules property would add an empty container to every tuner)
        shared = getattr(tuner, tuner.shared_name or f"{tuner.prefix}shared", None)
        classes.update(type(module) for module in (shared.values() if shared is not None else ()))
    return tuple(sorted(classes, key=lambda c: c.__name__))


def fsdp_auto_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """The FSDP wrap policy for a model with hadapeft adapters (like ``peft.utils.other.fsdp_auto_wrap_policy``).

    Units: each transformer block (its ``_no_split_modules`` classes) and each shared hypernetwork (HyperMod), plus the
    root that the caller wraps last. Adapter layers stay in their block's unit: a layer reads its frozen base weight
    directly (the fused path), so the base layer must not be a unit of its own — peft's policy, which makes a unit of
    every leaf module with a trainable ``weight``, is fine for hadapeft too, since hadapeft's base layers are frozen
    (and HyperMod's hypernetwork computes through module calls, so it works with its leaves as units as well).

    Blocks mix frozen base weights and trainable adapter weights: FSDP1 needs ``use_orig_params=True`` (FSDP2 shards
    each parameter on its own and needs nothing).

    Returns ``policy(module, recurse=False, nonwrapped_numel=0) -> bool``, FSDP1's callable-policy signature; called
    with a module alone it is the predicate for FSDP2's ``fully_shard``. ``policy.classes`` lists the classes.
    """
    classes = _units(model)

    def policy(module: nn.Module, recurse: bool = False, nonwrapped_numel: int = 0) -> bool:
        return True if recurse else isinstance(module, classes)

    policy.classes = classes
    return policy


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`fsdp_auto_wrap_policy` selects, innermost first: for FSDP2, ``fully_shard`` each of them, then
    the root (``for m in fsdp_units(model): fully_shard(m, mesh=mesh)``; ``fully_shard(model, mesh=mesh)``)."""
    policy = fsdp_auto_wrap_policy(model)
    return [m for m in reversed(list(model.modules())) if m is not model and policy(m)]


def requested_engine(args=None, environ=None) -> Optional[str]:
    """"fsdp", "deepspeed" or None: the engine a launch asked for — ``accelerate launch --config_file`` with an FSDP /
    DeepSpeed config (it sets ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``), or ``TrainingArguments``'
    ``fsdp`` / ``deepspeed`` fields (``args``)."""
    env = os.environ if environ is None else environ
    # TrainingArguments deletes ACCELERATE_USE_DEEPSPEED after reading it (into args.deepspeed_plugin); the launcher's
    # other DeepSpeed variables stay.
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE or "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env \
            or getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE or getattr(args, "fsdp", None):
        return "fsdp"
    return None


def check_engine(accelerator, args=None, environ=None) -> None:
    """Raise :class:`~hadapeft.errors.EngineError` when the engine the launch asked for (:func:`requested_engine`) is
    not the one ``accelerator`` runs, or runs in a way hadapeft adapters do not train correctly under (FSDP1 without
    ``use_orig_params=True``). Does nothing when no engine was asked for.

    Call it right after creating the ``Accelerator`` (the trainers of hadapeft do it in ``__init__``)."""
    from accelerate.utils import DistributedType

    wanted = requested_engine(args, environ)
    if wanted is None:
        return
    state = accelerator.state
    actual = state.distributed_type
    expected = DistributedType.FSDP if wanted == "fsdp" else DistributedType.DEEPSPEED
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[wanted]
    if actual != expected:
        device = getattr(state, "device", None)
        why = (f"accelerate starts {name} only on GPU-type devices (CUDA, XPU, NPU, ...), and this process runs on "
               f"{device} (Accelerator(cpu=True), TrainingArguments(use_cpu=True) or no GPU found)"
               if device is not None and device.type == "cpu" else
               f"accelerate chose {actual.value} for this process (device {device}, {state.num_processes} processes)")
        raise EngineError(
            f"{name} was requested (ACCELERATE_USE_{wanted.upper()}, from `accelerate launch --config_file` or the "
            f"training arguments) but would not run: {why}; training would silently be {actual.value} instead. "
            f"Run on GPUs, or launch with a config without {name} (e.g. recipes/accelerate/cpu_ddp.yaml). On CPU, "
            f"torch FSDP and deepspeed.initialize run directly (tests/test_distributed.py does).")
    plugin = getattr(state, "fsdp_plugin", None)
    if wanted == "fsdp" and plugin is not None and getattr(plugin, "fsdp_version", 1) == 1 \
            and not getattr(plugin, "use_orig_params", False):
        raise EngineError("FSDP1 with use_orig_params=False puts the frozen base weights and the trainable adapter "
                          "weights of a transformer block into one flat parameter, which FSDP1 refuses (or trains "
                          "wrongly): set fsdp_use_orig_params: true (recipes/accelerate/fsdp1.yaml) or use FSDP2 "
                          "(fsdp_version: 2, recipes/accelerate/fsdp.yaml)")
