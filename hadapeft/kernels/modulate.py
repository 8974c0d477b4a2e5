"""Fused Triton kernels for the modulated linear op: ``y = o[t] ∘ (W (i[t] ∘ x) + b) + β[t]`` per sample.

The op behind HadaIA3 (o or i alone), FiLM (o and β, per-sample t) and HyperMod (i and o, scale_bias=False).
Shapes: x (B, ..., d_in) flattened to (N, d_in) with L = N / B rows per sample, weight (d_out, d_in) frozen,
bias (d_out,) | None frozen, tables in_scale (T, d_in), out_scale (T, d_out), shift (T, d_out) (each optional),
index (B,) long | None (None: T == 1). Row n uses table row t = index[n // L].

The frozen GEMMs stay in cuBLAS; the kernels replace the elementwise passes around them (H100, bf16, d = 4096,
N = 8192: one GEMM ~0.37 ms, one read or write of an N × d activation ~0.022 ms):

forward   i ∘ x: one gather-scale pass (``_modulate_rows_kernel``), or, with a single table row and N > d_out, the
          scale folded into a copy of W (one d_out × d_in pass, cheaper); h = x_s Wᵀ (+ b) in cuBLAS; then one pass
          y = o[t] ∘ h (+ b) + β[t] (same kernel). h is saved only when o needs a gradient.
backward  one pass over dy (and h) gives the per-sample partial sums Σ dy ∘ h (→ do) and Σ dy (→ dβ) and writes
          dh = o[t] ∘ dy (``_modulate_bwd_kernel``; with a single table row and N > d_in, o is folded into W
          instead and dh is not written); dx_s = dh W in cuBLAS; one pass over dx_s and x gives Σ x ∘ dx_s (→ di)
          and turns dx_s into dx = i[t] ∘ dx_s in place (same kernel). Per-sample partials are summed into table
          rows by ``_table_grad_kernel``, in a fixed order: deterministic, no atomics (index_add_ on CUDA is not).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.modulate import modulated_linear_ref
from . import autotune_enabled, autotuned, call_op, new_buffer, sm_count

__all__ = ["modulated_linear_triton"]


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _modulate_rows_kernel(
    X, SCALE, BIAS, SHIFT, INDEX, Y,  # x (N, D); scale, shift (T, D); bias (D,); index (B,); y (N, D)
    N, D, L,
    stride_x, stride_y, stride_scale, stride_shift,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # y = scale[t] ∘ x + bias + shift[t], t = index[row // L]; the table rows are gathered per row (L2-resident).
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < N, rn < D
    mask = mask_m[:, None] & mask_n[None, :]
    rm64 = rm.to(tl.int64)
    if HAS_INDEX:
        t = tl.load(INDEX + rm // L, mask=mask_m, other=0)[:, None]
    else:
        t = tl.zeros((BLOCK_M, 1), dtype=tl.int64)
    y = tl.load(X + rm64[:, None] * stride_x + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(SCALE + t * stride_scale + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        y += tl.load(SHIFT + t * stride_shift + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rm64[:, None] * stride_y + rn[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _modulate_bwd_kernel(
    A, X, SCALE, INDEX, OUT,  # a (N, D) gradient; x (N, D) the other factor; scale (T, D); out (N, D)
    RED_AX, RED_A,  # (B, S, D) fp32 partials of Σ a ∘ x and Σ a over each split of each sample's rows
    D, L, rows_per_split,
    stride_a, stride_x, stride_scale, stride_out,
    REDUCE_AX: tl.constexpr, REDUCE_A: tl.constexpr, WRITE: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program = one column block × one split of one sample's rows, so every row shares the table row t and
    # the sums are per sample; out = scale[t] ∘ a (may alias a: each element is read before it is written).
    pid_n, b, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < D
    row_end = (b + 1) * L
    row_start = b * L + s * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, row_end)
    if WRITE:
        if HAS_INDEX:
            t = tl.load(INDEX + b)
        else:
            t = 0
        scale = tl.load(SCALE + t * stride_scale + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc_ax = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_start, row_stop, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)
        mask = (rm < row_stop)[:, None] & mask_n[None, :]
        a = tl.load(A + rm64[:, None] * stride_a + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        if REDUCE_AX:
            x = tl.load(X + rm64[:, None] * stride_x + rn[None, :], mask=mask, other=0.0).to(tl.float32)
            acc_ax += tl.sum(a * x, axis=0)
        if REDUCE_A:
            acc_a += tl.sum(a, axis=0)
        if WRITE:
            tl.store(OUT + rm64[:, None] * stride_out + rn[None, :], (a * scale).to(OUT.dtype.element_ty), mask=mask)
    part = (b * tl.num_programs(2) + s) * D + rn
    if REDUCE_AX:
        tl.store(RED_AX + part, acc_ax, mask=mask_n)
    if REDUCE_A:
        tl.store(RED_A + part, acc_a, mask=mask_n)


@triton.jit
def _table_grad_kernel(
    PART, INDEX, OUT,  # partials (B, S, D) fp32; index (B,); out (T, D) in the table's dtype
    B, S, D,
    HAS_INDEX: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out[t] = Σ_{b : index[b] = t} Σ_s part[b, s], summed in a fixed order (deterministic).
    t, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < D
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for b in range(0, B):
        if HAS_INDEX:
            tb = tl.load(INDEX + b)
        else:
            tb = 0
        if tb == t:
            for s in range(0, S):
                acc += tl.load(PART + (b * S + s) * D + rn, mask=mask_n, other=0.0)
    tl.store(OUT + t * D + rn, acc.to(OUT.dtype.element_ty), mask=mask_n)


@triton.jit
def _scale_weight_kernel(
    W, ROW, COL, OUT,  # W (M, K); ROW (M,) | COL (K,): row 0 of a table; OUT (M, K) = diag(ROW) W diag(COL)
    M, K, stride_w, stride_o,
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < M, rn < K
    mask = mask_m[:, None] & mask_n[None, :]
    rm64 = rm.to(tl.int64)
    w = tl.load(W + rm64[:, None] * stride_w + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ROW:
        w = w * tl.load(ROW + rm, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    if HAS_COL:
        w = w * tl.load(COL + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm64[:, None] * stride_o + rn[None, :], w.to(OUT.dtype.element_ty), mask=mask)


# Tuned on CUDA (first call per key): a streaming reduction whose speed depends on tile height and loads in flight.
# OUT may alias A (dx = i ∘ dx_s in place), so the tuner restores it between its trial runs.
_BWD_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
                for bm in (16, 32, 64) for w in (4, 8) for st in (1, 3)]
_modulate_bwd_tuned = autotuned(_modulate_bwd_kernel, _BWD_CONFIGS, restore_value=["OUT"],
                                key=["D", "REDUCE_AX", "REDUCE_A", "WRITE", "HAS_INDEX"])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _p2(n, lo=16):
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _launch_rows(x, scale=None, bias=None, shift=None, index=None, rows_per_sample=1, out=None):
    """y = scale[t] ∘ x + bias + shift[t] over (N, D) rows."""
    N, D = x.shape
    y = new_buffer(x.shape, x) if out is None else out
    if N == 0:
        return y
    BLOCK_M, BLOCK_N = (32, 256) if x.is_cuda else (min(128, _p2(N, 1)), min(256, _p2(D)))
    grid = (triton.cdiv(N, BLOCK_M), triton.cdiv(D, BLOCK_N))
    _modulate_rows_kernel[grid](
        x, scale if scale is not None else x, bias if bias is not None else x, shift if shift is not None else x,
        index if index is not None else x, y, N, D, rows_per_sample,
        x.stride(0), y.stride(0), scale.stride(0) if scale is not None else 0,
        shift.stride(0) if shift is not None else 0,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HAS_SHIFT=shift is not None,
        HAS_INDEX=index is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return y


def _launch_bwd(a, x, scale, index, num_samples, reduce_ax, reduce_a, write, out=None):
    """One pass over a (N, D) (and x): per-sample partials (B, S, D) of Σ a∘x and Σ a, and out = scale[t] ∘ a."""
    N, D = a.shape
    L = N // num_samples
    cuda = a.is_cuda
    # The interpreter runs programs one by one at a fixed cost per tl op: there, few programs with tall tiles.
    BLOCK_M, BLOCK_N = (64, 256) if cuda else (min(128, _p2(L, 1)), min(256, _p2(D)))
    n_col = triton.cdiv(D, BLOCK_N)
    target = 8 * sm_count(a.device) if cuda else 1
    splits = max(1, min(triton.cdiv(L, BLOCK_M), triton.cdiv(target, n_col * num_samples)))
    rows_per_split = triton.cdiv(triton.cdiv(L, splits), BLOCK_M) * BLOCK_M
    splits = triton.cdiv(L, rows_per_split)
    red_ax = new_buffer((num_samples, splits, D), a, torch.float32) if reduce_ax else None
    red_a = new_buffer((num_samples, splits, D), a, torch.float32) if reduce_a else None
    if write and out is None:
        out = new_buffer(a.shape, a)
    dummy = red_ax if reduce_ax else (red_a if reduce_a else a)
    args = (a, x if x is not None else a, scale if scale is not None else a, index if index is not None else a,
            out if write else a, red_ax if reduce_ax else dummy, red_a if reduce_a else dummy,
            D, L, rows_per_split,
            a.stride(0), x.stride(0) if x is not None else 0, scale.stride(0) if scale is not None else 0,
            out.stride(0) if write else 0)
    meta = dict(REDUCE_AX=reduce_ax, REDUCE_A=reduce_a, WRITE=write, HAS_INDEX=index is not None, BLOCK_N=BLOCK_N)
    grid = (n_col, num_samples, splits)
    if cuda and autotune_enabled():
        _modulate_bwd_tuned[grid](*args, **meta)
    else:
        _modulate_bwd_kernel[grid](*args, **meta, BLOCK_M=BLOCK_M, num_warps=8)
    return red_ax, red_a, out


def _launch_table_grad(part, index, table):
    """Sum per-sample partials (B, S, D) into a zero-initialised gradient of ``table`` (T, D)."""
    T, D = table.shape
    out = new_buffer((T, D), table)
    B, S, _ = part.shape
    BLOCK_N = 128 if table.is_cuda else min(1024, _p2(D))
    _table_grad_kernel[(T, triton.cdiv(D, BLOCK_N))](
        part, index if index is not None else part, out, B, S, D,
        HAS_INDEX=index is not None, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return out


def _launch_scale_weight(weight, row=None, col=None):
    """diag(row) W diag(col) for single-row tables (1, d): one pass over W instead of one over an activation."""
    M, K = weight.shape
    out = new_buffer(weight.shape, weight)
    BLOCK_M, BLOCK_N = (64, 128) if weight.is_cuda else (min(64, _p2(M)), min(128, _p2(K)))
    _scale_weight_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_N))](
        weight, row if row is not None else weight, col if col is not None else weight, out,
        M, K, weight.stride(0), out.stride(0),
        HAS_ROW=row is not None, HAS_COL=col is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return out


def _empty(ref):
    return ref.new_empty(0)


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake impls for tracing)
# ----------------------------------------------------------------------------------------------------------------


def _modulated_linear_fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_scale: Optional[torch.Tensor],
    out_scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], index: Optional[torch.Tensor],
    num_samples: int, scale_bias: bool, save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, d_in) contiguous. Returns y (N, d_out) and h = W (i∘x) (+ b if scale_bias) when save_h, else empty."""
    N, d_out = x.shape[0], weight.shape[0]
    L = N // max(num_samples, 1)
    w = weight
    if in_scale is not None:
        if index is None and N > d_out:
            w = _launch_scale_weight(weight, col=in_scale)  # one d_out × d_in pass, not an N × d_in one
        else:
            x = _launch_rows(x, scale=in_scale, index=index, rows_per_sample=L)
    bias_in_gemm = bias is not None and (scale_bias or out_scale is None)
    h = torch.addmm(bias, x, w.t()) if bias_in_gemm else x @ w.t()  # (N, d_out)
    late_bias = bias if (bias is not None and not bias_in_gemm) else None
    if out_scale is None and shift is None and late_bias is None:
        return h, _empty(h)
    y = _launch_rows(h, scale=out_scale, bias=late_bias, shift=shift, index=index, rows_per_sample=L)
    return y, (h if save_h and out_scale is not None else _empty(h))


