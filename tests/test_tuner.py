"""The matmul tuner (kernels/_tiles.launch_tuned) with a stand-in clock: it launches the fastest candidate, skips
candidates that do not compile, times a product key once and reuses its pick. (Its GPU runs are covered by
test_linear_gpu.py's autotuned tests; its clock, queued_ms, is checked here with a stand-in CUDA: a timing test
on a shared GPU would be a benchmark, not a test.)"""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from triformer.kernels import _tiles
from triformer.kernels._runtime import overridden


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
        if candidate == "other dialect":  # e.g. a Gluon kernel whose API this Triton changed
            raise CompilationError(None, None, "unsupported")
        return {"slow": 2.0, "fast": 0.5, "medium": 1.0}[candidate]

    launched = []
    monkeypatch.setattr(_tiles, "queued_ms", queued_ms)
    with _tiles.fresh_picks():
        yield launched, timed


def test_launches_the_fastest_and_skips_what_does_not_compile(fake_clock):
    launched, timed = fake_clock
    _tiles.launch_tuned(("key",), lambda: ["slow", "too big", "fast", "other dialect", "medium"], launched.append)
    assert timed == ["slow", "too big", "fast", "other dialect", "medium"]
    assert launched[-1] == "fast"  # after timing, the pick itself is launched
    assert _tiles._CHOSEN[("key",)] == "fast"
    assert _tiles.TIMED[("key",)] == [
        ("slow", 2.0),
        ("too big", float("inf")),
        ("fast", 0.5),
        ("other dialect", float("inf")),
        ("medium", 1.0),
    ]


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


def test_queued_clock_holds_the_stream_then_times_batches_of_calls(monkeypatch):
    """queued_ms with a stand-in CUDA: each batch is a GPU-side wait, then the start event, the calls, the end
    event; the result is the median batch's time per call. A batch whose queuing outlasted the wait (the second
    here) is timed again behind a wait twice as long."""
    trace = []
    # per batch attempt: (how long the wait lasted, the calls' time) in ms; the second attempt's wait is too short
    attempts = iter([(50.0, 12.0), (0.0, 30.0), (50.0, 8.0), (50.0, 10.0)])

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.name = ("held", "start", "end")[len(trace_events) % 3]
            trace_events.append(self)

        def record(self):
            trace.append(f"record {self.name}")

        def synchronize(self):
            trace.append("sync")

        def elapsed_time(self, other):
            if self.name == "held":
                self.attempt = next(attempts)
                other.attempt = self.attempt
                return self.attempt[0]
            return self.attempt[1]

    trace_events = []
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: trace.append(f"hold {cycles}"), raising=False)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(_tiles, "_TUNE_CALLS", 4)
    monkeypatch.setattr(_tiles, "_TUNE_BATCHES", 3)
    ms = _tiles.queued_ms(lambda: trace.append("call"))

    def batch(cycles):
        return ["record held", f"hold {cycles}", "record start"] + ["call"] * 4 + ["record end", "sync"]

    hold = _tiles._TUNE_HOLD_CYCLES
    assert trace == ["call"] + batch(hold) + batch(hold) + batch(2 * hold) + batch(2 * hold)
    assert ms == 10.0 / 4  # median of 12, 8, 10 (the batch queued too slowly is not counted)


@pytest.fixture
def stored_picks(tmp_path, monkeypatch, fake_clock):
    """TRIFORMER_TUNING_CACHE pointed at a fresh file; yields (its path, a function that forgets this process's
    picks, as a new process starts)."""
    path = tmp_path / "picks" / "tuning.json"
    monkeypatch.setenv("TRIFORMER_TUNING_CACHE", str(path))

    def new_process():
        _tiles._CHOSEN.clear()

    with overridden(_tiles, _USE_STORED=True):  # fake_clock's fresh_picks turned the store off
        yield path, new_process


