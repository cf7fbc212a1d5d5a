"""On a GPU host: a product whose N is 768 (the forward of a 3072 → 768 layer, the backward's dX of a 768 → 3072
one) with 128×384 tiles — three 128×128 accumulators sharing each A tile — so its 8192 rows make 128 tiles, one
wave on 132 SMs, where 128×128 tiles make 2.9 waves (at a lower rate per SM) and 128×256 tiles 1.45. A probe of the
idea before any library change: relu(X·Wᵀ + b) against torch.mm, torch._addmm_activation and the library's
kernel, GPU time (CUDA graph, L2 flushed), with its error against float32. Not part of the pipeline."""

import torch
import triton
import triton.language as tl

from triformer.bench.timing import gpu_ms
from triformer.kernels._tiles import grouped_tile
from triformer.kernels._tma import use_descriptor_memory
from triformer.kernels.matmul import matmul


@triton.jit
def _store_sub_tile(c_desc, acc, bias_ptr, row, col, N):
    cols = col + tl.arange(0, acc.shape[1])
    acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    c_desc.store([row, col], tl.maximum(acc, 0.0).to(c_desc.dtype))


@triton.jit
def _wide_tile_kernel(x_ptr, w_ptr, c_ptr, bias_ptr, M, N, K, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = relu(X·Wᵀ + b), X [M, K], W [N, K] row-major; a program's tile is BLOCK_M × 3·BLOCK_N."""
    x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [K, 1], [BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, 3 * BLOCK_N)
    tile_c = tl.program_id(0) - NUM_SMS
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * 3 * BLOCK_N
        acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(tl.cdiv(K, BLOCK_K)):
            k = kk * BLOCK_K
            a = x_desc.load([row, k])
            acc0 = tl.dot(a, w_desc.load([col, k]).T, acc0)
            acc1 = tl.dot(a, w_desc.load([col + BLOCK_N, k]).T, acc1)
            acc2 = tl.dot(a, w_desc.load([col + 2 * BLOCK_N, k]).T, acc2)
        tile_c += NUM_SMS
        pid_m, pid_n = grouped_tile(tile_c, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * 3 * BLOCK_N
        _store_sub_tile(c_desc, acc0, bias_ptr, row, col, N)
        _store_sub_tile(c_desc, acc1, bias_ptr, row, col + BLOCK_N, N)
        _store_sub_tile(c_desc, acc2, bias_ptr, row, col + 2 * BLOCK_N, N)


def wide(x, w, b, c, stages, warps, block_n=128, block_k=64):
    use_descriptor_memory()
    M, K = x.shape
    N = w.shape[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 3 * block_n)
    _wide_tile_kernel[(min(sms, tiles),)](x, w, c, b, M, N, K, NUM_SMS=sms, BLOCK_M=128, BLOCK_N=block_n,
                                          BLOCK_K=block_k, GROUP_M=8, num_stages=stages, num_warps=warps)


def main():
    print(torch.cuda.get_device_name(), "— relu(X·Wᵀ + b), GPU µs (÷ ours-now in brackets: > 1 = faster)")
    for M, K, N in [(8192, 3072, 768), (16384, 3072, 768), (8192, 768, 3072)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
        b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        ref = torch.relu(x.float() @ w.float().t() + b.float())
        library = gpu_ms(lambda: matmul(x, w.t(), bias=b, activation="relu")) * 1e3
        cells = [f"library {library:.1f}",
                 f"torch.mm {gpu_ms(lambda: torch.mm(x, w.t())) * 1e3:.1f}",
                 f"addmm_activation {gpu_ms(lambda: torch._addmm_activation(b, x, w.t())) * 1e3:.1f}"]
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        for stages in (2, 3, 4):
            for warps in (4, 8):
                c.fill_(float("nan"))
                try:
                    wide(x, w, b, c, stages, warps)
                    err = ((c.float() - ref).norm() / ref.norm()).item()
                    us = gpu_ms(lambda: wide(x, w, b, c, stages, warps)) * 1e3
                    cells.append(f"128x384 s{stages} w{warps} {us:.1f} ({library / us:.2f}, err {err:.1e})")
                except Exception as error:
                    cells.append(f"128x384 s{stages} w{warps} {type(error).__name__}")
        print(f"{M},{K},{N}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
