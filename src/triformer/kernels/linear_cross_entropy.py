"""Fused linear + cross-entropy over chunks of rows: the loss of cross_entropy(x·Wᵀ + b, targets) and the gradients
of x, W and b, without the full [N, V] logits ever in memory.

Per chunk of C rows (x_c [C, H], targets t_c), every product on triformer's kernels:

    Z_c = x_c·Wᵀ + b               matmul.py (on Hopper its TMA kernel)                      [C, V], x's dtype
    loss_c, G_c = CE(Z_c, t_c)     cross_entropy.py's kernel; G_c = ∂loss_c/∂Z_c is written over Z_c
    G_c ⊙= s_c                     the per-row incoming gradient (reduction="none", in its backward)
    dx_c = G_c·W                   matmul.py, copied into dx's rows
    dW = α·G_cᵀ·x_c (+ dW)         this file's product, accumulated across chunks in W's dtype
    db += Σ_rows G_c               reductions.py's column_sum, float32

α (a device scalar: 1 / number of non-ignored targets for reduction="mean") is folded into the dW product's
epilogue, so no pass ever rescales dW; dx and db, both small, take it together with the incoming gradient in the
backward.

dW in float32 precision (16-bit W, several chunks): instead of a float32 [V, H] buffer, the row chunks keep each
row's softmax statistics (its max m, log s with lse = m + log s, and the target logit x_t as the chunk read it:
float32 [3, N]) and a second pass goes over slabs of the vocabulary, columns v of one slab at a time (the slab's
[N, |v|] logits about as large as a row chunk's):

    Z_v = x·W_vᵀ + b_v             matmul.py                                                 [N, |v|]
    G_v = (e^((Z_v − m) − log s) − ε/V − (1 − ε)·[v = t]) ⊙ s      _slab_grad_kernel, over Z_v
    dW_v = α·G_vᵀ·x                this file's product: every row summed in one float32 accumulator, rounded once
    db_v = Σ_rows G_v              column_sum, float32

The target's own term takes the stored x_t rather than the recomputed logit: a product of another shape may round
a logit differently by one unit of x's dtype, which the target term of a confident row (e^(x_t − lse) − 1 ≈ 0)
would magnify; elsewhere such a difference moves a probability by as little as rounding the gradient does. One
more product (8·N·H·V FLOPs in all against 6) for no float32 buffer and no read-modify-write of dW per chunk. Peak
extra memory: one chunk's or slab's logits plus the gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import matmul_tma
from ._launch import launch
from ._runtime import cdiv, device_properties, interpreter_active, new_empty
from ._tiles import fitting_configs, fixed_config, grouped_tile, launch_tuned, row_major_tile
from ._tma import load_tile, operand_descriptors, tile_counts, use_descriptor_memory
from .cross_entropy import (
    cross_entropy_forward,
    row_factor,
    row_targets,
    scale_rows_,
    softmax_less_smoothing,
    target_gradient,
)
from .matmul import matmul
from .reductions import column_sum

# Default chunk: its logits are at most 1/CHUNK_FRACTION of the full logits and at most CHUNK_MAX_BYTES, in whole
# 128-row tiles when there are that many rows (N = 8192: 1024 rows, for V = 50304 as for V = 128256 in bf16).
CHUNK_FRACTION = 8
CHUNK_MAX_BYTES = 256 * 2**20
_CHUNK_ROW_MULTIPLE = 128


def default_chunk_rows(n: int, v: int, element_size: int) -> int:
    """Rows per chunk when the caller gives none (see CHUNK_FRACTION and CHUNK_MAX_BYTES); at least 1."""
    rows = min(n // CHUNK_FRACTION, CHUNK_MAX_BYTES // max(v * element_size, 1))
    if rows >= _CHUNK_ROW_MULTIPLE:
        rows -= rows % _CHUNK_ROW_MULTIPLE
    return max(rows, 1)


@triton.jit
def _accumulate_epilogue(
    acc, rows, cols, M, N, c_ptr, d_ptr, alpha_ptr, ACCUMULATE: tl.constexpr, HAS_ALPHA: tl.constexpr
):
    """D[rows, cols] = α·acc (+ C[rows, cols] when ACCUMULATE), float32 math, for contiguous C, D [M, N]
    (C may be D: each element is read before the same program overwrites it)."""
    if HAS_ALPHA:
        acc = acc * tl.load(alpha_ptr)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(d_ptr + offsets, acc.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    alpha_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    ACCUMULATE: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One BLOCK_M×BLOCK_N tile of D = α·A·B (+ C): A [M, K], B [K, N] of any strides, K swept in BLOCK_K steps
    into a float32 accumulator; edges masked."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks.to(tl.int64)[None, :] * stride_ak
    b_ptrs = b_ptr + ks.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (cols < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _accumulate_epilogue(acc, rows, cols, M, N, c_ptr, d_ptr, alpha_ptr, ACCUMULATE, HAS_ALPHA)


@triton.jit
def _accumulate_tma_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    alpha_ptr,
    M,
    N,
    K,
    stride_a,
    stride_b,
    ACCUMULATE: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    A_TRANS: tl.constexpr,
    B_TRANS: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """D = α·A·B (+ C) on Hopper, persistent: program p computes tiles p, p + NUM_SMS, ... in grouped order.
    A and B load through TMA descriptors (row strides stride_a, stride_b, or transposed views: A_TRANS/B_TRANS,
    see _tma.operand_descriptor); the tile loop and its K loop are flattened into one software-pipelined loop."""
    a_desc, b_desc = operand_descriptors(
        a_ptr, b_ptr, M, N, K, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K, A_TRANS, B_TRANS
    )
    tiles_m, tiles_n, k_tiles = tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    # The epilogue keeps its own tile counter: the pipeliner must not see one value used by both ends.
    tile_e = tl.program_id(0) - NUM_SMS
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            a = load_tile(a_desc, pid_m * BLOCK_M, kk * BLOCK_K, A_TRANS)
            b = load_tile(b_desc, kk * BLOCK_K, pid_n * BLOCK_N, B_TRANS)
            acc = tl.dot(a, b, acc)
        tile_e += NUM_SMS
        pid_m, pid_n = grouped_tile(tile_e, tiles_m, tiles_n, GROUP_M)
        _accumulate_epilogue(
            acc,
            pid_m * BLOCK_M + tl.arange(0, BLOCK_M),
            pid_n * BLOCK_N + tl.arange(0, BLOCK_N),
            M,
            N,
            c_ptr,
            d_ptr,
            alpha_ptr,
            ACCUMULATE,
            HAS_ALPHA,
        )


@triton.jit
def _slab_grad_kernel(
    z_ptr,
    stats_ptr,
    targets_ptr,
    row_scale_ptr,
    M,
    SLAB,
    V,
    first_col,
    stride_zm,
    stride_stats,
    ignore_index,
    smoothing,
    SMOOTH: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Over a slab of logits z [M, SLAB] (vocabulary columns first_col + j, unit column stride), in place:
    G = (e^((z − m) − log s) − ε/V − (1 − ε)·[first_col + j = t]) · row_scale, per row from stats (m, log s, x_t at
    k · stride_stats + row, k = 0, 1, 2; the target's term from x_t); 0 for rows whose target is ignore_index, NaN
    for rows whose target is outside [0, V). One BLOCK_M×BLOCK_N tile a program, tiles in row-major order. Every
    logit takes (e^((z − m) − log s) − ε/V) times one factor a row (row_scale, 0 where ignored, NaN out of range);
    the target's term, from x_t, is written over it after."""
    tile_m, tile_n = row_major_tile(tl.program_id(0), SLAB, BLOCK_N)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    first = tile_n * BLOCK_N
    cols = first + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    t, valid, out_of_range = row_targets(targets_ptr, rows, row_mask, V, ignore_index)
    m = tl.load(stats_ptr + rows, mask=valid, other=0.0)
    log_s = tl.load(stats_ptr + stride_stats + rows, mask=valid, other=0.0)
    x_t = tl.load(stats_ptr + 2 * stride_stats + rows, mask=valid, other=0.0)
    scale = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    if ROW_SCALE:
        scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    factor = row_factor(scale, valid, out_of_range)
    mask = row_mask[:, None] & (cols < SLAB)[None, :]
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zm
    z = tl.load(z_rows + cols[None, :], mask=mask & valid[:, None], other=0.0).to(tl.float32)
    g = softmax_less_smoothing(z, m[:, None], log_s[:, None], smoothing, V, SMOOTH)  # ignored: z = m = log s = 0
    tl.store(z_rows + cols[None, :], (g * factor[:, None]).to(z_ptr.dtype.element_ty), mask=mask)
    # the target's term where this tile holds the target's column, once every thread's stores are done
    tl.debug_barrier()
    col_t = t - first_col
    here = valid & ~out_of_range & (col_t >= first) & (col_t < first + BLOCK_N) & (col_t < SLAB)
    g_t = target_gradient(x_t, m, log_s, factor, smoothing, V, SMOOTH)
    tl.store(z_rows + tl.where(here, col_t, 0)[:, None], g_t[:, None].to(z_ptr.dtype.element_ty), mask=here[:, None])


