"""On a GPU host: a Gluon (Triton's lower-level dialect, triton ≥ 3.6) product for N = 768 layers with a 128×192
tile, which Triton's tl.dot cannot give (tensor shapes are powers of two, and two tl.dot in one loop serialize
their tensor-core waits: reports/NOTES.md, fifth session). Here a tile is two accumulators, 128×128 and 128×64,
fed by one A tile; each K step issues both warpgroup MMAs asynchronously and waits only for the previous step's,
so their waits do not serialize. At 8192 rows and N = 768 that is 256 tiles, 1.94 waves on 132 SMs.

    C = relu(X·Wᵀ + b)    X [M, K], W [N, K] (nn.Linear's layout), b [N]; bf16 in and out, fp32 accumulation

Persistent: program p computes tiles p, p + P, ... in grouped order; the K steps of all its tiles form one
sequence, run through a ring of STAGES shared-memory buffers whose TMA loads are issued STAGES − 1 steps ahead
(an mbarrier per buffer says when its bytes have landed). Printed against torch.mm, torch._addmm_activation and
the library; GPU time (CUDA graph, L2 flushed). Not part of the pipeline. On an H100 (sixth session) it was
correct but slow: 79.9 µs at 8192×3072×768 against the library's 65 (all warps wait at every K step for loads
issued only STAGES − 1 steps ahead); warp-specialized, it became the library's matmul_ws.py (59 µs).
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)


@gluon.jit
def _grouped(tile, tiles_m, tiles_n, GROUP_M: gl.constexpr):
    """(row, column) of tile number `tile` in grouped order (GROUP_M rows of tiles sweep the columns together)."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    rows = gl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@gluon.jit
def _issue_loads(step, x_desc, w_desc_0, w_desc_1, a_ring, b0_ring, b1_ring, ready, first_tile, num_programs,
                 tiles_m, tiles_n, k_steps, total_steps, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N0: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr):
    """TMA loads of the program's K step `step` (if it has one) into ring slot step % STAGES."""
    slot = step % STAGES
    tile = first_tile + (step // k_steps) * num_programs
    pid_m, pid_n = _grouped(tile, tiles_m, tiles_n, GROUP_M)
    k = (step % k_steps) * BLOCK_K
    col = pid_n * (BLOCK_N0 + w_desc_1.block_type.shape[0])
    valid = step < total_steps
    bar = ready.index(slot)
    mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc_0.block_type.nbytes + w_desc_1.block_type.nbytes,
                    pred=valid)
    tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M, k], bar, a_ring.index(slot), pred=valid)
    tma.async_copy_global_to_shared(w_desc_0, [col, k], bar, b0_ring.index(slot), pred=valid)
    tma.async_copy_global_to_shared(w_desc_1, [col + BLOCK_N0, k], bar, b1_ring.index(slot), pred=valid)


@gluon.jit
def _store_part(acc, c_desc, c_smem, bias_ptr, row, col, N, layout: gl.constexpr):
    """C[row:, col:] = relu(acc + bias[col:]) through shared memory and a TMA store (clipped at the edges)."""
    cols = col + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
    bias = gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
    c_smem.store(gl.maximum(acc + gl.expand_dims(bias, 0), 0.0).to(c_desc.dtype))
    fence_async_shared()
    gl.thread_barrier()  # every warp's part is in shared memory before the one bulk store reads it
    tma.async_copy_shared_to_global(c_desc, [row, col], c_smem)


