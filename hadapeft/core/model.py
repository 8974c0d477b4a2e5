"""HadaModel: the peft ``BaseTuner`` all hadapeft adapters share (injection, rollback, defaults, merge)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from .._peft_integration import _unwrap_adapter
from ..errors import AdapterCheckpointError, TargetModuleError
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
            if isinstance(e, NoMatchingPeftModuleError):
                raise TargetModuleError(str(e)) from None
            raise

    def _rollback(self, model: nn.Module, adapter_name: str) -> None:
        _unwrap_adapter(model, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """peft's key remapping, then a check that the checkpoint holds exactly this adapter's tensors with the
        shapes the model expects (peft would skip missing ones and torch would fail halfway through the others)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {k: v for k, v in model.state_dict().items()
                    if cls.prefix in k and k.endswith("." + adapter_name)}
        missing = sorted(set(expected) - set(remapped))
        unexpected = sorted(k for k in remapped if cls.prefix in k and k not in expected)
        wrong = [f"{k}: checkpoint {tuple(remapped[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in remapped and remapped[k].shape != v.shape]
        problems = []
        if wrong:
            problems.append(f"{len(wrong)} tensors have shapes that do not fit this base model, e.g. {wrong[0]}")
        if missing:
            problems.append(f"{len(missing)} adapter tensors are missing from the checkpoint, e.g. {missing[0]}")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint tensors match no adapted module, e.g. {unexpected[0]}")
        if problems:
            raise AdapterCheckpointError(f"adapter {adapter_name!r} ({config.peft_type}) does not fit the model: "
                                         + "; ".join(problems))
        return remapped
