"""Inventory of every private (or undocumented) name of peft, transformers, bitsandbytes and torch that hadapeft
relies on.

Each entry says where the name lives and why hadapeft needs it. ``tests/test_seam.py`` checks that every entry
exists on the installed versions, so a peft / transformers / torch upgrade that renames one fails one clear test
instead of fifty obscure ones. Code outside ``hadapeft/seam`` reaches these names only through this package (another
test greps for private imports elsewhere).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    module: str  # importable module
    name: str  # attribute path inside it ("BaseTuner._create_and_replace")
    why: str
    optional: bool = False  # in an optional dependency (bitsandbytes, trl): not missing when that is not installed

    def resolve(self):
        obj = importlib.import_module(self.module)
        for part in self.name.split("."):
            obj = getattr(obj, part)
        return obj


_TU = "peft.tuners.tuners_utils"
PRIVATE_HOOKS: tuple[Hook, ...] = (
    # --- registering a type from outside peft (seam/registration.py) ---
    Hook("peft.utils.peft_types", "PeftType._member_map_", "closed enum: members are added at runtime"),
    Hook("peft.utils.peft_types", "PeftType._value2member_map_", "closed enum: members are added at runtime"),
    Hook("peft.utils.peft_types", "PeftType._member_names_", "what list(PeftType) reads"),
    Hook("peft.utils", "register_peft_method", "fills peft's type -> config / tuner / prefix mappings"),
    Hook("peft.mapping", "PEFT_TYPE_TO_CONFIG_MAPPING", "idempotent registration; config class of a type"),
    Hook("peft.mapping", "PEFT_TYPE_TO_PREFIX_MAPPING", "register_peft_method checks prefix clashes wrongly"),
    # --- the tuner and layer base classes (seam/tuner.py maps these onto hadapeft-named methods) ---
    Hook(_TU, "BaseTuner._create_and_replace", "wrap one target module"),
    Hook(_TU, "BaseTuner._prepare_adapter_config", "default target_modules per model family"),
    Hook(_TU, "BaseTuner._check_target_module_exists", "which modules an adapter targets (HyperMod's layer table)"),
    Hook(_TU, "BaseTuner._replace_module", "put the wrapped module in place (device placement)"),
    Hook(_TU, "BaseTuner._unload_and_optionally_merge", "drop conditioning state on unload"),
    Hook(_TU, "BaseTuner._remove_adapter_name_from_key", "checkpoint keys of nested adapter containers"),
    Hook(_TU, "BaseTuner._remap_adapter_state_dict_for_load", "refuse ill-fitting checkpoints before loading"),
    Hook(_TU, "BaseTuner._get_adapter_state_dict", "select an adapter's tensors for saving under FSDP-wrapped paths"),
    Hook(_TU, "BaseTuner._get_learnable_bias_state_dict", "peft's bias selection, kept when selecting for saving"),
    Hook(_TU, "BaseTunerLayer._move_adapter_to_device_of_base_layer", "new adapter tensors follow the base layer"),
    Hook(_TU, "BaseTunerLayer._all_available_adapter_names", "which adapters a layer holds (rollback)"),
    Hook(_TU, "BaseTunerLayer._disable_adapters", "layer state peft's methods read"),
    Hook(_TU, "BaseTunerLayer._active_adapter", "layer state peft's methods read"),
    Hook(_TU, "_get_tuner_state_dict_key_prefixes", "select an adapter's state-dict keys as peft saves them"),
    Hook(_TU, "_filter_state_dict_by_key_prefixes", "select an adapter's state-dict keys as peft saves them"),
    # --- loading, saving and conditioning kwargs on peft's wrappers (seam/peft_model.py) ---
    Hook("peft", "PeftModel.from_pretrained", "made all-or-nothing (it injects before reading the weights)"),
    Hook("peft", "PeftModel.load_adapter", "made all-or-nothing"),
    Hook("peft", "PeftModel.save_pretrained", "made crash-consistent for hadapeft adapters"),
    Hook("peft.auto", "_BaseAutoPeftModel.from_pretrained", "safe-loading checks before AutoPeftModel* loads"),
    Hook("peft.auto", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "task wrappers whose forward / generate drop task_ids"),
    Hook("peft.config", "PeftConfigMixin._get_peft_type", "start-up hint when hadapeft is not imported"),
    Hook("peft.config", "PeftConfigMixin.from_peft_type", "start-up hint when hadapeft is not imported"),
    # --- bitsandbytes bases (core/frozen.py through seam.dequantize_bnb_weight) ---
    Hook("peft.utils.integrations", "dequantize_bnb_weight", "dense view of a 4-/8-bit weight for merging"),
    Hook("bitsandbytes.functional", "_convert_weight_packed_for_cpu_inverse",
         "4-bit weights repacked for the AVX512-BF16 CPU kernel back to the standard layout (seam/bnb.py)",
         optional=True),
    # --- torch ---
    Hook("torch._C", "_current_graph_task_id", "tell a gradient-checkpointing recompute (inside backward)"),
    Hook("torch", "_assert_async", "range-check task ids on the device, without a host sync"),
    Hook("torch._C", "_are_functorch_transforms_active", "Gated LoRA's eager fast path skips Function.apply's "
         "Python wrapper, which only matters inside a functorch transform"),
    # --- trainers (seam/trainer.py): dataset columns and TRL's dataset preparation ---
    Hook("transformers", "Trainer._set_signature_columns_if_needed", "keep the task_ids / task_embeds columns "
         "(it fills the instance attribute _signature_columns)"),
    Hook("transformers", "PreTrainedModel._no_split_modules", "transformer block classes: hadapeft's FSDP wrap policy "
         "makes each block a unit, as peft's and accelerate's policies do"),
    Hook("transformers", "PreTrainedConfig._attn_implementation", "padded rows of packed sequences need an "
         "attention that masks documents apart by position ids (not flash attention)"),
    Hook("trl", "SFTTrainer._set_signature_columns_if_needed", "TRL keeps a fixed column list", optional=True),
    Hook("trl", "SFTTrainer._prepare_dataset", "pack each task apart (TRL's packing drops every other column)",
         optional=True),
    Hook("trl", "DPOTrainer._set_signature_columns_if_needed", "TRL keeps a fixed column list", optional=True),
)


def missing_hooks() -> list[str]:
    """The entries of :data:`PRIVATE_HOOKS` that the installed libraries lack, as ``module:name`` strings."""
    missing = []
    for hook in PRIVATE_HOOKS:
        if hook.optional and importlib.util.find_spec(hook.module.split(".")[0]) is None:
            continue
        try:
            hook.resolve()
        except (ImportError, AttributeError):
            missing.append(f"{hook.module}:{hook.name}")
    return missing


# --- accessors: the only way the rest of hadapeft reaches a private name -----------------------------------------
def in_backward() -> bool:
    """Whether autograd is running a backward on this thread (a gradient-checkpointing recompute)."""
    import torch

    return torch._C._current_graph_task_id() != -1


def functorch_transforms_active() -> bool:
    """Whether a functorch transform (vmap, grad, functionalize) is running: then ``Function.apply``'s Python
    wrapper is needed (it unwraps the transform's tensors)."""
    import torch

    return torch._C._are_functorch_transforms_active()


def assert_async(condition, message: str) -> None:
    """Assert a boolean tensor on its device (no host sync; raises at the next sync on CUDA, at once on CPU)."""
    import torch

    torch._assert_async(condition, message)


def dequantize_bnb_weight(weight, state=None):
    from peft.utils.integrations import dequantize_bnb_weight as dequantize

    return dequantize(weight, state=state)


def attn_implementation(model) -> str:
    """The attention a transformers model runs: "sdpa", "eager", "flash_attention_2", ... ("" if not set)."""
    return str(getattr(model.config, "_attn_implementation", None) or "")


def no_split_class_names(model) -> set[str]:
    """Class names of the blocks (transformer layers) that a transformers model must not split across devices or FSDP
    units: the union of its modules' ``_no_split_modules``, as peft's and accelerate's wrap policies read it."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def peft_config_class(peft_type):
    """The config class peft maps ``peft_type`` to (None when peft does not know it)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)


