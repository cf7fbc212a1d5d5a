"""The matmul tuner (kernels/_tiles.launch_tuned) with a stand-in clock: it launches the fastest candidate, skips
candidates that do not compile, times a product key once and reuses its pick. (Its GPU runs are covered by
test_linear_gpu.py's autotuned tests.)"""

from __future__ import annotations

import pytest
import triton.testing
from triton.runtime.errors import OutOfResources

from triformer.kernels import _tiles


@pytest.fixture
def fake_clock(monkeypatch):
    """do_bench replaced by a table of times per candidate; records which candidates were timed."""
    timed = []

    def do_bench(fn, **_):
        fn()
        candidate = launched[-1]
        timed.append(candidate)
        if candidate == "too big":
            raise OutOfResources(300_000, 232_448, "shared memory")
        return {"slow": 2.0, "fast": 0.5, "medium": 1.0}[candidate]

    launched = []
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(_tiles, "_CHOSEN", {})
    return launched, timed


def test_launches_the_fastest_and_skips_what_does_not_compile(fake_clock):
    launched, timed = fake_clock
    _tiles.launch_tuned(("key",), lambda: ["slow", "too big", "fast", "medium"], launched.append)
    assert timed == ["slow", "too big", "fast", "medium"]
    assert launched[-1] == "fast"  # after timing, the pick itself is launched
    assert _tiles._CHOSEN[("key",)] == "fast"


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
