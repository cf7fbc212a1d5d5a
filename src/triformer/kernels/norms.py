"""LayerNorm and RMSNorm over the last dimension, forward and backward; one pair of kernels serves both.

Per row x of N elements (float32 math), with μ = 0 for RMSNorm (CENTER = False):

    μ = Σx / N      rstd = 1 / √(Σ(x − μ)² / N + eps)      x̂ = (x − μ) · rstd      y = x̂ · w + b
    backward, with g = w ⊙ dy:
    dx = (g − x̂ · mean(x̂ ⊙ g) − mean(g)) · rstd        (RMSNorm: no mean(g) term)
    dw = Σ_rows dy ⊙ x̂      db = Σ_rows dy

Each row is first shifted by its first element x₀ (μ is computed as x₀ + mean(x − x₀)), so a large common
offset costs no precision in float32; the forward saves mean(x − x₀) (not μ) and rstd, float32, one per row.
The backward runs a fixed number of programs (as many as stay resident), each over a contiguous group of rows:
dx row by row (the loads of the next rows in flight while a row is computed: a software-pipelined loop), dw and
db accumulated in float32 registers and written once per program as a [programs, N] partial sum, then both
summed over programs by one more kernel, in the parameters' dtype (no atomics: the result is deterministic).
Rows wider than one register block loop over column blocks (mean and variance by Chan's pairwise combination);
there the per-program partials accumulate in global memory that the program owns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._rows import WIDE_ROW, as_rows, launch_rows, persistent_programs, row_tiling
from ._runtime import cdiv, new_empty
from .reductions import column_sum

# The backward holds x̂, w ⊙ dy, dy and the dw, db accumulators per element: rows wider than this spill registers
# (16 warps, sm_90), so they take the looping path instead.
_BACKWARD_MAX_BLOCK = 8192
# The backward's loop over blocks of whole rows: Triton's software-pipelining depth (1: none) and whether the
# next block's loads are issued before the current block is computed (with a 2048-element block this keeps narrow
# rows' loads in flight); the 3 stages serve the widest whole rows (8192), where the prefetch is off.
BACKWARD_STAGES = 3
BACKWARD_PREFETCH = True
# Elements of the block of rows the backward computes at once (rows narrower than this share a block).
BACKWARD_TILE = 2048
# Prefetching doubles the registers that hold x and dy: wider tiles than this would spill.
_PREFETCH_MAX_TILE = 4096


def backward_prefetch(meta: dict) -> bool:
    """Whether the backward prefetches the next rows at this tiling (see BACKWARD_PREFETCH)."""
    return BACKWARD_PREFETCH and meta["BLOCK_M"] * meta["BLOCK_N"] <= _PREFETCH_MAX_TILE


@triton.jit
def _affine_params(cols, col_mask, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(w, b) at columns cols as float32 [1, BLOCK_N] rows (unused placeholders where the norm has none)."""
    w = tl.full((1, cols.shape[0]), 1.0, dtype=tl.float32)
    b = tl.zeros((1, cols.shape[0]), dtype=tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return w, b


@triton.jit
def _affine(xhat, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """x̂ · w + b, leaving out what the norm does not have."""
    y = xhat
    if HAS_W:
        y = y * w
    if HAS_B:
        y = y + b
    return y


@triton.jit
def whole_row_stats(x, col_mask, pivot, N, eps, CENTER: tl.constexpr):
    """For whole rows x [BLOCK_M, BLOCK_N] (float32, 0 in masked columns) and their pivots x₀ [BLOCK_M, 1]:
    (x − x₀ − μ' with masked columns 0 (x itself for RMSNorm), μ' = mean(x − x₀) [BLOCK_M] (0 for RMSNorm), rstd)."""
    mean = tl.zeros((x.shape[0],), dtype=tl.float32)
    if CENTER:  # masked rows hold x = x₀ = μ = 0: only masked columns need zeroing
        x = tl.where(col_mask[None, :], x - pivot, 0.0)
        mean = tl.sum(x, axis=1) / N
        x = tl.where(col_mask[None, :], x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    return x, mean, rstd


@triton.jit
def norm_input_gradient(xhat, g, rstd, N, CENTER: tl.constexpr):
    """dx = (g − x̂ · mean(x̂ ⊙ g) − mean(g)) · rstd for whole rows (no mean(g) term for RMSNorm); g = w ⊙ dy."""
    c1 = tl.sum(xhat * g, axis=1) / N
    c2 = tl.zeros((xhat.shape[0],), dtype=tl.float32)
    if CENTER:
        c2 = tl.sum(g, axis=1) / N
    return (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]


@triton.jit
def _norm_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    M,
    N,
    stride_xm,
    stride_ym,
    eps,
    CENTER: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    PARAMS_FIRST: tl.constexpr = True,
):
    """y = x̂ · w + b per row; stores μ (when CENTER) and rstd per row. Whole rows (ONE_BLOCK) load w and b
    before the row's reductions when PARAMS_FIRST, else after them."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
    cols = tl.arange(0, BLOCK_N)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)  # of x − x₀
    pivot = _row_pivot(x_rows, row_mask, CENTER)
    if ONE_BLOCK:
        col_mask = cols < N
        if PARAMS_FIRST:
            w, b = _affine_params(cols, col_mask, w_ptr, b_ptr, HAS_W, HAS_B)
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x, mean, rstd = whole_row_stats(x, col_mask, pivot, N, eps, CENTER)
        if not PARAMS_FIRST:
            w, b = _affine_params(cols, col_mask, w_ptr, b_ptr, HAS_W, HAS_B)
        y = _affine(x * rstd[:, None], w, b, HAS_W, HAS_B)
        tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ(x − μ)² so far (Σx² for RMSNorm)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if CENTER:
                x = tl.where(mask, x - pivot, 0.0)
                n_a = start * 1.0  # rows folded so far, as float32
                n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
                mean_b = tl.sum(x, axis=1) / n_b
                d = tl.where(mask, x - mean_b[:, None], 0.0)
                delta = mean_b - mean
                mean = mean + delta * (n_b / (n_a + n_b))
                m2 = m2 + tl.sum(d * d, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
            else:
                m2 = m2 + tl.sum(x * x, axis=1)
        rstd = tl.math.rsqrt(m2 / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            w, b = _affine_params(c, c < N, w_ptr, b_ptr, HAS_W, HAS_B)
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            y = _affine((x - pivot - mean[:, None]) * rstd[:, None], w, b, HAS_W, HAS_B)
            tl.store(y_rows + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if CENTER:
        tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _row_pivot(x_rows, row_mask, CENTER: tl.constexpr):
    """[BLOCK_M, 1]: each row's first element x₀ when centering (0 for RMSNorm)."""
    if CENTER:
        return tl.load(x_rows, mask=row_mask[:, None], other=0.0).to(tl.float32)
    else:
        return tl.zeros((x_rows.shape[0], 1), dtype=tl.float32)


@triton.jit
def _xhat_and_g(x_rows, dy_rows, c, N, row_mask, w_ptr, pivot, mean, rstd, HAS_W: tl.constexpr):
    """(x̂, g = w ⊙ dy, dy, mask) for the [BLOCK_M, BLOCK_N] block at columns c; float32, 0 on masked lanes."""
    col_mask = c < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - pivot - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_W:
        g = dy * tl.load(w_ptr + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return xhat, g, dy, mask


@triton.jit
def _load_row_block(
    x_ptr, dy_ptr, mean_ptr, rstd_ptr, rows, row_end, cols, N, stride_xm, stride_dym, CENTER: tl.constexpr
):
    """The loads one block of whole rows needs: x and dy (as stored), x₀, μ (of x − x₀) and rstd; rows ≥ row_end
    are masked (no memory traffic)."""
    row_mask = rows < row_end
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    mask = row_mask[:, None] & (cols < N)[None, :]
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
    mean = tl.zeros((rows.shape[0],), dtype=tl.float32)
    if CENTER:
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    return x, dy, _row_pivot(x_rows, row_mask, CENTER), mean, rstd


@triton.jit
def _norm_backward_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    partial_ptr,
    M,
    N,
    stride_dym,
    stride_xm,
    stride_dxm,
    rows_per_program,
    CENTER: tl.constexpr,
    HAS_W: tl.constexpr,
    DW: tl.constexpr,
    DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """dx for the rows [pid · rows_per_program, …) and this program's partial sums: row pid of the [programs, N]
    plane of dw (first, when DW) and of db (next, when DB) in partial_ptr.

    Whole rows (ONE_BLOCK): the loads of the next block of rows are issued before this block is computed
    (PREFETCH), so a program always has memory requests in flight.
    """
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    dw_row = partial_ptr + pid.to(tl.int64) * N
    db_row = dw_row
    if DW:
        db_row += tl.num_programs(0).to(tl.int64) * N
    if ONE_BLOCK:
        col_mask = cols < N
        w = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        x_n, dy_n, pivot_n, mean_n, rstd_n = _load_row_block(
            x_ptr,
            dy_ptr,
            mean_ptr,
            rstd_ptr,
            row_start + tl.arange(0, BLOCK_M),
            row_end,
            cols,
            N,
            stride_xm,
            stride_dym,
            CENTER,
        )
        for r0 in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
            rows = r0 + tl.arange(0, BLOCK_M)
            if PREFETCH:
                x, dy, pivot, mean, rstd = x_n, dy_n, pivot_n, mean_n, rstd_n
                x_n, dy_n, pivot_n, mean_n, rstd_n = _load_row_block(
                    x_ptr, dy_ptr, mean_ptr, rstd_ptr, rows + BLOCK_M, row_end, cols, N, stride_xm, stride_dym, CENTER
                )
            else:
                x, dy, pivot, mean, rstd = _load_row_block(
                    x_ptr, dy_ptr, mean_ptr, rstd_ptr, rows, row_end, cols, N, stride_xm, stride_dym, CENTER
                )
            mask = (rows < row_end)[:, None] & col_mask[None, :]
            dy = dy.to(tl.float32)
            xhat = tl.where(mask, (x.to(tl.float32) - pivot - mean[:, None]) * rstd[:, None], 0.0)
            dx = norm_input_gradient(xhat, dy * w[None, :], rstd, N, CENTER)
            tl.store(
                dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm + cols[None, :],
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask,
            )
            if DW:
                dw_acc += tl.sum(dy * xhat, axis=0)
            if DB:
                db_acc += tl.sum(dy, axis=0)
        if DW:
            tl.store(dw_row + cols, dw_acc, mask=col_mask)
        if DB:
            tl.store(db_row + cols, db_acc, mask=col_mask)
    else:
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
            dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
            dx_rows = dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
            if CENTER:
                mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            pivot = _row_pivot(x_rows, row_mask, CENTER)
            c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                xhat, g, dy, mask = _xhat_and_g(x_rows, dy_rows, c, N, row_mask, w_ptr, pivot, mean, rstd, HAS_W)
                c1 += tl.sum(xhat * g, axis=1)
                if CENTER:
                    c2 += tl.sum(g, axis=1)
            c1 = c1 / N
            c2 = c2 / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                xhat, g, dy, mask = _xhat_and_g(x_rows, dy_rows, c, N, row_mask, w_ptr, pivot, mean, rstd, HAS_W)
                dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                tl.store(dx_rows + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
                if DW:
                    acc = tl.load(dw_row + c, mask=c < N, other=0.0)
                    tl.store(dw_row + c, acc + tl.sum(dy * xhat, axis=0), mask=c < N)
                if DB:
                    acc = tl.load(db_row + c, mask=c < N, other=0.0)
                    tl.store(db_row + c, acc + tl.sum(dy, axis=0), mask=c < N)


# The forward over rows of 513–1024 elements: four rows a program on four warps (32 elements a thread) instead of
# row_tiling's two rows.
_NARROW_FORWARD = {"gpu_tile": 4096, "shared_row_warps": 4}


# Whole rows of WIDE_ROW (8192) elements or more take 16 warps instead of 8.
_WIDE_FORWARD = {"wide_row_warps": 16}


def forward_launch_options(n: int) -> dict:
    """launch_rows' tiling options for the forward over rows of n elements."""
    return _NARROW_FORWARD if 512 < n <= 1024 else _WIDE_FORWARD


def forward_flags(n: int, center: bool) -> dict:
    """The forward kernel's flags for rows of n elements (see _norm_forward_kernel).

    PARAMS_FIRST: w and b are loaded before the row's reductions, which is faster for LayerNorm's rows of
    1024–4096; LayerNorm's rows of WIDE_ROW (8192) elements or more are faster loading them after. Elsewhere the
    order matters little; they load first."""
    return {"PARAMS_FIRST": not (center and n >= WIDE_ROW)}


def _unit_stride(param: torch.Tensor | None) -> torch.Tensor | None:
    """A weight or bias [N] as the kernels read it (param[c] at c): a strided or expanded (stride-0) view is
    copied, N elements."""
    return None if param is None else param.contiguous()


def norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, center: bool):
    """Normalize x [..., N] over its last dimension (LayerNorm when center, else RMSNorm); weight and bias [N] or
    None, any strides.

    Returns (y shaped like x and contiguous, x as [M, N] rows for the backward, μ [M] or None, rstd [M]).
    """
    n = x.shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    y = new_empty(x.shape, like=x)
    mean = new_empty((m,), like=x, dtype=torch.float32) if center else None
    rstd = new_empty((m,), like=x, dtype=torch.float32)
    launch_rows(
        _norm_forward_kernel,
        m,
        n,
        x2,
        x2 if weight is None else weight,
        x2 if bias is None else bias,
        y,
        rstd if mean is None else mean,
        rstd,
        m,
        n,
        x2.stride(0),
        n,
        eps,
        CENTER=center,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        **forward_flags(n, center),
        **forward_launch_options(n),
    )
    return y, x2, mean, rstd


def sums_dtype(*dtypes: torch.dtype | None) -> torch.dtype:
    """The dtype column sums (dw, db, ...) are summed in: theirs when the wanted ones (not None) agree, else float32
    (each cast after the sum)."""
    wanted = {dtype for dtype in dtypes if dtype is not None}
    return wanted.pop() if len(wanted) == 1 else torch.float32


def norm_backward_sums(
    dy: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    need_dw: bool,
    need_db: bool,
    sum_dtype: torch.dtype,
):
    """(dx [M, N], the wanted of dw and db as the rows of one [k, N] tensor in sum_dtype) from dy [..., N] and what
    norm_forward saved."""
    m, n = x2.shape
    dy2 = as_rows(dy, n)
    weight = _unit_stride(weight)
    dx = new_empty((m, n), like=x2)
    k = need_dw + need_db
    if not (m and n):
        return dx, torch.zeros((k, n), device=x2.device, dtype=sum_dtype)
    meta = row_tiling(m, n, max_block=_BACKWARD_MAX_BLOCK, gpu_tile=BACKWARD_TILE)
    tiles = cdiv(m, meta["BLOCK_M"])
    programs = persistent_programs(x2.device, tiles, meta["num_warps"])
    rows_per_program = cdiv(tiles, programs) * meta["BLOCK_M"]
    programs = cdiv(m, rows_per_program)
    # a [programs, N] float32 plane per gradient; looping programs add into theirs, so it starts at zero
    shape = (k, programs, n)
    partials = (
        new_empty(shape, like=x2, dtype=torch.float32)
        if meta["ONE_BLOCK"]
        else torch.zeros(shape, device=x2.device, dtype=torch.float32)
    )
    launch(
        _norm_backward_kernel,
        (programs,),
        dy2,
        x2,
        x2 if weight is None else weight,
        rstd if mean is None else mean,
        rstd,
        dx,
        partials if k else rstd,
        m,
        n,
        dy2.stride(0),
        x2.stride(0),
        n,
        rows_per_program,
        CENTER=mean is not None,
        HAS_W=weight is not None,
        DW=need_dw,
        DB=need_db,
        STAGES=BACKWARD_STAGES,
        PREFETCH=backward_prefetch(meta),
        **meta,
    )
    if not k:
        return dx, new_empty((0, n), like=x2, dtype=sum_dtype)
    return dx, column_sum(partials, sum_dtype, rows_per_program=programs)


def norm_backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    dw_dtype: torch.dtype | None,
    db_dtype: torch.dtype | None,
):
    """(dx [M, N], dw or None, db or None) from dy [..., N] and what norm_forward saved; dw (db) is computed in
    dw_dtype (db_dtype), None for no gradient."""
    dx, sums = norm_backward_sums(
        dy, x2, weight, mean, rstd, dw_dtype is not None, db_dtype is not None, sums_dtype(dw_dtype, db_dtype)
    )
    sums = list(sums.unbind(0))
    dw = sums.pop(0).to(dw_dtype) if dw_dtype is not None else None
    db = sums.pop(0).to(db_dtype) if db_dtype is not None else None
    return dx, dw, db
