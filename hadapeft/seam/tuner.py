"""peft's ``BaseTuner`` / ``BaseTunerLayer`` with their private hooks mapped onto hadapeft-named methods.

``hadapeft.core`` subclasses :class:`SeamTuner` and :class:`SeamTunerLayer` and overrides only the public-named
methods below; which private peft method calls which is written here, once.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn


class SeamTunerLayer(BaseTunerLayer):
    def init_tuner_layer(self, adapter_name: str) -> None:
        """peft's per-layer state (its methods read these attributes)."""
        self._disable_adapters = False
        self._active_adapter = adapter_name

    def switch_state(self) -> tuple:
        """(adapters disabled, active adapter name or names): peft's per-layer switches, read on every forward."""
        return self._disable_adapters, self._active_adapter

    def move_adapter_to_base_device(self, adapter_name: str) -> None:
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds (active or not)."""
        return self._all_available_adapter_names()


class SeamTuner(BaseTuner):
    # --- what a subclass overrides ------------------------------------------------------------------------------
    def wrap_target(self, config, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
                    key: str) -> None:
        """Wrap (or add ``adapter_name`` to) the target module ``key``."""
        raise NotImplementedError

    def prepare_config(self, config, model_config: dict):
        """Fill in defaults (``target_modules`` of the model family) before injection."""
        return BaseTuner._prepare_adapter_config(self, config, model_config)

    def after_unload(self, model: nn.Module) -> None:
        """Called with the plain model after ``unload`` / ``merge_and_unload``."""

    @classmethod
    def checkpoint_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of model key ``key`` (the adapter name removed)."""
        return BaseTuner._remove_adapter_name_from_key.__func__(cls, key, adapter_name)

    @classmethod
    def check_checkpoint(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> None:
        """Refuse (raise) a remapped checkpoint state dict that does not fit ``model``."""

    # --- helpers for subclasses ---------------------------------------------------------------------------------
    def targets(self, config, key: str) -> bool:
        return bool(self._check_target_module_exists(config, key))

    def replace_module(self, parent, child_name, new_module, child) -> None:
        self._replace_module(parent, child_name, new_module, child)

    # --- peft's private hooks -----------------------------------------------------------------------------------
    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **_):
        self.wrap_target(config, adapter_name, target, target_name, parent, current_key)

    def _prepare_adapter_config(self, config, model_config):
        return self.prepare_config(config, model_config)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self.after_unload(model)
        return model

    @classmethod
    def _remove_adapter_name_from_key(cls, key, adapter_name):
        return cls.checkpoint_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        cls.check_checkpoint(model, config, adapter_name, remapped)
        return remapped


def unwrap_adapter(root: nn.Module, adapter_name: str) -> None:
    """Remove every trace of ``adapter_name`` from the hadapeft layers under ``root`` (layers that held only it are
    replaced by their base layer)."""
    layers = [(k, m) for k, m in root.named_modules()
              if isinstance(m, SeamTunerLayer) and adapter_name in m.adapter_names()]
    for key, layer in layers:
        if [a for a in layer.adapter_names() if a != adapter_name]:
            layer.delete_adapter(adapter_name)
        else:
            parent_key, _, child = key.rpartition(".")
            setattr(root.get_submodule(parent_key) if parent_key else root, child, layer.get_base_layer())


def holds_adapter(root: nn.Module, adapter_name: str) -> bool:
    return any(isinstance(m, SeamTunerLayer) and adapter_name in m.adapter_names() for m in root.modules())
