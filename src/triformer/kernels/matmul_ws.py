"""The warp-specialized Hopper product for nn.Linear's forward, written in Gluon (Triton's lower-level dialect):

    C = act(P),  P = X·Wᵀ + bias[n]          X [M, K], W [N, K] (both row-major), C (and P if STORE_PREACT) [M, N]

Why: at N = 768 a 128×256 tile leaves the second wave half empty (1.45 waves on 132 SMs) and 128×128 tiles run a
slower main loop; cuBLAS uses 128×192. Gluon keeps Triton's power-of-two shapes, so a tile here is
BLOCK_M × (BLOCK_N0 + BLOCK_N1) as two accumulators (128×(128+64): two waves at N = 768) fed by one X tile.
Written with tl.dot, two accumulators serialize their tensor-core waits; here each K step issues both warpgroup
MMAs asynchronously and waits only for the previous step's.

Partitions (gl.warp_specialize): one producer warp issues the TMA loads of every K step of the program's tiles
into a ring of STAGES shared-memory slots, as far ahead as the ring allows; two MMA partitions of one warpgroup
each consume them. Step s uses slot s % STAGES: its `ready` barrier completes phase (s // STAGES) & 1 when the
loads land; its `empty` barrier the same phase when the MMA partitions reading it are done. Two schedules:
- cooperative: each MMA partition computes 64 rows of every tile (both read every slot: `empty` takes two arrivals);
- ping-pong: the MMA partitions take the program's tiles in turns, whole, and a partition starts its K loop only
  once the other has issued its own (`turn` barriers), so one partition's epilogue runs under the other's MMAs.
The epilogue (bias, activation, bf16/fp16) goes through shared memory and TMA stores, which clip at the edges; TMA
loads zero-fill past them. Persistent: program p takes tiles p, p + P, ...

matmul_tma's tuner times these tiles beside its own where `warp_specialized_fits` holds.
Gluon has no interpreter: on the CPU this module is only compiled for sm_90 (tests/test_matmul_ws_compile.py).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import _launch
from ._tiles import grouped_tile
from .activation import apply_activation

# The CTA-wide barrier: gl.thread_barrier in triton 3.6, gl.barrier from 3.7 on.
_partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BLOCK_M, BLOCK_K = 128, 64
SCHEDULES = ("cooperative", "pingpong")  # two MMA partitions of one warpgroup each: halves of every tile, or turns
_PRODUCER_REGS, _MMA_REGS = 40, 232
GROUP_M = gl.constexpr(8)  # rows of tiles that sweep the columns together (grouped_tile)


@gluon.jit
def _load_partition(
    x_desc,
    w_desc_0,
    w_desc_1,
    a_ring,
    b0_ring,
    b1_ring,
    ready,
    empty,
    M,
    N,
    K,
    BLOCK_N0: gl.constexpr,
    BLOCK_N1: gl.constexpr,
    STAGES: gl.constexpr,
):
    """The producer warp: for every K step of the program's tiles, wait until its slot is empty, then load the X
    tile and the two W tiles into it (they complete the slot's `ready` barrier when they land)."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    tiles_m = gl.cdiv(M, BM)
    tiles_n = gl.cdiv(N, BLOCK_N0 + BLOCK_N1)
    k_steps = gl.cdiv(K, BK)
    step = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BM, pid_n * (BLOCK_N0 + BLOCK_N1)
        for kk in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
            bar = ready.index(slot)
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc_0.block_type.nbytes + w_desc_1.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [row, kk * BK], bar, a_ring.index(slot))
            tma.async_copy_global_to_shared(w_desc_0, [col, kk * BK], bar, b0_ring.index(slot))
            tma.async_copy_global_to_shared(w_desc_1, [col + BLOCK_N0, kk * BK], bar, b1_ring.index(slot))
            step += 1


@gluon.jit
def _bias_row(bias_ptr, col, N, WIDTH: gl.constexpr, layout: gl.constexpr, HAS_BIAS: gl.constexpr):
    """bias[col:col + WIDTH] in float32 (zero past N, or everywhere without a bias) as a [1, WIDTH] row."""
    cols = col + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    bias = gl.load(bias_ptr + cols, mask=(cols < N) & HAS_BIAS, other=0.0).to(gl.float32)
    return gl.expand_dims(bias, 0)