@gluon.jit
def _linear_relu_192_kernel(x_ptr, w_ptr, c_ptr, bias_ptr, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N0: gl.constexpr,
                            BLOCK_N1: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                            GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    """C = relu(X·Wᵀ + b) on BLOCK_M × (BLOCK_N0 + BLOCK_N1) tiles, persistent (see the module docstring)."""
    x_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16)
    w0_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N0, BLOCK_K], gl.bfloat16)
    w1_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N1, BLOCK_K], gl.bfloat16)
    c0_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N0], gl.bfloat16)
    c1_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N1], gl.bfloat16)
    x_desc = tma.make_tensor_descriptor(x_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K], x_layout)
    w_desc_0 = tma.make_tensor_descriptor(w_ptr, [N, K], [K, 1], [BLOCK_N0, BLOCK_K], w0_layout)
    w_desc_1 = tma.make_tensor_descriptor(w_ptr, [N, K], [K, 1], [BLOCK_N1, BLOCK_K], w1_layout)
    c_desc_0 = tma.make_tensor_descriptor(c_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N0], c0_layout)
    c_desc_1 = tma.make_tensor_descriptor(c_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N1], c1_layout)

    a_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_layout)
    b0_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N0, BLOCK_K], w0_layout)
    b1_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N1, BLOCK_K], w1_layout)
    c0_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, BLOCK_N0], c0_layout)
    c1_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, BLOCK_N1], c1_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)

    # Each warp takes 16 rows: two warpgroups of 64 rows with 8 warps.
    layout0: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N0, 16])
    layout1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N1, 16])
    acc0 = gl.zeros((BLOCK_M, BLOCK_N0), dtype=gl.float32, layout=layout0)
    acc1 = gl.zeros((BLOCK_M, BLOCK_N1), dtype=gl.float32, layout=layout1)

    tiles_m = gl.cdiv(M, BLOCK_M)
    tiles_n = gl.cdiv(N, BLOCK_N0 + BLOCK_N1)
    k_steps = gl.cdiv(K, BLOCK_K)
    first_tile = gl.program_id(0)
    num_programs = gl.num_programs(0)
    my_tiles = gl.cdiv(tiles_m * tiles_n - first_tile, num_programs)
    total_steps = my_tiles * k_steps

    for step in gl.static_range(STAGES - 1):
        _issue_loads(step, x_desc, w_desc_0, w_desc_1, a_ring, b0_ring, b1_ring, ready, first_tile, num_programs,
                     tiles_m, tiles_n, k_steps, total_steps, STAGES, BLOCK_M, BLOCK_N0, BLOCK_K, GROUP_M)
    for step in range(total_steps):
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), phase=(step // STAGES) & 1)
        first_k = (step % k_steps) == 0
        acc0 = warpgroup_mma(a_ring.index(slot), b0_ring.index(slot).permute((1, 0)), acc0, use_acc=not first_k,
                             is_async=True)
        acc1 = warpgroup_mma(a_ring.index(slot), b1_ring.index(slot).permute((1, 0)), acc1, use_acc=not first_k,
                             is_async=True)
        # The previous step's two MMAs are done once at most these two are in flight: its slot can be refilled.
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))
        gl.thread_barrier()  # both warpgroups are past the previous step before its slot is overwritten
        _issue_loads(step + STAGES - 1, x_desc, w_desc_0, w_desc_1, a_ring, b0_ring, b1_ring, ready, first_tile,
                     num_programs, tiles_m, tiles_n, k_steps, total_steps, STAGES, BLOCK_M, BLOCK_N0, BLOCK_K,
                     GROUP_M)
        if (step % k_steps) == k_steps - 1:
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
            tile = first_tile + (step // k_steps) * num_programs
            pid_m, pid_n = _grouped(tile, tiles_m, tiles_n, GROUP_M)
            row, col = pid_m * BLOCK_M, pid_n * (BLOCK_N0 + BLOCK_N1)
            tma.store_wait(pendings=0)  # the previous tile's stores have left c0_smem and c1_smem
            gl.thread_barrier()
            _store_part(acc0, c_desc_0, c0_smem, bias_ptr, row, col, N, layout0)
            _store_part(acc1, c_desc_1, c1_smem, bias_ptr, row, col + BLOCK_N0, N, layout1)
    tma.store_wait(pendings=0)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))


def _descriptor_memory(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def linear_relu_192(x, w, b, c, stages=4, warps=8):
    triton.set_allocator(_descriptor_memory)
    M, K = x.shape
    N = w.shape[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 192)
    _linear_relu_192_kernel[(min(sms, tiles),)](x, w, c, b, M, N, K, BLOCK_M=128, BLOCK_N0=128, BLOCK_N1=64,
                                                BLOCK_K=64, STAGES=stages, GROUP_M=8, num_warps=warps)


def main():
    from gpu_wide_tile_probe import forward_case, timed_cell  # scripts/ is on the path as scripts/<name> runs

    print(torch.cuda.get_device_name(), "— relu(X·Wᵀ + b), GPU µs (÷ library in brackets: > 1 = faster)")
    for M, K, N in [(8192, 3072, 768), (16384, 3072, 768), (8192, 768, 3072), (1000, 520, 328)]:
        x, w, b, ref, c, library, cells = forward_case(M, K, N)
        for stages in (3, 4):
            cells.append(timed_cell(f"gluon 128x(128+64) s{stages}", lambda: linear_relu_192(x, w, b, c, stages),
                                    c, ref, library))
        print(f"{M},{K},{N}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
