"""On a GPU host: the fused linear relu(x·wᵀ + b) in bf16 with its products on the TMA kernel (matmul_tma.py) and
on the pointer kernel (matmul.py), beside eager PyTorch and cuBLASLt's fused relu (torch._addmm_activation);
forward and forward+backward, do_bench and GPU time (triformer.bench.timing). (The backward's gated pass is swept
by gpu_matmul_products.py.)
"""

import torch
import torch.nn.functional as F

import triformer.functional as TF
from triformer.bench.timing import timings
from triformer.kernels import matmul_tma

SHAPES = [(8192, 768, 3072), (8192, 3072, 768), (16384, 1024, 4096), (4096, 4096, 4096)]
print(torch.cuda.get_device_name())
print(f"{'M,K,N':18s} {'case':34s} {'ms':>8s} {'gpu ms':>8s} {'eager/ours':>10s} {'gpu eager/ours':>14s}")
for M, K, N in SHAPES:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5).requires_grad_()
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    step = lambda f: (lambda: torch.autograd.grad(f(), (x, w, b), dy))  # noqa: E731
    ours = lambda: TF.linear(x, w, b, "relu")  # noqa: E731
    eager = lambda: torch.relu(F.linear(x, w, b))  # noqa: E731
    with torch.no_grad():
        cases = {"fwd eager": timings(eager),
                 "fwd addmm_activation": timings(lambda: torch._addmm_activation(b, x, w.t()))}
    cases["fwd+bwd eager"] = timings(step(eager))
    for tma in (True, False):
        matmul_tma.ENABLED = tma
        with torch.no_grad():
            cases[f"fwd ours, {'TMA' if tma else 'pointer'} kernel"] = timings(ours)
        cases[f"fwd+bwd ours, {'TMA' if tma else 'pointer'} kernel"] = timings(step(ours))
    matmul_tma.ENABLED = True
    for name, t in cases.items():
        ref = cases["fwd eager" if name.startswith("fwd ") else "fwd+bwd eager"]
        print(f"{M},{K},{N:<8d} {name:34s} {t['ms']:8.4f} {t['gpu_ms']:8.4f} {ref['ms'] / t['ms']:10.2f} "
              f"{ref['gpu_ms'] / t['gpu_ms']:14.2f}", flush=True)
