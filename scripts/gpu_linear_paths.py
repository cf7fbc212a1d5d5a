"""On a GPU host: the fused linear relu(x·wᵀ + b) in bf16 with its products on the TMA kernel (matmul_tma.py) and
on the pointer kernel (matmul.py), beside eager PyTorch and cuBLASLt's fused relu (torch._addmm_activation);
forward and forward+backward, do_bench and GPU time (triformer.bench.timing); then the backward's gated pass
(dZ and db) by rows per program. Prints both; `gpu_linear_paths.py rows` prints only the second.
"""

import sys

import torch
import torch.nn.functional as F

import triformer.functional as TF
from triformer.bench.timing import gpu_ms, timings
from triformer.kernels import activation, matmul_tma

SHAPES = [(8192, 768, 3072), (8192, 3072, 768), (16384, 1024, 4096), (4096, 4096, 4096)]
print(torch.cuda.get_device_name())
print(f"{'M,K,N':18s} {'case':34s} {'ms':>8s} {'gpu ms':>8s} {'eager/ours':>10s} {'gpu eager/ours':>14s}")
for M, K, N in SHAPES if sys.argv[1:] != ["rows"] else []:
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

print("\ndZ = dY ⊙ relu'(Y) and db in one pass (activation.gated_column_sum), GPU time by rows per program:")
for M, K, N in SHAPES:
    dy, y = (torch.randn(M, N, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for rows in (32, 64, 128, 256):
        activation.GATED_ROWS_PER_PROGRAM = rows
        times.append(f"{rows}: {gpu_ms(lambda: activation.gated_column_sum(dy, y, 'relu')) * 1e3:6.1f} us")
    print(f"{M}x{N}  " + "   ".join(times), flush=True)
activation.GATED_ROWS_PER_PROGRAM = 64
