"""Rotary position embedding (RoPE), rotate-half convention (GPT-NeoX, LLaMA), forward and backward.

A head vector x of D = 2·d elements at position p is split into halves x₁ = x[:d], x₂ = x[d:]; with c = cos θ_p
and s = sin θ_p (rows p of tables [S_max, d], the angle of pair i being θ_p,i):

    y = x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁]:    y₁ = x₁·c − x₂·s      y₂ = x₂·c + x₁·s

The map is a rotation by θ, so its backward is the rotation by −θ (the same kernel with s negated):

    dx₁ = dy₁·c + dy₂·s      dx₂ = dy₂·c − dy₁·s

One launch rotates q [B, Hq, S, D] and k [B, Hk, S, D] (Hk may differ: grouped-query attention), both read through
their strides (views of a fused QKV projection [B, S, 3, H, D] need no copy), into contiguous outputs. Position p of
the sequence takes table row offset + p (generation with a cache). A program covers BLOCK_S positions of one batch
element and a group of heads, counted over q's heads then k's: it loads its cos and sin rows once and reuses them
for every head of the group. Float32 math; outputs in the inputs' dtype.
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

    q, k: any strides (element units, stride_*d between the elements of a head vector). qo, ko: contiguous
    [B, HQ, S, 2·HALF] and [B, HK, S, 2·HALF]. cos, sin: tables [S_max, ≥ HALF] read at
    rows offset + position, columns < HALF, through their strides (0 allowed: expanded tables).
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
    out_offsets = p64 * (2 * HALF) + cols[None, :]
    out_head = S * (2 * HALF)  # the outputs' head stride (multiplied by int64 indices only)
    h_begin = tl.program_id(1).to(tl.int64) * heads_per_program
    h_end = tl.minimum(h_begin + heads_per_program, HQ + HK)
    _rotate_heads(
        q_ptr + b * stride_qb,
        qo_ptr + b * HQ * out_head,
        h_begin,
        tl.minimum(h_end, HQ),
        stride_qh,
        out_head,
        p64 * stride_qs + cols[None, :] * stride_qd,
        out_offsets,
        HALF * stride_qd,
        HALF,
        mask,
        c,
        s,
    )
    _rotate_heads(
        k_ptr + b * stride_kb,
        ko_ptr + b * HK * out_head,
        tl.maximum(h_begin, HQ) - HQ,
        h_end - HQ,
        stride_kh,
        out_head,
        p64 * stride_ks + cols[None, :] * stride_kd,
        out_offsets,
        HALF * stride_kd,
        HALF,
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
):
    """(q rotated, k rotated) as new contiguous tensors (None for a None input): by +θ, or by −θ when inverse.

    q [B, Hq, S, D], k [B, Hk, S, D] (any strides, one dtype), cos and sin [S_max, D/2] or wider (only columns
    < D/2 are read), offset + S ≤ S_max; the caller validates shapes.
    """
    present = q if q is not None else k
    batch, _, seq, dim = present.shape
    half = dim // 2
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
        *cos.stride(),
        *sin.stride(),
        INVERSE=inverse,
        **meta,
    )
    return q_out, k_out