# The slab gradient's tile and warps (32 logits a thread; 32 rows spill registers on sm_90), the interpreter's tile.
_SLAB_BLOCK, _SLAB_WARPS = (16, 256), 4
_INTERPRETER_SLAB_BLOCK = (16, 32)


def slab_grad_(z, stats, targets, first_col, v, ignore_index, smoothing, row_scale) -> torch.Tensor:
    """z [N, SLAB] (logits of vocabulary columns first_col + j, unit column stride) becomes their cross-entropy
    gradient in place, from each row's stats (float32 [3, N] with unit column stride, as cross_entropy_forward
    stores them), contiguous targets [N] and row_scale (float32 [N]) or None; see _slab_grad_kernel."""
    m, slab = z.shape
    if m and slab:
        block_m, block_n = _INTERPRETER_SLAB_BLOCK if interpreter_active() else _SLAB_BLOCK
        launch(
            _slab_grad_kernel,
            (cdiv(m, block_m) * cdiv(slab, block_n),),
            z,
            stats,
            targets,
            stats if row_scale is None else row_scale,
            m,
            slab,
            v,
            first_col,
            z.stride(0),
            stats.stride(0),
            ignore_index,
            float(smoothing),
            SMOOTH=smoothing > 0,
            ROW_SCALE=row_scale is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=_SLAB_WARPS,
        )
    return z


