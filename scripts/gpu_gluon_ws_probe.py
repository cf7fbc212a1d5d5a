"""On a GPU host: the Gluon 128×(128+64) product of gpu_gluon_probe.py, warp-specialized. There (one partition
issuing both the TMA loads and the MMAs, all warps in lockstep at every K step) it ran at about 65 % of the
tensor-core rate on an H100 (sixth session). Here one extra warp only issues TMA loads, as far ahead as the ring
of STAGES buffers allows, and the two MMA warpgroups hand each buffer back through an `empty` mbarrier as soon as
the MMAs reading it have finished; the producer never waits for the epilogue.

    C = relu(X·Wᵀ + b)    X [M, K], W [N, K] (nn.Linear's layout), b [N]; bf16 in and out, fp32 accumulation

Step s of a program (its tiles' K steps in sequence) uses ring slot s % STAGES; its `ready` barrier completes
phase (s // STAGES) & 1 when the loads land, its `empty` barrier the same phase when the MMAs are done with it.
Printed against torch.mm, torch._addmm_activation and the library; GPU time (CUDA graph, L2 flushed). A probe,
not part of the pipeline.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from gpu_gluon_probe import _grouped  # scripts/ is on the path as scripts/<name> runs


@gluon.jit
def _load_partition(descs, rings, barriers, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N0: gl.constexpr,
                    BLOCK_N1: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """The producer warp: for every K step of the program's tiles, wait until its ring slot is empty, then load
    the X tile and the two W tiles into it (completing the slot's `ready` barrier when they land)."""
    x_desc, w_desc_0, w_desc_1 = descs
    a_ring, b0_ring, b1_ring = rings
    ready, empty = barriers
    tiles_m = gl.cdiv(M, BLOCK_M)
    tiles_n = gl.cdiv(N, BLOCK_N0 + BLOCK_N1)
    k_steps = gl.cdiv(K, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        pid_m, pid_n = _grouped(tile, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * (BLOCK_N0 + BLOCK_N1)
        for kk in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
            bar = ready.index(slot)
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc_0.block_type.nbytes + w_desc_1.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [row, kk * BLOCK_K], bar, a_ring.index(slot))
            tma.async_copy_global_to_shared(w_desc_0, [col, kk * BLOCK_K], bar, b0_ring.index(slot))
            tma.async_copy_global_to_shared(w_desc_1, [col + BLOCK_N0, kk * BLOCK_K], bar, b1_ring.index(slot))
            step += 1


@gluon.jit
def _mma_partition(descs, rings, barriers, outputs, bias_ptr, M, N, K, BLOCK_M: gl.constexpr,
                   BLOCK_N0: gl.constexpr, BLOCK_N1: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                   GROUP_M: gl.constexpr, CONSUMERS: gl.constexpr, PART: gl.constexpr):
    """One MMA partition: rows PART·ROWS to (PART + 1)·ROWS of every tile (ROWS = BLOCK_M / CONSUMERS, one
    warpgroup per 64 rows). Per K step: wait for the slot's loads, issue both MMAs, wait for the previous step's
    and hand its slot back (one arrival per partition); per tile, the epilogue of its rows."""
    a_ring, b0_ring, b1_ring = rings
    ready, empty = barriers
    c_desc_0, c_desc_1, c0_smem, c1_smem = outputs
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    WARPS: gl.constexpr = ROWS // 16
    layout0: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_N0, 16])
    layout1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_N1, 16])
    acc0 = gl.zeros((ROWS, BLOCK_N0), dtype=gl.float32, layout=layout0)
    acc1 = gl.zeros((ROWS, BLOCK_N1), dtype=gl.float32, layout=layout1)
    c0_part = c0_smem.index(PART)
    c1_part = c1_smem.index(PART)
    tiles_m = gl.cdiv(M, BLOCK_M)
    tiles_n = gl.cdiv(N, BLOCK_N0 + BLOCK_N1)
    k_steps = gl.cdiv(K, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        for kk in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            a = a_ring.index(slot).slice(PART * ROWS, ROWS)
            acc0 = warpgroup_mma(a, b0_ring.index(slot).permute((1, 0)), acc0, use_acc=kk > 0, is_async=True)
            acc1 = warpgroup_mma(a, b1_ring.index(slot).permute((1, 0)), acc1, use_acc=kk > 0, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))
            if WARPS > 4:  # two warpgroups: both past the previous step before its slot goes back (one is: a
                gl.thread_barrier()  # warpgroup MMA completes for the whole warpgroup)
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=kk > 0)
            step += 1
        pid_m, pid_n = _grouped(tile, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BLOCK_M + PART * ROWS, pid_n * (BLOCK_N0 + BLOCK_N1)
        bias0 = _bias(bias_ptr, col, N, BLOCK_N0, layout0)  # loaded while the last MMAs finish
        bias1 = _bias(bias_ptr, col + BLOCK_N0, N, BLOCK_N1, layout1)
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
        gl.thread_barrier()
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES))  # the tile's last slot
        tma.store_wait(pendings=0)  # the previous tile's stores have left c0_part and c1_part
        gl.thread_barrier()
        _store_relu(acc0, bias0, c_desc_0, c0_part, row, col)
        _store_relu(acc1, bias1, c_desc_1, c1_part, row, col + BLOCK_N0)
    tma.store_wait(pendings=0)


