"""Patches of peft's ``PeftModel`` (and ``AutoPeftModel*``) classes, applied once by :func:`install`:

* ``from_pretrained`` / ``load_adapter`` are all-or-nothing for hadapeft adapters (peft injects the layers before it
  reads the weights, so a bad checkpoint would leave the model half-adapted) and run the safe-loading checks of
  :mod:`hadapeft.safety.load_policy` first;
* ``save_pretrained`` of a hadapeft adapter is crash-consistent (:mod:`hadapeft.safety.atomic_save`);
* ``forward`` / ``generate`` take ``task_ids`` / ``task_embeds`` (peft's task wrappers capture ``task_ids`` for its
  Poly method and silently drop it for every other type).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from .. import registry
from ..errors import AdapterCheckpointError
from ..safety import atomic_save, precheck_local_adapter
from .tuner import holds_adapter, unwrap_adapter

def _is_ours(config) -> bool:
    return registry.is_hadapeft_type(getattr(config, "peft_type", None))


# --- loading ----------------------------------------------------------------------------------------------------
def _install_load_guard() -> None:
    from peft import PeftModel

    if getattr(PeftModel.load_adapter, "_hadapeft_guard", False):
        return
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter

    def from_pretrained(cls, model, model_id, adapter_name="default", *args, **kwargs):
        precheck_local_adapter(model_id, kwargs)
        had_config = hasattr(model, "peft_config")
        try:
            return original_from_pretrained(cls, model, model_id, adapter_name, *args, **kwargs)
        except Exception as e:
            if not holds_adapter(model, adapter_name):
                raise
            unwrap_adapter(model, adapter_name)
            if not had_config and hasattr(model, "peft_config"):
                del model.peft_config
            if isinstance(e, AdapterCheckpointError):
                raise
            raise AdapterCheckpointError(f"cannot load adapter {adapter_name!r} from {model_id}: {e}") from e

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        precheck_local_adapter(model_id, kwargs)
        existed = adapter_name in self.peft_config
        try:
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        except Exception as e:
            if not existed and isinstance(e, ValueError) and "different peft types" in str(e):
                # peft refused before injecting anything (one model holds one adapter type): name the checkpoint.
                raise AdapterCheckpointError(f"cannot load adapter {adapter_name!r} from {model_id} into this model: "
                                             f"{e}") from e
            if existed or not holds_adapter(self.base_model.model, adapter_name):
                raise
            unwrap_adapter(self.base_model.model, adapter_name)
            self.peft_config.pop(adapter_name, None)
            if isinstance(e, AdapterCheckpointError):
                raise
            raise AdapterCheckpointError(f"cannot load adapter {adapter_name!r} from {model_id}: {e}") from e

    load_adapter._hadapeft_guard = True
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter


def _install_auto_guard() -> None:
    """Run the safe-loading checks before ``AutoPeftModel*.from_pretrained``."""
    from peft.auto import _BaseAutoPeftModel

    current = _BaseAutoPeftModel.from_pretrained.__func__
    if getattr(current, "_hadapeft_guard", False):
        return

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        precheck_local_adapter(pretrained_model_name_or_path, kwargs, auto=True,
                               trust_remote_code=bool(kwargs.get("trust_remote_code")))
        return current(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained._hadapeft_guard = True
    _BaseAutoPeftModel.from_pretrained = classmethod(from_pretrained)


# --- saving -----------------------------------------------------------------------------------------------------
def _install_atomic_save() -> None:
    """``PeftModel.save_pretrained`` goes through :func:`hadapeft.safety.atomic_save` when a saved adapter is a
    hadapeft one (other adapters are saved by peft unchanged)."""
    from peft import PeftModel

    if getattr(PeftModel.save_pretrained, "_hadapeft_atomic", False):
        return
    original = PeftModel.save_pretrained
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        selected = bound.arguments["selected_adapters"]
        names = selected if selected is not None else list(self.peft_config)
        if not any(_is_ours(self.peft_config.get(n)) for n in names) or not bound.arguments["is_main_process"]:
            return original(self, *args, **kwargs)
        rest = {k: v for k, v in bound.arguments.items() if k not in ("self", "save_directory", "kwargs")}
        rest.update(bound.arguments.get("kwargs", {}))
        return atomic_save(bound.arguments["save_directory"], lambda folder: original(self, folder, **rest))

    save_pretrained._hadapeft_atomic = True
    PeftModel.save_pretrained = save_pretrained


# --- conditioning kwargs ----------------------------------------------------------------------------------------
def _conditioned_method(method, conditioning: Callable):
    """Wrap a PeftModel ``forward`` / ``generate``: take ``task_ids`` / ``task_embeds`` out of the call and run it
    inside ``conditioning`` when a hadapeft adapter is active; for other adapters they are passed on untouched."""

    @functools.wraps(method)
    def wrapper(self, *args, task_ids=None, task_embeds=None, **kwargs):
        if task_ids is None and task_embeds is None:
            return method(self, *args, **kwargs)
        configs = getattr(self, "peft_config", None) or {}
        if not any(_is_ours(configs.get(a)) for a in self.active_adapters):
            passed = {k: v for k, v in (("task_ids", task_ids), ("task_embeds", task_embeds)) if v is not None}
            return method(self, *args, **passed, **kwargs)
        with conditioning(self, task_ids, task_embeds, args, kwargs):
            return method(self, *args, **kwargs)

    wrapper._hadapeft_conditioning = True
    return wrapper


def _install_conditioning_kwargs(conditioning: Callable) -> None:
    from peft import PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    for cls in (PeftModel, *MODEL_TYPE_TO_PEFT_MODEL_MAPPING.values()):
        for name in ("forward", "generate"):
            method = cls.__dict__.get(name)  # only methods the class defines itself, so none is wrapped twice
            if method is not None and not getattr(method, "_hadapeft_conditioning", False):
                setattr(cls, name, _conditioned_method(method, conditioning))


def install(conditioning: Callable) -> None:
    """Apply every patch above (idempotent). ``conditioning(model, task_ids, task_embeds, args, kwargs)`` is the
    context manager of ``hadapeft.core.conditioning`` for one model call (passed in: the seam does not import
    ``hadapeft.core``)."""
    _install_load_guard()
    _install_auto_guard()
    _install_atomic_save()
    _install_conditioning_kwargs(conditioning)
