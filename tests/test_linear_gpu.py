"""GPU-only checks of the linear kernels: every tile of the tuning space, the autotuned path, large shapes."""

from __future__ import annotations

import pytest
import torch

import triformer.functional as TF
from harness import DTYPES, ON_GPU
from test_linear import make_inputs, run_and_compare
from triformer.kernels import matmul as matmul_module

pytestmark = pytest.mark.skipif(
    not ON_GPU, reason="tile configs and autotuning exist only on the GPU (the interpreter uses one fixed tile)"
)

CONFIGS = matmul_module._HOPPER_CONFIGS


def config_id(c):
    k = c.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}-w{c.num_warps}-s{c.num_stages}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_every_tile_config(config, activation, dtype, monkeypatch, seed):
    monkeypatch.setattr(matmul_module, "FORCED_CONFIG", config)
    run_and_compare(*make_inputs(515, 257, 383, dtype), activation, True, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(2048, 768, 3072), (333, 1024, 129)])
def test_autotuned_path(M, K, N, dtype, monkeypatch, seed):
    monkeypatch.setenv("TRIFORMER_AUTOTUNE", "1")
    run_and_compare(*make_inputs(M, K, N, dtype), "silu", True, dtype)


def test_results_do_not_move_between_runs(seed):
    """Same inputs, same outputs and gradients bit for bit: a race would show as a moving result."""
    x, w, b = make_inputs(1031, 769, 1537, torch.bfloat16)
    results = []
    for _ in range(3):
        for t in (x, w, b):
            t.grad = None
        y = TF.linear(x, w, b, activation="gelu")
        y.backward(torch.ones_like(y))
        results.append((y.detach().clone(), x.grad.clone(), w.grad.clone(), b.grad.clone()))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)
