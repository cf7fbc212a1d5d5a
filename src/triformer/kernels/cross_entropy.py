"""Cross-entropy over the last dimension of logits, with the gradient computed in the same kernel.

Per row x (V logits) with target t and label smoothing ε (as torch defines it):

    lse = log Σ_j e^(x_j) = m + log s                     (m = max x, s online over blocks of V, see _rows.py)
    loss = (1 − ε) · (lse − x_t) + ε · (lse − Σ_j x_j / V)
    ∂loss/∂x_j = softmax(x)_j − ε / V − (1 − ε) · [j = t]

Every difference of logits is formed before anything is added to it — (m − x_t) + log s, e^((x − m) − log s),
Σ_j (x_j − x_0) with x_0 the row's first logit — so logits of ±1e4 lose nothing to float32 rounding.

Rows whose target is ignore_index have loss 0 and gradient 0 (their logits are never read); a target outside
[0, V) gives its row a NaN loss and gradient (checked on the device: nothing waits for the check, so a CUDA graph
captures it). A small kernel (count_targets) counts the valid targets and those out of range and keeps the first
of these, for the caller to report. The main kernel makes two passes over a row: the online max and sum (plus Σx
when ε > 0), then, when a gradient is wanted, the gradient times `scale` (1 / number of non-ignored rows for
reduction="mean", read from device memory so the host never waits; 1 otherwise). The gradient may be written
into the logits' own storage (grad_ptr == logits_ptr: each element is read before the same program overwrites
it). The backward then only multiplies it by the incoming gradient, skipping the pass entirely where that is
exactly 1 (the usual loss.backward()).

Wide rows (a GPT's logits, a fused linear + CE chunk) get the same kernel one row a program, on a wider vocabulary
block and more warps: more loads in flight per SM is what keeps the memory busy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._rows import online_softmax_update, row_tiling
from ._runtime import cdiv, device_properties, interpreter_active, new_empty, next_power_of_2

# The usual tiling's vocabulary block per loop step, on 16 warps (16 logits a thread), for rows of one block or more
# that do not take one row a program (see below): large blocks keep fewer rows in flight, so a row's second read
# (the gradient pass) more often finds it in L2.
_BLOCK_V = 8192
_WIDE_ROW_WARPS = 16
# Targets per step (and warps) of the one-program count of valid and out-of-range targets (one launch instead of
# torch's seven): each step is one dependent load, so the blocks are wide.
_COUNT_BLOCK, _COUNT_WARPS = 4096, 8


# Wide rows (a GPT's or a fused linear + CE chunk's logits) take one row a program on _ONE_ROW_WARPS warps, a
# vocabulary block of _ONE_ROW_BLOCK_V a step, or _ONE_ROW_WIDE_BLOCK_V where the programs are few (at most one a SM,
# or fewer than _FEW_ROWS_PER_SM a SM over a vocabulary of more than two wide blocks): more bytes in flight per SM.
# Rows of _ONE_ROW_MIN_V logits or more take it whatever their number; rows of _BLOCK_V or more only when few (rows of
# one launch). (Measurements: reports/NOTES.md, "Cross-entropy tiling", 2026-12-07 fifth session.)
_ONE_ROW_BLOCK_V, _ONE_ROW_WIDE_BLOCK_V, _ONE_ROW_WARPS = 16384, 32768, 32
_ONE_ROW_MIN_V = 16384
_FEW_ROWS_PER_SM = 4
FORCED_ONE_ROW: bool | None = None  # True / False: every one-launch call takes / never takes it (tests, tools)
FORCED_ONE_ROW_BLOCK_V: int | None = None  # its block, whatever the rows (tools)


def one_row_tiling(m: int, v: int, device: torch.device) -> bool:
    """Whether m rows of v logits take one row a program (see _ONE_ROW_MIN_V); never through the interpreter unless
    forced (FORCED_ONE_ROW)."""
    if FORCED_ONE_ROW is not None:
        return FORCED_ONE_ROW
    if interpreter_active() or m == 0 or v < _BLOCK_V:
        return False
    return v >= _ONE_ROW_MIN_V or m < _FEW_ROWS_PER_SM * device_properties(device).multi_processor_count


def one_row_block(m: int, v: int, sms: int | None, smooth: bool = False) -> int:
    """The vocabulary block of one row a program for m rows of v logits on sms SMs (None: many rows); never the wide
    block with label smoothing (its Σx spills a register on sm_90)."""
    if FORCED_ONE_ROW_BLOCK_V is not None:
        block = FORCED_ONE_ROW_BLOCK_V
    elif smooth or sms is None:
        block = _ONE_ROW_BLOCK_V
    elif m <= sms or (m < _FEW_ROWS_PER_SM * sms and v > 2 * _ONE_ROW_WIDE_BLOCK_V):
        block = _ONE_ROW_WIDE_BLOCK_V
    else:
        block = _ONE_ROW_BLOCK_V
    return min(block, max(16, next_power_of_2(v)))


def launch_meta(m: int, v: int, one_row: bool = False, sms: int | None = None, smooth: bool = False) -> dict:
    """The cross-entropy kernel's tiling for m rows of v logits: whole vocabulary blocks of _BLOCK_V on
    _WIDE_ROW_WARPS warps, or several narrow rows a program on at most 4 warps; one_row: one row a program, blocks of
    one_row_block(m, v, sms, smooth) on _ONE_ROW_WARPS warps."""
    if one_row:
        return {"BLOCK_M": 1, "BLOCK_N": one_row_block(m, v, sms, smooth), "num_warps": _ONE_ROW_WARPS}
    meta = row_tiling(m, v, loop=True, max_block=_BLOCK_V)
    wide = meta["BLOCK_M"] == 1 and meta["BLOCK_N"] == _BLOCK_V
    meta["num_warps"] = _WIDE_ROW_WARPS if wide else min(meta["num_warps"], 4)
    return meta


@triton.jit
def row_factor(scale, valid, out_of_range):
    """One factor a row of the gradient: scale where the target counts, 0 where it is ignored, NaN where it is out
    of range (scale: a number or one per row)."""
    return tl.where(out_of_range, float("nan"), tl.where(valid, scale, 0.0))


@triton.jit
def softmax_less_smoothing(x, m, log_s, smoothing, V, SMOOTH: tl.constexpr):
    """e^((x − m) − log s) − ε/V: a logit's gradient unless it is the target's, before its row's factor."""
    g = tl.exp((x - m) - log_s)
    if SMOOTH:
        g -= smoothing / V
    return g


