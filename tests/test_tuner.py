"""The matmul tuner (kernels/_tiles.launch_tuned) with a stand-in clock: it launches the fastest candidate, skips
candidates that do not compile, times a product key once and reuses its pick. (Its GPU runs are covered by
test_linear_gpu.py's autotuned tests; its clock, queued_ms, by the GPU test below.)"""

from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from harness import ON_GPU
from triformer.kernels import _tiles


@pytest.fixture
def fake_clock(monkeypatch):
    """queued_ms replaced by a table of times per candidate; records which candidates were timed."""
    timed = []

    def queued_ms(fn):
        fn()
        candidate = launched[-1]
        timed.append(candidate)
        if candidate == "too big":
            raise OutOfResources(300_000, 232_448, "shared memory")
        return {"slow": 2.0, "fast": 0.5, "medium": 1.0}[candidate]

    launched = []
    monkeypatch.setattr(_tiles, "queued_ms", queued_ms)
    monkeypatch.setattr(_tiles, "_CHOSEN", {})
    return launched, timed


def test_launches_the_fastest_and_skips_what_does_not_compile(fake_clock):
    launched, timed = fake_clock
    _tiles.launch_tuned(("key",), lambda: ["slow", "too big", "fast", "medium"], launched.append)
    assert timed == ["slow", "too big", "fast", "medium"]
    assert launched[-1] == "fast"  # after timing, the pick itself is launched
    assert _tiles._CHOSEN[("key",)] == "fast"
    assert _tiles.TIMED[("key",)] == [("slow", 2.0), ("too big", float("inf")), ("fast", 0.5), ("medium", 1.0)]


def test_a_key_is_timed_once(fake_clock):
    launched, timed = fake_clock

    def candidates():
        raise AssertionError("candidates are listed only on a key's first call")

    _tiles.launch_tuned(("key",), lambda: ["slow", "medium"], launched.append)
    timed.clear()
    launched.clear()
    _tiles.launch_tuned(("key",), candidates, launched.append)
    assert launched == ["medium"] and timed == []


def test_a_single_candidate_is_launched_without_timing(fake_clock):
    launched, timed = fake_clock
    _tiles.launch_tuned(("other",), lambda: ["slow"], launched.append)
    assert launched == ["slow"] and timed == []


@pytest.mark.skipif(not ON_GPU, reason="the tuner's clock holds a CUDA stream")
def test_queued_time_counts_the_gpu_work_not_the_host():
    """Two launches of a product cost twice one launch's GPU time, and a host pause between the calls (the
    sleep below, far longer than the product) is not counted."""
    import time

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    one = _tiles.queued_ms(lambda: a @ a)
    two = _tiles.queued_ms(lambda: (a @ a, a @ a))
    assert 1.6 * one < two < 2.4 * one
    paused = _tiles.queued_ms(lambda: (time.sleep(4 * one * 1e-3), a @ a))  # 4× the product's time, per call
    assert paused < 1.5 * one
