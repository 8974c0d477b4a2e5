"""Fused Triton kernels for Gated LoRA: ``y = γ ∘ (x Wᵀ + b) + (1 − γ) ∘ (s · (x_l Aᵀ) Bᵀ)``.

Shapes (N = rows after flattening leading dims; r ≤ 64 is padded to BLOCK_R ≥ 16 for ``tl.dot``, masked):

    x (N, d_in)   weight (d_out, d_in) frozen   bias (d_out,) | None frozen
    lora_A (r, d_in)   lora_B (d_out, r)   gate (d_out,) | (1,), clamped to [0, 1] on load   lora_x (N, d_in) | None

Where the time goes (H100, bf16, d = 4096, N = 8192): each GEMM of the frozen layer is ~0.37 ms, one elementwise
pass over an N × d bf16 activation (read or write) ~0.022 ms. So the design keeps both big GEMMs in cuBLAS and
removes passes around them:

forward   u = x_l Aᵀ (cuBLAS, N × r), h = x Wᵀ + b (cuBLAS); one kernel reads h and u, forms the rank-r product
          l = s · u Bᵀ in registers (``tl.dot``), writes y = l + γ (h − l). We save h, not h − l: it is already
          in memory, so the forward writes nothing extra (the eager path writes h − l: one more pass).
backward  one cuBLAS GEMM dx = dy W_m on the merged weight W_m = diag(γ) W + diag((1−γ) s) B A (formed by a kernel
          in one d_out × d_in pass: cheaper than any N × d pass once N > d_in / 2);
          one kernel reads dy and h once and produces P = dyᵀ u (→ dB = (1−γ) s ∘ P), v = ((1−γ) s ∘ dy) B and
          dγ = Σ_n dy ∘ (h − l) = Σ_n dy ∘ h − s Σ_k B_jk P_jk (the low-rank part from P, so no l is formed),
          all as per-block fp32 partials summed afterwards (deterministic, no atomics); dA = vᵀ x_l (cuBLAS).
With a separate ``lora_x`` (dropout) the merge is impossible: dx = dy (diag(γ) W), dx_l = v A.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.gated_lora import gated_lora_ref
from . import autotune_enabled, autotuned, call_op, new_buffer, sm_count

__all__ = ["gated_lora_triton"]

MAX_RANK = 64


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _clamp01(g):
    """γ = clamp(gate, 0, 1), applied wherever a kernel reads the gate (the op's gradient is straight-through)."""
    return tl.minimum(tl.maximum(g, 0.0), 1.0)


@triton.jit
def _gated_lora_fwd_kernel(
    H, U, LB, GATE, Y,  # h (N, D), u (N, R), lora_B (D, R), γ (D,) | (1,), y (N, D)
    N, D, R, scaling,
    stride_h, stride_u, stride_b, stride_y,
    GATE_VEC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    mask_m, mask_n, mask_r = rm < N, rn < D, rr < R
    rm64 = rm.to(tl.int64)  # N × D can pass 2**31

    u = tl.load(U + rm64[:, None] * stride_u + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    bt = tl.load(LB + rn[None, :] * stride_b + rr[:, None], mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    low = tl.dot(u, bt, input_precision=DOT_PRECISION) * scaling  # (BLOCK_M, BLOCK_N) fp32

    mask = mask_m[:, None] & mask_n[None, :]
    h = tl.load(H + rm64[:, None] * stride_h + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if GATE_VEC:
        g = _clamp01(tl.load(GATE + rn, mask=mask_n, other=0.0).to(tl.float32))[None, :]
    else:
        g = _clamp01(tl.load(GATE).to(tl.float32))
    y = low + g * (h - low)
    tl.store(Y + rm64[:, None] * stride_y + rn[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_lora_bwd_kernel(
    DY, H, U, LB, GATE,  # dy (N, D), h (N, D), u (N, R), lora_B (D, R), γ
    DG_PART,  # (G, D) fp32: per row group, Σ_n dy ∘ (h − l)
    DB_PART,  # (G, D, R) fp32: per row group, (1−γ) s ∘ (dyᵀ u)
    V_PART,  # (cdiv(D, BLOCK_N), N, R) fp32: per column block, dy[:, block] ((1−γ) s ∘ B)[block]
    N, D, R, scaling, rows_per_group,
    stride_dy, stride_h, stride_u, stride_b,
    GATE_VEC: tl.constexpr, HAS_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program = one column block × one group of rows; dy and h are read exactly once overall.
    pid_n, pid_g = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    mask_n, mask_r = rn < D, rr < R

    bt = tl.load(LB + rn[None, :] * stride_b + rr[:, None], mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    if GATE_VEC:
        g = _clamp01(tl.load(GATE + rn, mask=mask_n, other=0.0).to(tl.float32))
        mix = ((1.0 - g) * scaling)[None, :]  # (1, BLOCK_N)
    else:
        mix = (1.0 - _clamp01(tl.load(GATE).to(tl.float32))) * scaling
    bt_mix = (bt.to(tl.float32) * mix).to(bt.dtype)  # ((1−γ) s ∘ B)ᵀ, (BLOCK_R, BLOCK_N)

    acc_dh = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    row_start = pid_g * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, N)
    for m0 in range(row_start, row_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask_m = rm < row_end
        rm64 = rm.to(tl.int64)
        mask = mask_m[:, None] & mask_n[None, :]
        dy = tl.load(DY + rm64[:, None] * stride_dy + rn[None, :], mask=mask, other=0.0)
        u = tl.load(U + rm64[:, None] * stride_u + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if HAS_H:
            h = tl.load(H + rm64[:, None] * stride_h + rn[None, :], mask=mask, other=0.0).to(tl.float32)
            acc_dh += tl.sum(dy.to(tl.float32) * h, axis=0)
        acc_p += tl.dot(tl.trans(dy), u, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_R)
        v = tl.dot(dy, tl.trans(bt_mix), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_R)
        v_ptr = V_PART + (pid_n * N + rm64)[:, None] * R + rr[None, :]
        tl.store(v_ptr, v, mask=mask_m[:, None] & mask_r[None, :])

    p_mask = mask_n[:, None] & mask_r[None, :]
    if HAS_H:
        # Σ_n dy ∘ l = s Σ_k B_jk (dyᵀ u)_jk: the low-rank part of dγ from P, so the loop needs no third dot.
        corr = tl.sum(tl.trans(bt).to(tl.float32) * acc_p, axis=1) * scaling
        tl.store(DG_PART + pid_g * D + rn, acc_dh - corr, mask=mask_n)
    if GATE_VEC:
        acc_p = acc_p * tl.trans(mix)
    else:
        acc_p = acc_p * mix
    tl.store(DB_PART + (pid_g * D + rn)[:, None] * R + rr[None, :], acc_p, mask=p_mask)


# Tuned on CUDA (first call per (D, R)): the loop is memory-bound with three small dots per tile, and the best tile
# height / pipelining depth depends on the GPU. BLOCK_N stays fixed so that the partial buffers do not depend on it.
_BWD_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
                for bm in (32, 64) for w in (4, 8) for st in (2, 3, 4)]
_gated_lora_bwd_tuned = autotuned(_gated_lora_bwd_kernel, _BWD_CONFIGS, key=["D", "R", "HAS_H", "GATE_VEC"])


@triton.jit
def _merge_weight_kernel(
    W, LB, LA, GATE, OUT,  # W (D_out, D_in), lora_B (D_out, R), lora_A (R, D_in), γ; OUT (D_out, D_in)
    D_OUT, D_IN, R, scaling,
    stride_w, stride_b, stride_a, stride_o,
    GATE_VEC: tl.constexpr, HAS_LOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # OUT = diag(γ) W + diag((1 − γ) s) B A  (HAS_LOW=False: diag(γ) W only)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < D_OUT, rn < D_IN
    rm64 = rm.to(tl.int64)
    mask = mask_m[:, None] & mask_n[None, :]
    if GATE_VEC:
        g = _clamp01(tl.load(GATE + rm, mask=mask_m, other=0.0).to(tl.float32))[:, None]
    else:
        g = _clamp01(tl.load(GATE).to(tl.float32))
    w = tl.load(W + rm64[:, None] * stride_w + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    out = g * w
    if HAS_LOW:
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        b = tl.load(LB + rm64[:, None] * stride_b + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        a = tl.load(LA + rr[:, None] * stride_a + rn[None, :], mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        out += (1.0 - g) * scaling * tl.dot(b, a, input_precision=DOT_PRECISION)
    tl.store(OUT + rm64[:, None] * stride_o + rn[None, :], out.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _dot_precision(dtype):
    # fp32 inputs must not silently drop to tf32: the fp32 eager path uses full-precision cuBLAS.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_r(r):
    if r > MAX_RANK:
        raise ValueError(f"the Triton gated-LoRA kernels support rank r <= {MAX_RANK}, got r={r}; "
                         "use backend='torch' for larger ranks")
    return max(16, triton.next_power_of_2(r))


def _blocks(n, d, block_m, block_n, device):
    """Tile sizes; in the interpreter clamped to the problem (keeping tl.dot's minimum of 16), since every masked-off
    element costs time there. On GPU fixed, so one compiled variant serves every shape."""
    if device.type == "cuda":
        return block_m, block_n
    return (min(block_m, max(16, triton.next_power_of_2(n))), min(block_n, max(16, triton.next_power_of_2(d))))


def _num_programs_target(device):
    if device.type == "cuda":
        return 4 * sm_count(device)
    return 1  # the interpreter runs programs one after another at a fixed cost per tl op: few, large programs


def _launch_fwd(h, u, lora_B, gate, scaling):
    N, D = h.shape
    R = lora_B.shape[1]
    y = new_buffer(h.shape, h)
    if N == 0:
        return y
    BLOCK_M, BLOCK_N = _blocks(N, D, 64 if h.is_cuda else 128, 128, h.device)
    grid = (triton.cdiv(N, BLOCK_M), triton.cdiv(D, BLOCK_N))
    _gated_lora_fwd_kernel[grid](
        h, u, lora_B, gate, y, N, D, R, scaling,
        h.stride(0), u.stride(0), lora_B.stride(0), y.stride(0),
        GATE_VEC=gate.numel() > 1, DOT_PRECISION=_dot_precision(h.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(R), num_warps=4,
    )
    return y


def _launch_bwd(dy, h, u, lora_B, gate, scaling):
    """Returns dγ (D,) fp32 | None, dB (D, R) fp32, v (N, R) fp32."""
    N, D = dy.shape
    R = lora_B.shape[1]
    if N == 0:
        f32 = dict(device=dy.device, dtype=torch.float32)
        return torch.zeros(D, **f32), torch.zeros(D, R, **f32), torch.zeros(0, R, **f32)
    BLOCK_R = _block_r(R)
    cuda = dy.is_cuda
    BLOCK_M, BLOCK_N = _blocks(N, D, 64 if cuda else 128, 128, dy.device)  # BLOCK_M: the tuner's largest on CUDA
    n_col = triton.cdiv(D, BLOCK_N)
    # Enough row groups to fill the GPU; each group's partials are D × (R + 1) fp32, so not more than that.
    groups = max(1, min(triton.cdiv(N, BLOCK_M), triton.cdiv(_num_programs_target(dy.device), n_col)))
    rows_per_group = triton.cdiv(triton.cdiv(N, groups), BLOCK_M) * BLOCK_M
    groups = triton.cdiv(N, rows_per_group)
    has_h = h is not None
    dg_part = new_buffer((groups, D), dy, torch.float32) if has_h else None
    db_part = new_buffer((groups, D, R), dy, torch.float32)
    v_part = new_buffer((n_col, N, R), dy, torch.float32)
    args = (dy, h if has_h else dy, u, lora_B, gate, dg_part if has_h else db_part, db_part, v_part,
            N, D, R, scaling, rows_per_group,
            dy.stride(0), (h if has_h else dy).stride(0), u.stride(0), lora_B.stride(0))
    meta = dict(GATE_VEC=gate.numel() > 1, HAS_H=has_h, DOT_PRECISION=_dot_precision(dy.dtype),
                BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)
    if cuda and autotune_enabled():
        _gated_lora_bwd_tuned[(n_col, groups)](*args, **meta)
    else:
        _gated_lora_bwd_kernel[(n_col, groups)](*args, **meta, BLOCK_M=BLOCK_M, num_warps=8)
    dg = None if not has_h else (dg_part[0] if groups == 1 else dg_part.sum(0))
    dB = db_part[0] if groups == 1 else db_part.sum(0)
    v = v_part[0] if n_col == 1 else v_part.sum(0)
    return dg, dB, v


def _launch_merge(weight, lora_B, lora_A, gate, scaling, with_low=True):
    D_OUT, D_IN = weight.shape
    R = lora_A.shape[0]
    out = new_buffer(weight.shape, weight)
    BLOCK_M, BLOCK_N = _blocks(D_OUT, D_IN, 64, 128, weight.device)
    grid = (triton.cdiv(D_OUT, BLOCK_M), triton.cdiv(D_IN, BLOCK_N))
    _merge_weight_kernel[grid](
        weight, lora_B, lora_A, gate, out, D_OUT, D_IN, R, scaling,
        weight.stride(0), lora_B.stride(0), lora_A.stride(0), out.stride(0),
        GATE_VEC=gate.numel() > 1, HAS_LOW=with_low, DOT_PRECISION=_dot_precision(weight.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(R), num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake impls for tracing)
# ----------------------------------------------------------------------------------------------------------------


def _gated_lora_fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
    lora_B: torch.Tensor, gate: torch.Tensor, scaling: float, lora_x: Optional[torch.Tensor], save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, lora_x: (N, d_in) contiguous. Returns y (N, d_out), h (N, d_out) or empty, u (N, r)."""
    u = (x if lora_x is None else lora_x) @ lora_A.t()  # (N, r)
    h = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()  # (N, d_out)
    y = _launch_fwd(h, u, lora_B, gate, scaling)
    return y, (h if save_h else h.new_empty(0)), u


def _gated_lora_bwd_impl(
    dy: torch.Tensor, x_l: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    gate: torch.Tensor, h: torch.Tensor, u: torch.Tensor, scaling: float, separate_lora_x: bool, need_dx: bool,
    need_dlx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx, dA, dB, dγ, dx_l; dx / dx_l / dγ are empty when not needed (dγ needs h)."""
    has_h = h.numel() > 0 or dy.shape[0] == 0
    dg, dB, v = _launch_bwd(dy, h if h.numel() > 0 else None, u, lora_B, gate, scaling)
    v = v.to(dy.dtype)
    dA = (v.t() @ x_l).to(lora_A.dtype)  # (r, d_in)
    dB = dB.to(lora_B.dtype)
    dgate = dy.new_empty(0, dtype=gate.dtype)
    if has_h:
        dgate = (dg if gate.numel() > 1 else dg.sum().reshape(1)).to(gate.dtype)
    dx, dlx = dy.new_empty(0), dy.new_empty(0)  # distinct: custom-op outputs may not alias
    if separate_lora_x:
        if need_dx:
            dx = dy @ _launch_merge(weight, lora_B, lora_A, gate, scaling, with_low=False)
        if need_dlx:
            dlx = v @ lora_A
    elif need_dx:
        dx = dy @ _launch_merge(weight, lora_B, lora_A, gate, scaling)
    return dx, dA, dB, dgate, dlx


_gated_lora_fwd = torch.library.custom_op("hadapeft::gated_lora_fwd", _gated_lora_fwd_impl, mutates_args=())
_gated_lora_bwd = torch.library.custom_op("hadapeft::gated_lora_bwd", _gated_lora_bwd_impl, mutates_args=())


@_gated_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x, save_h):
    N, D = x.shape[0], weight.shape[0]
    return x.new_empty(N, D), (x.new_empty(N, D) if save_h else x.new_empty(0)), x.new_empty(N, lora_A.shape[0])


@_gated_lora_bwd.register_fake
def _(dy, x_l, weight, lora_A, lora_B, gate, h, u, scaling, separate_lora_x, need_dx, need_dlx):
    N, D_in = x_l.shape
    has_h = h.numel() > 0 or N == 0
    dx = dy.new_empty(N, D_in) if need_dx else dy.new_empty(0)
    dlx = dy.new_empty(N, D_in) if (separate_lora_x and need_dlx) else dy.new_empty(0)
    dgate = gate.new_empty(gate.shape) if has_h else dy.new_empty(0, dtype=gate.dtype)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), dgate, dlx


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


class GatedLoraTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, gate, scaling, lora_x):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in).contiguous()
        lx2 = None if lora_x is None else lora_x.reshape(-1, d_in).contiguous()
        save_h = ctx.needs_input_grad[5]
        y, h, u = call_op(_gated_lora_fwd, _gated_lora_fwd_impl,
                          x2, weight, bias, lora_A, lora_B, gate, scaling, lx2, save_h)
        ctx.save_for_backward(x2 if lx2 is None else lx2, weight, lora_A, lora_B, gate, h, u)
        ctx.scaling = scaling
        ctx.separate_lora_x = lx2 is not None
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_l, weight, lora_A, lora_B, gate, h, u = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.shape[0]).contiguous()
        need_dx, need_dlx = ctx.needs_input_grad[0], ctx.needs_input_grad[7]
        dx, dA, dB, dgate, dlx = call_op(
            _gated_lora_bwd, _gated_lora_bwd_impl,
            dy2, x_l, weight, lora_A, lora_B, gate, h, u, ctx.scaling, ctx.separate_lora_x, need_dx, need_dlx)
        dx = dx.view(ctx.x_shape) if need_dx else None
        dlx = dlx.view(ctx.x_shape) if (ctx.separate_lora_x and need_dlx) else None
        dgate = dgate if ctx.needs_input_grad[5] else None
        return dx, None, None, dA, dB, dgate, None, dlx


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def gated_lora_triton(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x=None):
    """Fused Gated LoRA: ``y = γ ∘ (x Wᵀ + b) + (1 − γ) ∘ (s · (x_l Aᵀ) Bᵀ)``, x_l = ``lora_x`` or x.

    Args:
        x: (..., d_in) input of the frozen layer.
        weight: (d_out, d_in) frozen; bias: (d_out,) or None, frozen. Trainable base weights fall back to
            the eager formula (autograd produces their gradients).
        lora_A: (r, d_in), lora_B: (d_out, r), r ≤ 64; same dtype as x.
        gate: (d_out,) or (1,); γ = clamp(gate, 0, 1) in the forward, the gradient w.r.t. gate is straight-through
            (any float dtype; gradient returned in that dtype).
        scaling: s = lora_alpha / r.
        lora_x: (..., d_in) or None; dropout(x) for the low-rank branch.

    Returns:
        (..., d_out), differentiable w.r.t. x, lora_A, lora_B, gate and lora_x.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return gated_lora_ref(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x)
    scaling = float(scaling)
    tensors = (x, lora_A, lora_B, gate) + (() if lora_x is None else (lora_x,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return GatedLoraTritonFunction.apply(x, weight, bias, lora_A, lora_B, gate, scaling, lora_x)
    # Inference: skip autograd and do not keep h alive.
    d_in = x.shape[-1]
    lx2 = None if lora_x is None else lora_x.reshape(-1, d_in).contiguous()
    y, _, _ = call_op(_gated_lora_fwd, _gated_lora_fwd_impl,
                      x.reshape(-1, d_in).contiguous(), weight, bias, lora_A, lora_B, gate, scaling, lx2, False)
    return y.view(*x.shape[:-1], weight.shape[0])
