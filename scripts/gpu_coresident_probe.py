"""On a GPU host: two programs per SM. The persistent TMA product launches one program per SM; a tile whose shared
memory (pipeline stages + epilogue staging) and registers fit twice into one SM can instead run as 2 × SMs
programs, so that one program's loads, epilogue and stalls overlap the other's tensor-core work (what CUTLASS's
"ping-pong" schedule does with two warpgroups). Here each tile below runs the fused forward relu(X·Wᵀ + b) with
one and with two programs per SM, beside torch.mm, torch._addmm_activation and the library's tuned pick; GPU time
(CUDA graph, L2 flushed), ÷ the library in brackets (> 1: faster). Not part of the pipeline."""

import torch

from gpu_wide_tile_probe import forward_case, timed_cell  # scripts/ is on the path when this runs as scripts/<name>
from triformer.kernels import matmul_tma
from triformer.kernels.activation import activation_code

SHAPES = [(8192, 3072, 768), (8192, 768, 3072), (16384, 1024, 4096), (4096, 4096, 4096)]
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, split epilogue): shared memory ≤ ~112 KB, so two fit in an SM
CONFIGS = [(128, 128, 64, 2, 4, False), (128, 128, 64, 3, 4, True), (128, 128, 32, 4, 4, False),
           (128, 128, 32, 5, 4, True), (64, 256, 64, 2, 4, False), (128, 128, 64, 5, 4, False)]


def forward_on(x, w, b, c, config, programs):
    """c = relu(x·wᵀ + b) on one tile config and `programs` persistent programs, all tiles whole."""
    (a_view, a_trans), (b_view, b_trans) = matmul_tma.tma_views(x, w.t(), c)
    M, N = c.shape
    args = (a_view, b_view, c, c, b, M, N, x.shape[1], a_view.stride(0), b_view.stride(0))
    flags = dict(HAS_BIAS=True, ACT=activation_code("relu"), STORE_PREACT=False, A_TRANS=a_trans, B_TRANS=b_trans)
    meta = matmul_tma._config(*config).all_kwargs()
    matmul_tma.launch_on(args, flags, matmul_tma.schedule_meta(meta, matmul_tma.count_tiles(M, N, meta), 1), programs)


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), f"({sms} SMs) — relu(X·Wᵀ + b), GPU µs (÷ library in brackets)")
    for M, K, N in SHAPES:
        x, w, b, ref, c, library, cells = forward_case(M, K, N)
        for config in CONFIGS:
            bm, bn, bk, stages, warps, split = config
            for per_sm in (1, 2):
                name = f"{bm}x{bn}x{bk} s{stages} w{warps}{' se' if split else ''} x{per_sm}"
                cells.append(timed_cell(name, lambda: forward_on(x, w, b, c, config, per_sm * sms), c, ref, library))
        print(f"{M},{K},{N}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
