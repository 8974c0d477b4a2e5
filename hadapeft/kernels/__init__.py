"""Fused Triton kernels for the hadapeft ops (CUDA, or Triton's CPU interpreter under ``TRITON_INTERPRET=1``).

Each op file follows one layout, Liger / flash-attn style: Triton kernels → launchers → ``torch.library`` custom ops
(with fake impls, so ``torch.compile`` traces them) → ``torch.autograd.Function`` → public function with the shapes.

    gated_lora.py  gated_lora_triton        y = γ∘(x Wᵀ + b) + (1−γ)∘(s · x_l Aᵀ Bᵀ)
    modulate.py    modulated_linear_triton  y = o[t]∘(W (i[t]∘x) + b) + β[t]

The frozen GEMMs stay in cuBLAS (``torch.mm``/``addmm``); the kernels fuse everything around them that would
otherwise be separate elementwise passes over an N × d activation. The package never imports this sub-package
unless the Triton backend was selected (``hadapeft/ops/__init__.py``), so machines without Triton are unaffected.
"""

import os

import torch

# Tests set this to True: every buffer a launcher allocates for a kernel to fill starts as NaN, so an element that a
# kernel forgets to write (a wrong mask, grid or partial-sum slot) shows up as NaN instead of stale memory.
POISON_OUTPUTS = False


def new_buffer(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled when ``POISON_OUTPUTS``)."""
    dtype = like.dtype if dtype is None else dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


# Set False (or HADAPEFT_AUTOTUNE=0) to launch the tuned kernels with their default config instead: tuning costs a
# few seconds of compiling per new key, which small-shape correctness tests on a GPU do not need.
AUTOTUNE = os.environ.get("HADAPEFT_AUTOTUNE", "1") != "0"


def autotune_enabled() -> bool:
    return AUTOTUNE


def autotuned(kernel, configs, key, **kwargs):
    """``triton.autotune`` with a short benchmark per config (5 ms warm-up, 25 ms timing instead of 25 / 100): the
    candidates here are few and differ by tens of percent, and tuning happens on the first call of each key."""
    import triton

    def bench(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    return triton.autotune(configs, key, do_bench=bench, **kwargs)(kernel)


def sm_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


_SM_COUNT: dict[int, int] = {}


def _sm_count(index: int) -> int:
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def call_op(op, impl, *args):
    """Under ``torch.compile`` go through the registered custom op (traced with its fake impl); in eager mode call
    the implementation directly: the custom-op dispatcher costs ~20-40 µs of CPU per call, which a layer that must
    keep an H100 busy cannot afford."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)
