"""The one seam between hadapeft and peft's internals.

Everything that relies on peft behaviour that is not a public, documented extension point lives here:

* adding members to peft's closed ``PeftType`` enum so that ``register_peft_method`` accepts our types
  (there is no plugin mechanism, see huggingface/peft#2273);
* the supported peft version range, checked once at import;
* per-sample conditioning kwargs (``task_ids`` / ``task_embeds``) through peft's model wrappers, and through the
  signature the HF Trainer reads to decide which dataset columns to keep;
* the structural selection of an adapter's state-dict keys (used to check checkpoints before loading).

Tested with peft 0.21.x (see ``SUPPORTED_PEFT``). Outside that range ``import hadapeft`` raises, because the enum
surgery and the tuner hooks below depend on private layout that peft changes between minor releases.
"""

from __future__ import annotations

import enum
import functools
import inspect
import sys

import peft
from packaging.version import Version
from peft.utils import PeftType, register_peft_method

# Lowest tested peft (inclusive) and first untested minor (exclusive). Keep in sync with pyproject.toml.
SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))


class UnsupportedPeftVersionError(ImportError):
    """peft is installed in a version hadapeft was not tested with."""


def check_peft_version(version: str | None = None) -> None:
    v = Version(version or peft.__version__)
    low, high = SUPPORTED_PEFT
    if not (low <= v < high):
        raise UnsupportedPeftVersionError(
            f"hadapeft supports peft >={low},<{high} but peft {v} is installed. "
            f"Install a supported version: pip install 'peft>={low},<{high}'."
        )


def _add_enum_member(enum_cls: type[enum.Enum], name: str, python: tuple[int, int] | None = None) -> enum.Enum:
    """Add member ``name`` (value ``name``) to a ``(str, Enum)`` class at runtime; idempotent.

    ``python`` selects the code path (defaults to the running interpreter) so that the branch for the other
    interpreter versions can be unit tested from one interpreter.
    """
    if name in enum_cls.__members__:
        return enum_cls[name]
    python = python or sys.version_info[:2]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)  # definition order (read by Python >= 3.11)
    if python >= (3, 13) and hasattr(enum_cls, "_add_member_"):
        # 3.13 grew a helper that binds the class attribute (as a descriptor) and fills _member_map_; it leaves
        # _member_names_ and the value map to the caller, as enum's own class construction does.
        enum_cls._add_member_(name, member)
    else:
        enum_cls._member_map_[name] = member
        # Bypass EnumType.__setattr__, which refuses to rebind members.
        type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[name] = member
    return member


HADAPEFT_TYPES: set[str] = set()


def register_adapter_type(name: str, config_cls: type, model_cls: type) -> None:
    """Register one hadapeft adapter type with peft; safe to call more than once."""
    HADAPEFT_TYPES.add(name.upper())
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    member = _add_enum_member(PeftType, name.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(member) is config_cls:
        return
    prefix = model_cls.prefix
    # register_peft_method checks prefix uniqueness against the mapping's keys, not its values: check it here.
    clash = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix and t != member]
    if clash:
        raise RuntimeError(f"hadapeft prefix {prefix!r} for {name} is already used by peft type {clash[0]}")
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def _hada_layers(model, adapter_name: str):
    from .core.layer import HadaLayer

    return [(k, m) for k, m in model.named_modules() if isinstance(m, HadaLayer) and m.owns(adapter_name)]


def _unwrap_adapter(root, adapter_name: str) -> None:
    """Remove every trace of ``adapter_name`` from the layers under ``root`` (newly wrapped layers are unwrapped)."""
    for key, layer in _hada_layers(root, adapter_name):
        if [a for a in layer._all_available_adapter_names() if a != adapter_name]:
            layer.delete_adapter(adapter_name)
        else:
            parent_key, _, child = key.rpartition(".")
            setattr(root.get_submodule(parent_key) if parent_key else root, child, layer.get_base_layer())


def install_load_guard() -> None:
    """Make loading a hadapeft adapter all-or-nothing.

    peft injects an adapter's layers into the user's model *before* reading the weights file, so a missing, corrupt
    or ill-fitting checkpoint would leave the model half-adapted. On any error we take the adapter back out and
    re-raise as :class:`~hadapeft.errors.AdapterCheckpointError` naming the checkpoint.
    """
    from peft import PeftModel

    from .errors import AdapterCheckpointError

    if getattr(PeftModel.load_adapter, "_hadapeft_guard", False):
        return
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter

    def from_pretrained(cls, model, model_id, adapter_name="default", *args, **kwargs):
        had_config = hasattr(model, "peft_config")
        try:
            return original_from_pretrained(cls, model, model_id, adapter_name, *args, **kwargs)
        except Exception as e:
            if not _hada_layers(model, adapter_name):
                raise
            _unwrap_adapter(model, adapter_name)
            if not had_config and hasattr(model, "peft_config"):
                del model.peft_config
            if isinstance(e, AdapterCheckpointError):
                raise
            raise AdapterCheckpointError(f"cannot load adapter {adapter_name!r} from {model_id}: {e}") from e

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        existed = adapter_name in self.peft_config
        try:
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        except Exception as e:
            if existed or not _hada_layers(self.base_model.model, adapter_name):
                raise
            _unwrap_adapter(self.base_model.model, adapter_name)
            self.peft_config.pop(adapter_name, None)
            if isinstance(e, AdapterCheckpointError):
                raise
            raise AdapterCheckpointError(f"cannot load adapter {adapter_name!r} from {model_id}: {e}") from e

    def precheck(model_id, kwargs):
        """Refuse a local hadapeft adapter folder without weights before peft touches the model (peft would fall
        back to the Hub and fail with an unrelated message)."""
        import json
        import os

        folder = os.path.join(str(model_id), kwargs.get("subfolder") or "")
        config = os.path.join(folder, "adapter_config.json")
        if not os.path.isfile(config):
            return
        try:
            with open(config) as f:
                peft_type = json.load(f).get("peft_type")
        except (OSError, ValueError) as e:
            raise AdapterCheckpointError(f"{config} is not valid JSON: {e}") from None
        if peft_type not in HADAPEFT_TYPES:
            return
        if not any(os.path.isfile(os.path.join(folder, n)) for n in ("adapter_model.safetensors", "adapter_model.bin")):
            raise AdapterCheckpointError(f"{folder} has an adapter_config.json but no adapter_model.safetensors")

    original_from_pretrained_checked = from_pretrained
    original_load_adapter_checked = load_adapter

    def from_pretrained(cls, model, model_id, adapter_name="default", *args, **kwargs):  # noqa: F811
        precheck(model_id, kwargs)
        return original_from_pretrained_checked(cls, model, model_id, adapter_name, *args, **kwargs)

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):  # noqa: F811
        precheck(model_id, kwargs)
        return original_load_adapter_checked(self, model_id, adapter_name, *args, **kwargs)

    load_adapter._hadapeft_guard = True
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter


