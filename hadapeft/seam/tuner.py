"""peft's ``BaseTuner`` / ``BaseTunerLayer`` with their private hooks mapped onto hadapeft-named methods.

``hadapeft.core`` subclasses :class:`SeamTuner` and :class:`SeamTunerLayer` and overrides only the public-named
methods below; which private peft method calls which is written here, once.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .hooks import adapter_state_keys, plain_key


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
        """Checkpoint key of model key ``key`` (the adapter name removed; callers remove wrapper segments first)."""
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
        # Saving maps model keys to checkpoint keys, loading builds the inverse from the model's keys: both without
        # wrapper segments (FSDP1 units, checkpoint wrappers, torch.compile), so a checkpoint fits wrapped and plain
        # models alike.
        return cls.checkpoint_key(plain_key(key), adapter_name)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # peft's selection strips "_fsdp_wrapped_module." only at the start of a module path: under FSDP1 with nested
        # units it selects nothing. Same structural selection, wrapper segments removed anywhere.
        selected = {plain_key(k): state_dict[k] for k in adapter_state_keys(model, adapter_name, state_dict)}
        selected.update(cls._get_learnable_bias_state_dict(model, state_dict, config))
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        cls.check_checkpoint(model, config, adapter_name, remapped)
        return remapped


def holds_adapter(root: nn.Module, adapter_name: str) -> bool:
    return any(isinstance(m, SeamTunerLayer) and adapter_name in m.adapter_names() for m in root.modules())


# Instance attributes that peft (and hadapeft) set on models and tuners while adding an adapter; ``ModelUndo`` puts
# them back. Attributes named ``_hadapeft...`` (e.g. the conditioning state) are tracked too.
_TRACKED_ATTRS = ("peft_config", "active_adapter", "targeted_module_names", "forward", "generate", "_active_adapter",
                  "_disable_adapters")


def _tracked(name: str) -> bool:
    return name in _TRACKED_ATTRS or name.startswith("_hadapeft")


def _copy_content(value):
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else None


def _restore_content(value, content) -> None:
    if isinstance(value, dict):
        value.clear()
        value.update(content)
    elif isinstance(value, list):
        value[:] = content


class ModelUndo:
    """What an operation that adds an adapter (``get_peft_model``, ``add_adapter``, ``load_adapter``,
    ``from_pretrained``) may change under ``root``, recorded before it, so that a failure can undo exactly what it did
    and nothing else — adapters that were there before keep their layers, configs and parameters.

    Recorded: which module sits at each path (a wrapped target comes back, a new container entry goes), the adapters
    each hadapeft layer holds, every parameter's ``requires_grad``, and the tracked instance attributes of every
    module (``peft_config`` contents, active adapter, ...). An attribute value with a ``snapshot()`` method (the
    conditioning state) records itself: ``snapshot()`` returns the function that restores it."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.modules = dict(root.named_modules())
        self.adapters = {id(m): set(m.adapter_names()) for m in self.modules.values() if isinstance(m, SeamTunerLayer)}
        self.grad = [(p, p.requires_grad) for p in root.parameters()]
        self.attrs = {}
        for path, module in self.modules.items():
            names = [k for k in module.__dict__ if _tracked(k)]
            saved = {}
            for k in names:
                value = module.__dict__[k]
                restore = value.snapshot() if hasattr(value, "snapshot") else None
                saved[k] = (value, _copy_content(value), restore)
            self.attrs[path] = saved

    def restore(self) -> None:
        root = self.root
        # 1. modules back in their places, parents first (a wrapped target replaces its wrapper)
        for path in sorted(self.modules, key=lambda p: p.count(".") if p else -1):
            if not path:
                continue
            parent_path, _, child = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            old = self.modules[path]
            if getattr(parent, child, None) is not old:
                setattr(parent, child, old)
        # 2. modules added under modules that were there (e.g. a shared hypernetwork of the new adapter) go
        for path in sorted(set(dict(root.named_modules())) - set(self.modules), key=lambda p: -p.count(".")):
            parent_path, _, child = path.rpartition(".")
            if parent_path in self.modules and hasattr(self.modules[parent_path], child):
                delattr(self.modules[parent_path], child)
        # 3. adapters added to layers that were there
        for module in self.modules.values():
            if isinstance(module, SeamTunerLayer):
                for name in set(module.adapter_names()) - self.adapters[id(module)]:
                    module.delete_adapter(name)
        # 4. trainability and instance attributes
        for p, flag in self.grad:
            p.requires_grad_(flag)
        for path, module in self.modules.items():
            saved = self.attrs[path]
            for k in [k for k in module.__dict__ if _tracked(k) and k not in saved]:
                del module.__dict__[k]
            for k, (value, content, restore) in saved.items():
                module.__dict__[k] = value
                if content is not None:
                    _restore_content(value, content)
                if restore is not None:
                    restore()