@gluon.jit
def _bias_rows(
    bias_ptr,
    col,
    N,
    BLOCK_N0: gl.constexpr,
    BLOCK_N1: gl.constexpr,
    layout0: gl.constexpr,
    layout1: gl.constexpr,
    HAS_BIAS: gl.constexpr,
):
    """The bias rows of a tile's two accumulators, whose columns start at col and col + BLOCK_N0."""
    return (
        _bias_row(bias_ptr, col, N, BLOCK_N0, layout0, HAS_BIAS),
        _bias_row(bias_ptr, col + BLOCK_N0, N, BLOCK_N1, layout1, HAS_BIAS),
    )


@gluon.jit
def _store_through(value, desc, staging, row, col):
    """desc[row:, col:] = value (cast to desc's dtype) through the staging buffer and one TMA store."""
    staging.store(value.to(desc.dtype))
    fence_async_shared()
    _partition_barrier()  # every warp's part is in shared memory before the bulk store reads it
    tma.async_copy_shared_to_global(desc, [row, col], staging)


@gluon.jit
def _epilogue(
    p, c_desc, preact_desc, staging, row, col, ACT: gl.constexpr, STORE_PREACT: gl.constexpr, OWN_STAGING: gl.constexpr
):
    """C = act(P) (and the preactivation P itself when STORE_PREACT) for one accumulator's block, through a staging
    buffer of its own (OWN_STAGING) or one the partition's other accumulator uses too."""
    # This staging buffer's previous store has left. Bulk stores complete in order: with a buffer of its own, those
    # issued since (the other buffer's: one, or two with the preactivation) may still be in flight.
    tma.store_wait(pendings=(2 if STORE_PREACT else 1) if OWN_STAGING else 0)
    _partition_barrier()
    if STORE_PREACT:
        _store_through(p, preact_desc, staging, row, col)
        tma.store_wait(pendings=0)
        _partition_barrier()
    _store_through(apply_activation(p, ACT), c_desc, staging, row, col)


@gluon.jit
def _mma_partition(
    outputs,
    a_ring,
    b0_ring,
    b1_ring,
    ready,
    empty,
    turn,
    bias_ptr,
    M,
    N,
    K,
    BLOCK_N0: gl.constexpr,
    BLOCK_N1: gl.constexpr,
    STAGES: gl.constexpr,
    PART: gl.constexpr,
    PINGPONG: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    ACT: gl.constexpr,
    STORE_PREACT: gl.constexpr,
):
    """MMA partition PART. Cooperative: rows PART·ROWS to (PART + 1)·ROWS of every tile. PINGPONG: every other tile
    of the program, whole, its K loop started only when the other partition has issued its own (`turn`), so that
    one partition's epilogue runs under the other's MMAs. Per K step: wait for the slot's loads, issue both MMAs,
    wait for the previous step's and give its slot back; per tile, the epilogue."""
    c_desc_0, c_desc_1, preact_desc_0, preact_desc_1, staging_0, staging_1 = outputs
    BM: gl.constexpr = a_ring.type.shape[1]
    ROWS: gl.constexpr = c_desc_0.block_type.shape[0]
    FIRST_ROW: gl.constexpr = 0 if PINGPONG else PART * ROWS
    layout0: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N0, 16]
    )
    layout1: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N1, 16]
    )
    acc0 = gl.zeros((ROWS, BLOCK_N0), dtype=gl.float32, layout=layout0)
    acc1 = gl.zeros((ROWS, BLOCK_N1), dtype=gl.float32, layout=layout1)
    tiles_m = gl.cdiv(M, BM)
    tiles_n = gl.cdiv(N, BLOCK_N0 + BLOCK_N1)
    k_steps = gl.cdiv(K, a_ring.type.shape[2])
    first, stride = gl.program_id(0), gl.num_programs(0)
    if PINGPONG:
        first, stride = first + PART * stride, 2 * stride
    turns = 0
    for tile in range(first, tiles_m * tiles_n, stride):
        step = (tile - gl.program_id(0)) // gl.num_programs(0) * k_steps  # the ring's steps run over all tiles
        if PINGPONG:  # partition 0 starts; then each waits for the other's K loop (phase 1 passes a fresh barrier).
            # This also keeps a partition from waiting on a slot's `ready` barrier two phases early, which a parity
            # wait could not tell from the phase it wants.
            mbarrier.wait(turn.index(PART), (turns & 1) ^ (1 - PART))
        for kk in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            a = a_ring.index(slot).slice(FIRST_ROW, ROWS)
            acc0 = warpgroup_mma(a, b0_ring.index(slot).permute((1, 0)), acc0, use_acc=kk > 0, is_async=True)
            acc1 = warpgroup_mma(a, b1_ring.index(slot).permute((1, 0)), acc1, use_acc=kk > 0, is_async=True)
            # The previous step's MMAs are done (for the whole warpgroup): its slot goes back.
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=kk > 0)
            step += 1
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - PART))
            turns += 1
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BM + FIRST_ROW, pid_n * (BLOCK_N0 + BLOCK_N1)
        if not PINGPONG:  # loaded while the last MMAs finish (a ping-pong tile's accumulators leave no room)
            bias0, bias1 = _bias_rows(bias_ptr, col, N, BLOCK_N0, BLOCK_N1, layout0, layout1, HAS_BIAS)
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES))  # the tile's last slot
        if PINGPONG:
            bias0, bias1 = _bias_rows(bias_ptr, col, N, BLOCK_N0, BLOCK_N1, layout0, layout1, HAS_BIAS)
        _epilogue(acc0 + bias0, c_desc_0, preact_desc_0, staging_0, row, col, ACT, STORE_PREACT, not PINGPONG)
        _epilogue(
            acc1 + bias1, c_desc_1, preact_desc_1, staging_1, row, col + BLOCK_N0, ACT, STORE_PREACT, not PINGPONG
        )
    tma.store_wait(pendings=0)


