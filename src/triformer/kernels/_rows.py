"""What the row-wise kernels share (LayerNorm, RMSNorm, softmax, cross-entropy): row views, tiling, online softmax.

A row kernel sees its input as M rows of N elements with unit column stride. One program covers a tile of
BLOCK_M rows × BLOCK_N columns; a row wider than MAX_ROW_BLOCK is covered by looping over column blocks
(ONE_BLOCK = False) instead of holding the whole row in registers.

Online softmax (Milakov & Gimelshein, 2018), folding the blocks b of a row one after another:

    m' = max(m, max_b x)        s' = s · e^(m − m') + Σ_b e^(x − m')        logsumexp(x) = m + log s

A row that is −inf so far keeps (m, s) = (−inf, 0); a row that is −inf everywhere ends with logsumexp = −inf,
so its softmax is NaN, as torch gives.
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._runtime import cdiv, device_properties, interpreter_active, next_power_of_2, overridden

# Widest row block held in registers; wider rows loop. Tests lower it (row_block_cap) to run the looping path on
# small rows.
MAX_ROW_BLOCK = 16384
# Elements per program when several narrow rows share one: a GPU wants ~2K (more programs in flight, none
# spilling); the interpreter runs programs one after another in numpy and wants few, large tiles.
_GPU_TILE = 2048
# Column block of the looping path: the row is not held, so a smaller block keeps registers free (no spills).
_LOOP_BLOCK = 8192
_INTERPRETER_TILE = 16384


def row_block_cap(n: int):
    """Within the block rows wider than n elements take the looping path (MAX_ROW_BLOCK = n)."""
    return overridden(sys.modules[__name__], MAX_ROW_BLOCK=n)


def as_rows(x: torch.Tensor, n_cols: int) -> torch.Tensor:
    """x [..., n_cols] as a 2-D [rows, n_cols] tensor with unit column stride: a view when possible, else a copy.
    (The row count is spelled out: reshape(-1, 0) of an empty row is ambiguous.)"""
    rows = x.reshape(x.shape[:-1].numel(), n_cols)
    if n_cols > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def row_tiling(
    n_rows: int, n_cols: int, loop: bool = False, max_block: int | None = None, gpu_tile: int | None = None
) -> dict:
    """Launch meta for a row kernel: BLOCK_M, BLOCK_N, ONE_BLOCK and num_warps (about 16 elements per thread).

    loop=True: the kernel always loops over column blocks (cross-entropy) and ONE_BLOCK is not returned.
    max_block: a tighter cap than MAX_ROW_BLOCK on BLOCK_N. gpu_tile: elements per program on a GPU when rows
    share one (default _GPU_TILE).
    """
    tile = _INTERPRETER_TILE if interpreter_active() else gpu_tile or _GPU_TILE
    return dict(_tiling(n_rows, n_cols, loop, min(MAX_ROW_BLOCK, max_block or MAX_ROW_BLOCK), tile))


@functools.lru_cache(maxsize=4096)
def _tiling(n_rows: int, n_cols: int, loop: bool, max_block: int, tile: int) -> tuple:
    """row_tiling's meta as (key, value) pairs, computed once per shape (every argument is part of the key)."""
    block_n = min(next_power_of_2(max(n_cols, 1)), max_block)
    one_block = block_n >= n_cols
    if not one_block:
        block_n = min(block_n, _LOOP_BLOCK)
    block_m = 1
    if one_block:
        block_m = max(1, min(tile // block_n, next_power_of_2(max(n_rows, 1))))
    elements = block_m * block_n
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}
    if not loop:
        meta["ONE_BLOCK"] = one_block
    return tuple(meta.items())


# Warps a one-row tile of WIDE_ROW elements or more may take instead of row_tiling's (launch_rows' wide_row_warps).
WIDE_ROW = 8192


def launch_meta(
    n_rows: int,
    n_cols: int,
    wide_row_warps: int | None = None,
    gpu_tile: int | None = None,
    shared_row_warps: int | None = None,
    row_elements_per_thread: int | None = None,
) -> dict:
    """The meta launch_rows launches with (see there)."""
    meta = row_tiling(n_rows, n_cols, gpu_tile=gpu_tile)
    one_row = meta.get("ONE_BLOCK") and meta["BLOCK_M"] == 1
    if wide_row_warps and one_row and meta["BLOCK_N"] >= WIDE_ROW:
        meta["num_warps"] = wide_row_warps
    if row_elements_per_thread and one_row:
        meta["num_warps"] = min(32, max(4, meta["BLOCK_N"] // (32 * row_elements_per_thread)))
    if shared_row_warps and meta["BLOCK_M"] > 1:
        meta["num_warps"] = shared_row_warps
    return meta


def launch_rows(
    kernel,
    n_rows: int,
    n_cols: int,
    *args,
    wide_row_warps: int | None = None,
    gpu_tile: int | None = None,
    shared_row_warps: int | None = None,
    row_elements_per_thread: int | None = None,
    **flags,
) -> None:
    """kernel[one program per BLOCK_M rows](*args, **flags, tiling meta); nothing to launch for an empty input.
    wide_row_warps: num_warps for whole-row tiles of one row of WIDE_ROW elements or more (for a kernel that
    wants more). row_elements_per_thread: num_warps for every one-row whole-row tile, so that each thread holds this
    many elements (4 to 32 warps). gpu_tile, shared_row_warps: elements per program (see row_tiling) and num_warps
    where several rows share a program."""
    if n_rows and n_cols:
        meta = launch_meta(n_rows, n_cols, wide_row_warps, gpu_tile, shared_row_warps, row_elements_per_thread)
        launch(kernel, (cdiv(n_rows, meta["BLOCK_M"]),), *args, **flags, **meta)


# Warps of a register-heavy loop-over-rows kernel (the norms' backward) that stay resident on one SM together.
RESIDENT_WARPS_PER_SM = 16


def persistent_programs(device: torch.device, n_tiles: int, num_warps: int, resident_warps: int | None = None) -> int:
    """How many programs a loop-over-rows kernel launches: as many as stay resident together (resident_warps a SM,
    default RESIDENT_WARPS_PER_SM), at most one per tile."""
    if device.type != "cuda" or interpreter_active():
        return max(1, min(n_tiles, 4))
    per_sm = max(1, (resident_warps or RESIDENT_WARPS_PER_SM) // num_warps)
    return max(1, min(n_tiles, per_sm * device_properties(device).multi_processor_count))


@triton.jit
def online_softmax_update(m, s, x):
    """Fold a block x [BLOCK_M, BLOCK_N] (masked lanes −inf) into the running max m and Σ e^(x − m) s, per row."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, s
