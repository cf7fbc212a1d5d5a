"""Rotary position embedding (RoPE), rotate-half convention (GPT-NeoX, LLaMA), forward and backward.

A head vector x of D = 2·d elements at position p is split into halves x₁ = x[:d], x₂ = x[d:]; with c = cos θ_p
and s = sin θ_p (rows p of tables [S_max, d], the angle of pair i being θ_p,i):

    y = x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁]:    y₁ = x₁·c − x₂·s      y₂ = x₂·c + x₁·s

The map is a rotation by θ, so its backward is the rotation by −θ (the same kernel with s negated):

    dx₁ = dy₁·c + dy₂·s      dx₂ = dy₂·c − dy₁·s

One launch rotates q [B, Hq, S, D] and k [B, Hk, S, D] (Hk may differ: grouped-query attention), both read through
their strides (views of a fused QKV projection [B, S, 3, H, D] need no copy), into new contiguous outputs or over
the inputs themselves (in place: each element is read and written by one program, which loads both halves of a pair
before it stores either). Position p of the sequence takes table row offset + p (generation with a cache). A program
covers BLOCK_S positions of one batch element and a group of heads, counted over q's heads then k's: it loads its
cos and sin rows once and reuses them for every head of the group. Float32 math; outputs in the inputs' dtype.
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._runtime import cdiv, device_properties, interpreter_active, new_empty, next_power_of_2, overridden

# Elements (positions × D) of one head's tile on a GPU; the interpreter runs programs one after another in numpy
# and wants few, large tiles. Tests lower the interpreter's values (interpreter_tiling) to cover several position
# blocks and head groups (one straddling q's and k's heads).
GPU_TILE = 4096
INTERPRETER_TILE = 16384
INTERPRETER_HEADS_PER_PROGRAM = 1024


def interpreter_tiling(tile: int, heads_per_program: int):
    """Within the block the interpreter's launch takes tiles of `tile` elements and `heads_per_program` heads."""
    return overridden(sys.modules[__name__], INTERPRETER_TILE=tile, INTERPRETER_HEADS_PER_PROGRAM=heads_per_program)


# Programs per SM the GPU launch aims at, splitting the heads into groups when positions × batch give fewer.
PROGRAMS_PER_SM = 8


