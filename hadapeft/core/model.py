"""HadaModel: the peft ``BaseTuner`` all hadapeft adapters share (injection, rollback, defaults, merge)."""

from __future__ import annotations

import re
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from .. import registry
from ..errors import AdapterCheckpointError, HadapeftConfigError, TargetModuleError
from ..safety.load_policy import NONFINITE_ENV, nonfinite_allowed
from ..seam.hooks import adapter_state_keys
from ..seam.tuner import ModelUndo, SeamTuner
from . import frozen
from .conditioning import STATE_ATTR, ConditioningState, install_conditioned_forward, merge_conditioning, \
    uninstall_conditioned_forward
from .layer import HadaLayer, SharedModules


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
NAME_RULE = ("adapter names start with a letter and hold at most 64 letters, digits, '_' and '-', and differ from "
             "every module, parameter and attribute name of the model and of the adapter layers (peft selects an "
             "adapter's tensors by its name when saving, and keeps it as a dict key and a folder name)")


def check_adapter_name(model: nn.Module, name, layer_cls) -> None:
    """Refuse an adapter name that peft's state-dict filters, dict containers or save folders would mangle: e.g.
    ``"layers"`` (a component of every layer's key: saving another adapter would drop all of them), ``"training"``
    (an attribute of the containers), ``"../x"`` or an absolute path (the folder it is saved to)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise HadapeftConfigError(f"adapter name {name!r} is not allowed: {NAME_RULE}")
    reserved = {"base_layer", "base_model", "model", "modules_to_save", "original_module",
                *layer_cls.adapter_layer_names, *layer_cls.other_param_names}
    if name in reserved or hasattr(layer_cls, name) or hasattr(nn.ParameterDict(), name):
        raise HadapeftConfigError(f"adapter name {name!r} is not allowed: it is an attribute of the adapter layers; "
                                  f"{NAME_RULE}")
    prefix = next((t.model_cls.prefix for t in registry.ADAPTER_TYPES.values()
                   if name.startswith(t.model_cls.prefix)), None)
    if prefix:
        raise HadapeftConfigError(f"adapter name {name!r} is not allowed: it starts with the parameter prefix "
                                  f"{prefix!r} of an adapter type; {NAME_RULE}")
    # Before its layers exist, a new adapter's name is a key component only where it clashes with the model. (Names,
    # not model.state_dict(): that would run bitsandbytes' state-dict code on layers not yet guarded, see seam/bnb.py.)
    names = (*model.named_modules(), *model.named_parameters(), *model.named_buffers())
    for key in (k for k, _ in names):
        if name in key.split("."):
            raise HadapeftConfigError(f"adapter name {name!r} is not allowed: the model has a module or parameter "
                                      f"of that name ({key!r}); {NAME_RULE}")


class HadaModel(SeamTuner):
    """Base tuner. A subclass sets ``prefix``, ``tuner_layer_cls``, ``target_module_mapping`` and may add per-layer
    arguments in ``layer_kwargs``. A tuner that keeps model-level modules shared by its layers (HyperMod's
    hypernetwork) puts them in ``self.shared_modules`` (saved with the adapter under ``<prefix>shared``); layers
    reach them through ``layer.shared.modules``."""

    tuner_layer_cls: type[HadaLayer]
    shared_name: Optional[str] = None  # attribute (and checkpoint key) of shared_modules; default "<prefix>shared"

    def layer_kwargs(self, config, adapter_name: str, key: str) -> dict:
        """Extra keyword arguments for ``tuner_layer_cls`` / ``update_layer`` of the module at ``key``."""
        return {}

    @property
    def conditioning_state(self) -> ConditioningState:
        """The model's :class:`ConditioningState`, kept on the wrapped model so that ``hadapeft.conditioning`` finds
        it from a PeftModel, this tuner, or a transformers model with natively loaded adapters alike."""
        state = self.model.__dict__.get(STATE_ATTR)
        if state is None:
            state = ConditioningState()
            setattr(self.model, STATE_ATTR, state)
        return state

    @property
    def shared_modules(self) -> nn.ModuleDict:
        """Model-level modules per adapter name (empty unless a subclass adds some), saved as ``shared_name``."""
        name = self.shared_name or f"{self.prefix}shared"
        if name not in self._modules:
            self.add_module(name, nn.ModuleDict())
        return self._modules[name]

    def wrap_target(self, config, adapter_name, target, target_name, parent, current_key):
        try:
            self._wrap_target(config, adapter_name, target, target_name, parent, current_key)
        except (RuntimeError, MemoryError) as e:
            # torch's "DefaultCPUAllocator: can't allocate memory" (or CUDA's out of memory) names bytes, not the field
            if not isinstance(e, MemoryError) and "alloc" not in str(e) and "out of memory" not in str(e):
                raise
            raise HadapeftConfigError(f"cannot allocate adapter {adapter_name!r} ({config.sizes()}) for module "
                                      f"{current_key!r}: {str(e).strip().splitlines()[0]}") from None

    def _wrap_target(self, config, adapter_name, target, target_name, parent, current_key):
        kwargs = self.layer_kwargs(config, adapter_name, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, **kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TargetModuleError(f"module {current_key!r} already holds an adapter of another type "
                                    f"({type(target).__name__}); hadapeft cannot stack on it")
        try:
            frozen.layer_kind(target)
        except TypeError as e:
            raise TargetModuleError(f"target module {current_key!r} is a {type(target).__name__}: {e}") from None
        try:
            new_module = self.tuner_layer_cls(target, adapter_name, config, conditioning_state=self.conditioning_state,
                                              shared=SharedModules(self.shared_modules), **kwargs)
        except TargetModuleError as e:  # the layer does not know its name: add it
            raise TargetModuleError(f"target module {current_key!r}: {e}") from None
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self.replace_module(parent, target_name, new_module, target)

    def __init__(self, model, peft_config, adapter_name: str, *args, **kwargs):
        # peft's BaseTuner writes the new config into a peft_config the model already holds (from an adapter added
        # before) before it injects anything: check first, and on failure undo exactly what this call did.
        existing = getattr(model, "peft_config", None) or {}
        if adapter_name in existing:
            raise HadapeftConfigError(f"the model already holds an adapter named {adapter_name!r} "
                                      f"({type(existing[adapter_name]).__name__}): choose another adapter_name")
        check_adapter_name(model, adapter_name, self.tuner_layer_cls)
        undo = ModelUndo(model)
        try:
            super().__init__(model, peft_config, adapter_name, *args, **kwargs)
        except Exception:
            undo.restore()
            raise

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection, made all-or-nothing: on any error the model (and this tuner) are put back exactly as
        they were; adapters already there keep their layers, configs and parameters."""
        config = self.peft_config[adapter_name]
        check_adapter_name(model, adapter_name, self.tuner_layer_cls)
        config.validate()  # again: a config object may have been changed after it was built
        undo = ModelUndo(self)
        spec = config.conditioning_spec()
        if spec is not None:
            self.conditioning_state.add_spec(adapter_name, spec)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception as e:
            undo.restore()
            if isinstance(e, NoMatchingPeftModuleError):
                raise TargetModuleError(str(e)) from None
            raise
        if spec is not None:
            # so that the HF Trainer keeps a task_ids / task_embeds column (it drops what forward does not name)
            install_conditioned_forward(model)
        frozen.guard_4bit_layers(model)

    def _drop_shared(self, adapter_name: str) -> None:
        if adapter_name in self.shared_modules:
            del self.shared_modules[adapter_name]

    def _forget_conditioning(self, adapter_name: str) -> None:
        state = self.model.__dict__.get(STATE_ATTR)
        if state is None:
            return
        state.specs.pop(adapter_name, None)
        state.merged.pop(adapter_name, None)
        if not state.specs:
            uninstall_conditioned_forward(self.model)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget_conditioning(adapter_name)
        self._drop_shared(adapter_name)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        for name, module in self.shared_modules.items():  # model-level: peft's set_adapter sees only the layers
            module.requires_grad_(name in names and not inference_mode)

    # --- merge: a conditioned adapter merges one task -----------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False,
                      task_id: Optional[int] = None, task_embeds=None) -> None:
        """peft's ``merge_adapter``; conditioned adapters (FiLM, HyperMod, multi-task HadaIA3) merge the task
        ``task_id`` (or the conditioning vector ``task_embeds``) into the weights."""
        with merge_conditioning(self, adapter_names, task_id, task_embeds):
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None, task_id: Optional[int] = None, task_embeds=None):
        """peft's ``merge_and_unload``: a plain transformers model. For a conditioned adapter it computes what the
        adapted model computes for task ``task_id`` (or conditioning vector ``task_embeds``)."""
        with merge_conditioning(self, adapter_names, task_id, task_embeds):
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                            adapter_names=adapter_names)

    def after_unload(self, model):
        uninstall_conditioned_forward(model)
        model.__dict__.pop(STATE_ATTR, None)
        self.shared_modules.clear()

    @classmethod
    def checkpoint_key(cls, key, adapter_name):
        """Checkpoint key of a model key: drop the adapter name after the first ``<prefix>...`` container, wherever it
        sits — last (``film_gamma.default``), or with a sub-module after it (``film_generator.default.0.weight``,
        ``hypermod_hypernet.default.mlp.0.weight``), which peft's default (last or second to last) would keep."""
        pattern = rf"((?:^|\.){re.escape(cls.prefix)}[^.]*)\.{re.escape(adapter_name)}(?=\.|$)"
        new, n = re.subn(pattern, r"\1", key, count=1)
        return new if n else super().checkpoint_key(key, adapter_name)

    @classmethod
    def check_checkpoint(cls, model, config, adapter_name, remapped):
        """The checkpoint holds exactly this adapter's tensors (its layers', shared modules' and modules_to_save's),
        with the shapes the model expects and finite values. peft would skip missing tensors, let torch fail halfway
        through the others, and load any other key it holds into the model: a downloaded adapter could replace the
        frozen base weights (``...q_proj.base_layer.weight``, ``lm_head.weight``)."""
        state = model.state_dict()
        expected = {k: state[k] for k in adapter_state_keys(model, adapter_name)}
        to_save = f".modules_to_save.{adapter_name}."
        own = set(expected) | {k for k in state if to_save in k}
        missing = sorted(set(expected) - set(remapped))
        foreign = sorted(k for k in remapped if k not in own)
        overwrite = [k for k in foreign if k in state]  # weights of the base model (or of other adapters)
        unmatched = [k for k in foreign if k not in state]
        wrong = [f"{k}: checkpoint {tuple(remapped[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in remapped and remapped[k].shape != v.shape]
        bad_dtype = [f"{k}: checkpoint dtype {remapped[k].dtype} where the model holds {v.dtype}"
                     for k, v in expected.items() if k in remapped and v.is_floating_point()
                     and not remapped[k].is_floating_point()]
        non_finite = [] if nonfinite_allowed() else \
            sorted(k for k in own & set(remapped) if remapped[k].is_floating_point()
                   and not bool(torch.isfinite(remapped[k]).all()))
        problems = []
        if overwrite:
            problems.append(f"{len(overwrite)} checkpoint tensors are not this adapter's but weights of the model, "
                            f"which loading would overwrite: {', '.join(overwrite[:3])}"
                            + (", ..." if len(overwrite) > 3 else ""))
        if bad_dtype:
            problems.append(f"{len(bad_dtype)} tensors are not floating point, e.g. {bad_dtype[0]}")
        if wrong:
            problems.append(f"{len(wrong)} tensors have shapes that do not fit this base model, e.g. {wrong[0]}")
        if missing:
            problems.append(f"{len(missing)} adapter tensors are missing from the checkpoint, e.g. {missing[0]}")
        if unmatched:
            problems.append(f"{len(unmatched)} checkpoint tensors match no adapted module, e.g. {unmatched[0]}")
        if non_finite:
            problems.append(f"{len(non_finite)} tensors hold NaN or infinite values, e.g. {non_finite[0]} (load "
                            f"them anyway inside `with hadapeft.allow_nonfinite_checkpoints():` or with "
                            f"{NONFINITE_ENV}=1)")
        if problems:
            raise AdapterCheckpointError(f"adapter {adapter_name!r} ({config.peft_type}) does not fit the model: "
                                         + "; ".join(problems))
