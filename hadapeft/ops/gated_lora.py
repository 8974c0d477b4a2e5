"""Gated LoRA op: ``y = γ ∘ (x Wᵀ + b) + (1 − γ) ∘ (s · (x_l Aᵀ) Bᵀ)``.

This is the PyTorch reference path (the CPU implementation users run) and the shape contract the Triton kernel in
``hadapeft/kernels/gated_lora.py`` implements. Shapes (N = number of rows after flattening leading dims):

    x      (..., d_in)      input of the frozen layer
    weight (d_out, d_in)    frozen, no grad
    bias   (d_out,) | None  frozen, no grad
    lora_A (r, d_in)
    lora_B (d_out, r)
    gate   (d_out,) | (1,)  γ; adapter layers pass γ = unit_gate(g), already in [0, 1]. For direct callers the
                            forward uses clamp(gate, 0, 1) with a straight-through (identity) gradient
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


def unit_gate(gate: torch.Tensor) -> torch.Tensor:
    """γ = reflect(gate) in [0, 1]: the gate parameter folded into [0, 1] by reflection at 0 and 1 (a triangle wave of
    period 2: γ = g on [0, 1], 2 − g on [1, 2], −g on [−1, 0], ...), in native ops.

    Why a reparametrization rather than a clamp plus a projection after each optimizer step: engines that keep their
    own master copy of the weights (DeepSpeed ZeRO's fp32 partitions) or flatten / shard them (FSDP) copy the
    optimizer's values back over any projection, and a process-wide optimizer hook also runs after unrelated
    optimizers. Here γ is in [0, 1] whatever value the parameter holds, so no engine or optimizer wrapper can break it.

    * Exact: γ = g bit for bit on [0, 1] (``remainder`` is exact), so γ = 1 at init (g = 1) and saved gates in [0, 1]
      mean what they meant under the previous clamp.
    * No dead start: dγ/dg = ±1 everywhere (+1 at the kinks g = 0, 1, i.e. from inside [0, 1]), so the gate gets the
      full gradient at γ = 1; a step that would push γ past 1 reflects it to 1 − δ (the low-rank branch then starts
      learning) and the next gradient brings it back, where a clamped parameter would sit outside with γ stuck.
    * Linear in the upstream gradient: the slope depends only on g, so the gradient is a plain sum over samples, the
      same whether a batch is split over N processes or micro-batches (a rule on the gradient's sign would not be).
    """
    r = torch.remainder(gate, 2.0)
    return torch.where(r <= 1.0, r, 2.0 - r)
