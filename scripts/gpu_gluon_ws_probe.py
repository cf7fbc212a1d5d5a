"""On a GPU host: the library's warp-specialized Gluon product (src/triformer/kernels/matmul_ws.py) with each of
its tiles, beside the library as tuned (which may pick it), torch.mm and torch._addmm_activation, for
relu(X·Wᵀ + b) in bf16; GPU time (CUDA graph, L2 flushed), the error against float32. Not part of the pipeline.

The design was chosen here (sixth session, H100 logs reports/gpu/h100-2026-11-26f-gluon-ws-probe*.log; the probe's
kernel as it was then is in git history, commit dd6d82b): a producer warp and MMA partitions of one warpgroup each
(59.1 µs at 8192×3072×768) beat one 8-warp MMA partition synchronised at every K step (59.6), a single partition
issuing loads and MMAs (80; gpu_gluon_probe.py, removed after e6c30d8), epilogue stores straight from registers with
one more stage (66–69) and 32-deep K steps with twice the stages (69). Seventh session
(`…-2026-11-26g-pingpong-probe-*.log`): the ping-pong schedule of 128×(128+64) s4 reached 58.3–58.7 µs.
"""

import torch

from triformer.kernels import matmul_tma
from triformer.kernels.activation import activation_code

# Timed beside the tuner's configs (matmul_tma.WARP_SPECIALIZED_CONFIGS), to see whether they earn a place there:
# ping-pong 128×(128+64), whose 192 accumulator registers a thread spill a few hundred bytes in the epilogue, with
# 4 and 3 stages; ping-pong 128×(64+64) with 6 and 4 stages.
PROBE_ONLY_CONFIGS = [(128, 64, 4, "pingpong"), (128, 64, 3, "pingpong"), (64, 64, 6, "pingpong"),
                      (64, 64, 4, "pingpong")]


def main():
    from gpu_matmul_products import ws_label  # scripts/ is on the path as scripts/<name> runs
    from gpu_wide_tile_probe import forward_case, timed_cell

    ws = matmul_tma._gluon_kernel()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "— relu(X·Wᵀ + b), GPU µs (÷ library in brackets: > 1 = faster)")
    for M, K, N in [(8192, 3072, 768), (16384, 3072, 768), (8192, 768, 3072), (16384, 1024, 4096),
                    (4096, 4096, 4096), (1000, 520, 328)]:
        x, w, b, ref, c, library, cells = forward_case(M, K, N)
        for config in matmul_tma.WARP_SPECIALIZED_CONFIGS + PROBE_ONLY_CONFIGS:
            cells.append(timed_cell(ws_label(config),
                                    lambda: ws.launch(x, w, c, None, b, activation_code("relu"), config, sms), c,
                                    ref, library))
        print(f"{M},{K},{N}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