@triton.jit
def target_gradient(x_t, m, log_s, factor, smoothing, V, SMOOTH: tl.constexpr):
    """The target logit's gradient (e^((x_t − m) − log s) − ε/V − (1 − ε)) · factor, per row."""
    return (softmax_less_smoothing(x_t, m, log_s, smoothing, V, SMOOTH) - (1.0 - smoothing)) * factor


@triton.jit
def row_targets(targets_ptr, rows, row_mask, V, ignore_index):
    """(each row's target t, whether it counts (not ignored), whether it is outside [0, V): NaN loss and gradient,
    count_targets keeps the first)."""
    t = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = row_mask & (t != ignore_index)
    return t, valid, valid & ((t < 0) | (t >= V))


@triton.jit
def _target_logit(x_rows, t, valid, out_of_range, stride_lv):
    """Each row's logit at its target, float32 (0 where the target is ignored or out of range); x_rows [BLOCK_M, 1]
    points at each row's first logit."""
    t_safe = tl.where(valid & ~out_of_range, t, 0)
    x_t = tl.load(x_rows + (t_safe * stride_lv)[:, None], mask=valid[:, None], other=0.0)
    return tl.sum(x_t.to(tl.float32), axis=1)


@triton.jit
def _logit_block(x_rows, start, valid, V, stride_lv, other, BLOCK_N: tl.constexpr):
    """The logits of columns [start, start + BLOCK_N) of each row [BLOCK_M, BLOCK_N], in their dtype; `other` past V
    and in rows whose target is ignored (valid false)."""
    c = start + tl.arange(0, BLOCK_N)
    mask = valid[:, None] & (c < V)[None, :]
    return tl.load(x_rows + c[None, :].to(tl.int64) * stride_lv, mask=mask, other=other)


