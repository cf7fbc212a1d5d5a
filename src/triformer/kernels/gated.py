"""Gated activations of a fused up-projection: SwiGLU and GeGLU, forward and backward.

x [M, 2N] holds the two halves of one up-projection, a = x[:, :N] (the gate) and b = x[:, N:]:

    h = act(a) ⊙ b                 act = silu (SwiGLU) or gelu with the tanh approximation (GeGLU)
    backward:  da = dh ⊙ b ⊙ act'(a)      db = dh ⊙ act(a)

(act and act' as in activation.py.) Nothing is stored for the backward but x itself: act(a) and act'(a) are
recomputed from a. The halves are read through x's strides (no copy) and da, db are written into the two halves of
one [M, 2N] gradient, which may be x's own storage (each element is read before the same program overwrites it).
Float32 math; outputs in x's dtype. Programs cover [BLOCK_M, BLOCK_N] tiles of the [M, N] half-plane, in row-major
tile order (consecutive programs read consecutive memory).
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._runtime import cdiv, interpreter_active, new_empty, next_power_of_2, overridden
from ._tiles import row_major_tile
from .activation import _sigmoid, _tanh, activation_code

GATED_ACTIVATIONS = ("silu", "gelu")

# Elements of a program's tile on a GPU and the widest column block; the interpreter wants few, large tiles.
# Tests lower the interpreter's values (interpreter_tiling) to cover several row and column blocks.
GPU_TILE = 4096
GPU_MAX_BLOCK_N = 1024
INTERPRETER_TILE = 16384
INTERPRETER_MAX_BLOCK_N = 4096


def interpreter_tiling(tile: int, max_block_n: int):
    """Within the block the interpreter's launch takes tiles of `tile` elements and column blocks of at most
    `max_block_n`."""
    return overridden(sys.modules[__name__], INTERPRETER_TILE=tile, INTERPRETER_MAX_BLOCK_N=max_block_n)


@triton.jit
def _act_and_derivative(a, ACT: tl.constexpr):
    """(act(a), act'(a)) in float32 for ACT = silu (3) or gelu-tanh (2), sharing σ(a) or tanh(u)
    (c = √(2/π) = 0.79788…, 0.044715 as in activation.py)."""
    if ACT == 3:
        s = _sigmoid(a)
        return a * s, s * (1.0 + a * (1.0 - s))
    else:
        t = _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a))
        derivative = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        return 0.5 * a * (1.0 + t), derivative


@triton.jit
def _tile(M, N, stride_m, stride_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offsets of this program's [BLOCK_M, BLOCK_N] tile in a tensor of the given strides, its mask, and the
    [rows, cols] index vectors). Program p takes tile p in row-major order (consecutive programs read consecutive
    memory)."""
    pid_m, pid_n = row_major_tile(tl.program_id(0), N, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64)[:, None] * stride_m + cols[None, :] * stride_n, mask, rows, cols


@triton.jit
def _gated_forward_kernel(
    x_ptr,
    h_ptr,
    M,
    N,
    stride_xm,
    stride_xn,
    stride_hm,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """h = act(a) ⊙ b with a at x_ptr + offsets and b N columns further; h has unit column stride."""
    x_offsets, mask, rows, cols = _tile(M, N, stride_xm, stride_xn, BLOCK_M, BLOCK_N)
    a = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + N * stride_xn + x_offsets, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_derivative(a, ACT)
    h_offsets = rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    tl.store(h_ptr + h_offsets, (act * b).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_backward_kernel(
    dh_ptr,
    x_ptr,
    dx_ptr,
    M,
    N,
    stride_dhm,
    stride_dhn,
    stride_xm,
    stride_xn,
    stride_dxm,
    stride_dxn,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """da = dh ⊙ b ⊙ act'(a) into dx's first N columns, db = dh ⊙ act(a) into the next N (dx may be x)."""
    x_offsets, mask, rows, cols = _tile(M, N, stride_xm, stride_xn, BLOCK_M, BLOCK_N)
    dh_offsets = rows.to(tl.int64)[:, None] * stride_dhm + cols[None, :] * stride_dhn
    dh = tl.load(dh_ptr + dh_offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + N * stride_xn + x_offsets, mask=mask, other=0.0).to(tl.float32)
    act, derivative = _act_and_derivative(a, ACT)
    dx_offsets = rows.to(tl.int64)[:, None] * stride_dxm + cols[None, :] * stride_dxn
    tl.store(dx_ptr + dx_offsets, (dh * b * derivative).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + N * stride_dxn + dx_offsets, (dh * act).to(dx_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=1024)
def _launch(m: int, n: int, tile: int, max_block_n: int) -> tuple:
    """(grid, meta as (key, value) pairs), computed once per shape: one program a tile, in row-major tile order."""
    block_n = min(next_power_of_2(n), max_block_n)
    block_m = max(1, min(next_power_of_2(m), tile // block_n))
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4 if block_m * block_n <= 2048 else 8}
    return (cdiv(m, block_m) * cdiv(n, block_n),), tuple(meta.items())


def launch_config(m: int, n: int) -> tuple:
    """(grid, meta) over the [m, n] half-plane."""
    if interpreter_active():
        grid, meta = _launch(m, n, INTERPRETER_TILE, INTERPRETER_MAX_BLOCK_N)
    else:
        grid, meta = _launch(m, n, GPU_TILE, GPU_MAX_BLOCK_N)
    return grid, dict(meta)


def gated_forward(x: torch.Tensor, activation: str) -> torch.Tensor:
    """h = act(a) ⊙ b for x [M, 2N] (any strides) as a new contiguous [M, N] tensor of x's dtype."""
    m, n = x.shape[0], x.shape[1] // 2
    h = new_empty((m, n), like=x)
    if m and n:
        grid, meta = launch_config(m, n)
        launch(
            _gated_forward_kernel,
            grid,
            x,
            h,
            m,
            n,
            x.stride(0),
            x.stride(1),
            n,
            ACT=activation_code(activation),
            **meta,
        )
    return h


def gated_backward(dh: torch.Tensor, x: torch.Tensor, activation: str, dx: torch.Tensor | None = None) -> torch.Tensor:
    """[da | db] for dh [M, N] and x [M, 2N] (any strides), written into dx (x itself allowed: rows that do not
    overlap) or, when dx is None, a new contiguous [M, 2N] tensor of x's dtype; returns it."""
    m, n = dh.shape
    if dx is None:
        dx = new_empty(x.shape, like=x)
    if m and n:
        grid, meta = launch_config(m, n)
        launch(
            _gated_backward_kernel,
            grid,
            dh,
            x,
            dx,
            m,
            n,
            *dh.stride(),
            *x.stride(),
            *dx.stride(),
            ACT=activation_code(activation),
            **meta,
        )
    return dx