@gluon.jit
def _bias(bias_ptr, col, N, WIDTH: gl.constexpr, layout: gl.constexpr):
    """bias[col:col + WIDTH] in float32, zero past N, as a row of an accumulator of this layout."""
    cols = col + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    return gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)


@gluon.jit
def _store_relu(acc, bias, c_desc, c_smem, row, col):
    """C[row:, col:] = relu(acc + bias) through shared memory and a TMA store (clipped at the edges)."""
    c_smem.store(gl.maximum(acc + gl.expand_dims(bias, 0), 0.0).to(c_desc.dtype))
    fence_async_shared()
    gl.thread_barrier()  # every warp's part is in shared memory before the one bulk store reads it
    tma.async_copy_shared_to_global(c_desc, [row, col], c_smem)


@gluon.jit
def _linear_relu_ws_kernel(x_desc, w_desc_0, w_desc_1, c_desc_0, c_desc_1, bias_ptr, M, N, K,
                           BLOCK_M: gl.constexpr, BLOCK_N0: gl.constexpr, BLOCK_N1: gl.constexpr,
                           BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                           CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                           num_warps: gl.constexpr):
    """C = relu(X·Wᵀ + b) on BLOCK_M × (BLOCK_N0 + BLOCK_N1) tiles, persistent, warp-specialized (module
    docstring). CONSUMERS 1: one MMA partition of two warpgroups (num_warps 8), synchronised at every K step;
    2: two partitions of one warpgroup each (num_warps 4), each with its own half of the rows, which meet only
    at the ring's barriers."""
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    a_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    b0_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N0, BLOCK_K], w_desc_0.layout)
    b1_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N1, BLOCK_K], w_desc_1.layout)
    c0_smem = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, ROWS, BLOCK_N0], c_desc_0.layout)
    c1_smem = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, ROWS, BLOCK_N1], c_desc_1.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=CONSUMERS)
    descs = (x_desc, w_desc_0, w_desc_1)
    rings = (a_ring, b0_ring, b1_ring)
    barriers = (ready, empty)
    outputs = (c_desc_0, c_desc_1, c0_smem, c1_smem)
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_mma_partition, (descs, rings, barriers, outputs, bias_ptr, M, N, K, BLOCK_M, BLOCK_N0, BLOCK_N1,
                              BLOCK_K, STAGES, GROUP_M, 1, 0)),
            (_load_partition, (descs, rings, barriers, M, N, K, BLOCK_M, BLOCK_N0, BLOCK_N1, BLOCK_K, STAGES,
                               GROUP_M)),
        ], [1], [PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_mma_partition, (descs, rings, barriers, outputs, bias_ptr, M, N, K, BLOCK_M, BLOCK_N0, BLOCK_N1,
                              BLOCK_K, STAGES, GROUP_M, 2, 0)),
            (_mma_partition, (descs, rings, barriers, outputs, bias_ptr, M, N, K, BLOCK_M, BLOCK_N0, BLOCK_N1,
                              BLOCK_K, STAGES, GROUP_M, 2, 1)),
            (_load_partition, (descs, rings, barriers, M, N, K, BLOCK_M, BLOCK_N0, BLOCK_N1, BLOCK_K, STAGES,
                               GROUP_M)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _descriptor(t, block):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))


def linear_relu_ws(x, w, b, c, n0=128, n1=64, stages=4, consumers=1, block_k=64, consumer_regs=232,
                   producer_regs=40):
    M, K = x.shape
    N = w.shape[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, n0 + n1)
    rows = 128 // consumers
    _linear_relu_ws_kernel[(min(sms, tiles),)](
        _descriptor(x, [128, block_k]), _descriptor(w, [n0, block_k]), _descriptor(w, [n1, block_k]),
        _descriptor(c, [rows, n0]), _descriptor(c, [rows, n1]), b, M, N, K, BLOCK_M=128, BLOCK_N0=n0, BLOCK_N1=n1,
        BLOCK_K=block_k, STAGES=stages,
        GROUP_M=8, CONSUMERS=consumers, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs,
        num_warps=8 // consumers)


VARIANTS = [  # (n0, n1, stages, MMA partitions, BLOCK_K)
    (128, 64, 4, 1, 64), (128, 64, 4, 2, 64), (128, 64, 8, 2, 32), (64, 64, 6, 2, 64), (128, 128, 3, 2, 64),
    (128, 128, 6, 2, 32),
]


def main():
    from gpu_wide_tile_probe import forward_case, timed_cell

    print(torch.cuda.get_device_name(), "— relu(X·Wᵀ + b), GPU µs (÷ library in brackets: > 1 = faster)")
    for M, K, N in [(8192, 3072, 768), (16384, 3072, 768), (8192, 768, 3072), (4096, 4096, 4096), (1000, 520, 328)]:
        x, w, b, ref, c, library, cells = forward_case(M, K, N)
        for n0, n1, stages, consumers, block_k in VARIANTS:
            cells.append(timed_cell(f"ws 128x({n0}+{n1})x{block_k} s{stages} c{consumers}",
                                    lambda: linear_relu_ws(x, w, b, c, n0, n1, stages, consumers, block_k), c, ref,
                                    library))
        print(f"{M},{K},{N}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
