"""bitsandbytes 4-bit weights in either of their two CPU layouts.

bitsandbytes >= 0.49 on a CPU with AVX512-BF16 (its flag ``has_avx512bf16``, read by each ``Linear4bit`` when it is
built) repacks a 4-bit weight for its bf16 inference kernel the first time the layer runs in eval mode without
autograd: ``weight.data`` becomes an (N, K/2) tile layout and ``quant_state.absmax`` a transposed bf16 (K/64, N)
table, flagged by ``quant_state.packing_format_for_cpu``. Three things go wrong after that (bitsandbytes 0.50.2):

* ``dequantize_4bit`` reads the repacked weight as if it were in the standard layout (errors of the size of W);
* its packed matmul has no autograd formula: a layer called with an input that requires grad returns no gradient for
  that input (or fails when the layer has a trainable bias), so adapters before it silently stop learning;
* its inverse (run by ``Linear4bit._save_to_state_dict``) leaves a non-nested ``absmax`` transposed, so one
  ``model.state_dict()`` corrupts the layer for every later forward.

:func:`dense_weight_4bit` dequantizes either layout without touching the layer; :func:`to_standard_layout` converts a
repacked weight back, with the ``absmax`` fix, and :func:`guard_4bit_layer` runs it before autograd needs the layer
and before its state dict is taken. bitsandbytes repacks again on the next eval-mode no-grad forward; after the first
repacking (which rounds ``absmax`` to bf16 once) the round trip is exact.

:func:`import_quietly` imports bitsandbytes without the warnings of its import-time kernel fetch (see there).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys

import torch
from torch import nn

_GUARD_ATTR = "_hadapeft_4bit_guard"  # set on a Linear4bit whose hooks are installed (idempotent installation)

# bitsandbytes >= 0.50 on a CPU with AVX512-BF16 tries, while it is imported (which `import peft` does), to fetch an
# optional 4-bit matmul kernel from the Hub (kernels-community, through the `kernels` package that transformers
# installs); offline or untrusted, `kernels` and then bitsandbytes log a WARNING each ("Skipping publisher trust check
# for 'kernels-community/...'", "Failed to load CPU gemm_4bit_forward from kernels-community: ..."), on every import.
# bitsandbytes then runs its own CPU code, which is what hadapeft's 4-bit support (this module) is tested with.
KERNEL_FETCH_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
KERNEL_FETCH_REPO = "kernels-community/"


class _DropKernelFetch(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return KERNEL_FETCH_REPO not in record.getMessage()


def import_quietly() -> None:
    """Import bitsandbytes (when installed and not imported yet) without the warnings of its kernel fetch.

    A library should not print on import about an optional kernel its user never asked for. Only records that name
    ``kernels-community/`` are dropped, only from the two loggers above, and only while bitsandbytes is imported:
    every other message, and every later one, shows as usual. ``hadapeft.seam`` calls it before importing peft."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    drop = _DropKernelFetch()
    loggers = [logging.getLogger(name) for name in KERNEL_FETCH_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken install: peft's own import of it reports the error
        pass
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def is_cpu_packed(weight) -> bool:
    """Whether a ``Params4bit`` is in bitsandbytes' repacked CPU inference layout."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _standard_absmax(packed_state) -> torch.Tensor:
    """The (N·K/blocksize,) fp32 absmax of the standard layout from the repacked (K/blocksize, N) bf16 table: exactly
    the scales the repacked kernel multiplies by."""
    return packed_state.absmax.t().reshape(-1).float()


def _unpacked(weight) -> tuple[torch.Tensor, object]:
    """(standard-layout data, standard QuantState) of a repacked weight, as new objects (the weight is unchanged)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    packed_state = weight.quant_state
    state = copy.copy(packed_state)  # the inverse rebinds fields of the state it is given; keep the layer's own
    state.original_nested = False  # the plain table is rebuilt below: skip re-quantizing nested statistics
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), state)
    # bitsandbytes restores the table only for nested statistics (re-quantizing it); a plain one stays transposed.
    state.absmax = _standard_absmax(packed_state)
    state.nested, state.state2, state.offset = False, None, None
    return data, state


def dense_weight_4bit(weight) -> torch.Tensor:
    """The dequantized (N, K) weight of a ``Params4bit`` in either layout, in the state's compute dtype."""
    import bitsandbytes.functional as F

    if not is_cpu_packed(weight):
        return F.dequantize_4bit(weight.data, weight.quant_state)
    data, state = _unpacked(weight)
    return F.dequantize_4bit(data, state)


def to_standard_layout(layer: nn.Module) -> None:
    """Convert a ``Linear4bit``'s repacked weight back to the standard layout in place (no-op otherwise)."""
    weight = layer.weight
    if not is_cpu_packed(weight):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = weight.quant_state
    absmax = _standard_absmax(state)
    nested = state.original_nested
    # In place on the layer's own QuantState (Linear4bit.quant_state is the same object), as bitsandbytes does.
    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        state.absmax = absmax


def _before_forward(layer, args):
    # The repacked kernel has no backward: give autograd the standard layout when the input needs a gradient.
    if args and torch.is_grad_enabled() and getattr(args[0], "requires_grad", False):
        to_standard_layout(layer)


def _before_state_dict(layer, prefix, keep_vars):
    to_standard_layout(layer)


def guard_4bit_layer(layer: nn.Module) -> None:
    """Install the two hooks of the module docstring on a ``Linear4bit`` (idempotent; they survive deepcopy and
    pickling, being module-level functions)."""
    if layer.__dict__.get(_GUARD_ATTR):
        return
    layer.register_forward_pre_hook(_before_forward)
    layer.register_state_dict_pre_hook(_before_state_dict)
    layer.__dict__[_GUARD_ATTR] = True
