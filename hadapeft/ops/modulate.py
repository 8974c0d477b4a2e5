"""Modulated linear op: ``y = o[t] ∘ (W (i[t] ∘ x) + b) + β[t]`` with per-sample table rows t.

The Hadamard pattern shared by HadaIA3, FiLM and HyperMod (a frozen linear map with element-wise scales on its input
and/or output and an optional shift). This file is the PyTorch reference path and the shape contract of the Triton
kernel in ``hadapeft/kernels/modulate.py``.

    x         (B, ..., d_in)    B samples; every row of sample b uses table row index[b]
    weight    (d_out, d_in)     frozen, no grad
    bias      (d_out,) | None   frozen, no grad
    in_scale  (T, d_in)  | None
    out_scale (T, d_out) | None
    shift     (T, d_out) | None
    index     (B,) long | None  None: the tables have a single row (T == 1) used for every sample
    scale_bias: True  -> y = o ∘ (W(i∘x) + b) + β      (IA³, FiLM: the module's output is scaled)
                False -> y = o ∘ (W(i∘x)) + b + β      (HyperMod: W' = W ∘ (o iᵀ), the bias is not modulated)

Gradients of the tables are summed per row of the table (deterministically, with index_add on per-sample sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reduce import per_sample_sum_of_products, sum_of_products


def _rows(table, index, batch):
    """Per-sample rows of a table: (B, 1, d) to broadcast over (B, L, d), or the single row (1, d) when index is
    None (then x keeps its own shape: reshaping a strided input would copy it and change the GEMM's rounding)."""
    if table is None:
        return None
    if index is None:
        return table
    return table.index_select(0, index).unsqueeze(1)


def _view(x, index):
    return x if index is None else x.reshape(x.shape[0], -1, x.shape[-1])


def modulated_linear_ref(x, weight, bias, in_scale=None, out_scale=None, shift=None, index=None,
                         scale_bias=True, upcast=False):
    """Eager formula with autograd through plain ops; ``upcast=True`` computes in fp64 (test reference)."""
    if upcast:
        cast = lambda t: None if t is None else t.double()  # noqa: E731
        x, weight, bias, in_scale, out_scale, shift = map(cast, (x, weight, bias, in_scale, out_scale, shift))
    B = x.shape[0]
    x3 = _view(x, index)
    i, o, s = (_rows(t, index, B) for t in (in_scale, out_scale, shift))
    h = F.linear(x3 if i is None else x3 * i, weight, bias if scale_bias else None)
    if o is not None:
        h = h * o
    if not scale_bias and bias is not None:
        h = h + bias
    if s is not None:
        h = h + s
    return h.reshape(*x.shape[:-1], weight.shape[0])


def _rows_count(t):
    return t.numel() // max(t.shape[-1], 1)


def _table_grad(a, b, index, table):
    """Σ a ∘ b (or Σ a when b is None) into the table's rows (T, d): a, b are (B, L, d) with an index (one table row
    per sample), else (..., d) summed over everything but the last dim."""
    if index is None:
        g = a.reshape(-1, a.shape[-1]).sum(0, dtype=torch.float32) if b is None else sum_of_products(a, b)
        return g.to(table.dtype).unsqueeze(0)
    g = a.sum(1, dtype=torch.float32) if b is None else per_sample_sum_of_products(a, b)
    return torch.zeros_like(table).index_add_(0, index, g.to(table.dtype))


class ModulatedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, in_scale, out_scale, shift, index, scale_bias):
        B, d_out = x.shape[0], weight.shape[0]
        x3 = _view(x, index)  # (B, L, d_in), or x as given when every sample uses the same row
        i, o, s = (_rows(t, index, B) for t in (in_scale, out_scale, shift))
        inner_bias = bias if scale_bias or o is None else None  # without an output scale the bias goes in as is
        if i is not None and index is None and _rows_count(x) >= d_out:
            # One input scale for every row: scale W's columns (d_out × d_in) rather than x (rows × d_in).
            h = F.linear(x3, weight * in_scale, inner_bias)
        else:
            h = F.linear(x3 if i is None else x3 * i, weight, inner_bias)  # (B, L, d_out)
        if o is None:
            y = h
        else:
            y = h * o
            if not scale_bias and bias is not None:
                y.add_(bias)
        if s is not None:
            y = y.add_(s) if y is not h else h + s
        # h is needed only for the out-scale gradient.
        ctx.save_for_backward(x3, weight, in_scale, out_scale, shift, index, h if o is not None else None)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, dy):
        x3, weight, in_scale, out_scale, shift, index, h = ctx.saved_tensors
        B = x3.shape[0]
        dy3 = _view(dy, index)  # (B, L, d_out), or dy as given
        i, o = _rows(in_scale, index, B), _rows(out_scale, index, B)
        d_in_t = d_out_t = d_shift_t = None
        if out_scale is not None and ctx.needs_input_grad[4]:
            d_out_t = _table_grad(dy3, h, index, out_scale)
        if shift is not None and ctx.needs_input_grad[5]:
            d_shift_t = _table_grad(dy3, None, index, shift)
        # Gradient w.r.t. the scaled input (B, L, d_in); a single output scale goes onto W's rows when that is the
        # smaller temporary.
        if o is None:
            dxs = dy3 @ weight
        elif index is None and _rows_count(dy3) >= weight.shape[1]:
            dxs = dy3 @ (weight * out_scale.reshape(-1, 1))
        else:
            dxs = (dy3 * o) @ weight
        if in_scale is not None:
            if ctx.needs_input_grad[3]:
                d_in_t = _table_grad(dxs, x3, index, in_scale)
            dxs.mul_(i)
        dx = dxs.reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, None, None, d_in_t, d_out_t, d_shift_t, None, None


def modulated_linear_torch(x, weight, bias, in_scale=None, out_scale=None, shift=None, index=None,
                           scale_bias=True):
    return ModulatedLinearFunction.apply(x, weight, bias, in_scale, out_scale, shift, index, scale_bias)
