"""Column sums of element-wise products, the parameter-gradient reduction of every Hadamard adapter.

    dγ = Σ_n dy ∘ (h − l)      (gated LoRA)        d(out scale) = Σ_n dy ∘ h      d(in scale) = Σ_n (dy W) ∘ x

Written as ``(a * b).sum(0)`` this materialises an N × d temporary and then walks it column-wise. On a CPU that
costs more than the product itself: a fresh N × d buffer is page-faulted in, and the result is written and read
back through main memory. Here the rows go through in blocks of about 2 MB, so the temporary stays in cache, and
the partial sums add up in fp32 in a fixed order (deterministic; half-precision inputs do not lose the small terms).
On CUDA one fused ``(a * b).sum`` is already a single pass of the caching allocator and stays as is.
"""

from __future__ import annotations

import torch

_BLOCK_ELEMENTS = 1 << 19  # ≈ 2 MB of fp32 per temporary block: fits in L2 of current server CPUs


def sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b)`` summed over every dim but the last, as fp32, for a, b of the same shape (..., d)."""
    d = a.shape[-1]
    a2, b2 = a.reshape(-1, d), b.reshape(-1, d)
    rows = max(1, _BLOCK_ELEMENTS // max(d, 1))
    if a.device.type != "cpu" or a2.shape[0] <= rows:  # one block: no loop (small inputs are host-bound)
        return torch.mul(a2, b2).sum(0, dtype=torch.float32)
    acc = torch.zeros(d, dtype=torch.float32)
    block = torch.empty(min(rows, a2.shape[0]), d, dtype=torch.promote_types(a.dtype, b.dtype))
    for start in range(0, a2.shape[0], rows):
        stop = min(start + rows, a2.shape[0])
        part = torch.mul(a2[start:stop], b2[start:stop], out=block[: stop - start])
        acc += part.sum(0, dtype=torch.float32)
    return acc


def per_sample_sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For a, b of shape (B, L, d): Σ over L of a ∘ b for each sample, (B, d) in fp32."""
    if a.device.type != "cpu":
        return torch.mul(a, b).sum(1, dtype=torch.float32)
    return torch.stack([sum_of_products(a[i], b[i]) for i in range(a.shape[0])])