_modulated_linear_fwd = torch.library.custom_op("hadapeft::modulated_linear_fwd", _modulated_linear_fwd_impl,
                                                 mutates_args=())


@_modulated_linear_fwd.register_fake
def _(x, weight, bias, in_scale, out_scale, shift, index, num_samples, scale_bias, save_h):
    N, d_out = x.shape[0], weight.shape[0]
    return x.new_empty(N, d_out), (x.new_empty(N, d_out) if save_h and out_scale is not None else x.new_empty(0))


def _modulated_linear_bwd_impl(
    dy: torch.Tensor, x: Optional[torch.Tensor], weight: torch.Tensor, in_scale: Optional[torch.Tensor],
    out_scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], index: Optional[torch.Tensor],
    h: torch.Tensor, num_samples: int, need_dx: bool, need_din: bool, need_dout: bool, need_dshift: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (N, d_out), x (N, d_in) | None (needed for d in_scale only). Returns dx, d in_scale, d out_scale, d shift
    (each empty when not needed)."""
    N, d_in = dy.shape[0], weight.shape[1]
    dx, d_in_t, d_out_t, d_shift_t = (_empty(dy) for _ in range(4))  # distinct: outputs may not alias
    if N == 0:  # nothing flows; table gradients are zero
        z = lambda t, need: torch.zeros_like(t) if need else _empty(dy)  # noqa: E731
        dx = dy.new_empty(0, d_in) if need_dx else dx
        return dx, z(in_scale, need_din), z(out_scale, need_dout), z(shift, need_dshift)
    need_dxs = need_dx or need_din  # the GEMM dh W is needed for either
    w = weight
    dh = dy
    reduce_o, reduce_b = need_dout and out_scale is not None, need_dshift and shift is not None
    fold_o = out_scale is not None and index is None and N > d_in  # scale W's rows once instead of writing dh
    write_dh = out_scale is not None and need_dxs and not fold_o
    if reduce_o or reduce_b or write_dh:
        red_o, red_b, out = _launch_bwd(dy, h if reduce_o else None, out_scale, index, num_samples,
                                        reduce_ax=reduce_o, reduce_a=reduce_b, write=write_dh)
        if write_dh:
            dh = out
        if reduce_o:
            d_out_t = _launch_table_grad(red_o, index, out_scale)
        if reduce_b:
            d_shift_t = _launch_table_grad(red_b, index, shift)
    if need_dxs:
        if fold_o:
            w = _launch_scale_weight(weight, row=out_scale)
        dxs = dh @ w  # (N, d_in): gradient w.r.t. the scaled input i ∘ x
        if in_scale is None:
            dx = dxs
        else:
            reduce_i = need_din
            red_i, _, dxs = _launch_bwd(dxs, x if reduce_i else None, in_scale, index, num_samples,
                                        reduce_ax=reduce_i, reduce_a=False, write=need_dx, out=dxs)
            if reduce_i:
                d_in_t = _launch_table_grad(red_i, index, in_scale)
            if need_dx:
                dx = dxs  # scaled in place: dx = i[t] ∘ dx_s
    return dx, d_in_t, d_out_t, d_shift_t


_modulated_linear_bwd = torch.library.custom_op("hadapeft::modulated_linear_bwd", _modulated_linear_bwd_impl,
                                                 mutates_args=())


@_modulated_linear_bwd.register_fake
def _(dy, x, weight, in_scale, out_scale, shift, index, h, num_samples, need_dx, need_din, need_dout, need_dshift):
    like = lambda t, need: torch.empty_like(t) if (need and t is not None) else dy.new_empty(0)  # noqa: E731
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if need_dx else dy.new_empty(0)
    return dx, like(in_scale, need_din), like(out_scale, need_dout), like(shift, need_dshift)


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


class ModulatedLinearTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, in_scale, out_scale, shift, index, scale_bias):
        B, d_in = x.shape[0], x.shape[-1]
        x2 = x.reshape(-1, d_in).contiguous()  # (N, d_in), N = B·L
        save_h = out_scale is not None and ctx.needs_input_grad[4]
        y, h = call_op(_modulated_linear_fwd, _modulated_linear_fwd_impl,
                       x2, weight, bias, in_scale, out_scale, shift, index, B, scale_bias, save_h)
        # x is needed only for the in-scale gradient.
        ctx.save_for_backward(x2 if in_scale is not None and ctx.needs_input_grad[3] else None,
                              weight, in_scale, out_scale, shift, index, h)
        ctx.x_shape, ctx.num_samples = x.shape, B
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, in_scale, out_scale, shift, index, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, weight.shape[0]).contiguous()
        dx, d_in_t, d_out_t, d_shift_t = call_op(
            _modulated_linear_bwd, _modulated_linear_bwd_impl,
            dy2, x2, weight, in_scale, out_scale, shift, index, h, ctx.num_samples, need[0], need[3], need[4], need[5])
        return (dx.view(ctx.x_shape) if need[0] else None, None, None,
                d_in_t if need[3] else None, d_out_t if need[4] else None, d_shift_t if need[5] else None,
                None, None)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def modulated_linear_triton(x, weight, bias, in_scale=None, out_scale=None, shift=None, index=None,
                            scale_bias=True):
    """Fused modulated linear: ``y = o[t] ∘ (W (i[t] ∘ x) + b) + β[t]``, t = ``index[sample]``.

    Args:
        x: (B, ..., d_in); every row of sample b uses table row ``index[b]``.
        weight: (d_out, d_in) frozen; bias: (d_out,) or None, frozen (trainable ones fall back to the eager path).
        in_scale: (T, d_in) or None; out_scale: (T, d_out) or None; shift: (T, d_out) or None.
        index: (B,) long, or None when the tables have a single row (T == 1).
        scale_bias: True → ``o ∘ (W(i∘x) + b) + β`` (IA³, FiLM); False → ``o ∘ W(i∘x) + b + β`` (HyperMod).

    Returns:
        (B, ..., d_out), differentiable w.r.t. x and the three tables (gradients summed per table row).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return modulated_linear_ref(x, weight, bias, in_scale, out_scale, shift, index, scale_bias)
    if index is None:
        for name, t in (("in_scale", in_scale), ("out_scale", out_scale), ("shift", shift)):
            if t is not None and t.shape[0] != 1:
                raise ValueError(f"index=None needs single-row tables, but {name} has {t.shape[0]} rows")
    tensors = [t for t in (x, in_scale, out_scale, shift) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return ModulatedLinearTritonFunction.apply(x, weight, bias, in_scale, out_scale, shift, index, scale_bias)
    y, _ = call_op(_modulated_linear_fwd, _modulated_linear_fwd_impl,
                   x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, in_scale, out_scale, shift, index,
                   x.shape[0], scale_bias, False)
    return y.view(*x.shape[:-1], weight.shape[0])
