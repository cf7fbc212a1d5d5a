"""GPU-only checks of the linear kernels: every tile of both tuning spaces (pointer kernel, TMA kernel), which
products take the TMA path and which fall back, the autotuned path, large shapes."""

from __future__ import annotations

import pytest
import torch
from harness import DTYPES, ON_GPU, randn
from test_linear import make_inputs, run_and_compare

import triformer.functional as F_tri
from triformer.kernels import _tiles, matmul_tma
from triformer.kernels import matmul as matmul_module

pytestmark = pytest.mark.skipif(
    not ON_GPU, reason="tile configs and autotuning exist only on the GPU (the interpreter uses one fixed tile)"
)

CONFIGS = matmul_module._HOPPER_CONFIGS
TMA_CONFIGS = matmul_tma._TMA_CONFIGS
TMA_DTYPES = [d for d in DTYPES if d.values[0] != torch.float32]
HAS_TMA = ON_GPU and torch.cuda.get_device_capability()[0] >= 9
needs_tma = pytest.mark.skipif(not HAS_TMA, reason="the TMA path needs compute capability 9.0 (Hopper) or newer")


def config_id(c):
    k = c.kwargs
    extras = "".join(f"-{name.lower()}" for name in ("SPLIT_EPILOGUE", "WARP_SPECIALIZE") if k.get(name))
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}-w{c.num_warps}-s{c.num_stages}{extras}"


@pytest.fixture
def tma_launches(monkeypatch):
    """Counts the products that run the TMA kernel."""
    calls = []
    launch = matmul_tma.launch

    def counted(*args):
        calls.append(args[1].shape)  # (views, c, ...): the product's output shape
        launch(*args)

    monkeypatch.setattr(matmul_tma, "launch", counted)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_every_tile_config(config, activation, dtype, seed):
    with matmul_tma.disabled(), matmul_module.forced(config):
        run_and_compare(*make_inputs(515, 257, 383, dtype), activation, True, dtype)


@needs_tma
@pytest.mark.parametrize("dtype", TMA_DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("config", TMA_CONFIGS, ids=config_id)
@pytest.mark.parametrize("schedule", [None, (0.0, 3), (0.5, 3)], ids=["whole", "cut3", "half-cut3"])
def test_every_tma_config(schedule, config, activation, dtype, tma_launches, seed):
    """Edges in every dimension (TMA zero-fills and clips them): the forward, dX, and dW with its transposed dZ;
    every tile whole, every tile cut into three runs of its K-iterations, half of them whole and half cut."""
    with matmul_tma.forced(config, schedule):
        run_and_compare(*make_inputs(515, 264, 392, dtype), activation, True, dtype)
    assert len(tma_launches) == 3


@needs_tma
@pytest.mark.parametrize("dtype", TMA_DTYPES)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M,K,N", [(1000, 3000, 776), (64, 8, 8), (2048, 768, 3072)])
def test_tma_path(M, K, N, bias, activation, dtype, tma_launches, seed):
    run_and_compare(*make_inputs(M, K, N, dtype, bias), activation, True, dtype)
    assert len(tma_launches) == 3  # forward, dX and dW


@needs_tma
@pytest.mark.parametrize("layout", ["odd-width", "sliced-columns", "offset-base", "row-expanded"])
def test_tma_ineligible_inputs_fall_back(layout, tma_launches, seed):
    """Rows not 16-byte aligned, a non-unit inner stride, a base off 16 bytes, one row repeated (row stride 0,
    aligned but no descriptor layout): the pointer kernel takes over."""
    dtype, K, N = torch.bfloat16, 64, 72
    if layout == "odd-width":
        x = randn(100, K + 1, dtype=dtype)[:, :K]  # row stride of 65 elements
    elif layout == "sliced-columns":
        x = randn(100, 2 * K, dtype=dtype)[:, ::2]
    elif layout == "row-expanded":
        x = randn(1, K, dtype=dtype).expand(100, K)
    else:
        x = randn(100 * K + 1, dtype=dtype)[1:].view(100, K)  # 2-byte offset base
    x = x.detach().requires_grad_(True)
    w = randn(N, K, dtype=dtype, scale=K**-0.5, requires_grad=True)
    b = randn(N, dtype=dtype, requires_grad=True)
    run_and_compare(x, w, b, "relu", True, dtype)
    assert tma_launches == [(100, K)]  # only dX = dZ·W (it does not read x); the forward and dW = dZᵀ·X read x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(2048, 768, 3072), (333, 1024, 129)])
def test_autotuned_path(M, K, N, dtype, monkeypatch, seed):
    monkeypatch.setenv("TRIFORMER_AUTOTUNE", "1")
    run_and_compare(*make_inputs(M, K, N, dtype), "silu", True, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(2048, 768, 3072), (333, 1024, 129)])
def test_autotuned_pick_is_launched_directly_later(M, K, N, dtype, monkeypatch, seed):
    """After a product's first call the tuner's pick is cached and launched without timing again: the later
    call must give the same forward and gradients bit for bit, and match float64."""
    monkeypatch.setenv("TRIFORMER_AUTOTUNE", "1")
    x, w, b = make_inputs(M, K, N, dtype)
    with _tiles.fresh_picks() as picks:
        first, second = (forward_and_gradients(x, w, b, "silu") for _ in range(2))
        assert len(picks) == 3  # forward, dX, dW: one pick each, reused by the second call
        assert all(torch.equal(a, c) for a, c in zip(first, second))
        run_and_compare(x, w, b, "silu", True, dtype)


@pytest.mark.parametrize(
    "M,K,N,schedule",
    [(1031, 769, 1537, None), (1032, 768, 1544, None), (1032, 768, 1544, (0.5, 3))],
    ids=["pointer", "tma", "tma-half-cut3"],
)
def test_results_do_not_move_between_runs(M, K, N, schedule, seed):
    """Same inputs, same outputs and gradients bit for bit: a race would show as a moving result."""
    x, w, b = make_inputs(M, K, N, torch.bfloat16)
    with matmul_tma.forced(None, schedule):
        results = [forward_and_gradients(x, w, b, "gelu") for _ in range(3)]
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


def forward_and_gradients(x, w, b, activation):
    """(y, dx, dw, db) of one forward and backward with an all-ones upstream gradient; the leaves' .grad is left
    empty for whoever comes next."""
    y = F_tri.linear(x, w, b, activation=activation)
    y.backward(torch.ones_like(y))
    result = (y.detach().clone(), x.grad, w.grad, b.grad)
    for t in (x, w, b):
        t.grad = None
    return result
