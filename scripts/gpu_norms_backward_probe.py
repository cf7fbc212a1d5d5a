"""On a GPU host: where the norms' forward+backward spends its GPU time at small widths (4096×768), beside torch
eager: the kernels of one forward+backward by device time (torch.profiler, L2 flushed before each call), then the
sum of the backward's per-program partial gradients ([programs, N] float32 → one row) by launch, and the whole
forward+backward (GPU time, CUDA graph) against the backward's resident warps per SM. Not part of the pipeline."""

import collections

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import triformer.functional as TF
from triformer.bench.timing import gpu_ms
from triformer.kernels import _rows, activation

SIZES = [(4096, 768), (4096, 4096)]
bf = torch.bfloat16
flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")


def providers(m, n):
    x = torch.randn(m, n, device="cuda", dtype=bf, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=bf, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=bf, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=bf)
    return {
        ("layer_norm", "ours"): (lambda: TF.layer_norm(x, (n,), w, b), (x, w, b), dy),
        ("layer_norm", "eager"): (lambda: F.layer_norm(x, (n,), w, b), (x, w, b), dy),
        ("rms_norm", "ours"): (lambda: TF.rms_norm(x, (n,), w), (x, w), dy),
        ("rms_norm", "eager"): (lambda: F.rms_norm(x, (n,), w, eps=1e-6), (x, w), dy),
    }


def kernel_table(m, n):
    print(f"\n{m}x{n}: device time per call (µs) of each kernel of one forward+backward (20 calls, L2 flushed)")
    for (op, who), (fn, inputs, dy) in providers(m, n).items():
        step = lambda: torch.autograd.grad(fn(), inputs, dy)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                flush.zero_()
                step()
            torch.cuda.synchronize()
        per_kernel = collections.Counter()
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA and "FillFunctor<signed char>" not in event.name:
                per_kernel[event.name[:70]] += event.time_range.elapsed_us() / 20
        total = sum(per_kernel.values())
        print(f"  {op:10s} {who:6s} total {total:6.1f} µs; GPU time (graph) {gpu_ms(step) * 1e3:6.1f} µs")
        for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
            print(f"      {us:6.1f}  {name}")


def partial_sum_table(m, n):
    for programs in (132, 264, 512):
        partials = torch.randn(programs, n, device="cuda", dtype=torch.float32)
        cells = []
        for rows in (programs, 128, 64, 32):
            for block_m, block_n in ((32, 128), (16, 64), (32, 32)):
                if rows < programs and rows % block_m:
                    continue
                activation._COLUMN_SUM_LAUNCH = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
                us = gpu_ms(lambda: activation.column_sum(partials, bf, rows_per_program=rows)) * 1e3
                cells.append(f"r{rows} {block_m}x{block_n}: {us:.1f}")
        activation._COLUMN_SUM_LAUNCH = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4)
        print(f"  partials [{programs}, {n}] → bf16 row (µs): " + "; ".join(cells), flush=True)


def resident_table(m, n):
    for (op, who), (fn, inputs, dy) in providers(m, n).items():
        if who != "ours":
            continue
        step = lambda: torch.autograd.grad(fn(), inputs, dy)
        cells = []
        for warps in (8, 16, 32, 64):
            _rows.RESIDENT_WARPS_PER_SM = warps
            cells.append(f"{warps}: {gpu_ms(step) * 1e3:.1f}")
        _rows.RESIDENT_WARPS_PER_SM = 16
        print(f"  {op} fwd+bwd GPU µs by the backward's resident warps per SM: " + "; ".join(cells), flush=True)


print(torch.cuda.get_device_name())
for m, n in SIZES:
    kernel_table(m, n)
    partial_sum_table(m, n)
    resident_table(m, n)
