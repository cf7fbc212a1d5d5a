"""Timing and the two ceilings every benchmark is read against, measured in the same run."""

from __future__ import annotations

import time

import torch

from ..kernels._runtime import interpreter_active


def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of fn() in milliseconds: triton.testing.do_bench on a GPU (events, L2 flushed between calls).

    Under the interpreter (no GPU) it runs fn a few times on the host clock: such numbers mean nothing and every
    result that carries them is labelled as an interpreter run.
    """
    if interpreter_active() or not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbps(device: str, gib: float = 1.0) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (the memory-bound ceiling)."""
    n = int(gib * 2**30) // 4 if device == "cuda" else 2**20
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """torch.matmul rate on random n×n×n inputs (the compute ceiling), in TFLOP/s."""
    if device != "cuda":
        n, dtype = 256, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12
