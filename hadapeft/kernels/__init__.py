"""Fused Triton kernels for the hadapeft ops (CUDA, or Triton's CPU interpreter under ``TRITON_INTERPRET=1``).

Each op file follows one layout, Liger / flash-attn style: Triton kernels → launchers → ``torch.library`` custom ops
(with fake impls, so ``torch.compile`` traces them) → ``torch.autograd.Function`` → public function with the shapes.

    gated_lora.py  gated_lora_triton        y = γ∘(x Wᵀ + b) + (1−γ)∘(s · x_l Aᵀ Bᵀ)
    modulate.py    modulated_linear_triton  y = o[t]∘(W (i[t]∘x) + b) + β[t]

The frozen GEMMs stay in cuBLAS (``torch.mm``/``addmm``); the kernels fuse everything around them that would
otherwise be separate elementwise passes over an N × d activation. The package never imports this sub-package
unless the Triton backend was selected (``hadapeft/ops/__init__.py``), so machines without Triton are unaffected.
"""

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