@triton.jit
def _rotate_heads(x_ptr, y_ptr, h_begin, h_end, stride_xh, stride_yh, x_offsets, y_offsets, half_x, half_y, mask, c, s):
    """Heads h_begin ≤ h < h_end of one tensor: y₁ = x₁·c − x₂·s, y₂ = x₂·c + x₁·s on [BLOCK_S, BLOCK_D] tiles
    (x₁ at x_offsets, x₂ half_x further; y₁ at y_offsets, y₂ half_y further)."""
    for h in tl.range(h_begin, h_end):
        x_head = x_ptr + h * stride_xh
        y_head = y_ptr + h * stride_yh
        x1 = tl.load(x_head + x_offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_head + x_offsets + half_x, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_head + y_offsets, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_head + y_offsets + half_y, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    S,
    HALF,
    HQ,
    HK,
    offset,
    heads_per_program,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_qod,
    stride_kob,
    stride_koh,
    stride_kos,
    stride_kod,
    stride_cs,
    stride_cd,
    stride_ss,
    stride_sd,
    INVERSE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rotate positions [pid₀·BLOCK_S, …) of batch element pid₂, heads [pid₁·heads_per_program, …) of q's HQ heads
    followed by k's HK (HQ or HK may be 0), by +θ, or by −θ when INVERSE (the backward).

    q, k: any strides (element units, stride_*d between the elements of a head vector); qo, ko: q's and k's
    shapes, any strides whose elements do not overlap (q and k themselves: in place). cos, sin: tables
    [S_max, ≥ HALF] read at rows offset + position, columns < HALF, through their strides (0 allowed: expanded
    tables).
    """
    positions = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = tl.program_id(2).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (positions < S)[:, None] & (cols < HALF)[None, :]
    rows = (offset + positions).to(tl.int64)[:, None]
    c = tl.load(cos_ptr + rows * stride_cs + cols[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + rows * stride_ss + cols[None, :] * stride_sd, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    p64 = positions.to(tl.int64)[:, None]
    h_begin = tl.program_id(1).to(tl.int64) * heads_per_program
    h_end = tl.minimum(h_begin + heads_per_program, HQ + HK)
    _rotate_heads(
        q_ptr + b * stride_qb,
        qo_ptr + b * stride_qob,
        h_begin,
        tl.minimum(h_end, HQ),
        stride_qh,
        stride_qoh,
        p64 * stride_qs + cols[None, :] * stride_qd,
        p64 * stride_qos + cols[None, :] * stride_qod,
        HALF * stride_qd,
        HALF * stride_qod,
        mask,
        c,
        s,
    )
    _rotate_heads(
        k_ptr + b * stride_kb,
        ko_ptr + b * stride_kob,
        tl.maximum(h_begin, HQ) - HQ,
        h_end - HQ,
        stride_kh,
        stride_koh,
        p64 * stride_ks + cols[None, :] * stride_kd,
        p64 * stride_kos + cols[None, :] * stride_kod,
        HALF * stride_kd,
        HALF * stride_kod,
        mask,
        c,
        s,
    )


@functools.lru_cache(maxsize=1024)
def _launch(batch: int, seq: int, half: int, heads: int, gpu_programs: int, tile: int, max_group: int) -> tuple:
    """(grid, heads_per_program, meta as (key, value) pairs) for the kernel, computed once per shape;
    gpu_programs = 0 under the interpreter."""
    block_d = next_power_of_2(half)
    block_s = max(1, min(next_power_of_2(seq), tile // (2 * block_d)))
    position_blocks = cdiv(seq, block_s)
    groups = 1
    if gpu_programs:
        groups = min(heads, max(1, cdiv(gpu_programs, position_blocks * batch)))
    per_program = min(cdiv(heads, groups), max_group)
    groups = cdiv(heads, per_program)
    elements = block_s * 2 * block_d
    meta = {"BLOCK_S": block_s, "BLOCK_D": block_d, "num_warps": 4 if elements <= 2048 else 8}
    return (position_blocks, groups, batch), per_program, tuple(meta.items())


def launch_config(batch: int, seq: int, half: int, heads: int, device: torch.device) -> tuple:
    """(grid, heads_per_program, meta) for `heads` heads (q's and k's together) of `seq` positions."""
    if interpreter_active() or device.type != "cuda":
        grid, per_program, meta = _launch(batch, seq, half, heads, 0, INTERPRETER_TILE, INTERPRETER_HEADS_PER_PROGRAM)
    else:
        programs = PROGRAMS_PER_SM * device_properties(device).multi_processor_count
        grid, per_program, meta = _launch(batch, seq, half, heads, programs, GPU_TILE, heads)
    return grid, per_program, dict(meta)


def rotate(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offset: int,
    inverse: bool = False,
    in_place: bool = False,
):
    """(q rotated, k rotated) by +θ, or by −θ when inverse (None for a None input): new contiguous tensors, or q and
    k themselves when in_place.

    q [B, Hq, S, D], k [B, Hk, S, D] (any strides, one dtype), cos and sin [S_max, D/2] or wider (only columns
    < D/2 are read), offset + S ≤ S_max; the caller validates shapes, and for in_place that no element of q or k
    is another's.
    """
    present = q if q is not None else k
    batch, _, seq, dim = present.shape
    half = dim // 2
    if in_place:
        q_out, k_out = q, k
    else:
        q_out = None if q is None else new_empty(q.shape, like=q)
        k_out = None if k is None else new_empty(k.shape, like=k)
    hq = 0 if q is None else q.shape[1]
    hk = 0 if k is None else k.shape[1]
    if batch == 0 or seq == 0 or half == 0 or hq + hk == 0:
        return q_out, k_out
    q_in, qo = (q, q_out) if q is not None else (k, k_out)  # placeholders where a tensor is absent (0 heads)
    k_in, ko = (k, k_out) if k is not None else (q, q_out)
    grid, per_program, meta = launch_config(batch, seq, half, hq + hk, present.device)
    launch(
        _rope_kernel,
        grid,
        q_in,
        k_in,
        qo,
        ko,
        cos,
        sin,
        seq,
        half,
        hq,
        hk,
        offset,
        per_program,
        *q_in.stride(),
        *k_in.stride(),
        *qo.stride(),
        *ko.stride(),
        *cos.stride(),
        *sin.stride(),
        INVERSE=inverse,
        **meta,
    )
    return q_out, k_out
