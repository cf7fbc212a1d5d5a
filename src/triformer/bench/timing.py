"""Timing and the two ceilings every benchmark is read against, measured in the same run.

Two times per call, both with L2 flushed before each call (a 256 MiB write), both medians:
- `median_ms`: triton.testing.do_bench, events around each call from the host, so the host's launch cost counts
  whenever it exceeds the GPU's work (what an eager training loop sees);
- `gpu_ms`: the same calls captured in one CUDA graph and replayed, minus a graph of the flushes alone: the GPU's
  time with no host in the way (what a captured or compiled model sees).
"""

from __future__ import annotations

import math
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


_FLUSH_BYTES = 256 * 2**20


def gpu_ms(fn, rep_ms: int = 100) -> float:
    """GPU time of fn() in ms, host launch cost excluded (see the module docstring); NaN without a GPU or when fn
    cannot be captured in a CUDA graph."""
    if interpreter_active() or not torch.cuda.is_available():
        return float("nan")
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def flushed_call():
        flush.zero_()
        fn()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            flushed_call()  # compile, autotune and allocate outside the capture
            torch.cuda.synchronize()
            estimate = _replay_ms(_captured(flushed_call, 1), 3)
            calls = max(1, min(500, int(rep_ms / max(estimate, 1e-3))))
            with_fn = _replay_ms(_captured(flushed_call, calls), 5)
            flush_only = _replay_ms(_captured(flush.zero_, calls), 5)
    except Exception as error:  # e.g. an op that synchronizes: say so, keep the other measurements
        print(f"gpu_ms: not captured in a CUDA graph ({str(error)[:120]})")
        return float("nan")
    finally:
        torch.cuda.current_stream().wait_stream(stream)
    return max(with_fn - flush_only, 0.0) / calls


def _captured(step, calls: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Median wall time of one replay of the graph on the GPU, in ms."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def interleaved_gpu_ms(fns: dict, rounds: int, rep_ms: int = 100) -> dict:
    """Median gpu_ms of each fn over `rounds` rounds, each round timing every fn once in turn, so that a drift of
    the clock or the temperature during the run touches all of them alike (NaN for a fn any round left NaN)."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(gpu_ms(fn, rep_ms))
    return {name: float("nan") if any(map(math.isnan, times)) else sorted(times)[len(times) // 2]
            for name, times in samples.items()}


def timings(fn, capture: bool = True) -> dict:
    """{"ms": median_ms(fn), "gpu_ms": gpu_ms(fn)}: a benchmark row's two times (gpu_ms NaN when capture is off:
    a failed capture can leave CUDA's RNG state unusable for the rest of the process)."""
    return {"ms": median_ms(fn), "gpu_ms": gpu_ms(fn) if capture else float("nan")}


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
