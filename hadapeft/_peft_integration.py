"""The one seam between hadapeft and peft's internals.

Everything that relies on peft behaviour that is not a public, documented extension point lives here:

* adding members to peft's closed ``PeftType`` enum so that ``register_peft_method`` accepts our types
  (there is no plugin mechanism, see huggingface/peft#2273);
* the supported peft version range, checked once at import;
* per-sample conditioning kwargs (``task_ids`` / ``task_embeds``) through peft's model wrappers, and through the
  signature the HF Trainer reads to decide which dataset columns to keep;
* the structural selection of an adapter's state-dict keys (used to check checkpoints before loading);
* crash-consistent ``save_pretrained`` and safe loading (safetensors only by default, no code named by a config).

Tested with peft 0.21.x (see ``SUPPORTED_PEFT``). Outside that range ``import hadapeft`` raises, because the enum
surgery and the tuner hooks below depend on private layout that peft changes between minor releases.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import inspect
import json
import os
import re
import secrets
import shutil
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
    re-raise as :class:`~hadapeft.errors.AdapterCheckpointError` naming the checkpoint. Also installs the atomic
    saves and safe-loading checks (:func:`install_safety`).
    """
    from peft import PeftModel

    from .errors import AdapterCheckpointError

    install_safety()
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
            if not _hada_layers(model, adapter_name):
                raise
            _unwrap_adapter(model, adapter_name)
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
            if existed or not _hada_layers(self.base_model.model, adapter_name):
                raise
            _unwrap_adapter(self.base_model.model, adapter_name)
            self.peft_config.pop(adapter_name, None)
            if isinstance(e, AdapterCheckpointError):
                raise
            raise AdapterCheckpointError(f"cannot load adapter {adapter_name!r} from {model_id}: {e}") from e

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


# --- atomic saves -------------------------------------------------------------------------------------------------
_STAGE_PREFIX = ".hadapeft-tmp-"
_COMMIT_NAME = ".hadapeft-commit"


def _fsync_path(path: str, directory: bool = False) -> None:

    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # directories cannot be opened on Windows; nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:

    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath, directory=True)


def _pid_alive(pid: int) -> bool:

    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM), or no way to tell: keep its folder
        return True
    return True


