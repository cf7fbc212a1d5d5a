"""Softmax over the last dimension, plain or causal, forward and backward.

    y_j = e^(x_j − m) / Σ_k e^(x_k − m),  m = max_k x_k          dx = y ⊙ (dy − Σ_k y_k dy_k)

Causal (attention scores [..., S_q, S_k]): key j of query i is masked (as −inf) when j > i, the mask
torch.ones(S_q, S_k).triu(1) gives; masked entries are never read and come out 0. A row that is −inf
everywhere comes out NaN, as torch.softmax gives. Rows wider than one register block take two passes:
an online max and sum (see _rows.py), then the normalized write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import as_rows, launch_rows, online_softmax_update
from ._runtime import new_empty


@triton.jit
def _visible(rows, c, row_mask, N, SQ, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of the elements a row reads: in range and, when CAUSAL, key c ≤ query rows % SQ."""
    mask = row_mask[:, None] & (c < N)[None, :]
    if CAUSAL:
        mask = mask & (c[None, :] <= (rows % SQ)[:, None])
    return mask


@triton.jit
def _softmax_forward_kernel(
    x_ptr,
    y_ptr,
    M,
    N,
    SQ,
    stride_xm,
    stride_ym,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    """y = softmax(x) over each row (with the causal mask when CAUSAL)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        x = tl.load(x_rows + cols[None, :], mask=_visible(rows, cols, row_mask, N, SQ, CAUSAL), other=float("-inf"))
        x = x.to(tl.float32)
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        y = e / tl.sum(e, axis=1)[:, None]
        tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols < N)[None, :])
    else:
        m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = tl.load(x_rows + c[None, :], mask=_visible(rows, c, row_mask, N, SQ, CAUSAL), other=float("-inf"))
            m, s = online_softmax_update(m, s, x.to(tl.float32))
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = tl.load(x_rows + c[None, :], mask=_visible(rows, c, row_mask, N, SQ, CAUSAL), other=float("-inf"))
            y = tl.exp(x.to(tl.float32) - m[:, None]) / s[:, None]
            tl.store(y_rows + c[None, :], y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & (c < N)[None, :])


@triton.jit
def _softmax_backward_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    M,
    N,
    SQ,
    stride_ym,
    stride_dym,
    stride_dxm,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    """dx = y ⊙ (dy − Σ y ⊙ dy) over each row (masked causal entries have y = 0 and are not read)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
    dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
    dx_rows = dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = _visible(rows, cols, row_mask, N, SQ, CAUSAL)
        y = tl.load(y_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(y * dy, axis=1)[:, None])
        tl.store(dx_rows + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols < N)[None, :])
    else:
        dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = _visible(rows, c, row_mask, N, SQ, CAUSAL)
            y = tl.load(y_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(y * dy, axis=1)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = _visible(rows, c, row_mask, N, SQ, CAUSAL)
            y = tl.load(y_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            dx = y * (dy - dot[:, None])
            tl.store(dx_rows + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & (c < N)[None, :])


# launch_rows' options: the forward's rows of 8192+ elements (one per program) take 16 warps instead of 8; the
# backward's whole rows take 32 elements a thread (4096: 4 warps, 8192: 8).
FORWARD_LAUNCH = {"wide_row_warps": 16}
BACKWARD_LAUNCH = {"row_elements_per_thread": 32}


def softmax_forward(x: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax over the last dimension of x [..., N] (causal over the last two); contiguous, x's dtype and shape."""
    n = x.shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    y = new_empty(x.shape, like=x)
    sq = x.shape[-2] if causal else 1
    launch_rows(_softmax_forward_kernel, m, n, x2, y, m, n, sq, x2.stride(0), n, CAUSAL=causal, **FORWARD_LAUNCH)
    return y


def softmax_backward(y: torch.Tensor, dy: torch.Tensor, causal: bool) -> torch.Tensor:
    """dx for y = softmax_forward(x, causal) (contiguous y) and dy of y's shape, any strides."""
    n = y.shape[-1]
    dy2 = as_rows(dy, n)
    m = dy2.shape[0]
    dx = new_empty(y.shape, like=y)
    sq = y.shape[-2] if causal else 1
    launch_rows(
        _softmax_backward_kernel, m, n, y, dy2, dx, m, n, sq, n, dy2.stride(0), n, CAUSAL=causal, **BACKWARD_LAUNCH
    )
    return dx
