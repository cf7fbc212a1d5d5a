"""The benchmarks' timing helpers and the norms suite's bookkeeping, on any machine (GPU times are NaN without a
GPU; a stand-in clock checks the interleaving)."""

from __future__ import annotations

import math

import pytest
import torch

from triformer.bench import norms, timing


def test_interleaved_rounds_time_every_fn_once_per_round_and_take_medians(monkeypatch):
    order = []
    clock = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 9.0, 7.0]), "c": iter([1.0, float("nan"), 1.0])}

    def fake_gpu_ms(fn, rep_ms):
        assert rep_ms == 40
        name = fn()
        order.append(name)
        return next(clock[name])

    monkeypatch.setattr(timing, "gpu_ms", fake_gpu_ms)
    medians = timing.interleaved_gpu_ms({name: (lambda name=name: name) for name in "abc"}, rounds=3, rep_ms=40)
    assert order == list("abc") * 3
    assert medians["a"] == 2.0 and medians["b"] == 7.0 and math.isnan(medians["c"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run's bookkeeping")
def test_norms_suite_rows_on_the_cpu():
    rows = norms.run(
        [(33, 129)],
        dtype=torch.float32,
        device="cpu",
        progress=False,
        ops=("rms_norm",),
        modes=("fwd", "fwd+bwd"),
        rounds=2,
    )
    by = {(r["mode"], r["provider"]): r for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        assert by[mode, "triformer"]["ms"] > 0 and by[mode, "torch"]["ms"] > 0
        assert math.isnan(by[mode, "triformer"]["gpu_ms"])  # no GPU: no GPU time, never a made-up one
        assert norms.COMPILE_CUDA_ONLY in by[mode, "torch.compile"]["error"]
    assert by["fwd", "triformer"]["shape"] == "33x129"


def test_timings_of_uncapturable_code_take_the_profilers_gpu_time(monkeypatch):
    monkeypatch.setattr(timing, "median_ms", lambda fn: 2.0)
    monkeypatch.setattr(timing, "gpu_ms", lambda fn: pytest.fail("captured code that cannot be captured"))
    monkeypatch.setattr(timing, "kernel_ms", lambda fn: 1.5)
    assert timing.timings(lambda: None, capture=False) == {"ms": 2.0, "gpu_ms": 1.5}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run's bookkeeping")
def test_kernel_ms_has_no_gpu_time_on_the_cpu():
    assert math.isnan(timing.kernel_ms(lambda: None))


TINY_HOST = dict(rows=4, width=16, vocab=24, heads=2, seq=8, head_dim=16)


def test_host_suite_times_every_op_both_ways_for_every_provider(monkeypatch):
    """Rows for every op × mode × provider, each the median of interleaved rounds; each triformer provider runs with its
    own launch path, the dispatcher provider through torch.ops.triformer. (On the CPU the fast provider cannot take the
    fast path: the interpreter runs every launch; tests/test_launch.py checks the path, the GPU rows flag it when
    inactive.)"""
    from harness import DEVICE

    from triformer.bench import host
    from triformer.functional import _library
    from triformer.kernels import _launch

    fast_seen, dispatcher_seen, times = [], [], iter(range(1, 1000))

    def fake_per_call_ms(fn, calls, warmup=20):
        fn()
        fast_seen.append(_launch.FAST)
        dispatcher_seen.append(_library._state.dispatcher)
        return float(next(times))

    monkeypatch.setattr(host, "per_call_ms", fake_per_call_ms)
    ops = ["linear relu", "layer_norm", "swiglu"]
    rows = host.run(
        calls=1, warmup=1, rounds=3, size=TINY_HOST, dtype=torch.float32, device=DEVICE, progress=False, ops=ops
    )
    assert [(r["shape"], r["mode"], r["provider"]) for r in rows] == [
        (f"{op} (4x16)", mode, provider) for op in ops for mode in ("fwd", "fwd+bwd") for provider in host.PROVIDERS
    ]
    # rounds interleave the providers: round r of provider i got time 4·r + i + 1 (+ 12 per case); the median is r = 1
    assert [r["ms"] for r in rows[:4]] == [5.0, 6.0, 7.0, 8.0]
    assert all(r["op"] == "host" and r["unit"] == "calls/s" and r["rate"] == 1e3 / r["ms"] for r in rows)
    expected = {
        "triformer (Triton launch)": False,
        "triformer (fast launch)": True,
        "triformer (dispatcher)": True,
        "torch": _launch.FAST,
    }
    assert fast_seen == [expected[p] for _ in ops for _ in range(2) for _ in range(3) for p in host.PROVIDERS]
    assert dispatcher_seen == [p == "triformer (dispatcher)" for _ in ops for _ in range(6) for p in host.PROVIDERS]


def test_host_suite_reports_an_op_that_fails_and_goes_on(monkeypatch):
    from harness import DEVICE

    from triformer.bench import host

    real = host.op_cases

    def with_a_broken_op(device, dtype, size=None):
        cases = real(device, dtype, size)
        ours, theirs, inputs = cases["softmax"]
        cases["softmax"] = (lambda: 1 / 0, theirs, inputs)
        return cases

    monkeypatch.setattr(host, "op_cases", with_a_broken_op)
    rows = host.run(
        calls=1,
        warmup=0,
        rounds=1,
        size=TINY_HOST,
        dtype=torch.float32,
        device=DEVICE,
        progress=False,
        ops=["softmax", "layer_norm"],
    )
    broken = [r for r in rows if r["shape"].startswith("softmax")]
    assert len(broken) == 2 * len(host.PROVIDERS)
    assert all("ZeroDivisionError" in r["error"] and math.isnan(r["ms"]) for r in broken)
    assert all(r["error"] == "" and r["ms"] > 0 for r in rows if r["shape"].startswith("layer_norm"))


def test_live_at_peak_names_the_blocks_of_the_peak():
    """Replaying allocator events: the peak counts blocks allocated during the trace, frees end a block's life, and
    each block is named by its innermost frame inside the library."""
    from triformer.bench.memory import allocation_site, blocks_by_site, live_at_peak

    def frame(path, line):
        return {"filename": path, "line": line, "name": "f"}

    ours = frame("/x/site-packages/triformer/kernels/a.py", 7)
    theirs = frame("/usr/lib/python3/torch/nn/functional.py", 3)
    events = [
        {"action": "free_requested", "addr": 99, "size": 4096},  # allocated before the trace: not counted
        {"action": "alloc", "addr": 1, "size": 1024, "frames": [theirs, ours]},
        {"action": "alloc", "addr": 2, "size": 512, "frames": [theirs]},
        {"action": "free_requested", "addr": 2, "size": 512},
        {"action": "alloc", "addr": 3, "size": 2048, "frames": []},
        {"action": "alloc", "addr": 4, "size": 512, "frames": [ours]},
        {"action": "free_requested", "addr": 3, "size": 2048},
        {"action": "alloc", "addr": 5, "size": 1024, "frames": [ours]},
    ]
    peak, blocks = live_at_peak(events)
    assert peak == 1024 + 2048 + 512 and sorted(b["addr"] for b in blocks) == [1, 3, 4]
    assert allocation_site(blocks[0]) == "triformer/kernels/a.py:7 (f)"
    assert allocation_site({"frames": [theirs]}) == "/usr/lib/python3/torch/nn/functional.py:3 (f)"
    assert blocks_by_site(blocks) == [("?", 1, 2048), ("triformer/kernels/a.py:7 (f)", 2, 1536)]