@gluon.jit
def _linear_ws_kernel(
    x_desc,
    w_desc_0,
    w_desc_1,
    c_desc_0,
    c_desc_1,
    preact_desc_0,
    preact_desc_1,
    bias_ptr,
    M,
    N,
    K,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    ACT: gl.constexpr,
    STORE_PREACT: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    MMA_REGS: gl.constexpr,
):
    """C = act(X·Wᵀ + bias) on BLOCK_M × (BLOCK_N0 + BLOCK_N1) tiles (the block shapes of w_desc_0 and w_desc_1),
    warp-specialized and persistent (module docstring); the two MMA partitions split every tile's rows, or with
    PINGPONG take turns on whole tiles (then c_desc blocks are BLOCK_M rows high, else half).
    Launched with num_warps 4: the first MMA partition."""
    BLOCK_N0: gl.constexpr = w_desc_0.block_type.shape[0]
    BLOCK_N1: gl.constexpr = w_desc_1.block_type.shape[0]
    dtype: gl.constexpr = x_desc.dtype
    a_ring = gl.allocate_shared_memory(dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    b0_ring = gl.allocate_shared_memory(dtype, [STAGES] + w_desc_0.block_type.shape, w_desc_0.layout)
    b1_ring = gl.allocate_shared_memory(dtype, [STAGES] + w_desc_1.block_type.shape, w_desc_1.layout)
    # Each MMA partition stages its blocks of the two accumulators: in a buffer each, or with PINGPONG (whose
    # epilogues run under the other partition's MMAs, and whose blocks are twice as high) one after the other in
    # one buffer, which leaves room for the ring.
    staging_0 = gl.allocate_shared_memory(dtype, [2] + c_desc_0.block_type.shape, c_desc_0.layout)
    if PINGPONG:  # the second accumulator's block is the first part of the partition's first buffer (N1 ≤ N0)
        FIRST_BLOCKS: gl.constexpr = [BLOCK_N0 // BLOCK_N1] + c_desc_1.block_type.shape
        staging_1_0 = staging_0.index(0)._reinterpret(dtype, FIRST_BLOCKS, c_desc_1.layout).index(0)
        staging_1_1 = staging_0.index(1)._reinterpret(dtype, FIRST_BLOCKS, c_desc_1.layout).index(0)
    else:
        staging_1 = gl.allocate_shared_memory(dtype, [2] + c_desc_1.block_type.shape, c_desc_1.layout)
        staging_1_0, staging_1_1 = staging_1.index(0), staging_1.index(1)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1 if PINGPONG else 2)  # one arrival from each partition reading it
    for p in gl.static_range(2):
        mbarrier.init(turn.index(p), count=1)
    outputs_0 = (c_desc_0, c_desc_1, preact_desc_0, preact_desc_1, staging_0.index(0), staging_1_0)
    outputs_1 = (c_desc_0, c_desc_1, preact_desc_0, preact_desc_1, staging_0.index(1), staging_1_1)
    gl.warp_specialize(
        [
            (
                _mma_partition,
                (
                    outputs_0,
                    a_ring,
                    b0_ring,
                    b1_ring,
                    ready,
                    empty,
                    turn,
                    bias_ptr,
                    M,
                    N,
                    K,
                    BLOCK_N0,
                    BLOCK_N1,
                    STAGES,
                    0,
                    PINGPONG,
                    HAS_BIAS,
                    ACT,
                    STORE_PREACT,
                ),
            ),
            (
                _mma_partition,
                (
                    outputs_1,
                    a_ring,
                    b0_ring,
                    b1_ring,
                    ready,
                    empty,
                    turn,
                    bias_ptr,
                    M,
                    N,
                    K,
                    BLOCK_N0,
                    BLOCK_N1,
                    STAGES,
                    1,
                    PINGPONG,
                    HAS_BIAS,
                    ACT,
                    STORE_PREACT,
                ),
            ),
            (
                _load_partition,
                (
                    x_desc,
                    w_desc_0,
                    w_desc_1,
                    a_ring,
                    b0_ring,
                    b1_ring,
                    ready,
                    empty,
                    M,
                    N,
                    K,
                    BLOCK_N0,
                    BLOCK_N1,
                    STAGES,
                ),
            ),
        ],
        [4, 1],
        [MMA_REGS, PRODUCER_REGS],
    )


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@functools.cache
def _shared_layout(block: tuple, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The swizzled shared-memory layout of a TMA block, built once per block shape and dtype (building one is
    host work, and a launch needs up to seven descriptors)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype])