def adapter_state_keys(model, adapter_name: str) -> list[str]:
    """Keys of ``model.state_dict()`` that hold adapter ``adapter_name``: its entries in the tuner layers and in
    model-level containers on the tuner (HyperMod's hypernetwork), as peft selects them for saving."""
    from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    return list(_filter_state_dict_by_key_prefixes(model.state_dict(), prefixes))


# --- per-sample conditioning through peft's wrappers ------------------------------------------------------------------
CONDITIONING_KWARGS = ("task_ids", "task_embeds")
_INPUT_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def _input_batch(args, kwargs):
    """Batch size of a model call (None when it cannot be told from the arguments)."""
    for value in (*(kwargs.get(k) for k in _INPUT_KEYS), *args[:1]):
        if hasattr(value, "shape") and len(value.shape) > 0:
            return value.shape[0]
    return None


def _hadapeft_active(peft_model) -> bool:
    configs = getattr(peft_model, "peft_config", None) or {}
    return any(getattr(configs.get(a), "peft_type", None) in HADAPEFT_TYPES for a in peft_model.active_adapters)


def _conditioned_method(method):
    """Wrap a PeftModel ``forward`` / ``generate``: take ``task_ids`` / ``task_embeds`` out of the call and run it
    inside ``hadapeft.conditioning`` when a hadapeft adapter is active. peft's task wrappers capture ``task_ids`` for
    their Poly method and silently drop it for every other type; for non-hadapeft adapters it is passed on untouched."""

    @functools.wraps(method)
    def wrapper(self, *args, task_ids=None, task_embeds=None, **kwargs):
        if task_ids is None and task_embeds is None:
            return method(self, *args, **kwargs)
        if not _hadapeft_active(self):
            passed = {k: v for k, v in (("task_ids", task_ids), ("task_embeds", task_embeds)) if v is not None}
            return method(self, *args, **passed, **kwargs)
        from .core.conditioning import conditioning

        with conditioning(self, task_ids, task_embeds, batch=_input_batch(args, kwargs)):
            return method(self, *args, **kwargs)

    wrapper._hadapeft_conditioning = True
    return wrapper


def install_conditioning_kwargs() -> None:
    """Let ``forward`` and ``generate`` of PeftModel and of each task class take ``task_ids`` / ``task_embeds``;
    idempotent."""
    from peft import PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    for cls in (PeftModel, *MODEL_TYPE_TO_PEFT_MODEL_MAPPING.values()):
        for name in ("forward", "generate"):
            method = cls.__dict__.get(name)  # only methods the class defines itself, so none is wrapped twice
            if method is not None and not getattr(method, "_hadapeft_conditioning", False):
                setattr(cls, name, _conditioned_method(method))


class _ConditionedForward:
    """Instance ``forward`` of a model with conditioned hadapeft adapters: the model's own forward, whose signature
    also names ``task_ids`` and ``task_embeds`` (applied when given). The HF Trainer keeps only the dataset columns
    that ``get_base_model().forward`` names, so a ``task_ids`` column survives ``remove_unused_columns=True``.

    A plain object holding the model (not a closure), so that ``copy.deepcopy`` points the copy's forward at the copy
    and the model still pickles."""

    _hadapeft_conditioning = True

    def __init__(self, model, inner=None):
        self.model = model
        self.inner = inner  # an instance forward that was there before (e.g. accelerate's hooks), else None
        sig = inspect.signature(inner or model.forward)
        params = [p for p in sig.parameters.values() if p.name not in CONDITIONING_KWARGS]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in CONDITIONING_KWARGS]
        at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
        self.__signature__ = sig.replace(parameters=[*params[:at], *extra, *params[at:]])

    def __call__(self, *args, task_ids=None, task_embeds=None, **kwargs):
        inner = self.inner or type(self.model).forward.__get__(self.model)
        if task_ids is None and task_embeds is None:
            return inner(*args, **kwargs)
        from .core.conditioning import conditioning

        with conditioning(self.model, task_ids, task_embeds, batch=_input_batch(args, kwargs)):
            return inner(*args, **kwargs)


def install_conditioned_forward(model) -> None:
    """Give ``model`` a :class:`_ConditionedForward` (idempotent)."""
    current = model.__dict__.get("forward")
    if not getattr(current, "_hadapeft_conditioning", False):
        model.forward = _ConditionedForward(model, current)


def uninstall_conditioned_forward(model) -> None:
    current = model.__dict__.get("forward")
    if getattr(current, "_hadapeft_conditioning", False):
        del model.forward
        if current.inner is not None:
            model.forward = current.inner
