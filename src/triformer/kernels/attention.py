"""Flash attention, forward and backward: the S×S score matrix never leaves the chip.

Per (batch, query head), with q, k, v [S, D], scale c and s = c · log2(e) (scores in base 2, so exp2 is the
only transcendental):

    forward:   z = s · q kᵀ  (causal: z_ij = −∞ for j > i)        m = rowmax z,  l = Σ_j 2^(z − m)
               o = 2^(z − m) v / l                                  lse = m + log2 l  (stored, float32, [B, H, S])
    backward:  p = 2^(z − lse)        Δ = rowsum(o ⊙ do)            (preprocess, float32, [B, H, S])
               dv = pᵀ do     dp = do vᵀ     ds = p ⊙ (dp − Δ)      dk = c · dsᵀ q     dq = c · ds k

The forward folds key blocks into running (m, l, acc) (online softmax): a query block sweeps the key blocks it
sees once. Blocks that need no mask (every key of them visible to every query row, all in range) run in a loop
without masks; the blocks on the causal diagonal or past the sequence's end run in a second, masked loop.
The backward runs two kernels after the preprocess: one program per key block computes dk, dv (sweeping the
query blocks that see it), one program per query block computes dq (sweeping the key blocks it sees); each
recomputes p from the stored lse. Nothing is accumulated across programs: no atomics, deterministic, and the
extra memory is lse and Δ (O(B·H·S)).

Dropout on the attention probabilities (DROPOUT, rate p̂ = t / 2¹⁶ as kernels/dropout.py rounds it): with
keep_ij = [u(seed, (bh·S + i)·S + j) ≥ t], the mask of element (i, j) of head bh (b·Hq + h) drawn as dropout's
keep_mask draws it (nothing stored; each kernel draws the same mask again) and κ = 1 / (1 − p̂):
    forward:   o = κ · (keep ⊙ 2^(z − m)) v / l          (l and lse sum the probabilities before the dropout)
    backward:  dv = κ · (keep ⊙ p)ᵀ do     dp = κ · keep ⊙ (do vᵀ)     ds = p ⊙ (dp − Δ)   (Δ = rowsum(o ⊙ do) still)

Grouped-query attention: q [B, Hq, S, D], k, v [B, Hkv, S, D] with Hq = G·Hkv; query head h reads kv head h // G,
and the dk/dv program of a kv head loops over its G query heads (no repeated K/V in memory).
Every tensor is read through its four strides (views of a fused QKV projection need no copy). The head dim D
(a multiple of 8, at most 256) is padded to the next power of two with masks; float32 statistics and
accumulators for every input dtype; products of float32 inputs are true float32 unless torch allows TF32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._runtime import cdiv, interpreter_active, new_empty, next_power_of_2
from ._tiles import autotune_enabled, launch_tuned
from .dropout import keep_mask, philox_key, threshold_and_scale
from .matmul import _input_precision, _load_tile

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _visible_keys(S, start_m, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(end of the unmasked key blocks, end of the masked ones) for the query block at start_m: causal, every key
    before the block's first query is seen by all its rows, the diagonal block needs the mask; otherwise every
    whole key block is unmasked and the partial last one is masked."""
    if CAUSAL:
        return start_m, tl.minimum(start_m + BLOCK_M, S)
    else:
        return S - S % BLOCK_N, S


@triton.jit
def _visible(queries, keys, in_range, CAUSAL: tl.constexpr):
    """Mask of the (query, key) pairs that count: in range and, when CAUSAL, key ≤ query (broadcast shapes)."""
    if CAUSAL:
        return in_range & (keys <= queries)
    else:
        return in_range