def _config(bm, bn, bk, stages, warps):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps
    )


# Hopper tiles for the tuner. The epilogue holds the float32 accumulator and the loaded C tile in registers at once,
# so wide tiles get 8 warps (128×128: 64 + 64 registers a thread).
_TMA_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 64, 3, 8),
    _config(64, 256, 64, 4, 8),
    _config(64, 128, 64, 5, 4),
]
_POINTER_CONFIGS = [
    _config(128, 128, 64, 4, 8),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 5, 4),
]
# Under the interpreter every program runs in numpy one after another: one small fixed tile, no tuning.
_INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}

# Product keys whose tuning has run (on a scratch output: the tuner runs each candidate many times, and the real
# output accumulates).
_TUNED: set = set()


def _input_precision(dtype: torch.dtype) -> str:
    """Float32 products run in true fp32 unless the user allowed TF32 in torch (as matmul.py)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def launch_tma(views, c, d, alpha, meta: dict, num_sms: int) -> None:
    """D = α·A·B (+ C) with the TMA kernel, A and B as matmul_tma.tma_views gives them, on at most num_sms
    persistent programs with the tile meta."""
    (a_view, a_trans), (b_view, b_trans) = views
    M, N = d.shape
    K = a_view.shape[0] if a_trans else a_view.shape[1]
    use_descriptor_memory()
    tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
    launch(
        _accumulate_tma_kernel,
        (min(num_sms, tiles),),
        a_view,
        b_view,
        d if c is None else c,
        d,
        d if alpha is None else alpha,
        M,
        N,
        K,
        a_view.stride(0),
        b_view.stride(0),
        ACCUMULATE=c is not None,
        HAS_ALPHA=alpha is not None,
        A_TRANS=a_trans,
        B_TRANS=b_trans,
        NUM_SMS=num_sms,
        **meta,
    )


def launch_pointer(a, b, c, d, alpha, meta: dict) -> None:
    """D = α·A·B (+ C) with the pointer kernel (any strides of A and B) and the tile meta."""
    M, K = a.shape
    N = b.shape[1]
    grid = (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    launch(
        _accumulate_kernel,
        grid,
        a,
        b,
        d if c is None else c,
        d,
        d if alpha is None else alpha,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        ACCUMULATE=c is not None,
        HAS_ALPHA=alpha is not None,
        INPUT_PRECISION=_input_precision(a.dtype),
        **meta,
    )


def accumulate_product(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, d: torch.Tensor, alpha: torch.Tensor | None
) -> torch.Tensor:
    """d = α·(a @ b) + c for a [M, K], b [K, N] of any strides and contiguous c, d [M, N] (c None: nothing added;
    c may be d itself; alpha None: 1, else a float32 device scalar). Float32 accumulation, rounded once to d's
    dtype. On Hopper with 16-bit operands the persistent TMA kernel runs, else the pointer kernel."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return d
    views = matmul_tma.tma_views(a, b, d)
    if views is not None:
        num_sms = device_properties(d.device).multi_processor_count
        configs = _TMA_CONFIGS

        def run(meta, out=d):
            launch_tma(views, c, out, alpha, meta, num_sms)
    else:
        configs = _POINTER_CONFIGS

        def run(meta, out=d):
            launch_pointer(a, b, c, out, alpha, meta)

    if interpreter_active():
        run(_INTERPRETER_META)
        return d
    fixed = fixed_config(configs, None, M, N, a.element_size())
    if fixed is not None:
        run(fixed.all_kwargs())
        return d
    props = device_properties(d.device)  # a pick holds for one kind of GPU
    layout = (a.stride(), b.stride()) if views is None else (views[0][1], views[1][1])
    key = (
        "accumulate",
        views is not None,
        *layout,
        M,
        N,
        K,
        a.dtype,
        d.dtype,
        c is not None,
        alpha is not None,
        props.major,
        props.minor,
    )

    def candidates():
        return [cfg.all_kwargs() for cfg in fitting_configs(configs, M, N, a.element_size())]

    if key not in _TUNED:
        scratch = torch.empty_like(d)
        launch_tuned(key, candidates, lambda meta: run(meta, scratch))
        _TUNED.add(key)
    launch_tuned(key, candidates, run)
    return d


