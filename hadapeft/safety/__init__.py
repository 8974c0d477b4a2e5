"""File safety: crash-consistent saves and the loading policy (no peft internals here; the seam wires them in)."""

from .atomic_save import atomic_save, recover_interrupted_save
from .load_policy import allow_pickle_checkpoints, check_adapter_config, pickle_allowed, precheck_local_adapter

__all__ = ["atomic_save", "recover_interrupted_save", "allow_pickle_checkpoints", "check_adapter_config",
           "pickle_allowed", "precheck_local_adapter"]
