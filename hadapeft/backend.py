"""The one dispatch point between the fused Triton kernels and the PyTorch reference path.

Priority, highest first:
1. ``with hadapeft.use_backend("torch"):`` (tests, debugging; process-wide while the block runs),
2. the environment variable ``HADAPEFT_BACKEND`` (``auto`` | ``torch`` | ``triton``), read when hadapeft is imported,
3. the adapter config's ``backend`` field.

Resolution is cheap and traceable by ``torch.compile`` (plain module globals, no ``ContextVar`` or environment read
per call): layers call :func:`resolve_backend` on every forward, and dynamo guards on the globals, so entering
``use_backend`` recompiles rather than silently keeping the old choice.

``auto`` picks Triton for CUDA tensors when Triton imports, else the PyTorch reference. ``triton`` on a CPU tensor is
allowed only under ``TRITON_INTERPRET=1`` (Triton's numpy interpreter, used by the CPU test-suite).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "HADAPEFT_BACKEND"

_forced: str | None = None  # set by use_backend


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or for this tensor."""


def check_backend_name(name: str, source: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {BACKENDS}")
    return name


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _read_env() -> str | None:
    value = os.environ.get(ENV_VAR) or None
    return None if value is None else check_backend_name(value, source=ENV_VAR)


_env: str | None = _read_env()


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for everything run inside the block, in every thread (overrides env and config)."""
    global _forced
    previous, _forced = _forced, check_backend_name(name)
    try:
        yield
    finally:
        _forced = previous


def resolve_backend(requested: str, device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for an op on ``device``."""
    choice = _forced or _env or requested
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise BackendUnavailableError("backend='triton' was requested but triton is not installed "
                                          "(pip install 'hadapeft[triton]')")
        if device.type != "cuda" and not triton_interpreted():
            raise BackendUnavailableError(f"backend='triton' needs CUDA tensors (got {device.type}); "
                                          "set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter")
    return choice