# A slab's width is a multiple of this many columns wherever that costs at most an eighth of the widest slab the
# memory bound allows: whole tiles of the slab's products (its logits' columns, dW's rows) and of the slab
# gradient, none mostly empty.
SLAB_COLUMN_MULTIPLE = 128


def slab_columns(n: int, v: int, chunk_rows: int) -> int:
    """Vocabulary columns per slab of the float32-dW pass: slabs whose [n, columns] logits are no larger than a chunk
    of chunk_rows rows' (so the slab pass never raises the peak memory above the chunk pass's), as few as fit, as equal
    as a width in multiples of SLAB_COLUMN_MULTIPLE allows (see there), else of 8 (16-byte rows, which the TMA kernels
    need) where 8 fit; at least 1 column."""
    budget = max(chunk_rows * v // max(n, 1), 1)
    if budget < 8:
        return cdiv(v, cdiv(v, budget))
    whole_tiles = budget >= SLAB_COLUMN_MULTIPLE and budget % SLAB_COLUMN_MULTIPLE <= budget // 8
    multiple = SLAB_COLUMN_MULTIPLE if whole_tiles else 8
    budget -= budget % multiple
    return min(v, cdiv(cdiv(v, cdiv(v, budget)), multiple) * multiple)


def last_slab_workspace(dw: torch.Tensor, last_slab_row: int, floats: int) -> tuple:
    """(float32 [floats] at the end of dW's memory, the memory before it) when it lies within dW's rows from
    last_slab_row on, which the slab pass writes last (after its last read of the workspace); (None, all of dW's
    memory) when those rows lack room. dw: contiguous [V, H]."""
    flat = dw.view(-1)
    elements = floats * 4 // dw.element_size()
    start = (flat.numel() - elements) // 8 * 8  # 16-byte aligned for a 16-bit dW (and a 4-byte one)
    if floats * 4 % dw.element_size() or start < last_slab_row * dw.shape[1]:
        return None, flat
    return flat[start : start + elements].view(torch.float32), flat[:start]


def chunked_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    smoothing: float,
    chunk_rows: int,
    need: tuple,
    alpha: torch.Tensor | None,
    float32_dw: bool,
    row_scale: torch.Tensor | None = None,
    row_losses: bool = True,
):
    """The chunk loop (and, for float32_dw, the slab pass) of the module doc for x [N, H], weight [V, H], bias [V]
    or None, contiguous targets [N].

    need = (dx, dW, db) wanted. Returns (per-row losses float32 [N], dx [N, H] unscaled, dW [V, H] in weight's
    dtype with α folded in, db float32 [V] unscaled); None for a gradient not wanted. row_losses False: the sum of
    the losses (a float32 0-d tensor) instead of the per-row losses. float32_dw: dW in float32 precision (rounded
    once) when it would otherwise be summed over several chunks in a 16-bit dtype: by the slab pass; else dW
    accumulates in itself. row_scale: float32 [N] multiplying each row's logit gradient before the products. A
    target out of range gives its row a NaN loss and gradient (see cross_entropy.py; cross_entropy.count_targets
    finds it).

    Until the slab pass writes them, dW's rows hold what the chunks leave for it: the rows' stats and (row_losses
    False) the per-row losses in its last slab's rows, and before them the chunk products' scratch: the logits and
    dx products' split-K partials and TMA descriptors (which would otherwise be new memory at the peak).
    """
    n, h = x.shape
    v = weight.shape[0]
    need_dx, need_dw, need_db = need
    starts = range(0, n, chunk_rows)
    slabs = need_dw and float32_dw and weight.dtype != torch.float32 and len(starts) > 1
    chunk_dw, chunk_db = need_dw and not slabs, need_db and not slabs  # summed over the row chunks
    chunk_grad = need_dx or chunk_dw or chunk_db
    dx = new_empty((n, h), like=x) if need_dx else None
    dw = (new_empty((v, h), like=weight) if n else weight.new_zeros((v, h))) if need_dw else None
    losses = stats = partials = None
    if slabs:
        width = slab_columns(n, v, chunk_rows)
        in_dw = 3 * n if row_losses else 4 * n
        workspace, partials = last_slab_workspace(dw, (v - 1) // width * width, in_dw)
        if workspace is not None:
            stats = workspace[: 3 * n].view(3, n)
            losses = None if row_losses else workspace[3 * n :]
        else:
            stats = new_empty((3, n), like=x, dtype=torch.float32)
    if losses is None:
        losses = new_empty((n,), like=x, dtype=torch.float32)
    db = None  # summed over the row chunks from the first, or written slab by slab
    if need_db and slabs:
        db = new_empty((v,), like=x, dtype=torch.float32)
    elif need_db and not n:
        db = torch.zeros(v, device=x.device, dtype=torch.float32)
    for i, start in enumerate(starts):
        stop = min(n, start + chunk_rows)
        z = matmul(x[start:stop], weight.t(), bias=bias, scratch=partials)[0]  # descriptors in dW's free memory
        cross_entropy_forward(
            z,
            targets[start:stop],
            ignore_index,
            smoothing,
            z if chunk_grad else None,
            n_chunks=1,
            stats=None if stats is None else stats[:, start:stop],
            out=losses[start:stop],
        )
        if chunk_grad and row_scale is not None:
            scale_rows_(z, row_scale[start:stop], targets[start:stop], ignore_index)
        if need_dx:
            matmul(z, weight, out=dx[start:stop], scratch=partials)
        if chunk_dw:
            accumulate_product(z.t(), x[start:stop], dw if i else None, dw, alpha)
        if chunk_db:
            sums = column_sum(z, torch.float32)
            db = sums if db is None else db.add_(sums)
        del z  # the next chunk's logits reuse its memory
    if not row_losses:
        losses = losses.sum()  # before the slab pass writes over them
    if slabs:
        for first in range(0, v, width):
            last = min(v, first + width)
            z = matmul(x, weight[first:last].t(), bias=None if bias is None else bias[first:last])[0]
            slab_grad_(z, stats, targets, first, v, ignore_index, smoothing, row_scale)
            accumulate_product(z.t(), x, None, dw[first:last], alpha)
            if need_db:
                db[first:last] = column_sum(z, torch.float32)
            del z
    return losses, dx, dw, db