@triton.jit
def _row_stats(x_rows, valid, x0, V, stride_lv, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SMOOTH):
    """(max m, Σ e^(x − m), Σ (x − x₀)) of each row's V logits, online over blocks."""
    cols = tl.arange(0, BLOCK_N)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, V, BLOCK_N):
        x = _logit_block(x_rows, start, valid, V, stride_lv, float("-inf"), BLOCK_N).to(tl.float32)
        m, s = online_softmax_update(m, s, x)
        if SMOOTH:
            mask = valid[:, None] & (start + cols < V)[None, :]
            sum_x += tl.sum(tl.where(mask, x - x0, 0.0), axis=1)
    return m, s, sum_x


@triton.jit
def _row_loss(m, log_s, x_t, x0, sum_x, valid, out_of_range, smoothing, V, SMOOTH: tl.constexpr):
    """Each row's loss (module doc) from its max, log s, target logit and (ε > 0) Σ (x − x₀); 0 where ignored, NaN
    where the target is out of range."""
    loss = (m - x_t) + log_s
    if SMOOTH:
        loss = (1.0 - smoothing) * loss + smoothing * ((m - tl.sum(x0, axis=1)) + log_s - sum_x / V)
    loss = tl.where(out_of_range, float("nan"), loss)
    return tl.where(valid, loss, 0.0)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    targets_ptr,
    loss_ptr,
    grad_ptr,
    n_valid_ptr,
    stats_ptr,
    M,
    V,
    stride_lm,
    stride_lv,
    stride_gm,
    stride_gv,
    ignore_index,
    smoothing,
    stride_stats,
    MEAN: tl.constexpr,
    SMOOTH: tl.constexpr,
    GRAD: tl.constexpr,
    INPLACE: tl.constexpr,
    STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """loss[row] for BLOCK_M rows and, when GRAD, scale · ∂loss/∂logits into grad (INPLACE: into the logits);
    when STORE_STATS, the row's m, log s and x_t (lse = m + log s) into stats[k · stride_stats + row], k = 0, 1, 2
    (meaningless where the target is ignored)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    t, valid, out_of_range = row_targets(targets_ptr, rows, row_mask, V, ignore_index)
    x_rows = logits_ptr + rows.to(tl.int64)[:, None] * stride_lm
    # Read before the first pass: its block reductions (barriers) then separate every warp's reads of x_t and x₀
    # from the in-place gradient writes of the second pass.
    x_t = _target_logit(x_rows, t, valid, out_of_range, stride_lv)
    x0 = tl.zeros((BLOCK_M, 1), dtype=tl.float32)  # the shift of Σ (x − x₀), read only where ε > 0 needs it
    if SMOOTH:
        x0 = tl.load(x_rows, mask=valid[:, None], other=0.0).to(tl.float32)
    m, s, sum_x = _row_stats(x_rows, valid, x0, V, stride_lv, BLOCK_M, BLOCK_N, SMOOTH)
    log_s = tl.log(s)
    loss = _row_loss(m, log_s, x_t, x0, sum_x, valid, out_of_range, smoothing, V, SMOOTH)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    if STORE_STATS:
        tl.store(stats_ptr + rows, m, mask=row_mask)
        tl.store(stats_ptr + stride_stats + rows, log_s, mask=row_mask)
        tl.store(stats_ptr + 2 * stride_stats + rows, x_t, mask=row_mask)
    if GRAD:
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.load(n_valid_ptr).to(tl.float32)
        if INPLACE:  # one pointer for reads and writes, so the compiler never assumes they do not alias
            g_rows = x_rows
        else:
            g_rows = grad_ptr + rows.to(tl.int64)[:, None] * stride_gm
        cols = tl.arange(0, BLOCK_N)
        # Every logit takes (e^((x − m) − log s) − ε/V) times one factor a row; an ignored row's logits read as 0
        # against m = log s = 0: a finite value times its factor 0.
        factor = row_factor(scale, valid, out_of_range)
        m_row = tl.where(valid, m, 0.0)
        log_s_row = tl.where(valid, log_s, 0.0)
        for start in range(0, V, BLOCK_N):
            c = start + cols
            in_row = (c < V)[None, :]
            x = _logit_block(x_rows, start, valid, V, stride_lv, 0.0, BLOCK_N).to(tl.float32)
            g = softmax_less_smoothing(x, m_row[:, None], log_s_row[:, None], smoothing, V, SMOOTH) * factor[:, None]
            tl.store(
                g_rows + c[None, :].to(tl.int64) * stride_gv,
                g.to(grad_ptr.dtype.element_ty),
                mask=row_mask[:, None] & in_row,
            )
        # The target's own term, − (1 − ε)·scale, written over the loop's value at t once every thread's stores are
        # done, from x_t in float32 (the same logit the loop read).
        tl.debug_barrier()
        g_t = target_gradient(x_t, m_row, log_s_row, factor, smoothing, V, SMOOTH)
        in_range = valid & ~out_of_range
        t_safe = tl.where(in_range, t, 0)
        tl.store(
            g_rows + (t_safe * stride_gv)[:, None],
            g_t[:, None].to(grad_ptr.dtype.element_ty),
            mask=in_range[:, None],
        )


@triton.jit
def _scale_rows_kernel(
    g_ptr,
    scale_ptr,
    targets_ptr,
    M,
    V,
    stride_gm,
    stride_gv,
    stride_s,
    ignore_index,
    HAS_TARGETS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """g[row, :] *= scale[row · stride_s], one row a program; nothing is read or written where scale is 1, nor (with
    targets) in a row whose target is ignore_index: its gradient stays 0 whatever scale is (inf or NaN included),
    as torch's."""
    row = tl.program_id(0)
    scale = tl.load(scale_ptr + row * stride_s).to(tl.float32)
    active = scale != 1.0
    if HAS_TARGETS:
        active = active & (tl.load(targets_ptr + row) != ignore_index)
    if active:
        for start in range(0, V, BLOCK_N):
            c = start + tl.arange(0, BLOCK_N)
            ptrs = g_ptr + row.to(tl.int64) * stride_gm + c.to(tl.int64) * stride_gv
            g = tl.load(ptrs, mask=c < V, other=0.0)
            tl.store(ptrs, (g.to(tl.float32) * scale).to(g_ptr.dtype.element_ty), mask=c < V)


