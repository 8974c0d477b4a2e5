"""Gated LoRA op: ``y = γ ∘ (x Wᵀ + b) + (1 − γ) ∘ (s · (x_l Aᵀ) Bᵀ)``, γ = ``unit_gate(g)``.

This is the PyTorch path (the CPU implementation users run) and the shape contract the Triton kernel in
``hadapeft/kernels/gated_lora.py`` implements. Shapes (N = number of rows after flattening leading dims):

    x      (..., d_in)      input of the frozen layer
    weight (d_out, d_in)    frozen, no grad
    bias   (d_out,) | None  frozen, no grad
    lora_A (r, d_in)
    lora_B (d_out, r)
    gate   (d_out,) | (1,)  ``gated_lora_torch`` / ``gated_lora_linear``: the gate *parameter* g, γ = unit_gate(g)
                            (reflected into [0, 1], part of the op: one autograd node for the whole layer step).
                            ``gated_lora_ref`` and the Triton kernel: γ itself, clamp(γ, 0, 1) with a
                            straight-through gradient.
    lora_x same as x | None dropout(x) for the low-rank branch; None means x itself

Host cost (what bounds an eager step on a GPU, and small layers on a CPU): :class:`GatedLoraFunction` is one
autograd node per layer step. Its forward is 7 tensor ops (γ's reflection folded into ``a = 1 − γ = |1 − r|``,
``r = g mod 2``; ``y = h − a ∘ (h − l)`` with ``h − l`` one ``addmm`` on h); its backward is about 12, and returns
dg = ±dγ from the sign of ``1 − r`` (the slope of the reflection). The same graph in native autograd ops was 2.2×
peft LoRA's host time per layer (``python -m scripts.host_overhead``, 2026-12-07), mostly the reflection's nodes.

Memory: backward needs ``h − l`` (for dγ) and ``u = x_l Aᵀ`` (N × r). ``recompute=False`` saves ``h − l``
(N × d_out per layer); ``recompute=True`` saves nothing of size N × d_out and recomputes ``h − l`` in backward (one
more GEMM, x W ᵀ, plus the rank-r update), keeping what peft's LoRA keeps (x and u).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..seam.hooks import functorch_transforms_active
from . import reduce


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


def gated_lora_ref(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x=None, upcast=False):
    """Eager formula on γ = ``gate``, autograd through plain ops. ``upcast=True`` computes in fp64 (test reference).
    A γ outside [0, 1] acts as its clamp, with a straight-through gradient (what the Triton kernel does)."""
    lx = x if lora_x is None else lora_x
    if upcast:
        x, lx, weight, lora_A, lora_B, gate = (t.double() for t in (x, lx, weight, lora_A, lora_B, gate))
        bias = None if bias is None else bias.double()
    gate = gate + (gate.clamp(0.0, 1.0) - gate).detach()  # straight-through clamp; exact for gates in [0, 1]
    h = F.linear(x, weight, bias)
    low = F.linear(F.linear(lx, lora_A), lora_B) * scaling
    return gate * h + (1 - gate) * low


# 0-dim constants: an op given a Python number wraps it in a new tensor on every call (~2 µs of host time each, as
# much as the op itself on a small layer); a 0-dim CPU tensor is taken as a scalar on any device and does not promote
# a bf16 / fp16 operand.
_ONE, _TWO = torch.tensor(1.0), torch.tensor(2.0)


def _forward(x, weight, bias, lora_A, lora_B, gate, scaling, lx):
    """y and what backward needs: t = 1 − r (the sign of t is dγ/dg: +1 where r ≤ 1, t = +0 at r = 1 included),
    a = 1 − γ = |t|, u = x_l Aᵀ (N, r), h − l (N, d_out)."""
    t = torch.rsub(torch.remainder(gate, _TWO), _ONE)  # 1 − r, r = g mod 2 in [0, 2); γ = min(r, 2 − r) = 1 − |1 − r|
    a = t.abs()  # 1 − γ, (d_out,) | (1,)
    h = F.linear(x, weight, bias)  # (..., d_out); becomes y in place
    u = F.linear(lx, lora_A)  # (..., r)
    # 2-D views (F.linear returns contiguous tensors); h − l = h − s u Bᵀ in one GEMM. h itself is what the frozen
    # layer computes, so at init (a = 0) y = h bit for bit.
    h2, u2 = h.view(-1, h.shape[-1]), u.view(-1, u.shape[-1])
    diff = torch.addmm(h2, u2, lora_B.t(), alpha=-scaling)  # (N, d_out)
    h2.addcmul_(a, diff, value=-1.0)  # y = h − (1 − γ)(h − l) = γ h + (1 − γ) l, in h's memory
    return h, t, a, u2, diff


class GatedLoraFunction(torch.autograd.Function):
    """The whole layer step as one autograd node (see the module docstring); ``gate`` is the parameter g."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, gate, scaling, lora_x, recompute):
        lx = x if lora_x is None else lora_x
        y, t, a, u, diff = _forward(x, weight, bias, lora_A, lora_B, gate, scaling, lx)
        if recompute:  # keep x (for W x) and u; h − l is formed again in backward
            ctx.save_for_backward(lx, weight, lora_A, lora_B, t, a, u, x if lora_x is not None else None, bias)
        else:
            ctx.save_for_backward(lx, weight, lora_A, lora_B, t, a, u, diff)
        ctx.scaling, ctx.recompute, ctx.separate_lora_x, ctx.x_shape = scaling, recompute, lora_x is not None, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.recompute:
            lx, weight, lora_A, lora_B, t, a, u, x, bias = ctx.saved_tensors
            x = lx if x is None else x
        else:
            lx, weight, lora_A, lora_B, t, a, u, diff = ctx.saved_tensors
        s = ctx.scaling
        dy2, lx2 = dy.reshape(-1, weight.shape[0]), lx.reshape(-1, lx.shape[-1])
        dg = None
        if ctx.needs_input_grad[5]:  # dγ = Σ_n dy ∘ (h − l); dg = dγ · dγ/dg = dγ · copysign(1, t)
            if ctx.recompute:
                x2 = lx2 if x is lx else x.reshape(-1, x.shape[-1])
                diff = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
                diff.addmm_(u, lora_B.t(), alpha=-s)
                dgamma = _sum_of_products(diff, dy2, in_place=True)
            else:
                dgamma = _sum_of_products(diff, dy2)
            if t.numel() == 1:  # a scalar gate sums over features too
                dgamma = dgamma.sum().reshape(1)
            dg = dgamma.mul_(torch.copysign(_ONE, t))
            if dg.dtype != t.dtype:
                dg = dg.to(t.dtype)
        # y = (1 − a) h + a l with l = s u Bᵀ: the low-rank branch sees s a ∘ dy (s goes into the GEMMs' alpha; with
        # beta = 0 their first argument only gives the shape), the frozen path (1 − a) ∘ dy.
        gl = dy2 * a  # (N, d_out)
        dB = torch.addmm(lora_B, gl.t(), u, beta=0, alpha=s)  # (d_out, r)
        v = gl.mm(lora_B)  # (N, r), = du / s
        dA = torch.addmm(lora_A, v.t(), lx2, beta=0, alpha=s)  # (r, d_in)
        dx = dlx = None
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(dy2, dy2, a, value=-1.0).mm(weight)  # ((1 − a) ∘ dy) W, (N, d_in)
            if not ctx.separate_lora_x:
                dx.addmm_(v, lora_A, alpha=s)
            dx = dx.view(ctx.x_shape)
        if ctx.separate_lora_x and ctx.needs_input_grad[7]:
            dlx = v.mm(lora_A).mul_(s).view(ctx.x_shape)
        return dx, None, None, dA, dB, dg, None, dlx, None


