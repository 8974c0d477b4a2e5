"""HadaModel: the peft ``BaseTuner`` all hadapeft adapters share (injection, rollback, defaults, merge)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..errors import TargetModuleError
from . import frozen
from .layer import HadaLayer


class HadaModel(BaseTuner):
    """Base tuner. A subclass sets ``prefix``, ``tuner_layer_cls``, ``target_module_mapping`` and may add per-layer
    arguments in ``layer_kwargs``."""

    tuner_layer_cls: type[HadaLayer]

    def layer_kwargs(self, config, adapter_name: str, key: str) -> dict:
        """Extra keyword arguments for ``tuner_layer_cls`` / ``update_layer`` of the module at ``key``."""
        return {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **_):
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
        new_module = self.tuner_layer_cls(target, adapter_name, config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection, made all-or-nothing: on any error the model is put back as it was."""
        n_targeted = len(self.targeted_module_names)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception as e:
            self._rollback(model, adapter_name)
            del self.targeted_module_names[n_targeted:]
            if isinstance(e, ValueError) and "not found in the base model" in str(e):
                raise TargetModuleError(str(e)) from None
            raise

    def _rollback(self, model: nn.Module, adapter_name: str) -> None:
        for key, module in list(model.named_modules()):
            if not isinstance(module, HadaLayer) or not module.owns(adapter_name):
                continue
            others = [a for a in module._all_available_adapter_names() if a != adapter_name]
            if others:
                module.delete_adapter(adapter_name)
            else:
                parent_key, _, child = key.rpartition(".")
                parent = model.get_submodule(parent_key) if parent_key else model
                setattr(parent, child, module.get_base_layer())