@triton.jit
def _count_targets_kernel(targets_ptr, counts_ptr, M, V, ignore_index, BLOCK: tl.constexpr):
    """counts[0] = #{t ≠ ignore_index}, counts[1] = #{t ≠ ignore_index, t ∉ [0, V)} over M targets, counts[2] = the
    first of those out of range (0 when none is); one program."""
    valid_total = tl.zeros((BLOCK,), dtype=tl.int32)
    bad_total = tl.zeros((BLOCK,), dtype=tl.int32)
    first_bad = tl.full((BLOCK,), M, dtype=tl.int32)
    for start in range(0, M, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        t = tl.load(targets_ptr + offs, mask=offs < M, other=ignore_index)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= V))
        valid_total += valid.to(tl.int32)
        bad_total += bad.to(tl.int32)
        first_bad = tl.minimum(first_bad, tl.where(bad, offs, M))
    first = tl.min(first_bad)
    tl.store(counts_ptr, tl.sum(valid_total).to(tl.int64))
    tl.store(counts_ptr + 1, tl.sum(bad_total).to(tl.int64))
    tl.store(counts_ptr + 2, tl.load(targets_ptr + first, mask=first < M, other=0).to(tl.int64))


def count_targets(targets: torch.Tensor, v: int, ignore_index: int) -> torch.Tensor:
    """int64 [3] on targets' device: the number of targets ≠ ignore_index, the number of those outside [0, v), and
    the first of these (0 when none is), for integer targets [M]; one launch."""
    targets = targets.contiguous()  # read at unit stride
    counts = torch.empty(3, device=targets.device, dtype=torch.int64)
    launch(
        _count_targets_kernel,
        (1,),
        targets,
        counts,
        targets.shape[0],
        v,
        ignore_index,
        BLOCK=_COUNT_BLOCK,
        num_warps=_COUNT_WARPS,
    )
    return counts


