"""Timing and the two ceilings every benchmark is read against, measured in the same run.

Two times per call, both with L2 flushed before each call (a 256 MiB write):
- `median_ms`: triton.testing.do_bench, events around each call from the host, so the host's launch cost counts
  whenever it exceeds the GPU's work (what an eager training loop sees);
- `gpu_ms`: the same calls captured in one CUDA graph and replayed, minus a graph of the flushes alone: the GPU's
  time with no host in the way (what a captured or compiled model sees). Code that cannot be captured (it reads
  values back to the host) gets `kernel_ms` instead: the profiler's sum of its GPU work, host gaps left out.
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


def _with_flush(fn):
    """(the flush buffer, a call of fn that first flushes L2 by writing the buffer)."""
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def flushed_call():
        flush.zero_()
        fn()

    return flush, flushed_call


def gpu_ms(fn, rep_ms: int = 100) -> float:
    """GPU time of fn() in ms, host launch cost excluded (see the module docstring); NaN without a GPU or when fn
    cannot be captured in a CUDA graph."""
    if interpreter_active() or not torch.cuda.is_available():
        return float("nan")
    flush, flushed_call = _with_flush(fn)
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


def kernel_ms(fn, calls: int = 20) -> float:
    """GPU time of fn() in ms for code a CUDA graph cannot capture (it reads values back to the host): the summed
    durations of the GPU kernels and memory operations of `calls` calls under torch.profiler, L2 flushed before
    each, minus the same for the flushes alone. The host's gaps between kernels are not counted, as in gpu_ms.
    NaN without a GPU."""
    if interpreter_active() or not torch.cuda.is_available():
        return float("nan")
    flush, flushed_call = _with_flush(fn)
    flushed_call()  # compile, autotune and allocate outside the profile
    torch.cuda.synchronize()
    return max(_profiled_device_us(flushed_call, calls) - _profiled_device_us(flush.zero_, calls), 0.0) / calls / 1e3


def _profiled_device_us(step, calls: int) -> float:
    """Summed duration in µs of the GPU activities (kernels, copies, fills) of `calls` steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return sum(event.time_range.elapsed_us() for event in prof.events() if event.device_type == DeviceType.CUDA)


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
    return {
        name: float("nan") if any(map(math.isnan, times)) else sorted(times)[len(times) // 2]
        for name, times in samples.items()
    }


def timings(fn, capture: bool = True) -> dict:
    """{"ms": median_ms(fn), "gpu_ms": gpu_ms(fn)}: a benchmark row's two times. capture=False (fn cannot run in a
    CUDA graph; a failed capture can leave CUDA's RNG state unusable for the rest of the process): gpu_ms is
    kernel_ms(fn), the profiler's sum of its GPU work."""
    return {"ms": median_ms(fn), "gpu_ms": gpu_ms(fn) if capture else kernel_ms(fn)}


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