def _roll_forward(save_directory: str) -> bool:
    """Finish an interrupted commit: move what is left in ``.hadapeft-commit`` into place. Idempotent and safe to run
    again after a crash in the middle of it. Returns whether there was anything to finish."""

    commit = os.path.join(save_directory, _COMMIT_NAME)
    if not os.path.isdir(commit):
        return False
    files = []
    for dirpath, _, filenames in os.walk(commit):
        rel_dir = os.path.relpath(dirpath, commit)
        files += [os.path.normpath(os.path.join(rel_dir, n)) for n in filenames]
    # Weights before config within each folder, the model card last: a reader that does not recover sees the new
    # config only once the new weights are in place.
    order = {"adapter_model.safetensors": 0, "adapter_model.bin": 0, "adapter_config.json": 1, "README.md": 2}
    files.sort(key=lambda f: (os.path.basename(f) == "README.md", os.path.dirname(f),
                              order.get(os.path.basename(f), 1)))
    touched = set()
    for rel in files:
        src, dst = os.path.join(commit, rel), os.path.join(save_directory, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(dst):  # a folder where a file goes: not ours to delete
            raise OSError(f"cannot save {dst}: a directory is in the way")
        try:
            os.replace(src, dst)
        except FileNotFoundError:  # moved by a concurrent recovery
            continue
        touched.add(os.path.dirname(dst))
    for d in touched:
        _fsync_path(d, directory=True)
    shutil.rmtree(commit, ignore_errors=True)
    _fsync_path(save_directory, directory=True)
    return True


def recover_interrupted_save(save_directory: str) -> None:
    """Bring ``save_directory`` to a consistent state after a save that was killed: complete a committed save
    (roll forward) and delete staging folders of processes that are gone. Called before each save and each load."""

    if not os.path.isdir(save_directory):
        return
    _roll_forward(save_directory)
    for name in os.listdir(save_directory):
        if not name.startswith(_STAGE_PREFIX):
            continue
        try:
            pid = int(name[len(_STAGE_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid) or name.startswith(f"{_STAGE_PREFIX}{os.getpid()}-"):
            shutil.rmtree(os.path.join(save_directory, name), ignore_errors=True)


def atomic_save_pretrained(original, self, save_directory, *args, **kwargs) -> None:
    """Save like peft, but crash-consistently: after a crash (SIGKILL, power loss) at any moment, a load finds
    either the complete previous adapter(s) or the complete new one(s), never a mix or a truncated file.

    Scheme (a redo log made of one directory rename):

    1. **stage** — peft saves everything into a fresh ``save_directory/.hadapeft-tmp-<pid>-<rand>/`` (the existing
       ``README.md`` is copied in first, so that peft updates the user's model card as it would in place). Every
       file and folder in it is fsync'd. A crash here leaves the old files untouched; the staging folder is deleted
       by the next save or load (its pid is dead).
    2. **commit** — the staging folder is renamed to ``save_directory/.hadapeft-commit`` (one atomic rename, then an
       fsync of ``save_directory``). From this instant the new save is durable and will be completed.
    3. **apply** — each staged file is moved over its target with ``os.replace`` (atomic per file; weights before
       config before model card), then the commit folder is removed. Only the files peft writes are replaced:
       other files the user keeps in ``save_directory`` or the adapter sub-folders stay.

    A crash during *apply* leaves ``.hadapeft-commit`` behind; :func:`recover_interrupted_save` finishes the moves,
    and it runs at the start of every save and before every ``PeftModel.from_pretrained`` / ``load_adapter`` /
    ``AutoPeftModel*.from_pretrained`` of a local folder, so those always see the complete new adapter. (A reader
    that bypasses hadapeft, e.g. a bare ``transformers`` ``load_adapter`` in the crash window, may see it half
    applied until the next hadapeft save or load.)
    """

    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    os.makedirs(save_directory, exist_ok=True)
    recover_interrupted_save(save_directory)
    stage = os.path.join(save_directory, f"{_STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    os.makedirs(stage)
    try:
        card = os.path.join(save_directory, "README.md")
        if os.path.isfile(card):
            shutil.copy2(card, os.path.join(stage, "README.md"))
        original(self, stage, *args, **kwargs)
        _fsync_tree(stage)
        commit = os.path.join(save_directory, _COMMIT_NAME)
        for _ in range(10):  # a concurrent saver may hold the commit slot: finish its save, then take it
            try:
                os.rename(stage, commit)
                break
            except OSError:
                if not _roll_forward(save_directory):
                    raise
        else:
            raise OSError(f"could not commit the save into {save_directory}: another process keeps saving there")
        _fsync_path(save_directory, directory=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _roll_forward(save_directory)


def install_atomic_save() -> None:
    """Route ``PeftModel.save_pretrained`` through :func:`atomic_save_pretrained` when a saved adapter is a hadapeft
    one (other adapters are saved by peft unchanged); idempotent."""
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
        ours = any(getattr(self.peft_config.get(n), "peft_type", None) in HADAPEFT_TYPES for n in names)
        if not ours or not bound.arguments["is_main_process"]:
            return original(self, *args, **kwargs)
        return atomic_save_pretrained(original, self, *args, **kwargs)

    save_pretrained._hadapeft_atomic = True
    PeftModel.save_pretrained = save_pretrained


# --- safe loading -------------------------------------------------------------------------------------------------
_ALLOW_PICKLE = contextvars.ContextVar("hadapeft_allow_pickle", default=False)
PICKLE_ENV = "HADAPEFT_ALLOW_PICKLE"
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

    return _ALLOW_PICKLE.get() or os.environ.get(PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_adapter_config(config: dict, where: str, auto: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse fields of a hadapeft adapter_config.json that would make peft import or run code. Only
    ``AutoPeftModel*`` acts on ``auto_mapping`` (it imports ``parent_library``) and on ``base_model_name_or_path``
    (it loads that model, running its code under ``trust_remote_code=True``); ``PeftModel.from_pretrained`` ignores
    both, so they are checked when ``auto``."""

    from .errors import AdapterCheckpointError

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

    from .errors import AdapterCheckpointError

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
    return config if config.get("peft_type") in HADAPEFT_TYPES else None


def precheck_local_adapter(model_id, kwargs, auto: bool = False, trust_remote_code: bool = False) -> None:
    """Checks run before peft touches the model for a local hadapeft adapter folder: finish an interrupted save,
    refuse dangerous config fields, refuse a folder without weights (peft would fall back to the Hub and fail with an
    unrelated message), and refuse pickle weights unless :func:`allow_pickle_checkpoints`."""

    from .errors import AdapterCheckpointError

    model_id = os.fspath(model_id) if isinstance(model_id, os.PathLike) else model_id
    if not isinstance(model_id, str) or not os.path.isdir(model_id):
        return
    folder = os.path.join(model_id, kwargs.get("subfolder") or "")
    for d in {os.path.normpath(model_id), os.path.normpath(os.path.dirname(os.path.normpath(folder)))}:
        if os.path.isdir(os.path.join(d, _COMMIT_NAME)):
            _roll_forward(d)
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


def install_auto_guard() -> None:
    """Run :func:`precheck_local_adapter` before ``AutoPeftModel*.from_pretrained``; idempotent."""
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


def install_safety() -> None:
    """Atomic saves and safe loading; idempotent."""
    install_atomic_save()
    install_auto_guard()