def _descriptor(t: torch.Tensor, block: list) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, block, _shared_layout(tuple(block), t.dtype))


def launch(
    x: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    preact: torch.Tensor | None,
    bias: torch.Tensor | None,
    act: int,
    config: tuple,
    num_sms: int,
) -> None:
    """c = act(x·wᵀ + bias) (preact = x·wᵀ + bias when given) with config = (BLOCK_N0, BLOCK_N1, STAGES, schedule)
    (matmul_tma.WARP_SPECIALIZED_CONFIGS, schedule one of SCHEDULES);
    x [M, K] and w [N, K] with TMA-addressable rows (matmul_tma.tma_views), c and preact contiguous."""
    n0, n1, stages, schedule = config
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    pingpong = schedule == "pingpong"
    if pingpong and n0 % n1:
        raise ValueError(
            f"a ping-pong tile stages its second block inside its first: BLOCK_N1 must divide BLOCK_N0, "
            f"got {n0} and {n1}"
        )
    M, K = x.shape
    N = w.shape[0]
    rows = BLOCK_M if pingpong else BLOCK_M // 2  # the rows of a tile that one MMA partition stores
    c_descs = [_descriptor(c, [rows, n]) for n in (n0, n1)]
    preact_descs = [None, None] if preact is None else [_descriptor(preact, [rows, n]) for n in (n0, n1)]
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, n0 + n1)
    _launch.launch(
        _linear_ws_kernel,
        (min(num_sms, tiles),),
        _descriptor(x, [BLOCK_M, BLOCK_K]),
        _descriptor(w, [n0, BLOCK_K]),
        _descriptor(w, [n1, BLOCK_K]),
        *c_descs,
        *preact_descs,
        c if bias is None else bias,
        M,
        N,
        K,
        STAGES=stages,
        PINGPONG=pingpong,
        HAS_BIAS=bias is not None,
        ACT=act,
        STORE_PREACT=preact is not None,
        PRODUCER_REGS=_PRODUCER_REGS,
        MMA_REGS=_MMA_REGS,
        num_warps=4,
    )