def _sum_of_products(a, b, in_place=False):
    """Σ_n a ∘ b in fp32 (fp64 for fp64) for 2-D a, b: one ``mul`` + ``sum`` while the product fits in cache (or on a GPU), else the
    blocked reduction of ``reduce.py``; ``in_place`` lets it overwrite a (a temporary of the caller)."""
    if a.dtype == torch.float64:
        return (a.mul_(b) if in_place else torch.mul(a, b)).sum(0)
    if a.device.type != "cpu" or a.numel() <= reduce._BLOCK_ELEMENTS:
        return (a.mul_(b) if in_place else torch.mul(a, b)).sum(0, dtype=torch.float32)
    return reduce.sum_of_products(a, b)


def gated_lora_torch(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x=None, recompute=False):
    """``γ ∘ (x Wᵀ + b) + (1 − γ) ∘ (s · lora_x Aᵀ Bᵀ)``, γ = ``unit_gate(gate)``; one autograd node when grad is
    on (``recompute``: keep no N × d_out tensor for backward), plain tensor ops under ``no_grad`` (inference)."""
    if torch.is_grad_enabled():
        if torch.compiler.is_compiling() or functorch_transforms_active():
            return GatedLoraFunction.apply(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x, recompute)
        # Function.apply's Python wrapper only binds default arguments (none here) and unwraps functorch wrappers
        # (none outside a transform): ~4 µs a layer step spent on nothing; the C++ apply behind it is the same.
        return _apply(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x, recompute)
    return _forward(x, weight, bias, lora_A, lora_B, gate, scaling, x if lora_x is None else lora_x)[0]


_apply = super(torch.autograd.Function, GatedLoraFunction).apply  # torch._C._FunctionBase.apply, bound