@triton.jit
def _forward_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    stride_ks,
    stride_vs,
    start,
    end,
    offs_m,
    offs_n,
    d_ok,
    S,
    qk_scale,
    mask_rows,
    key,
    threshold,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Fold the key blocks [start, end) into (acc, l, m): z = s·q kᵀ, m' = max(m, rowmax z),
    acc' = acc·2^(m − m') + 2^(z − m') v, l' = l·2^(m − m') + Σ 2^(z − m'). MASK: keys past S (and, causal,
    keys after the query) get z = −∞. DROPOUT: acc takes keep ⊙ 2^(z − m') (mask_rows: (bh·S + query)·S, int64)."""
    k_ptrs += start * stride_ks
    v_ptrs += start * stride_vs
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        key_ok = cols < S
        k = _load_tile(k_ptrs, key_ok, d_ok, not MASK, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if MASK:
            ok = _visible(offs_m[:, None], cols[None, :], key_ok[None, :], CAUSAL)
            qk = tl.where(ok, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, key_ok, d_ok, not MASK, EVEN_D)
        if DROPOUT:
            p = tl.where(keep_mask(key, mask_rows[:, None] + cols[None, :], threshold), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit
def _tile_ptrs(ptr, b, h, stride_b, stride_h, stride_s, stride_d, offs_s, offs_d):
    """[len(offs_s), len(offs_d)] pointers to rows offs_s, columns offs_d of head h of batch b (int64 head offset)."""
    head = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    return ptr + head + offs_s[:, None] * stride_s + offs_d[None, :] * stride_d


@triton.jit
def _query_block(
    H, GROUP, S, D, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    """This program's query block on the grid (query blocks, B·H): (b·H + h, b, h, kv head, first query, query
    offsets, which are < S, key offsets of one block, head-dim offsets, which are < D). Causal runs the last
    (longest) query blocks first."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return bh, bh // H, h, h // GROUP, start_m, offs_m, offs_m < S, tl.arange(0, BLOCK_N), offs_d, offs_d < D


@triton.jit(do_not_specialize=["seed", "threshold"])
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    H,
    GROUP,
    S,
    D,
    qk_scale,
    seed,
    threshold,
    keep_scale,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr = False,
    SEED_IN_MEMORY: tl.constexpr = False,
):
    """o = softmax(c·q kᵀ) v for one block of BLOCK_M queries of one head, and lse = m + log2 l per query
    (base-2 scores s·q kᵀ, s = c·log2 e). Grid (query blocks, B·H): the query blocks of one head run side by side
    and share its K, V in L2; causal launches the longest rows (last blocks) first."""
    bh, b, h, hk, start_m, offs_m, row_ok, offs_n, offs_d, d_ok = _query_block(
        H, GROUP, S, D, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D
    )
    q = _load_tile(
        _tile_ptrs(q_ptr, b, h, stride_qb, stride_qh, stride_qs, stride_qd, offs_m, offs_d), row_ok, d_ok, False, EVEN_D
    )
    k_ptrs = _tile_ptrs(k_ptr, b, hk, stride_kb, stride_kh, stride_ks, stride_kd, offs_n, offs_d)
    v_ptrs = _tile_ptrs(v_ptr, b, hk, stride_vb, stride_vh, stride_vs, stride_vd, offs_n, offs_d)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    key = philox_key(seed, SEED_IN_MEMORY)
    mask_rows = (bh.to(tl.int64) * S + offs_m) * S
    unmasked_end, masked_end = _visible_keys(S, start_m, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _forward_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        stride_ks,
        stride_vs,
        0,
        unmasked_end,
        offs_m,
        offs_n,
        d_ok,
        S,
        qk_scale,
        mask_rows,
        key,
        threshold,
        False,
        CAUSAL,
        EVEN_D,
        BLOCK_N,
        INPUT_PRECISION,
        DROPOUT,
    )
    acc, l_i, m_i = _forward_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        stride_ks,
        stride_vs,
        unmasked_end,
        masked_end,
        offs_m,
        offs_n,
        d_ok,
        S,
        qk_scale,
        mask_rows,
        key,
        threshold,
        True,
        CAUSAL,
        EVEN_D,
        BLOCK_N,
        INPUT_PRECISION,
        DROPOUT,
    )
    if DROPOUT:
        acc = acc * keep_scale
    acc = acc / l_i[:, None]
    tl.store(lse_ptr + bh.to(tl.int64) * S + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    tl.store(
        _tile_ptrs(o_ptr, b, h, stride_ob, stride_oh, stride_os, stride_od, offs_m, offs_d),
        acc.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _delta_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dos,
    stride_dod,
    H,
    S,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Δ = rowsum(o ⊙ do) in float32 for BLOCK_M rows of one head (the backward's preprocess)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S)[:, None] & (offs_d < D)[None, :]
    o = tl.load(
        _tile_ptrs(o_ptr, b, h, stride_ob, stride_oh, stride_os, stride_od, offs_m, offs_d), mask=mask, other=0.0
    )
    do = tl.load(
        _tile_ptrs(do_ptr, b, h, stride_dob, stride_doh, stride_dos, stride_dod, offs_m, offs_d), mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * S + offs_m, delta, mask=offs_m < S)


@triton.jit
def _dkdv_blocks(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptr,
    delta_ptr,
    stride_qs,
    stride_dos,
    start,
    end,
    offs_n,
    offs_m0,
    d_ok,
    S,
    qk_scale,
    head_row,
    key,
    threshold,
    keep_scale,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Add the query blocks [start, end) to dk, dv of one key block (transposed: keys along rows):
    pᵀ = 2^(s·k qᵀ − lse), dv += pᵀ do, dsᵀ = pᵀ ⊙ (v doᵀ − Δ), dk += dsᵀ q (c applied by the caller).
    MASK: queries past S (and, causal, queries before the key) get p = 0. DROPOUT: dv takes keep ⊙ pᵀ (κ applied by
    the caller) and v doᵀ becomes κ · keep ⊙ v doᵀ (head_row: bh·S of the query head, int64)."""
    q_ptrs += start * stride_qs
    do_ptrs += start * stride_dos
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < S
        q = _load_tile(q_ptrs, row_ok, d_ok, not MASK, EVEN_D)
        if MASK:
            lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + offs_m)
        zT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale - lse[None, :]
        if MASK:
            zT = tl.where(_visible(offs_m[None, :], offs_n[:, None], row_ok[None, :], CAUSAL), zT, float("-inf"))
        pT = tl.math.exp2(zT)
        do = _load_tile(do_ptrs, row_ok, d_ok, not MASK, EVEN_D)
        if DROPOUT:
            keepT = keep_mask(key, (head_row + offs_m[None, :]) * S + offs_n[:, None], threshold)
            dv = tl.dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        if MASK:
            delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        else:
            delta = tl.load(delta_ptr + offs_m)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if DROPOUT:
            dpT = tl.where(keepT, dpT * keep_scale, 0.0)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
    return dk, dv


@triton.jit(do_not_specialize=["seed", "threshold"])
def _dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dos,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    stride_dvd,
    H,
    H_KV,
    GROUP,
    S,
    D,
    qk_scale,
    scale,
    seed,
    threshold,
    keep_scale,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr = False,
    SEED_IN_MEMORY: tl.constexpr = False,
):
    """dk = c · Σ dsᵀ q and dv = Σ pᵀ do for one block of BLOCK_N keys of one kv head, summed over the GROUP query
    heads that read it and the query blocks that see it. Grid (key blocks, B·Hkv); causal key blocks near the
    start see the most queries and are launched first."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // H_KV
    hk = bh % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    key_ok = offs_n < S
    k = _load_tile(
        _tile_ptrs(k_ptr, b, hk, stride_kb, stride_kh, stride_ks, stride_kd, offs_n, offs_d),
        key_ok,
        d_ok,
        False,
        EVEN_D,
    )
    v = _load_tile(
        _tile_ptrs(v_ptr, b, hk, stride_vb, stride_vh, stride_vs, stride_vd, offs_n, offs_d),
        key_ok,
        d_ok,
        False,
        EVEN_D,
    )
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    key = philox_key(seed, SEED_IN_MEMORY)
    # Causal: queries [start_n, start_n + BLOCK_N) straddle the diagonal (masked), later whole query blocks see
    # every key of the block (unmasked), and a partial last query block is masked. Otherwise all whole blocks
    # are unmasked.
    if CAUSAL:
        first = start_n
        diagonal_end = tl.minimum(start_n + BLOCK_N, S)
    else:
        first = 0
        diagonal_end = 0
    whole_end = tl.maximum(S - S % BLOCK_M, diagonal_end)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_ptrs = _tile_ptrs(q_ptr, b, h, stride_qb, stride_qh, stride_qs, stride_qd, offs_m0, offs_d)
        do_ptrs = _tile_ptrs(do_ptr, b, h, stride_dob, stride_doh, stride_dos, stride_dod, offs_m0, offs_d)
        row = (b * H + h).to(tl.int64) * S
        if CAUSAL:
            dk, dv = _dkdv_blocks(
                dk,
                dv,
                k,
                v,
                q_ptrs,
                do_ptrs,
                lse_ptr + row,
                delta_ptr + row,
                stride_qs,
                stride_dos,
                first,
                diagonal_end,
                offs_n,
                offs_m0,
                d_ok,
                S,
                qk_scale,
                row,
                key,
                threshold,
                keep_scale,
                True,
                CAUSAL,
                EVEN_D,
                BLOCK_M,
                INPUT_PRECISION,
                DROPOUT,
            )
        dk, dv = _dkdv_blocks(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptr + row,
            delta_ptr + row,
            stride_qs,
            stride_dos,
            diagonal_end,
            whole_end,
            offs_n,
            offs_m0,
            d_ok,
            S,
            qk_scale,
            row,
            key,
            threshold,
            keep_scale,
            False,
            CAUSAL,
            EVEN_D,
            BLOCK_M,
            INPUT_PRECISION,
            DROPOUT,
        )
        dk, dv = _dkdv_blocks(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptr + row,
            delta_ptr + row,
            stride_qs,
            stride_dos,
            whole_end,
            S,
            offs_n,
            offs_m0,
            d_ok,
            S,
            qk_scale,
            row,
            key,
            threshold,
            keep_scale,
            True,
            CAUSAL,
            EVEN_D,
            BLOCK_M,
            INPUT_PRECISION,
            DROPOUT,
        )
    mask = key_ok[:, None] & d_ok[None, :]
    tl.store(
        _tile_ptrs(dk_ptr, b, hk, stride_dkb, stride_dkh, stride_dks, stride_dkd, offs_n, offs_d),
        (dk * scale).to(dk_ptr.dtype.element_ty),
        mask=mask,
    )
    if DROPOUT:
        dv = dv * keep_scale
    tl.store(
        _tile_ptrs(dv_ptr, b, hk, stride_dvb, stride_dvh, stride_dvs, stride_dvd, offs_n, offs_d),
        dv.to(dv_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _dq_blocks(
    dq,
    q,
    do,
    lse,
    delta,
    k_ptrs,
    v_ptrs,
    stride_ks,
    stride_vs,
    start,
    end,
    offs_m,
    offs_n,
    d_ok,
    S,
    qk_scale,
    mask_rows,
    key,
    threshold,
    keep_scale,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Add the key blocks [start, end) to dq of one query block: p = 2^(s·q kᵀ − lse), ds = p ⊙ (do vᵀ − Δ),
    dq += ds k (c applied by the caller). MASK: keys past S (and, causal, keys after the query) get p = 0.
    DROPOUT: do vᵀ becomes κ · keep ⊙ do vᵀ (mask_rows: (bh·S + query)·S, int64)."""
    k_ptrs += start * stride_ks
    v_ptrs += start * stride_vs
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        key_ok = cols < S
        k = _load_tile(k_ptrs, key_ok, d_ok, not MASK, EVEN_D)
        z = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale - lse[:, None]
        if MASK:
            z = tl.where(_visible(offs_m[:, None], cols[None, :], key_ok[None, :], CAUSAL), z, float("-inf"))
        p = tl.math.exp2(z)
        v = _load_tile(v_ptrs, key_ok, d_ok, not MASK, EVEN_D)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if DROPOUT:
            dp = tl.where(keep_mask(key, mask_rows[:, None] + cols[None, :], threshold), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return dq


@triton.jit(do_not_specialize=["seed", "threshold"])
def _dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dos,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqs,
    stride_dqd,
    H,
    GROUP,
    S,
    D,
    qk_scale,
    scale,
    seed,
    threshold,
    keep_scale,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr = False,
    SEED_IN_MEMORY: tl.constexpr = False,
):
    """dq = c · Σ_j ds k for one block of BLOCK_M queries of one head, ds = p ⊙ (do vᵀ − Δ) recomputed from lse.
    Grid and launch order as the forward's."""
    bh, b, h, hk, start_m, offs_m, row_ok, offs_n, offs_d, d_ok = _query_block(
        H, GROUP, S, D, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D
    )
    q = _load_tile(
        _tile_ptrs(q_ptr, b, h, stride_qb, stride_qh, stride_qs, stride_qd, offs_m, offs_d), row_ok, d_ok, False, EVEN_D
    )
    do = _load_tile(
        _tile_ptrs(do_ptr, b, h, stride_dob, stride_doh, stride_dos, stride_dod, offs_m, offs_d),
        row_ok,
        d_ok,
        False,
        EVEN_D,
    )
    row = bh.to(tl.int64) * S
    lse = tl.load(lse_ptr + row + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + row + offs_m, mask=row_ok, other=0.0)
    k_ptrs = _tile_ptrs(k_ptr, b, hk, stride_kb, stride_kh, stride_ks, stride_kd, offs_n, offs_d)
    v_ptrs = _tile_ptrs(v_ptr, b, hk, stride_vb, stride_vh, stride_vs, stride_vd, offs_n, offs_d)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    key = philox_key(seed, SEED_IN_MEMORY)
    mask_rows = (row + offs_m) * S
    unmasked_end, masked_end = _visible_keys(S, start_m, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_ptrs,
        v_ptrs,
        stride_ks,
        stride_vs,
        0,
        unmasked_end,
        offs_m,
        offs_n,
        d_ok,
        S,
        qk_scale,
        mask_rows,
        key,
        threshold,
        keep_scale,
        False,
        CAUSAL,
        EVEN_D,
        BLOCK_N,
        INPUT_PRECISION,
        DROPOUT,
    )
    dq = _dq_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_ptrs,
        v_ptrs,
        stride_ks,
        stride_vs,
        unmasked_end,
        masked_end,
        offs_m,
        offs_n,
        d_ok,
        S,
        qk_scale,
        mask_rows,
        key,
        threshold,
        keep_scale,
        True,
        CAUSAL,
        EVEN_D,
        BLOCK_N,
        INPUT_PRECISION,
        DROPOUT,
    )
    tl.store(
        _tile_ptrs(dq_ptr, b, h, stride_dqb, stride_dqh, stride_dqs, stride_dqd, offs_m, offs_d),
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


# ------------------------------------------------------------------------------------------------ launches


def _config(block_m: int, block_n: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


# Hopper (H100/H200) candidates per kernel, by padded head dim: (BLOCK_M, BLOCK_N, warps, stages), the first the
# default when autotuning is off. BLOCK_M is the query block and BLOCK_N the key block in every kernel; the
# forward and dq need BLOCK_M % BLOCK_N == 0 (causal diagonal), dk/dv BLOCK_N % BLOCK_M == 0.
_FORWARD_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2)],
}
_DKDV_CONFIGS = {
    64: [(64, 128, 8, 3), (32, 128, 4, 4), (64, 64, 4, 3), (32, 64, 4, 4)],
    128: [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2)],
    256: [(32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
_DQ_CONFIGS = {
    64: [(128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 4, 4), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2)],
    256: [(64, 64, 4, 2), (64, 32, 4, 2)],
}
# Under the interpreter every program runs in numpy one after another: one small fixed tile (several blocks and
# partial ones even on the tests' short sequences).
_INTERPRETER_CONFIGS = {
    "forward": _config(32, 16, 4, 1),
    "dkdv": _config(16, 32, 4, 1),
    "dq": _config(32, 16, 4, 1),
}
_TABLES = {"forward": _FORWARD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}


def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def configs(kernel: str, d: int, s: int, element_size: int = 2) -> list[dict]:
    """The Hopper candidates of `kernel` ("forward", "dkdv", "dq") for head dim d and sequence length s: those of
    the smallest table head dim ≥ the padded one, without blocks longer than max(64, the sequence rounded
    up to a power of two). 4-byte inputs get half-size blocks on 4 warps without pipelining (the 16-bit tiles'
    buffers would not fit Hopper's 228 KB of shared memory twice over)."""
    table = _TABLES[kernel]
    block_d = _block_d(d)
    rows = table[min((dim for dim in table if dim >= block_d), default=max(table))]
    limit = max(64, next_power_of_2(s))
    fits = [r for r in rows if max(r[0], r[1]) <= limit] or [min(rows, key=lambda r: r[0] * r[1])]
    if element_size == 4:
        fits = list(dict.fromkeys((max(16, m // 2), max(16, n // 2), 4, 1) for m, n, _, _ in fits))
    return [_config(*r) for r in fits]


def _launch(name: str, kernel, grid, args: tuple, flags: dict, key: tuple, meta: dict | None) -> None:
    """kernel[grid(cfg)](*args, **flags, **cfg) with cfg: meta when given, else the interpreter's tile, the default
    tile (TRIFORMER_AUTOTUNE=0) or the tuner's pick for this key (b, h, h_kv, s, d, dtype, causal)."""

    def run(cfg):
        launch(kernel, grid(cfg), *args, **flags, **cfg)

    if meta is not None:
        run(meta)
    elif interpreter_active():
        run(_INTERPRETER_CONFIGS[name])
    else:
        candidates = configs(name, key[4], key[3], key[5].itemsize)
        if autotune_enabled():
            launch_tuned((f"attention.{name}", *key), lambda: candidates, run)
        else:
            run(candidates[0])


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def _common_flags(q: torch.Tensor, causal: bool) -> dict:
    d = q.shape[-1]
    return {
        "CAUSAL": causal,
        "EVEN_D": d == _block_d(d),
        "INPUT_PRECISION": _input_precision(q.dtype),
        "BLOCK_D": _block_d(d),
    }


def _key(q: torch.Tensor, k: torch.Tensor, causal: bool, dropout: dict) -> tuple:
    b, h, s, d = q.shape
    return (b, h, k.shape[1], s, d, q.dtype, causal, dropout["DROPOUT"])


def _dropout(dropout_p: float, seed) -> tuple[tuple, dict]:
    """(the kernels' runtime dropout arguments (seed, threshold, κ), their flags) for rate dropout_p and seed (an int,
    or a one-element integer tensor on the inputs' device, which the kernels read); no dropout where p̂ = 0."""
    threshold, keep_scale = threshold_and_scale(dropout_p)
    if threshold == 0:
        return (0, 0, 1.0), {"DROPOUT": False, "SEED_IN_MEMORY": False}
    return (seed, threshold, keep_scale), {"DROPOUT": True, "SEED_IN_MEMORY": isinstance(seed, torch.Tensor)}


def sequence_major_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor of t's shape [B, H, S, D] and dtype laid out as [B, S, H, D]: the layout of o and of
    dq, dk, dv (heads side by side, as a fused projection's input and output lie; what a fake implementation must
    return too)."""
    b, h, s, d = t.shape
    return new_empty((b, s, h, d), like=t).transpose(1, 2)


def gradient_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialized gradient for q, k or v: contiguous for a contiguous input (a leaf's .grad then takes it as it
    is), else laid out as [B, S, H, D] (sequence_major_like: views of a fused projection's output, whose gradient is
    then one concatenation of whole rows)."""
    return new_empty(t.shape, like=t) if t.is_contiguous() else sequence_major_like(t)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    meta: dict | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
):
    """(o [B, Hq, S, D] in q's dtype, lse [B, Hq, S] float32 in base 2) for validated inputs; o lies in memory as
    [B, S, Hq, D] (o.transpose(1, 2) is contiguous: the heads side by side, as the output projection reads them, with
    no copy). meta: a launch config to use instead of the tuner's pick (tests check each candidate). dropout_p, seed:
    dropout on the probabilities (see the module doc; seed an int or a one-element integer tensor on q's device)."""
    b, h, s, d = q.shape
    o = sequence_major_like(q)
    lse = new_empty((b, h, s), like=q, dtype=torch.float32)
    if not (b and s):  # an empty batch or sequence: nothing to compute
        return o, lse
    dropout_args, dropout_flags = _dropout(dropout_p, seed)
    args = (
        q,
        k,
        v,
        o,
        lse,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(o),
        h,
        h // k.shape[1],
        s,
        d,
        scale * LOG2E,
        *dropout_args,
    )
    _launch(
        "forward",
        _forward_kernel,
        lambda cfg: (cdiv(s, cfg["BLOCK_M"]), b * h),
        args,
        {**_common_flags(q, causal), **dropout_flags},
        _key(q, k, causal, dropout_flags),
        meta,
    )
    return o, lse


_DELTA_ROWS = 64


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    need_dq: bool = True,
    need_dkdv: bool = True,
    meta_dkdv: dict | None = None,
    meta_dq: dict | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
):
    """(dq, dk, dv) of attention_forward's output for the incoming gradient do (any strides), each laid out as
    gradient_like gives; None where not needed. meta_dkdv, meta_dq: launch configs to use instead of the tuner's
    picks. dropout_p, seed: the forward's."""
    b, h, s, d = q.shape
    h_kv = k.shape[1]
    group = h // h_kv
    if not (b and s):  # an empty batch or sequence: empty gradients
        return (
            gradient_like(q) if need_dq else None,
            gradient_like(k) if need_dkdv else None,
            gradient_like(v) if need_dkdv else None,
        )
    delta = new_empty((b, h, s), like=q, dtype=torch.float32)
    block_d = _block_d(d)
    launch(
        _delta_kernel,
        (cdiv(s, _DELTA_ROWS), b * h),
        o,
        do,
        delta,
        *_strides(o),
        *_strides(do),
        h,
        s,
        d,
        BLOCK_M=_DELTA_ROWS,
        BLOCK_D=block_d,
        num_warps=4,
    )
    dropout_args, dropout_flags = _dropout(dropout_p, seed)
    flags, key = {**_common_flags(q, causal), **dropout_flags}, _key(q, k, causal, dropout_flags)
    dq = dk = dv = None
    if need_dkdv:
        dk, dv = gradient_like(k), gradient_like(v)
        args = (
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(do),
            *_strides(dk),
            *_strides(dv),
            h,
            h_kv,
            group,
            s,
            d,
            scale * LOG2E,
            scale,
            *dropout_args,
        )
        _launch("dkdv", _dkdv_kernel, lambda cfg: (cdiv(s, cfg["BLOCK_N"]), b * h_kv), args, flags, key, meta_dkdv)
    if need_dq:
        dq = gradient_like(q)
        args = (
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(do),
            *_strides(dq),
            h,
            group,
            s,
            d,
            scale * LOG2E,
            scale,
            *dropout_args,
        )
        _launch("dq", _dq_kernel, lambda cfg: (cdiv(s, cfg["BLOCK_M"]), b * h), args, flags, key, meta_dq)
    return dq, dk, dv


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
