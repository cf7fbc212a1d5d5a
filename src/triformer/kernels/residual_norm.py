"""A residual add with dropout on the branch, then LayerNorm or RMSNorm of the sum: one kernel each way.

Per row of N elements, with the dropout mask keep of dropout.py (seed, element index in the [M, N] shape), the
branch t = h, or t = h + c with the branch's bias c [N] (the bias of the linear that made h, added here instead),
in t's dtype (h's and c's promoted), d = keep · t / (1 − p̂) rounded to t's dtype, and the sum rounded to its dtype
(x's and t's promoted):

    s = x + d          y = norm(s) · w + b                          (norms.py, whole rows)
    backward, with ds the gradient reaching s from later in the residual stream and dy that of y:
    g = ds + norm'(dy)          dx = g          dt = keep · g / (1 − p̂)          dh = dt          dc = Σ_rows dt
    (norm'(dy) and g rounded to s's dtype, g to t's before dt and dt to h's for dh: where the separate ops round
    them)
    dw = Σ_rows dy ⊙ ŝ          db = Σ_rows dy

This is `x + dropout(h)` (or `x + dropout(h + c)`) followed by the next norm, as a pre-norm transformer block computes
them, in the same roundings: the sum, the mask and the gradients equal those of the separate ops (dropout.py, the
adds, norms.py); the branch's bias column sum dc comes out of the pass that writes dh, instead of one more pass. The
backward forms the residual stream's gradient g itself, so the add that would accumulate ds and the norm's input
gradient is not launched either. Rows up to MAX_WIDTH elements (held whole in registers); the forward saves s, the
rows' mean(s − s₀) (LayerNorm) and rstd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._rows import as_rows, persistent_programs, row_tiling
from ._runtime import cdiv, new_empty
from .dropout import keep_mask, philox_key, row_keep_mask, threshold_and_scale
from .norms import _affine, _affine_params, _row_pivot, _unit_stride, norm_input_gradient, whole_row_stats
from .reductions import column_sum

# Widest row the kernels take: whole rows in registers (the backward holds s, dy, ds and ŝ per element; rows of
# 8192 spill on sm_90 at 8 or 16 warps).
MAX_WIDTH = 4096
# Launch knobs (`tools/gpu_tile_sweep.py residual` times their candidates): elements of the block of rows one
# program computes at once; the warps of a program (None: row_tiling's, by elements); the backward's resident warps
# a SM (None: _rows.RESIDENT_WARPS_PER_SM).
TILE = 2048
WARPS = None
BACKWARD_RESIDENT_WARPS = None


@triton.jit
def _dropped(
    h,
    rows,
    cols,
    N,
    threshold,
    scale,
    seed,
    DROPOUT: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr,
    ROW_CALLS: tl.constexpr,
):
    """keep · h · scale (float32) for a tile h [BLOCK_M, BLOCK_N] of whole rows (cols from 0) of the [M, N] shape;
    seed an int, or (SEED_IN_MEMORY) a pointer to it. ROW_CALLS (N a multiple of 8): one Philox call for eight
    neighbours, as the dropout kernel draws them; else one for each element. Without DROPOUT (p̂ = 0: every element
    kept at scale 1) h itself, and no mask is drawn."""
    if DROPOUT:
        key = philox_key(seed, SEED_IN_MEMORY)
        if ROW_CALLS:
            keep = row_keep_mask(key, rows.to(tl.int64), N, threshold, h.shape[0], h.shape[1])
        else:
            keep = keep_mask(key, rows.to(tl.int64)[:, None] * N + cols[None, :], threshold)
        h = h * tl.where(keep, scale, 0.0)  # a dropped NaN or inf stays NaN (NaN · 0), as torch
    return h


@triton.jit
def _in_branch_dtype(v, h_ptr, T_IS_H: tl.constexpr):
    """v (float32) rounded to the branch t's dtype: h's (T_IS_H), else float32 (h's and c's differ: promoted, t is
    float32)."""
    if T_IS_H:
        v = v.to(h_ptr.dtype.element_ty).to(tl.float32)
    return v


@triton.jit(do_not_specialize=["seed", "threshold"])
def _residual_norm_forward_kernel(
    x_ptr,
    h_ptr,
    c_ptr,
    w_ptr,
    b_ptr,
    s_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    M,
    N,
    stride_xm,
    stride_hm,
    eps,
    threshold,
    scale,
    seed,
    CENTER: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_C: tl.constexpr,
    T_IS_H: tl.constexpr,
    DROPOUT: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_CALLS: tl.constexpr,
):
    """s = x + keep · t · scale with t = h (+ c when HAS_C) and y = norm(s) · w + b for BLOCK_M whole rows; stores s,
    y (contiguous), μ' (when CENTER) and rstd per row."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0)
    t = h.to(tl.float32)
    if HAS_C:
        t = _in_branch_dtype(t + tl.load(c_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :], h_ptr, T_IS_H)
    d = _dropped(t, rows, cols, N, threshold, scale, seed, DROPOUT, SEED_IN_MEMORY, ROW_CALLS)
    s = x.to(tl.float32) + _in_branch_dtype(d, h_ptr, T_IS_H)
    s = tl.where(mask, s.to(s_ptr.dtype.element_ty).to(tl.float32), 0.0)  # as stored: the backward reads it back
    out = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(s_ptr + out, s.to(s_ptr.dtype.element_ty), mask=mask)
    pivot = tl.zeros((BLOCK_M, 1), dtype=tl.float32)
    if CENTER:
        pivot = tl.sum(tl.where(cols[None, :] == 0, s, 0.0), axis=1)[:, None]  # s₀, as _row_pivot reads it
    shifted, mean, rstd = whole_row_stats(s, col_mask, pivot, N, eps, CENTER)
    w, b = _affine_params(cols, col_mask, w_ptr, b_ptr, HAS_W, HAS_B)
    y = _affine(shifted * rstd[:, None], w, b, HAS_W, HAS_B)
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
    if CENTER:
        tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _residual_norm_backward_kernel(
    dy_ptr,
    ds_ptr,
    s_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dh_ptr,
    partial_ptr,
    M,
    N,
    stride_dym,
    stride_dsm,
    rows_per_program,
    threshold,
    scale,
    seed,
    CENTER: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DY: tl.constexpr,
    HAS_DS: tl.constexpr,
    DW: tl.constexpr,
    DB: tl.constexpr,
    DC: tl.constexpr,
    T_IS_H: tl.constexpr,
    DROPOUT: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_CALLS: tl.constexpr,
):
    """g = ds + norm'(dy) (either term absent without HAS_DS, HAS_DY), dx = g and dh = dt = keep · g · scale for the
    rows [pid · rows_per_program, …), and this program's partial sums: row pid of the [programs, N] plane of dw
    (first, when DW), of db (next, when DB; both need HAS_DY) and of dc = Σ dt (last, when DC)."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dc_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        at = rows.to(tl.int64)[:, None] * N + cols[None, :]
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_DY:
            s = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
            if CENTER:
                mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            pivot = _row_pivot(s_ptr + rows.to(tl.int64)[:, None] * N, row_mask, CENTER)
            shat = tl.where(mask, (s - pivot - mean[:, None]) * rstd[:, None], 0.0)
            # the norm's input gradient in s's dtype, as the norm op returns it
            g = norm_input_gradient(shat, dy * w[None, :], rstd, N, CENTER).to(s_ptr.dtype.element_ty).to(tl.float32)
            if DW:
                dw_acc += tl.sum(dy * shat, axis=0)
            if DB:
                db_acc += tl.sum(dy, axis=0)
        if HAS_DS:
            ds = tl.load(ds_ptr + rows.to(tl.int64)[:, None] * stride_dsm + cols[None, :], mask=mask, other=0.0)
            g += ds.to(tl.float32)
        g = g.to(s_ptr.dtype.element_ty)  # the stream's gradient in s's dtype, as autograd sums it
        tl.store(dx_ptr + at, g.to(dx_ptr.dtype.element_ty), mask=mask)
        g_t = _in_branch_dtype(g.to(tl.float32), dh_ptr, T_IS_H)  # the add's gradient of the branch, in t's dtype
        dt = _in_branch_dtype(
            _dropped(g_t, rows, cols, N, threshold, scale, seed, DROPOUT, SEED_IN_MEMORY, ROW_CALLS), dh_ptr, T_IS_H
        )
        tl.store(dh_ptr + at, dt.to(dh_ptr.dtype.element_ty), mask=mask)
        if DC:
            dc_acc += tl.sum(dt, axis=0)
    partials = partial_ptr + pid.to(tl.int64) * N
    if DW:
        tl.store(partials + cols, dw_acc, mask=col_mask)
        partials += tl.num_programs(0).to(tl.int64) * N
    if DB:
        tl.store(partials + cols, db_acc, mask=col_mask)
        partials += tl.num_programs(0).to(tl.int64) * N
    if DC:
        tl.store(partials + cols, dc_acc, mask=col_mask)


def branch_dtype(h_dtype: torch.dtype, branch_bias: torch.Tensor | None) -> torch.dtype:
    """The branch t's dtype: h's, or h's and the branch bias's promoted."""
    return h_dtype if branch_bias is None else torch.promote_types(h_dtype, branch_bias.dtype)


def _tiling(m: int, n: int) -> dict:
    if n > MAX_WIDTH:
        raise ValueError(f"rows of {n} elements are wider than the fused residual norm takes ({MAX_WIDTH})")
    meta = row_tiling(m, n, max_block=MAX_WIDTH, gpu_tile=TILE)
    if not meta.pop("ONE_BLOCK"):  # e.g. _rows.row_block_cap below n: the kernels hold whole rows only
        raise ValueError(f"rows of {n} elements do not fit one register block here")
    if WARPS:
        meta["num_warps"] = WARPS
    return meta


def forward(
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
    p: float,
    seed: int | torch.Tensor,
    y_dtype: torch.dtype | None = None,
    branch_bias: torch.Tensor | None = None,
):
    """(s, y, μ' or None, rstd) for x and h [..., N] of one shape, weight, bias and branch_bias (c) [N] or None; s and
    y contiguous, shaped like x, s in the promoted dtype of x and the branch t = h (+ c), y in y_dtype (default s's:
    y is computed in float32 and rounded once to it); μ' and rstd float32 [M]."""
    n = x.shape[-1]
    x2, h2 = as_rows(x, n), as_rows(h, n)
    m = x2.shape[0]
    t_dtype = branch_dtype(h.dtype, branch_bias)
    dtype = torch.promote_types(x.dtype, t_dtype)
    s = new_empty(x.shape, like=x, dtype=dtype)
    y = new_empty(x.shape, like=x, dtype=y_dtype or dtype)
    mean = new_empty((m,), like=x, dtype=torch.float32) if center else None
    rstd = new_empty((m,), like=x, dtype=torch.float32)
    if m and n:
        threshold, scale = threshold_and_scale(p)
        weight, bias, branch_bias = _unit_stride(weight), _unit_stride(bias), _unit_stride(branch_bias)
        meta = _tiling(m, n)
        launch(
            _residual_norm_forward_kernel,
            (cdiv(m, meta["BLOCK_M"]),),
            x2,
            h2,
            x2 if branch_bias is None else branch_bias,
            x2 if weight is None else weight,
            x2 if bias is None else bias,
            s,
            y,
            rstd if mean is None else mean,
            rstd,
            m,
            n,
            x2.stride(0),
            h2.stride(0),
            eps,
            threshold,
            scale,
            seed,
            CENTER=center,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            HAS_C=branch_bias is not None,
            T_IS_H=t_dtype == h.dtype,
            DROPOUT=threshold > 0,
            SEED_IN_MEMORY=isinstance(seed, torch.Tensor),
            ROW_CALLS=n % 8 == 0,
            **meta,
        )
    return s, y, mean, rstd


def backward(
    dy: torch.Tensor | None,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    p: float,
    seed: int | torch.Tensor,
    dx_dtype: torch.dtype,
    dh_dtype: torch.dtype,
    need_dw: bool,
    need_db: bool,
    sum_dtype: torch.dtype,
    t_dtype: torch.dtype | None = None,
    need_dc: bool = False,
):
    """(dx in dx_dtype, dh in dh_dtype, both shaped like s, the wanted of dw, db and dc (the branch bias's) as the
    rows of one [k, N] tensor in sum_dtype) from dy and ds [..., N] and what forward saved; t_dtype: the branch's
    dtype (forward's branch_dtype; None: dh_dtype, no branch bias). dy None: no gradient reached y (dw and db are
    not asked for); ds None: none reached s; not both."""
    assert dy is not None or ds is not None, "a gradient of s or y"
    assert dy is not None or not (need_dw or need_db), "dw and db need dy"
    n = s.shape[-1]
    s2 = s.reshape(s.shape[:-1].numel(), n)
    m = s2.shape[0]
    dx = new_empty(s.shape, like=s, dtype=dx_dtype)
    dh = new_empty(s.shape, like=s, dtype=dh_dtype)
    k = need_dw + need_db + need_dc
    if not (m and n):
        return dx, dh, torch.zeros((k, n), device=s.device, dtype=sum_dtype)
    dy2 = None if dy is None else as_rows(dy, n)
    ds2 = None if ds is None else as_rows(ds, n)
    given = ds2 if dy2 is None else dy2  # stands in for the absent one
    threshold, scale = threshold_and_scale(p)
    weight = _unit_stride(weight)
    meta = _tiling(m, n)
    tiles = cdiv(m, meta["BLOCK_M"])
    rows_per_program = (
        cdiv(tiles, persistent_programs(s.device, tiles, meta["num_warps"], BACKWARD_RESIDENT_WARPS)) * meta["BLOCK_M"]
    )
    programs = cdiv(m, rows_per_program)
    partials = new_empty((k, programs, n), like=s, dtype=torch.float32)
    launch(
        _residual_norm_backward_kernel,
        (programs,),
        given if dy2 is None else dy2,
        given if ds2 is None else ds2,
        s2,
        s2 if weight is None else weight,
        rstd if mean is None else mean,
        rstd,
        dx,
        dh,
        partials if k else rstd,
        m,
        n,
        given.stride(0) if dy2 is None else dy2.stride(0),
        given.stride(0) if ds2 is None else ds2.stride(0),
        rows_per_program,
        threshold,
        scale,
        seed,
        CENTER=mean is not None,
        HAS_W=weight is not None,
        HAS_DY=dy2 is not None,
        HAS_DS=ds2 is not None,
        DW=need_dw,
        DB=need_db,
        DC=need_dc,
        T_IS_H=t_dtype in (None, dh_dtype),
        DROPOUT=threshold > 0,
        SEED_IN_MEMORY=isinstance(seed, torch.Tensor),
        ROW_CALLS=n % 8 == 0,
        **meta,
    )
    if not k:
        return dx, dh, new_empty((0, n), like=s, dtype=sum_dtype)
    return dx, dh, column_sum(partials, sum_dtype, rows_per_program=programs)
