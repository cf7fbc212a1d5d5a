"""One-off check on the GPU: kernel_ms (profiler) against gpu_ms (CUDA graph) for triformer's cross-entropy."""
import torch
import triformer.functional as TF
from triformer.bench.timing import gpu_ms, kernel_ms
for n, v in [(8192, 50304), (16384, 32768)]:
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    def step():
        g = torch.autograd.grad(TF.cross_entropy(logits, targets, inplace_grad=True), logits)
        torch.autograd.graph.increment_version(logits)
        return g
    print(f"{n}x{v} triformer: gpu_ms {gpu_ms(step):.4f}, kernel_ms {kernel_ms(step):.4f}", flush=True)
