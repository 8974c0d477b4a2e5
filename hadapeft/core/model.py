"""HadaModel: the peft ``BaseTuner`` all hadapeft adapters share (injection, rollback, defaults, merge)."""

from __future__ import annotations

import re
from typing import Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ..errors import AdapterCheckpointError, TargetModuleError
from ..seam.hooks import adapter_state_keys
from ..seam.tuner import SeamTuner, unwrap_adapter
from . import frozen
from .conditioning import STATE_ATTR, ConditioningState, install_conditioned_forward, merge_conditioning, \
    uninstall_conditioned_forward
from .layer import HadaLayer, SharedModules


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

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection, made all-or-nothing: on any error the model is put back as it was."""
        n_targeted = len(self.targeted_module_names)
        spec = self.peft_config[adapter_name].conditioning_spec()
        if spec is not None:
            self.conditioning_state.specs[adapter_name] = spec
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception as e:
            self._rollback(model, adapter_name)
            del self.targeted_module_names[n_targeted:]
            if isinstance(e, NoMatchingPeftModuleError):
                raise TargetModuleError(str(e)) from None
            raise
        if spec is not None:
            # so that the HF Trainer keeps a task_ids / task_embeds column (it drops what forward does not name)
            install_conditioned_forward(model)
        frozen.guard_4bit_layers(model)

    def _rollback(self, model: nn.Module, adapter_name: str) -> None:
        unwrap_adapter(model, adapter_name)
        self._forget_conditioning(adapter_name)
        self._drop_shared(adapter_name)

    def _drop_shared(self, adapter_name: str) -> None:
        if adapter_name in self.shared_modules:
            del self.shared_modules[adapter_name]

    def _forget_conditioning(self, adapter_name: str) -> None:
        state = self.model.__dict__.get(STATE_ATTR)
        if state is None:
            return
        state.specs.pop(adapter_name, None)
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
        """The checkpoint holds exactly this adapter's tensors with the shapes the model expects (peft would skip
        missing ones and torch would fail halfway through the others)."""
        state = model.state_dict()
        expected = {k: state[k] for k in adapter_state_keys(model, adapter_name)}
        missing = sorted(set(expected) - set(remapped))
        unexpected = sorted(k for k in remapped if cls.prefix in k and k not in expected)
        wrong = [f"{k}: checkpoint {tuple(remapped[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in remapped and remapped[k].shape != v.shape]
        bad_dtype = [f"{k}: checkpoint dtype {remapped[k].dtype} where the model holds {v.dtype}"
                     for k, v in expected.items() if k in remapped and v.is_floating_point()
                     and not remapped[k].is_floating_point()]
        problems = []
        if bad_dtype:
            problems.append(f"{len(bad_dtype)} tensors are not floating point, e.g. {bad_dtype[0]}")
        if wrong:
            problems.append(f"{len(wrong)} tensors have shapes that do not fit this base model, e.g. {wrong[0]}")
        if missing:
            problems.append(f"{len(missing)} adapter tensors are missing from the checkpoint, e.g. {missing[0]}")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint tensors match no adapted module, e.g. {unexpected[0]}")
        if problems:
            raise AdapterCheckpointError(f"adapter {adapter_name!r} ({config.peft_type}) does not fit the model: "
                                         + "; ".join(problems))
