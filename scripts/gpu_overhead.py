"""Is a kernel slow, or is its host side? Times ours and torch with do_bench (host launches included) and with
do_bench_cudagraph (one graph replay: GPU time only) on a few shapes. Prints a table; run on a GPU host."""

import torch
import torch.nn.functional as F
import triton.testing as tt

import triformer.functional as TF


def linear_case(M, K, N, fn):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5).requires_grad_()
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)


def norm_case(M, N, fn):
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(N, device="cuda", dtype=torch.bfloat16)
    return lambda: fn(x, w)


def linear_forward_case(M, K, N, fn):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    return lambda: fn(x, w, b)


OURS = lambda x, w, b: TF.linear(x, w, b, "relu")  # noqa: E731
EAGER = lambda x, w, b: torch.relu(F.linear(x, w, b))  # noqa: E731
CASES = {}
for M, K, N in [(8192, 768, 3072), (8192, 3072, 768), (16384, 1024, 4096), (4096, 4096, 4096)]:
    for name, fn in (("triformer", OURS), ("torch", EAGER)):
        CASES[f"linear fwd {M}x{K}x{N} {name}"] = linear_forward_case(M, K, N, fn)
        CASES[f"linear fwd+bwd {M}x{K}x{N} {name}"] = linear_case(M, K, N, fn)
CASES.update({
    "rms_norm fwd 4096x4096 triformer": norm_case(4096, 4096, lambda x, w: TF.rms_norm(x, 4096, w)),
    "rms_norm fwd 4096x4096 torch": norm_case(4096, 4096, lambda x, w: F.rms_norm(x, (4096,), w)),
    "layer_norm fwd 4096x768 triformer": norm_case(4096, 768, lambda x, w: TF.layer_norm(x, 768, w)),
    "layer_norm fwd 4096x768 torch": norm_case(4096, 768, lambda x, w: F.layer_norm(x, (768,), w)),
})
print(torch.cuda.get_device_name())
print(f"{'case':45s} {'do_bench ms':>12s} {'cudagraph ms':>13s}")
for name, fn in CASES.items():
    fn()  # compile and autotune outside the timing
    torch.cuda.synchronize()
    eager = tt.do_bench(fn, return_mode="median")
    try:
        graph = tt.do_bench_cudagraph(fn, return_mode="median")
    except Exception as exc:  # an op that cannot be captured says so
        graph = float("nan")
        print(f"  (no graph for {name}: {type(exc).__name__}: {str(exc)[:100]})")
    print(f"{name:45s} {eager:12.4f} {graph:13.4f}", flush=True)
