"""Public ops, and the one place that chooses how each runs: the Triton kernel (``hadapeft/kernels``), the lean
PyTorch autograd Function, or the eager reference formula (``gated_lora.py`` / ``modulate.py`` implement them).

Adapter layers call only these functions; they never launch kernels themselves.
"""

from __future__ import annotations

from ..backend import resolve_backend
from .gated_lora import unit_gate, gated_lora_ref, gated_lora_torch
from .modulate import modulated_linear_ref, modulated_linear_torch

__all__ = ["gated_lora_linear", "modulated_linear", "unit_gate", "gated_lora_ref", "modulated_linear_ref"]


def _base_trains(weight, bias) -> bool:
    """An unfrozen base (unusual): only the eager formula gives the weight its gradient."""
    return weight.requires_grad or (bias is not None and bias.requires_grad)


def gated_lora_linear(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x=None, recompute=False,
                      backend="auto"):
    """``γ ∘ (x Wᵀ + b) + (1 − γ) ∘ (s · lora_x Aᵀ Bᵀ)`` with γ = ``unit_gate(gate)`` (``gate`` is the parameter);
    shapes in ``hadapeft/ops/gated_lora.py``. ``recompute``: the PyTorch path keeps no N × d_out tensor for the
    gate's gradient (the Triton kernel always keeps h, which its forward writes anyway)."""
    if resolve_backend(backend, x.device) == "triton":
        from ..kernels.gated_lora import gated_lora_triton

        return gated_lora_triton(x, weight, bias, lora_A, lora_B, unit_gate(gate), scaling, lora_x)
    if _base_trains(weight, bias):
        return gated_lora_ref(x, weight, bias, lora_A, lora_B, unit_gate(gate), scaling, lora_x)
    return gated_lora_torch(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x, recompute)


def modulated_linear(x, weight, bias, in_scale=None, out_scale=None, shift=None, index=None, scale_bias=True,
                     backend="auto"):
    """``o[t] ∘ (W (i[t] ∘ x) + b) + β[t]`` per sample; shapes in ``hadapeft/ops/modulate.py``."""
    if resolve_backend(backend, x.device) == "triton":
        from ..kernels.modulate import modulated_linear_triton

        return modulated_linear_triton(x, weight, bias, in_scale, out_scale, shift, index, scale_bias)
    if _base_trains(weight, bias):
        return modulated_linear_ref(x, weight, bias, in_scale, out_scale, shift, index, scale_bias)
    return modulated_linear_torch(x, weight, bias, in_scale, out_scale, shift, index, scale_bias)
