"""On a GPU host: the cross-entropy kernel's launch (vocabulary block × warps, one row a program), GPU time of the
kernel alone (CUDA graph, L2 flushed) with the gradient written into the logits, beside Liger-Kernel's
forward+backward (profiler GPU time: it cannot be captured). The kernel reads each row twice; with fewer rows in
flight a row's second read can come from L2. Prints a table; not part of the pipeline."""

import torch

from triformer.bench.timing import copy_bandwidth_gbps, gpu_ms, kernel_ms
from triformer.kernels import cross_entropy
from triformer.kernels._runtime import cdiv

LAUNCHES = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32), (32768, 32)]

copy = copy_bandwidth_gbps("cuda")
print(f"{torch.cuda.get_device_name()}: cross-entropy, ms and fraction of the 1 GiB copy ({copy:.0f} GB/s; logits "
      "read once and gradient written once counted)")
for n, v in [(8192, 50304), (16384, 32768)]:
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    losses = torch.empty(n, device="cuda")
    n_valid = (targets != -100).sum()
    no_bad_targets = torch.zeros((), device="cuda", dtype=torch.int64)
    gb = 2 * logits.numel() * 2 / 1e9
    cells = []
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        leaf = logits.clone().requires_grad_()
        liger = LigerCrossEntropyLoss()
        ms = kernel_ms(lambda: torch.autograd.grad(liger(leaf, targets), leaf))
        cells.append(f"liger fwd+bwd (profiler) {ms:.3f} {gb / ms / copy * 1e3:.2f}")
    except ImportError:
        pass
    for block, warps in LAUNCHES:
        def launch(block=block, warps=warps):
            cross_entropy._cross_entropy_kernel[(n,)](
                logits, targets, losses, logits, n_valid, no_bad_targets, n, v, v, 1, v, 1, -100, 0.0, MEAN=True,
                SMOOTH=False, GRAD=True, INPLACE=True, CHECKED=True, BLOCK_M=1, BLOCK_N=block, num_warps=warps)
        ms = gpu_ms(launch)
        cells.append(f"{block} w{warps} {ms:.3f} {gb / ms / copy * 1e3:.2f}")
    print(f"{n}x{v}: " + "; ".join(cells), flush=True)
