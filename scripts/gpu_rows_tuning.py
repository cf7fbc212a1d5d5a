"""On a GPU host: GPU time (CUDA graph, L2 flushed) of the row kernels under their tuning knobs, beside torch
eager, to pick the defaults: forward against the rows-per-program tile, the norms' forward+backward against the
backward's prefetching, pipelining depth and tile, dropout against its warps. Prints one table; not part of the
pipeline."""

import itertools

import torch
import torch.nn.functional as F

import triformer.functional as TF
from triformer.bench.timing import copy_bandwidth_gbps, gpu_ms
from triformer.kernels import _rows, dropout, norms

SIZES = [(4096, 768), (4096, 4096), (4096, 8192), (16384, 1024)]
copy = copy_bandwidth_gbps("cuda")
print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s")
print(f"{'op':10s} {'size':>10s} {'mode':8s} {'setting':34s} {'us':>8s} {'÷ eager':>8s} {'of copy':>8s}")


def report(op, m, n, mode, setting, fn, ref_us, tensors):
    us = gpu_ms(fn) * 1e3
    gbps = tensors * m * n * 2 / (us * 1e-6) / 1e9
    print(f"{op:10s} {m}x{n:<5d} {mode:8s} {setting:34s} {us:8.1f} {ref_us / us:8.2f} {gbps / copy:8.2f}", flush=True)


for m, n in SIZES:
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for op, ours, eager in (("softmax", lambda: TF.softmax(x), lambda: torch.softmax(x, -1)),
                                ("dropout", lambda: TF.dropout(x, 0.1, seed=1), lambda: F.dropout(x, 0.1))):
            ref = gpu_ms(eager) * 1e3
            report(op, m, n, "fwd", "torch eager", eager, ref, 2)
            for tile, warps in ((2048, 4), (4096, 8)):
                _rows._GPU_TILE, dropout.NUM_WARPS = tile, warps
                report(op, m, n, "fwd", f"tile {tile} (dropout warps {warps})", ours, ref, 2)
            _rows._GPU_TILE, dropout.NUM_WARPS = 2048, 4

for (m, n), center in itertools.product(SIZES, (True, False)):
    op = "layer_norm" if center else "rms_norm"
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True) if center else None
    dy = torch.randn_like(x)
    params = [x, w] + ([b] if center else [])
    ours = (lambda: TF.layer_norm(x, n, w, b)) if center else (lambda: TF.rms_norm(x, n, w))
    eager = (lambda: F.layer_norm(x, (n,), w, b)) if center else (lambda: F.rms_norm(x, (n,), w, eps=1e-6))
    with torch.no_grad():
        ref = gpu_ms(eager) * 1e3
        report(op, m, n, "fwd", "torch eager", eager, ref, 2)
        for tile in (2048, 4096):
            _rows._GPU_TILE = tile
            report(op, m, n, "fwd", f"tile {tile}", ours, ref, 2)
        _rows._GPU_TILE = 2048
    step = lambda fn: (lambda: torch.autograd.grad(fn(), params, dy))  # noqa: E731
    ref = gpu_ms(step(eager)) * 1e3
    report(op, m, n, "fwd+bwd", "torch eager", step(eager), ref, 4)
    for prefetch, stages, tile in itertools.product((False, True), (1, 3), (2048, 4096, 8192)):
        norms.BACKWARD_PREFETCH, norms.BACKWARD_STAGES, norms.BACKWARD_TILE = prefetch, stages, tile
        report(op, m, n, "fwd+bwd", f"prefetch {prefetch:d} stages {stages} tile {tile}", step(ours), ref, 4)
    norms.BACKWARD_PREFETCH, norms.BACKWARD_STAGES, norms.BACKWARD_TILE = True, 1, 4096
