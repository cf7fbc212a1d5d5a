"""On a GPU host: tiles whose width is not a power of two, made of two accumulators that share each A tile
(BLOCK_N0 + BLOCK_N1 columns: 128 + 64 = 192), for products whose N is 768 (the forward of a 3072 → 768 layer, the
backward's dX of a 768 → 3072 one). At 8192 rows, 128×192 tiles make 256 tiles, 1.94 waves on 132 SMs, where
128×256 tiles make 1.45 waves and 128×128 tiles 2.9 at a lower rate per SM. (A first version, 128×384 as three
128×128 accumulators, ran at 0.61–0.90 of the library on an H100: reports/NOTES.md.) A probe of the idea before any
library change: relu(X·Wᵀ + b) against torch.mm, torch._addmm_activation and the library's kernel, GPU time (CUDA
graph, L2 flushed), with its error against float32. Not part of the pipeline."""

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
def _two_part_tile_kernel(x_ptr, w_ptr, c_ptr, bias_ptr, M, N, K, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N0: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """C = relu(X·Wᵀ + b), X [M, K], W [N, K] row-major; a program's tile is BLOCK_M × (BLOCK_N0 + BLOCK_N1), two
    accumulators fed by one A tile per K step; persistent over the tiles in grouped order."""
    x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
    w0_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [K, 1], [BLOCK_N0, BLOCK_K])
    w1_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [K, 1], [BLOCK_N1, BLOCK_K])
    c0_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N0])
    c1_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N1])
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N0 + BLOCK_N1)
    tile_c = tl.program_id(0) - NUM_SMS
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * (BLOCK_N0 + BLOCK_N1)
        acc0 = tl.zeros((BLOCK_M, BLOCK_N0), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N1), dtype=tl.float32)
        for kk in range(tl.cdiv(K, BLOCK_K)):
            k = kk * BLOCK_K
            a = x_desc.load([row, k])
            acc0 = tl.dot(a, w0_desc.load([col, k]).T, acc0)
            acc1 = tl.dot(a, w1_desc.load([col + BLOCK_N0, k]).T, acc1)
        tile_c += NUM_SMS
        pid_m, pid_n = grouped_tile(tile_c, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * (BLOCK_N0 + BLOCK_N1)
        _store_sub_tile(c0_desc, acc0, bias_ptr, row, col, N)
        _store_sub_tile(c1_desc, acc1, bias_ptr, row, col + BLOCK_N0, N)


def two_part(x, w, b, c, config):
    block_m, block_n0, block_n1, block_k, stages, warps = config
    use_descriptor_memory()
    M, K = x.shape
    N = w.shape[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n0 + block_n1)
    _two_part_tile_kernel[(min(sms, tiles),)](x, w, c, b, M, N, K, NUM_SMS=sms, BLOCK_M=block_m, BLOCK_N0=block_n0,
                                              BLOCK_N1=block_n1, BLOCK_K=block_k, GROUP_M=8, num_stages=stages,
                                              num_warps=warps)


# (BLOCK_M, BLOCK_N0, BLOCK_N1, BLOCK_K, stages, warps)
CONFIGS = [(128, 128, 64, 64, 3, 8), (128, 128, 64, 64, 4, 8), (128, 128, 64, 64, 5, 8), (128, 128, 64, 64, 4, 4),
           (64, 128, 64, 64, 5, 4), (256, 128, 64, 64, 3, 8), (128, 128, 128, 64, 4, 8)]


def timed_cell(name: str, run, c: torch.Tensor, ref: torch.Tensor, library_us: float) -> str:
    """'name µs (library ÷ it, error against ref)' for run(), which writes c (poisoned first), or the name and the
    exception it raised (a tile that does not compile or fit)."""
    try:
        c.fill_(float("nan"))
        run()
        err = ((c.float() - ref).norm() / ref.norm()).item()
        us = gpu_ms(run) * 1e3
        return f"{name} {us:.1f} ({library_us / us:.2f}, err {err:.1e})"
    except Exception as error:
        return f"{name} {type(error).__name__}: {' '.join(str(error).split())[:160]}"


def forward_case(M: int, K: int, N: int):
    """Inputs of relu(X·Wᵀ + b) at [M, K] → [M, N] (bf16), its float32 result, an output buffer, the library's GPU
    time (µs) and the table's first cells: the library, torch.mm and torch._addmm_activation."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    ref = torch.relu(x.float() @ w.float().t() + b.float())
    library = gpu_ms(lambda: matmul(x, w.t(), bias=b, activation="relu")) * 1e3
    cells = [f"library {library:.1f}", f"torch.mm {gpu_ms(lambda: torch.mm(x, w.t())) * 1e3:.1f}",
             f"addmm_act {gpu_ms(lambda: torch._addmm_activation(b, x, w.t())) * 1e3:.1f}"]
    return x, w, b, ref, torch.empty(M, N, device="cuda", dtype=torch.bfloat16), library, cells


def main():
    print(torch.cuda.get_device_name(), "— relu(X·Wᵀ + b), GPU µs (÷ ours-now in brackets: > 1 = faster)")
    for M, K, N in [(8192, 3072, 768), (16384, 3072, 768), (8192, 768, 3072)]:
        x, w, b, ref, c, library, cells = forward_case(M, K, N)
        for config in CONFIGS:
            bm, n0, n1, bk, stages, warps = config
            cells.append(timed_cell(f"{bm}x({n0}+{n1})x{bk} s{stages} w{warps}",
                                    lambda: two_part(x, w, b, c, config), c, ref, library))
        print(f"{M},{K},{N}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
