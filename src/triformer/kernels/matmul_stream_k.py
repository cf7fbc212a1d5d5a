"""Stream-K schedule of the Hopper product (same product and epilogue as matmul_tma.py):

    C = act(P),  P = A·B + bias[n]

The T = tiles · k_tiles K-iterations (tile-major, tiles in grouped order) are cut into one contiguous slice per
program, slice p = [⌊p·T/P⌋, ⌊(p+1)·T/P⌋), so every SM gets the same work however few tiles the product has
(Osama et al., "Stream-K", 2023). A tile whose iterations all fall in one slice is finished by that program. A
tile cut between slices gets a float32 partial sum from each program that touched it, written to that program's
slot 0 (the tile its slice starts in) or slot 1 (the tile it ends in); a second kernel adds a cut tile's partials
in program order (deterministic, no atomics) and runs the epilogue. The float32 partial tile is staged through
shared memory on its way out, so this schedule has its own, smaller tiles (STREAM_K_CONFIGS in matmul_tma.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import cdiv
from ._tiles import grouped_tile
from ._tma import load_tile, operand_descriptors, output_descriptors, store_epilogue, tile_counts


@triton.jit
def _slice_start(program, total, PROGRAMS):
    """⌊program · total / PROGRAMS⌋: the first K-iteration of a program's slice."""
    return (tl.cast(program, tl.int64) * total // PROGRAMS).to(tl.int32)


@triton.jit
def _owner(iteration, total, PROGRAMS):
    """The program whose slice holds `iteration`: ⌈(iteration + 1) · PROGRAMS / total⌉ − 1."""
    return ((tl.cast(iteration + 1, tl.int64) * PROGRAMS + total - 1) // total - 1).to(tl.int32)


@triton.jit
def _partial_offsets(slot, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets of a [BLOCK_M, BLOCK_N] float32 partial-sum slot (slots are contiguous tiles)."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    return tl.cast(slot, tl.int64) * (BLOCK_M * BLOCK_N) + rows[:, None] * BLOCK_N + cols[None, :]


@triton.jit
def _segment(program, segment, total, k_tiles, PROGRAMS):
    """(tile, first K-iteration, end K-iteration) of the segment-th tile a program's slice touches."""
    start = _slice_start(program, total, PROGRAMS)
    end = _slice_start(program + 1, total, PROGRAMS)
    tile = start // k_tiles + segment
    return tile, tl.maximum(start - tile * k_tiles, 0), tl.minimum(end - tile * k_tiles, k_tiles)


@triton.jit
def _stream_k_kernel(
    a_ptr, b_ptr, c_ptr, preact_ptr, bias_ptr, partial_ptr, M, N, K, stride_a, stride_b, PROGRAMS,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    A_TRANS: tl.constexpr, B_TRANS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
):
    """Program p walks the tiles its slice touches (segments), accumulating each one's K-iterations in the slice;
    a tile it covers whole gets the epilogue, a cut one its partial sum in slot 2p + [not the first segment].
    Segment loop and K loop are flattened into one software-pipelined loop, as in matmul_tma.py's kernel."""
    a_desc, b_desc = operand_descriptors(a_ptr, b_ptr, M, N, K, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                                         A_TRANS, B_TRANS)
    c_desc, preact_desc = output_descriptors(c_ptr, preact_ptr, M, N, BLOCK_M, BLOCK_N, STORE_PREACT, SPLIT_EPILOGUE)

    tiles_m, tiles_n, k_tiles = tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    total = tiles_m * tiles_n * k_tiles
    program = tl.program_id(0)
    start = _slice_start(program, total, PROGRAMS)
    end = _slice_start(program + 1, total, PROGRAMS)
    segments = (end - 1) // k_tiles - start // k_tiles + 1
    # The epilogue keeps its own segment counter: the pipeliner must not see one value used by both ends.
    segment_c = -1
    for segment in tl.range(0, segments, flatten=True):
        tile, k_lo, k_hi = _segment(program, segment, total, k_tiles, PROGRAMS)
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_hi - k_lo):  # from 0, as the pipeliner flattens best
            k = (k_lo + kk) * BLOCK_K
            a = load_tile(a_desc, pid_m * BLOCK_M, k, A_TRANS)
            b = load_tile(b_desc, k, pid_n * BLOCK_N, B_TRANS)
            acc = tl.dot(a, b, acc)

        segment_c += 1
        tile, k_lo, k_hi = _segment(program, segment_c, total, k_tiles, PROGRAMS)
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        if (k_lo == 0) & (k_hi == k_tiles):
            store_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, c_desc, preact_desc, bias_ptr,
                           HAS_BIAS, ACT, STORE_PREACT, SPLIT_EPILOGUE)
        else:
            slot = 2 * program + (segment_c != 0).to(tl.int32)
            tl.store(partial_ptr + _partial_offsets(slot, BLOCK_M, BLOCK_N), acc)


@triton.jit
def _stream_k_fixup_kernel(
    partial_ptr, c_ptr, preact_ptr, bias_ptr, M, N, K, PROGRAMS,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
):
    """P = Σ over the programs that cut this tile (in program order) of their partial sums; then the epilogue.
    Tiles finished by one program are left alone."""
    tiles_m, tiles_n, k_tiles = tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    total = tiles_m * tiles_n * k_tiles
    tile = tl.program_id(0)
    first = _owner(tile * k_tiles, total, PROGRAMS)
    last = _owner(tile * k_tiles + k_tiles - 1, total, PROGRAMS)
    if first != last:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for program in range(first, last + 1):
            slot = 2 * program + (_slice_start(program, total, PROGRAMS) // k_tiles != tile).to(tl.int32)
            acc += tl.load(partial_ptr + _partial_offsets(slot, BLOCK_M, BLOCK_N))
        c_desc, preact_desc = output_descriptors(c_ptr, preact_ptr, M, N, BLOCK_M, BLOCK_N, STORE_PREACT,
                                                 SPLIT_EPILOGUE)
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        store_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, c_desc, preact_desc, bias_ptr,
                       HAS_BIAS, ACT, STORE_PREACT, SPLIT_EPILOGUE)


def launch(args: tuple, flags: dict, meta: dict, num_sms: int) -> None:
    """The stream-K product for matmul_tma.launch's args (a, b, c, preact, bias, M, N, K, stride_a, stride_b) and
    flags, with tile meta; one program per SM (fewer when there are fewer K-iterations than SMs)."""
    a, b, c, preact, bias, M, N, K, stride_a, stride_b = args
    tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
    programs = min(num_sms, tiles * cdiv(K, meta["BLOCK_K"]))
    partial = torch.empty((2 * programs, meta["BLOCK_M"], meta["BLOCK_N"]), device=c.device, dtype=torch.float32)
    _stream_k_kernel[(programs,)](a, b, c, preact, bias, partial, M, N, K, stride_a, stride_b, programs,
                                  **flags, **meta)
    fixup_flags = {name: flags[name] for name in ("HAS_BIAS", "ACT", "STORE_PREACT")}
    _stream_k_fixup_kernel[(tiles,)](partial, c, preact, bias, M, N, K, programs, **fixup_flags, **meta)
