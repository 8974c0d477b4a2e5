"""Patches of peft's ``PeftModel`` (and ``AutoPeftModel*``) classes, applied once by :func:`install`:

* ``from_pretrained`` / ``load_adapter`` are all-or-nothing for hadapeft adapters (peft injects the layers before it
  reads the weights, so a bad checkpoint would leave the model half-adapted; a failure undoes exactly what the call
  did), run the safe-loading checks of :mod:`hadapeft.safety.load_policy` first under the folder's read lock, and
  refuse loading into an existing adapter name a checkpoint with another config;
* an unknown or wrongly written ``peft_type`` is named, with the known types, instead of peft's bare ``KeyError``;
* ``save_pretrained`` of a hadapeft adapter is crash-consistent and safe with concurrent savers
  (:mod:`hadapeft.safety.atomic_save`), and checks what it wrote before committing it;
* ``forward`` / ``generate`` take ``task_ids`` / ``task_embeds`` (peft's task wrappers capture ``task_ids`` for its
  Poly method and silently drop it for every other type), and ``task_description`` (a list of sentences, see
  :mod:`hadapeft.descriptions`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
from typing import Callable

from .. import registry
from ..errors import AdapterCheckpointError
from ..safety import atomic_save, precheck_local_adapter, reading, save_folders
from .hooks import adapter_state_keys, plain_key
from .tuner import ModelUndo, holds_adapter


def _is_ours(config) -> bool:
    return registry.is_hadapeft_type(getattr(config, "peft_type", None))


# --- loading ----------------------------------------------------------------------------------------------------
# Fields of an adapter config that do not change what its weights compute (bookkeeping written by peft / hadapeft).
_BOOKKEEPING_FIELDS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "hadapeft_version",
                                 "peft_version", "auto_mapping", "task_type", "init_weights"})


def _comparable(value):
    if isinstance(value, (set, frozenset, list, tuple)):
        return sorted(map(str, value))
    return str(getattr(value, "value", value)) if value is not None else None


def _config_differences(existing, loaded) -> list[str]:
    a, b = existing.to_dict(), loaded.to_dict()
    return [f"{k}: {a.get(k)!r} in the model, {b.get(k)!r} in the checkpoint" for k in sorted(set(a) | set(b))
            if k not in _BOOKKEEPING_FIELDS and _comparable(a.get(k)) != _comparable(b.get(k))]


def _check_reload_into_existing(model, model_id, adapter_name, kwargs) -> None:
    """peft's ``load_adapter`` into a name that exists loads the new weights and keeps the old config (its
    ``lora_alpha``, targets, ...): refuse a checkpoint whose config differs, naming the fields."""
    from peft import PeftConfig

    existing = model.peft_config[adapter_name]
    hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    loaded = PeftConfig.from_pretrained(model_id, **hub)
    if not (_is_ours(existing) or _is_ours(loaded)):
        return
    differences = _config_differences(existing, loaded)
    if differences:
        raise AdapterCheckpointError(
            f"cannot load {model_id} into the existing adapter {adapter_name!r}: its config differs ("
            + "; ".join(differences) + "), and peft would run the new weights with the old config. Load it under "
            f"a new name (load_adapter(..., adapter_name='other')) or delete_adapter({adapter_name!r}) first")


# The adapter that PeftModel.from_pretrained is creating: it then calls load_adapter into that (existing) name.
_CREATING: contextvars.ContextVar = contextvars.ContextVar("hadapeft_creating", default=None)


@contextlib.contextmanager
def _creating(adapter_name):
    token = _CREATING.set(adapter_name)
    try:
        yield
    finally:
        _CREATING.reset(token)


def _install_load_guard() -> None:
    from peft import PeftModel

    if getattr(PeftModel.load_adapter, "_hadapeft_guard", False):
        return
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter

    def from_pretrained(cls, model, model_id, adapter_name="default", *args, **kwargs):
        with reading(save_folders(model_id, kwargs)), _creating(adapter_name):
            precheck_local_adapter(model_id, kwargs)
            undo = ModelUndo(model)
            try:
                return original_from_pretrained(cls, model, model_id, adapter_name, *args, **kwargs)
            except Exception as e:
                ours = holds_adapter(model, adapter_name)
                undo.restore()
                if not ours or isinstance(e, AdapterCheckpointError):
                    raise
                raise AdapterCheckpointError(f"cannot load adapter {adapter_name!r} from {model_id}: {e}") from e

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        with reading(save_folders(model_id, kwargs)):
            precheck_local_adapter(model_id, kwargs)
            existed = adapter_name in self.peft_config
            if existed and _CREATING.get() != adapter_name:  # not from_pretrained filling the adapter it made
                _check_reload_into_existing(self, model_id, adapter_name, kwargs)
            undo = ModelUndo(self)
            try:
                return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
            except Exception as e:
                ours = holds_adapter(self.base_model.model, adapter_name)
                undo.restore()
                if not existed and isinstance(e, ValueError) and "different peft types" in str(e):
                    # peft refused before injecting anything (one model holds one adapter type): name the checkpoint.
                    raise AdapterCheckpointError(f"cannot load adapter {adapter_name!r} from {model_id} into this "
                                                 f"model: {e}") from e
                if not ours or isinstance(e, AdapterCheckpointError):
                    raise
                raise AdapterCheckpointError(f"cannot load adapter {adapter_name!r} from {model_id}: {e}") from e

    load_adapter._hadapeft_guard = True
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter


def unknown_peft_type(peft_type) -> str | None:
    """Why peft cannot load an adapter_config.json's ``peft_type`` (None when it can): the known types, and the
    right spelling where only the case (or '-' for '_') is wrong. hadapeft is imported here, so its types are known."""
    from .hooks import peft_config_class

    name = str(getattr(peft_type, "value", peft_type))
    if peft_config_class(peft_type) is not None:
        return None
    from peft.utils import PeftType

    known = [t.value for t in PeftType]
    ours = [t for t in known if registry.is_hadapeft_type(t)]
    close = [t for t in known if t.lower() == name.strip().lower().replace("-", "_")]
    hint = f" (did you mean {close[0]!r}? peft types are written in upper case)" if close else ""
    return (f"adapter_config.json names peft_type {name!r}, which is not an adapter type{hint}. Known types: "
            f"hadapeft's {ours} (registered: hadapeft is imported), peft's {[t for t in known if t not in ours]}")


def _install_peft_type_check() -> None:
    """peft reads an adapter's type with ``PeftConfigMixin._get_peft_type`` / ``from_peft_type`` and looks it up with
    a bare ``KeyError`` (e.g. ``KeyError: 'gated_lora'``): name the problem instead."""
    from peft.config import PeftConfigMixin

    if getattr(PeftConfigMixin.from_peft_type, "_hadapeft_type_check", False):
        return
    get_type, from_type = PeftConfigMixin._get_peft_type.__func__, PeftConfigMixin.from_peft_type.__func__

    def _get_peft_type(cls, *args, **kwargs):
        peft_type = get_type(cls, *args, **kwargs)
        problem = unknown_peft_type(peft_type)
        if problem:
            raise AdapterCheckpointError(f"{args[0] if args else 'the adapter'}: {problem}")
        return peft_type

    def from_peft_type(cls, **kwargs):
        problem = unknown_peft_type(kwargs["peft_type"]) if "peft_type" in kwargs else None
        if problem:
            raise AdapterCheckpointError(problem)
        return from_type(cls, **kwargs)

    from_peft_type._hadapeft_type_check = True
    PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)
    PeftConfigMixin.from_peft_type = classmethod(from_peft_type)


def _install_auto_guard() -> None:
    """Run the safe-loading checks before ``AutoPeftModel*.from_pretrained``."""
    from peft.auto import _BaseAutoPeftModel

    current = _BaseAutoPeftModel.from_pretrained.__func__
    if getattr(current, "_hadapeft_guard", False):
        return

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        with reading(save_folders(pretrained_model_name_or_path, kwargs)):
            precheck_local_adapter(pretrained_model_name_or_path, kwargs, auto=True,
                                   trust_remote_code=bool(kwargs.get("trust_remote_code")))
            return current(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained._hadapeft_guard = True
    _BaseAutoPeftModel.from_pretrained = classmethod(from_pretrained)


# --- saving -----------------------------------------------------------------------------------------------------
def _adapter_tensors(model, adapter_name: str, state=None) -> dict:
    """{checkpoint key: tensor} of every tensor adapter ``adapter_name`` owns in ``model`` (a PeftModel): its entries
    in the tuner layers and the tuner's shared modules (found structurally, not by name) and its modules_to_save.
    ``state``: the state dict to read (the one given to ``save_pretrained``, e.g. an engine's gathered full state
    dict; default ``model.state_dict()``)."""
    state = model.state_dict() if state is None else state
    tuner = type(model.base_model)
    tensors = {tuner.checkpoint_key(plain_key(k), adapter_name): state[k]
               for k in adapter_state_keys(model, adapter_name, state)}
    marker = f".modules_to_save.{adapter_name}."
    tensors.update({plain_key(k).replace(marker, "."): v for k, v in state.items() if marker in k})
    return tensors


def _read_weights(path: str) -> dict:
    import torch
    from safetensors.torch import load_file

    return load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)


def _same_tensor(written, held) -> bool:
    import torch

    return written.shape == held.shape and written.dtype == held.dtype and torch.equal(written, held.detach().cpu())


def verify_saved(model, folder: str, adapter_names, safe_serialization: bool, state_dict=None) -> None:
    """Check what a save wrote into ``folder``: each hadapeft adapter's config and every one of its tensors, with its
    value. peft selects the tensors by name, and some names select too few (an adapter named ``layers`` saved none of
    ``default``'s) while reporting success; a partial or empty save is an error instead. ``state_dict``: the one the
    save was given (under FSDP / ZeRO-3 the gathered full state dict; ``model.state_dict()`` there would be a
    collective, or sharded), else ``model.state_dict()``."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    for name in adapter_names:
        if not _is_ours(model.peft_config.get(name)):
            continue
        out = folder if name == "default" else os.path.join(folder, name)
        weights = os.path.join(out, SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME)
        if not os.path.isfile(weights) or not os.path.isfile(os.path.join(out, "adapter_config.json")):
            raise AdapterCheckpointError(f"saving adapter {name!r} did not write {weights} and its "
                                         "adapter_config.json; nothing was saved")
        written = _read_weights(weights)
        expected = _adapter_tensors(model, name, state_dict)
        missing = sorted(k for k in expected if k not in written)
        changed = sorted(k for k in expected if k in written and not _same_tensor(written[k], expected[k]))
        if missing or changed:
            what = (f"{len(missing)} of its {len(expected)} tensors are missing, e.g. {missing[0]}" if missing
                    else f"{len(changed)} tensors were written with other values, e.g. {changed[0]}")
            raise AdapterCheckpointError(f"saving adapter {name!r} is incomplete: {what}; nothing was saved")


def _install_atomic_save() -> None:
    """``PeftModel.save_pretrained`` goes through :func:`hadapeft.safety.atomic_save` when a saved adapter is a
    hadapeft one (other adapters are saved by peft unchanged), and what it wrote is verified before it is committed."""
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

        def write(folder):
            original(self, folder, **rest)
            verify_saved(self, folder, names, bound.arguments["safe_serialization"], rest.get("state_dict"))

        return atomic_save(bound.arguments["save_directory"], write)

    save_pretrained._hadapeft_atomic = True
    PeftModel.save_pretrained = save_pretrained


# --- conditioning kwargs ----------------------------------------------------------------------------------------
def _conditioned_method(method, conditioning: Callable):
    """Wrap a PeftModel ``forward`` / ``generate``: for a model holding hadapeft adapters, take ``task_ids`` /
    ``task_embeds`` out of the call and run it inside ``conditioning`` (which ignores them while no conditioned
    adapter is active: they never reach the base model); for a model of peft's own types they are passed on
    untouched (peft's Poly takes ``task_ids``)."""

    @functools.wraps(method)
    def wrapper(self, *args, task_ids=None, task_embeds=None, task_description=None, **kwargs):
        if task_description is not None:  # sentences, embedded by the encoder the adapter was trained with
            from ..descriptions import description_embeds
            task_embeds = description_embeds(self, task_description, task_embeds)
        if task_ids is None and task_embeds is None:
            return method(self, *args, **kwargs)
        configs = getattr(self, "peft_config", None) or {}
        if not any(_is_ours(c) for c in configs.values()):
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
    _install_peft_type_check()
    _install_auto_guard()
    _install_atomic_save()
    _install_conditioning_kwargs(conditioning)
