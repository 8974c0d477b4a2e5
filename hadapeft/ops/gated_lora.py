"""Gated LoRA op: ``y = γ ∘ (x Wᵀ + b) + (1 − γ) ∘ (s · (x_l Aᵀ) Bᵀ)``.

This is the PyTorch reference path (the CPU implementation users run) and the shape contract the Triton kernel in
``hadapeft/kernels/gated_lora.py`` implements. Shapes (N = number of rows after flattening leading dims):

    x      (..., d_in)      input of the frozen layer
    weight (d_out, d_in)    frozen, no grad
    bias   (d_out,) | None  frozen, no grad
    lora_A (r, d_in)
    lora_B (d_out, r)
    gate   (d_out,) | (1,)  γ = clamp(gate, 0, 1) in the forward; its gradient is straight-through (the
                            identity), as Gated LoRA trains the gate by projected gradient descent
    lora_x same as x | None dropout(x) for the low-rank branch; None means x itself

Memory: the backward needs ``h − l`` (for dγ) and ``u = x_l Aᵀ`` (N × r). We save exactly those plus a reference to
the input (which the caller keeps alive anyway), and fold ``s`` and ``1 − γ`` into the small matrices so the backward
allocates no N × d temporaries beyond the gradients themselves (dγ is reduced block by block, ``reduce.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reduce import sum_of_products


def gated_lora_ref(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x=None, upcast=False):
    """Eager formula, autograd through plain ops. ``upcast=True`` computes in fp64 (test reference)."""
    lx = x if lora_x is None else lora_x
    if upcast:
        x, lx, weight, lora_A, lora_B, gate = (t.double() for t in (x, lx, weight, lora_A, lora_B, gate))
        bias = None if bias is None else bias.double()
    gate = gate + (gate.clamp(0.0, 1.0) - gate).detach()  # straight-through clamp; exact for gates in [0, 1]
    h = F.linear(x, weight, bias)
    low = F.linear(F.linear(lx, lora_A), lora_B) * scaling
    return gate * h + (1 - gate) * low


class GatedLoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, gate, scaling, lora_x):
        # x keeps its shape here: flattening a strided input would copy it and change the GEMM's rounding, and the
        # identity at init must be exact.
        lx = x if lora_x is None else lora_x
        gate = gate.clamp(0.0, 1.0)  # inside the Function: no autograd node; backward passes dγ straight through
        u = lx @ lora_A.t()  # (..., r)
        diff = F.linear(x, weight, bias)  # h, (..., d_out); becomes h − l in place below
        low = u @ (lora_B * scaling).t()  # l, (..., d_out); becomes y in place below
        diff.sub_(low)
        y = low.addcmul_(diff, gate)  # y = l + γ(h − l)
        ctx.save_for_backward(lx, weight, lora_A, lora_B, gate, u, diff)
        ctx.scaling = scaling
        ctx.separate_lora_x = lora_x is not None
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        lx, weight, lora_A, lora_B, gate, u, diff = ctx.saved_tensors
        s = ctx.scaling
        d_out, r = weight.shape[0], lora_A.shape[0]
        dy2, diff, u = dy.reshape(-1, d_out), diff.reshape(-1, d_out), u.reshape(-1, r)
        lx2 = lx.reshape(-1, lx.shape[-1])
        # dγ = Σ_n dy ∘ (h − l); a scalar gate sums over features too.
        dgate = sum_of_products(dy2, diff)
        dgate = (dgate.sum().reshape(1) if gate.numel() == 1 else dgate).to(gate.dtype)
        mix = ((1 - gate) * s).unsqueeze(-1)  # (d_out, 1) or (1, 1): weight of the low-rank branch
        dB = (dy2.t() @ u) * mix  # (d_out, r)
        v = dy2 @ (lora_B * mix)  # (N, r) = ((1−γ) s ∘ dy) B
        dA = v.t() @ lx2  # (r, d_in)
        dx = dlx = None
        if ctx.separate_lora_x:
            if ctx.needs_input_grad[0]:
                dx = (dy2 @ (weight * gate.unsqueeze(-1))).view(ctx.x_shape)
            if ctx.needs_input_grad[7]:
                dlx = (v @ lora_A).view(ctx.x_shape)
        elif ctx.needs_input_grad[0]:
            # dx = (γ ∘ dy) W + v A: one GEMM on a γ-scaled copy of W (d_out × d_in, cheaper than N × d), then the
            # low-rank term accumulated in place (one N × d_in buffer, not two).
            dx = (dy2 @ (weight * gate.unsqueeze(-1))).addmm_(v, lora_A).view(ctx.x_shape)
        return dx, None, None, dA, dB, dgate, None, dlx


def gated_lora_torch(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x=None):
    return GatedLoraFunction.apply(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x)


def clamp_gate(gate: torch.Tensor) -> torch.Tensor:
    """γ = clamp(gate, 0, 1) in the forward, identity in the backward (straight-through), in native ops.

    The gradient stays a plain sum over samples, so it is the same whether a batch is split over N processes or
    micro-batches (a sign-dependent rule applied per backward would not be). γ = 1 at init sits on the boundary,
    where a plain clamp's gradient would die for good once a step overshoots; instead the Gated LoRA layer projects
    the parameter back into [0, 1] after every optimizer step, i.e. projected gradient descent.
    """
    return gate + (gate.clamp(0.0, 1.0) - gate).detach()