def test_a_stored_pick_is_launched_in_a_later_process_without_timing(stored_picks, fake_clock):
    path, new_process = stored_picks
    launched, timed = fake_clock
    _tiles.launch_tuned(("key", 64, torch.bfloat16), lambda: ["slow", "fast", "medium"], launched.append)
    assert timed == ["slow", "fast", "medium"] and path.exists()
    new_process()
    timed.clear()
    launched.clear()
    _tiles.launch_tuned(("key", 64, torch.bfloat16), lambda: [{"tile": "slow"}, "fast", "medium"], launched.append)
    assert timed == [] and launched == ["fast"]
    # another key is still tuned, and both picks are kept
    _tiles.launch_tuned(("key", 128, torch.bfloat16), lambda: ["slow", "medium"], launched.append)
    assert timed == ["slow", "medium"]
    assert sorted(json.loads(path.read_text()).values()) == ["'fast'", "'medium'"]


def test_a_stored_pick_that_is_no_longer_a_candidate_is_tuned_again(stored_picks, fake_clock):
    path, new_process = stored_picks
    launched, timed = fake_clock
    _tiles.launch_tuned(("key",), lambda: ["slow", "fast"], launched.append)
    new_process()
    timed.clear()
    _tiles.launch_tuned(("key",), lambda: ["slow", "medium"], launched.append)
    assert timed == ["slow", "medium"] and launched[-1] == "medium"
    assert list(json.loads(path.read_text()).values()) == ["'medium'"]


def test_picks_are_kept_per_gpu_model(stored_picks, fake_clock, monkeypatch):
    path, new_process = stored_picks
    launched, timed = fake_clock
    monkeypatch.setattr(_tiles, "_stored_key", lambda key: f"GPU A | {key!r}")
    _tiles.launch_tuned(("key",), lambda: ["slow", "fast"], launched.append)
    new_process()
    timed.clear()
    monkeypatch.setattr(_tiles, "_stored_key", lambda key: f"GPU B | {key!r}")
    _tiles.launch_tuned(("key",), lambda: ["slow", "fast"], launched.append)
    assert timed == ["slow", "fast"] and len(json.loads(path.read_text())) == 2


def test_an_unreadable_store_warns_and_tunes(stored_picks, fake_clock):
    path, _ = stored_picks
    launched, timed = fake_clock
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        _tiles.launch_tuned(("key",), lambda: ["slow", "fast"], launched.append)
    assert timed == ["slow", "fast"] and launched[-1] == "fast"


def test_fresh_picks_neither_read_nor_write_the_store(stored_picks, fake_clock):
    path, _ = stored_picks
    launched, timed = fake_clock
    _tiles.launch_tuned(("key",), lambda: ["slow", "fast"], launched.append)
    timed.clear()
    with _tiles.fresh_picks():
        _tiles.launch_tuned(("key",), lambda: ["slow", "fast"], launched.append)
        _tiles.launch_tuned(("other key",), lambda: ["slow", "medium"], launched.append)
    assert timed == ["slow", "fast", "slow", "medium"]
    assert list(json.loads(path.read_text()).values()) == ["'fast'"]


def test_a_store_that_cannot_be_written_warns_and_launches(tmp_path, monkeypatch, fake_clock):
    launched, timed = fake_clock
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("TRIFORMER_TUNING_CACHE", str(tmp_path / "a file" / "tuning.json"))
    with overridden(_tiles, _USE_STORED=True), pytest.warns(UserWarning):
        _tiles.launch_tuned(("key",), lambda: ["slow", "fast"], launched.append)
    assert launched[-1] == "fast"


def _store_picks_in_a_process(path: str, first: int, start) -> None:
    os.environ["TRIFORMER_TUNING_CACHE"] = path
    start.wait()  # every process writes at the same time
    for key in range(first, first + 50):
        _tiles._store_pick(("key", key), {"tile": key})


def test_processes_storing_at_once_keep_every_pick(tmp_path):
    path = tmp_path / "tuning.json"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    workers = [context.Process(target=_store_picks_in_a_process, args=(str(path), 50 * i, start)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(worker.exitcode == 0 for worker in workers)
    assert len(json.loads(path.read_text())) == 200
