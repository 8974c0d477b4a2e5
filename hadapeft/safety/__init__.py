"""File safety: crash-consistent saves and the loading policy (no peft internals here; the seam wires them in)."""

from .atomic_save import atomic_save, reading, recover_interrupted_save
from .load_policy import allow_nonfinite_checkpoints, allow_pickle_checkpoints, check_adapter_config, \
    nonfinite_allowed, pickle_allowed, precheck_local_adapter, save_folders

__all__ = ["atomic_save", "reading", "recover_interrupted_save", "allow_nonfinite_checkpoints",
           "allow_pickle_checkpoints", "check_adapter_config", "nonfinite_allowed", "pickle_allowed",
           "precheck_local_adapter", "save_folders"]
