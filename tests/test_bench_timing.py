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
