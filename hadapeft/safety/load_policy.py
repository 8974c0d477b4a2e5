"""What hadapeft agrees to load: safetensors only (pickle on explicit opt-in), no code named by an adapter config,
and an interrupted save finished before its folder is read. File-safety policy with no peft in it; ``hadapeft.seam``
calls :func:`precheck_local_adapter` (inside :func:`hadapeft.safety.reading` of :func:`save_folders`) before peft's
loaders touch the model."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re

from .. import registry
from ..errors import AdapterCheckpointError

_ALLOW_PICKLE = contextvars.ContextVar("hadapeft_allow_pickle", default=False)
PICKLE_ENV = "HADAPEFT_ALLOW_PICKLE"
_ALLOW_NONFINITE = contextvars.ContextVar("hadapeft_allow_nonfinite", default=False)
NONFINITE_ENV = "HADAPEFT_ALLOW_NONFINITE"
# Packages a hadapeft adapter_config.json's auto_mapping may name (AutoPeftModel imports it; peft writes the model
# class's module, e.g. transformers.models.llama.modeling_llama).
AUTO_MAPPING_LIBRARIES = frozenset({"transformers"})


@contextlib.contextmanager
def allow_pickle_checkpoints():
    """Within this block, hadapeft adapters saved as ``adapter_model.bin`` (pickle) may be loaded. They are still
    read with ``torch.load(weights_only=True)`` (peft's loader), which unpickles tensors and plain containers only.
    Setting the environment variable ``HADAPEFT_ALLOW_PICKLE=1`` has the same effect process-wide."""
    token = _ALLOW_PICKLE.set(True)
    try:
        yield
    finally:
        _ALLOW_PICKLE.reset(token)


def pickle_allowed() -> bool:
    return _ALLOW_PICKLE.get() or _env_flag(PICKLE_ENV)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def allow_nonfinite_checkpoints():
    """Within this block, adapter checkpoints holding NaN or infinite values may be loaded (they are refused
    otherwise: a NaN scale can give finite but meaningless logits). ``HADAPEFT_ALLOW_NONFINITE=1`` has the same effect
    process-wide."""
    token = _ALLOW_NONFINITE.set(True)
    try:
        yield
    finally:
        _ALLOW_NONFINITE.reset(token)


def nonfinite_allowed() -> bool:
    return _ALLOW_NONFINITE.get() or _env_flag(NONFINITE_ENV)


def check_adapter_config(config: dict, where: str, auto: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse fields of a hadapeft adapter_config.json that would make peft import or run code. Only
    ``AutoPeftModel*`` acts on ``auto_mapping`` (it imports ``parent_library``) and on ``base_model_name_or_path``
    (it loads that model, running its code under ``trust_remote_code=True``); ``PeftModel.from_pretrained`` ignores
    both, so they are checked when ``auto``."""

    auto_mapping = config.get("auto_mapping") if auto else None
    if auto_mapping is not None:
        if not isinstance(auto_mapping, dict):
            raise AdapterCheckpointError(f"{where}: auto_mapping must be an object, got {auto_mapping!r}")
        library = auto_mapping.get("parent_library")
        cls_name = auto_mapping.get("base_model_class")
        if not isinstance(library, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*",
                                                            library) or library.split(".")[0] not in \
                AUTO_MAPPING_LIBRARIES:
            raise AdapterCheckpointError(
                f"{where}: auto_mapping.parent_library is {library!r}; AutoPeftModel would import it. hadapeft only "
                f"accepts {sorted(AUTO_MAPPING_LIBRARIES)}: load the base model yourself and use "
                "PeftModel.from_pretrained(base_model, adapter_dir)")
        if not isinstance(cls_name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cls_name):
            raise AdapterCheckpointError(f"{where}: auto_mapping.base_model_class {cls_name!r} is not a class name")
    if auto and trust_remote_code:
        raise AdapterCheckpointError(
            f"{where}: refusing trust_remote_code=True for a hadapeft adapter: AutoPeftModel would run the code of "
            f"base_model_name_or_path={config.get('base_model_name_or_path')!r}, a value taken from the adapter "
            "file. Load the base model yourself (with trust_remote_code=True if you trust it) and use "
            "PeftModel.from_pretrained(base_model, adapter_dir)")


def _read_hadapeft_config(folder: str):
    """The parsed adapter_config.json in ``folder`` if it is a hadapeft one, else None."""

    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterCheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterCheckpointError(f"{path} does not hold a JSON object")
    return config if config.get("peft_type") in registry.ADAPTER_TYPES else None


def adapter_folder(model_id, kwargs) -> str:
    """The local folder peft reads an adapter from."""
    return os.path.join(os.fspath(model_id), kwargs.get("subfolder") or "")


def save_folders(model_id, kwargs) -> list[str]:
    """The folders a hadapeft save may have written ``model_id`` (+ ``subfolder``) as: the adapter's own folder, and
    the folder above it (peft saves adapters other than ``default`` into sub-folders named after them)."""
    if not isinstance(model_id, (str, os.PathLike)) or not os.path.isdir(model_id):
        return []
    folder = os.path.normpath(adapter_folder(model_id, kwargs))
    return [os.path.normpath(os.fspath(model_id)), folder, os.path.dirname(folder)]


def precheck_local_adapter(model_id, kwargs, auto: bool = False, trust_remote_code: bool = False) -> None:
    """Checks run before peft touches the model for a local hadapeft adapter folder (inside
    :func:`hadapeft.safety.reading`, which finished any interrupted save): refuse dangerous config fields, refuse a
    folder without weights (peft would fall back to the Hub and fail with an unrelated message), and refuse pickle
    weights unless :func:`allow_pickle_checkpoints`."""

    model_id = os.fspath(model_id) if isinstance(model_id, os.PathLike) else model_id
    if not isinstance(model_id, str) or not os.path.isdir(model_id):
        return
    folder = adapter_folder(model_id, kwargs)
    config = _read_hadapeft_config(folder)
    if config is None:
        return
    check_adapter_config(config, os.path.join(folder, "adapter_config.json"), auto=auto,
                         trust_remote_code=trust_remote_code)
    if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        return
    if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
        if pickle_allowed():
            return
        raise AdapterCheckpointError(
            f"{folder} holds only adapter_model.bin, a pickle file; hadapeft loads weights from safetensors only. If "
            "you trust its origin, load it inside `with hadapeft.allow_pickle_checkpoints():` or with the environment "
            f"variable {PICKLE_ENV}=1 (it is read with torch.load(weights_only=True)), then re-save it as "
            "safetensors with model.save_pretrained(...)")
    raise AdapterCheckpointError(f"{folder} has an adapter_config.json but no adapter_model.safetensors")