# Module names that wrappers insert into module paths — FSDP1's FullyShardedDataParallel, activation checkpointing's
# CheckpointWrapper, torch.compile's OptimizedModule — and that their state dicts leave out (FSDP1 and the checkpoint
# wrapper strip them in state-dict hooks; a full state dict taken on the root has none). ``named_modules()`` keeps them,
# anywhere in a path: peft removes only a leading "_fsdp_wrapped_module.", so under FSDP1 with nested units (any wrap
# policy) its key selection finds nothing and an adapter saves empty.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def plain_key(key: str) -> str:
    """``key`` (a module path or state-dict key) without wrapper segments: the key of the unwrapped model."""
    if not any(s in key for s in WRAPPER_SEGMENTS):
        return key
    return ".".join(p for p in key.split(".") if p not in WRAPPER_SEGMENTS)


def adapter_state_keys(model, adapter_name, state_dict=None) -> list[str]:
    """Keys of ``state_dict`` (default ``model.state_dict()``) that hold adapter ``adapter_name`` (every adapter when
    None): its entries in the tuner layers and in model-level containers on the tuner (HyperMod's hypernetwork),
    found structurally as peft does, whatever wrapper segments (:data:`WRAPPER_SEGMENTS`) the module paths or the
    state-dict keys hold. ``state_dict`` may be a full state dict gathered by an engine (FSDP, DeepSpeed ZeRO-3)."""
    from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

    state = model.state_dict() if state_dict is None else state_dict
    prefixes = {plain_key(p) for p in _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)}
    plain = {plain_key(k): k for k in state}
    return [plain[k] for k in _filter_state_dict_by_key_prefixes(dict.fromkeys(plain), prefixes)]
