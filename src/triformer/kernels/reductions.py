"""Column sums: Σ over the rows of a [M, N] tensor (or of each plane of a [P, M, N] one), and the linear backward's
gated pass, which forms dZ = dY ⊙ act'(gate) and Σ_rows dZ in one read of dY and the gate.

Float32 partial sums per chunk of rows (so tall tensors spread over every SM), then the same kernel again over the
partials until one row is left; up to _WHOLE_COLUMN_MAX_ROWS rows a program loads its columns as one tile.
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._runtime import cdiv, new_empty, next_power_of_2, overridden
from .activation import activation_code, activation_derivative


@triton.jit
def _column_sum_kernel(
    x_ptr,
    gate_ptr,
    gated_ptr,
    out_ptr,
    M,
    N,
    ROWS_PER_PROGRAM,
    GATE_ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[p, c, n] = Σ_{m in chunk c} x[p, m, n] over contiguous planes x [P, M, N], accumulated in float32.

    GATE_ACT ≠ 0 (one plane): x is first replaced by x ⊙ act'(gate), which is also stored to `gated` (the linear
    backward's dZ = dY ⊙ act'(Z) and db = Σ_rows dZ in one pass). Program (n-block, c, p) sums ROWS_PER_PROGRAM rows
    of plane p, so tall tensors still spread over every SM.
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)
    x_ptr += plane * M * N
    out_ptr += (plane * tl.num_programs(1) + chunk) * N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(chunk * ROWS_PER_PROGRAM, tl.minimum(M, (chunk + 1) * ROWS_PER_PROGRAM), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        if GATE_ACT != 0:
            g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * activation_derivative(g, GATE_ACT)).to(gated_ptr.dtype.element_ty)
            tl.store(gated_ptr + offsets, x, mask=mask)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)


def column_sum(x: torch.Tensor, dtype: torch.dtype | None = None, rows_per_program: int = 256) -> torch.Tensor:
    """Σ over the rows of a contiguous [M, N] tensor, or of each plane of a contiguous [P, M, N] one, in `dtype`
    (default x's): float32 partial sums per chunk of rows, then the same kernel again over the partials until one
    row is left; the last pass writes `dtype` directly."""
    return _column_sum(x, dtype or x.dtype, rows_per_program)


# Launch of the gated pass: it streams three [M, N] tensors, so more, shorter programs keep more loads in flight
# than column_sum's default. `tools/gpu_matmul_products.py gated` times the alternatives (gated_launch).
GATED_ROWS_PER_PROGRAM = 128
GATED_BLOCK_M, GATED_BLOCK_N, GATED_WARPS = 64, 64, 4


def gated_launch(block_m: int, block_n: int, warps: int, rows_per_program: int):
    """Within the block the gated pass launches BLOCK_M × BLOCK_N tiles on `warps` warps, `rows_per_program` rows a
    program (rows_per_program a multiple of block_m)."""
    return overridden(
        sys.modules[__name__],
        GATED_BLOCK_M=block_m,
        GATED_BLOCK_N=block_n,
        GATED_WARPS=warps,
        GATED_ROWS_PER_PROGRAM=rows_per_program,
    )


def gated_column_sum(dy: torch.Tensor, gate: torch.Tensor, activation: str | None):
    """(dZ, Σ_rows dZ) with dZ = dy ⊙ act'(gate) for contiguous dy, gate [M, N], in one pass over them (then the
    partial sums are summed); both in dy's dtype."""
    dz = new_empty(dy.shape, like=dy)
    return dz, _column_sum(
        dy,
        dy.dtype,
        GATED_ROWS_PER_PROGRAM,
        gate=gate,
        gated=dz,
        gate_act=activation_code(activation),
        tiling=dict(BLOCK_M=GATED_BLOCK_M, BLOCK_N=GATED_BLOCK_N, num_warps=GATED_WARPS),
    )


_COLUMN_SUM_LAUNCH = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4)
# Up to this many rows (the norms' per-program partial sums, a second pass over chunk sums), a program loads its
# columns' rows as one tile of about _WHOLE_COLUMN_TILE elements: one round trip to memory instead of a loop.
_WHOLE_COLUMN_MAX_ROWS = 1024
_WHOLE_COLUMN_TILE = 8192


@functools.cache
def _whole_column_launch(rows: int) -> dict:
    """The one-tile launch for `rows` rows (computed once per row count; callers only unpack it)."""
    block_m = next_power_of_2(max(rows, 1))
    block_n = max(16, min(128, _WHOLE_COLUMN_TILE // block_m))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * block_n >= 8192 else 4)


def _column_sum(x, dtype, rows_per_program, gate=None, gated=None, gate_act=0, tiling=_COLUMN_SUM_LAUNCH):
    planes = x.reshape(x.shape[:-2].numel(), x.shape[-2], x.shape[-1])
    P, M, N = planes.shape
    if not (P and M and N):  # M = 0 (an empty batch) sums to zeros; an empty tensor may have no storage to pass
        return torch.zeros((*x.shape[:-2], N), device=x.device, dtype=dtype)
    if gate is None and M <= _WHOLE_COLUMN_MAX_ROWS:
        rows_per_program, tiling = max(M, 1), _whole_column_launch(M)
    chunks = max(1, cdiv(M, rows_per_program))
    # A program sweeps its rows in whole blocks: blocks must not reach into the next program's rows.
    assert chunks == 1 or rows_per_program % tiling["BLOCK_M"] == 0, (rows_per_program, tiling["BLOCK_M"])
    out = new_empty((P, chunks, N), like=x, dtype=dtype if chunks == 1 else torch.float32)
    launch(
        _column_sum_kernel,
        (cdiv(N, tiling["BLOCK_N"]), chunks, P),
        planes,
        planes if gate is None else gate,
        planes if gated is None else gated,
        out,
        M,
        N,
        rows_per_program,
        GATE_ACT=gate_act,
        **tiling,
    )
    if chunks > 1:
        out = _column_sum(out, dtype, rows_per_program)
    return out.reshape(*x.shape[:-2], N)
