"""Where does a call's host time go? On a GPU host: per-call wall time of tiny problems (the GPU finishes each
call long before the host launches the next, so wall time per call = host cost), from a bare Triton launch up to
a full autograd forward+backward, ours against torch; then cProfile of our heaviest paths. Prints a table."""

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from triformer.functional import layer_norm, linear, rms_norm, softmax
from triformer.kernels import matmul_tma, norms
from triformer.kernels.matmul import matmul


@triton.jit
def _empty_kernel(a, b, c, d, e, f, g, M, N, K, s0, s1, s2, s3, FLAG: tl.constexpr):
    pass


def per_call_us(fn, calls=2000):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def grad_step(fn, inputs, dy):
    return lambda: torch.autograd.grad(fn(), inputs, dy)


dev, bf = "cuda", torch.bfloat16
x = torch.randn(256, 256, device=dev, dtype=bf, requires_grad=True)
w = torch.randn(256, device=dev, dtype=bf, requires_grad=True)
b = torch.randn(256, device=dev, dtype=bf, requires_grad=True)
W = torch.randn(256, 256, device=dev, dtype=bf, requires_grad=True)
dy = torch.randn(256, 256, device=dev, dtype=bf)
y = torch.empty_like(x)
mean = torch.empty(256, device=dev)
rstd = torch.empty(256, device=dev)
xd = x.detach()

cases = {
    "torch.empty_like": lambda: torch.empty_like(xd),
    "triton empty kernel (7 ptr, 7 int)": lambda: _empty_kernel[(1,)](xd, xd, xd, xd, xd, xd, xd, 256, 256, 256,
                                                                    256, 1, 256, 1, FLAG=True),
    "norm fwd kernel, direct launch": lambda: norms._norm_forward_kernel[(256,)](
        xd, w, b, y, mean, rstd, 256, 256, 256, 256, 1e-5, CENTER=True, HAS_W=True, HAS_B=True,
        BLOCK_M=1, BLOCK_N=256, ONE_BLOCK=True, num_warps=4),
    "norms.norm_forward (launcher)": lambda: norms.norm_forward(xd, w, b, 1e-5, True),
}
with torch.no_grad():
    cases["triformer layer_norm no_grad"] = lambda: layer_norm(x, 256, w, b)
    cases["F.layer_norm no_grad"] = lambda: F.layer_norm(x, (256,), w, b)
    cases["triformer linear relu no_grad"] = lambda: linear(x, W, b, "relu")
    cases["relu(F.linear) no_grad"] = lambda: torch.relu(F.linear(x, W, b))
cases.update({
    "triformer layer_norm fwd+bwd": grad_step(lambda: layer_norm(x, 256, w, b), (x, w, b), dy),
    "F.layer_norm fwd+bwd": grad_step(lambda: F.layer_norm(x, (256,), w, b), (x, w, b), dy),
    "triformer rms_norm fwd+bwd": grad_step(lambda: rms_norm(x, 256, w), (x, w), dy),
    "F.rms_norm fwd+bwd": grad_step(lambda: F.rms_norm(x, (256,), w), (x, w), dy),
    "triformer linear relu fwd+bwd": grad_step(lambda: linear(x, W, b, "relu"), (x, W, b), dy),
    "relu(F.linear) fwd+bwd": grad_step(lambda: torch.relu(F.linear(x, W, b)), (x, W, b), dy),
    "triformer softmax fwd+bwd": grad_step(lambda: softmax(x), (x,), dy),
    "torch.softmax fwd+bwd": grad_step(lambda: torch.softmax(x, -1), (x,), dy),
})
_, x2, mean_s, rstd_s = norms.norm_forward(xd, w.detach(), b.detach(), 1e-5, True)
part = torch.randn(2, 16, 256, device=dev)
from triformer.kernels.reductions import column_sum  # noqa: E402

y_ours = layer_norm(x, 256, w, b)
y_torch = F.layer_norm(x, (256,), w, b)
cases.update({
    "norms.norm_backward (launcher)": lambda: norms.norm_backward(dy, x2, w.detach(), mean_s, rstd_s, bf, bf),
    "column_sum of [2, 16, 256]": lambda: column_sum(part, bf, rows_per_program=16),
    "triformer layer_norm backward only": lambda: torch.autograd.grad(y_ours, (x, w, b), dy, retain_graph=True),
    "F.layer_norm backward only": lambda: torch.autograd.grad(y_torch, (x, w, b), dy, retain_graph=True),
})
# The warp-specialized Gluon product (seven TMA descriptors a launch) beside the Triton TMA kernel, at a product
# just large enough for the tuner to offer it (2²⁰ outputs) and small enough to leave the host the bottleneck.
xg, wg, bg = (torch.randn(*shape, device=dev, dtype=bf) for shape in ((1024, 64), (1024, 64), (1024,)))
cg = torch.empty(1024, 1024, device=dev, dtype=bf)
ws = matmul_tma._gluon_kernel()
if ws is not None:
    cases["matmul_ws.launch (Gluon kernel, direct)"] = lambda: ws.launch(xg, wg, cg, None, bg, 1,
                                                                         matmul_tma.WARP_SPECIALIZED_CONFIGS[0], 132)
cases["matmul 1024x64x1024 (tuned, Gluon offered)"] = lambda: matmul(xg, wg.t(), bias=bg, activation="relu")


def without_gluon():
    with matmul_tma.without_warp_specialization():
        return matmul(xg, wg.t(), bias=bg, activation="relu")


cases["matmul 1024x64x1024 (tuned, Triton only)"] = without_gluon
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
print(f"{'case':40s} {'host us/call':>12s}")
for name, fn in cases.items():
    with torch.no_grad() if "no_grad" in name else torch.enable_grad():
        print(f"{name:40s} {per_call_us(fn):12.1f}", flush=True)

for name in [n for n in ("triformer linear relu fwd+bwd", "matmul_ws.launch (Gluon kernel, direct)") if n in cases]:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(300):
        cases[name]()
    profile.disable()
    torch.cuda.synchronize()
    print(f"\n== cProfile, 300 calls of {name} (tottime, s) ==")
    pstats.Stats(profile).sort_stats("tottime").print_stats(22)
