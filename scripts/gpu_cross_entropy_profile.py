"""On a GPU host: the GPU kernels of one cross-entropy forward+backward step (as the bench times it), triformer
and Liger-Kernel, from torch.profiler: where the step's GPU time goes. Prints tables; not part of the pipeline."""

import torch
from torch.profiler import ProfilerActivity, profile

import triformer.functional as TF

n, v = 8192, 50304
logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_()
targets = torch.randint(0, v, (n,), device="cuda")
steps = {"triformer": lambda: torch.autograd.grad(TF.cross_entropy(logits, targets, inplace_grad=True), logits)}
try:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    liger = LigerCrossEntropyLoss()
    steps["liger"] = lambda: torch.autograd.grad(liger(logits, targets), logits)
except ImportError:
    pass
for name, step in steps.items():
    for _ in range(3):
        step()
        torch.autograd.graph.increment_version(logits)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
            torch.autograd.graph.increment_version(logits)
        torch.cuda.synchronize()
    print(f"\n== {name}: 5 steps at {n}x{v}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