def cross_entropy_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    smoothing: float,
    grad: torch.Tensor | None,
    n_chunks: int,
    n_valid: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
):
    """Per-row losses (float32 [M]) of 2-D logits [M, V] and integer targets [M] (any strides), written into `out`
    (a float32 [M] with unit stride) when given.

    grad: None for no gradient, else an [M, V] tensor (`logits` itself to overwrite the logits) that receives
    scale · ∂loss/∂logits, scale = 1 / n_valid (a 0-d device tensor, reduction="mean") or 1 (n_valid None).
    stats: None, or a float32 [3, M] with unit column stride that receives each row's max m, log s (its
    log-sum-exp is m + log s) and target logit x_t, for a later pass that recomputes the row's gradient from its
    logits (meaningless where the target is ignored).
    Rows are processed in n_chunks launches (one launch covers them all when n_chunks = 1).
    """
    m, v = logits.shape
    targets = targets.contiguous()  # the kernel reads targets[row] at unit stride
    if out is None:
        losses = new_empty((m,), like=logits, dtype=torch.float32)
    else:
        assert out.shape == (m,) and out.dtype == torch.float32 and out.stride(0) == 1, (out.shape, out.dtype)
        losses = out
    if m == 0:
        return losses
    g = logits if grad is None else grad
    launch_rows = cdiv(m, n_chunks)
    one_row = one_row_tiling(launch_rows, v, logits.device)
    sms = device_properties(logits.device).multi_processor_count if one_row and not interpreter_active() else None
    meta = launch_meta(launch_rows, v, one_row, sms, smoothing > 0)
    rows_per_chunk = cdiv(cdiv(m, n_chunks), meta["BLOCK_M"]) * meta["BLOCK_M"]
    for first in range(0, m, rows_per_chunk):
        last = min(m, first + rows_per_chunk)
        launch(
            _cross_entropy_kernel,
            (cdiv(last - first, meta["BLOCK_M"]),),
            logits[first:last],
            targets[first:last],
            losses[first:last],
            g[first:last],
            losses if n_valid is None else n_valid,
            losses if stats is None else stats[:, first:last],
            last - first,
            v,
            logits.stride(0),
            logits.stride(1),
            g.stride(0),
            g.stride(1),
            ignore_index,
            float(smoothing),
            0 if stats is None else stats.stride(0),
            MEAN=n_valid is not None,
            SMOOTH=smoothing > 0,
            GRAD=grad is not None,
            INPLACE=grad is logits,
            STORE_STATS=stats is not None,
            **meta,
        )
    return losses


def scale_rows_(
    g: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """g [M, V] *= scale in place; scale is a 0-d tensor (every row) or one value per row [M]. With targets [M]
    (contiguous), rows whose target is ignore_index are left as they are (their gradient, 0)."""
    m, v = g.shape
    if m and v:
        block = min(next_power_of_2(v), 4096)
        stride_s = 0 if scale.dim() == 0 else scale.stride(0)
        # One program a row (not one a block of a row): where scale is 1 (loss.backward() of a mean or sum), as
        # few programs as rows load it and return.
        launch(
            _scale_rows_kernel,
            (m,),
            g,
            scale,
            scale if targets is None else targets,
            m,
            v,
            g.stride(0),
            g.stride(1),
            stride_s,
            ignore_index,
            HAS_TARGETS=targets is not None,
            BLOCK_N=block,
        )
    return g
