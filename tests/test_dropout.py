"""Dropout with a seeded counter-based mask: statistics, scale, mask reuse in the backward, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from harness import DEVICE, DTYPES, ON_GPU, assert_close, dropout_scale, randn

import triformer.functional as F_tri
from triformer import TritonDropout

N = 1 << 20 if ON_GPU else 1 << 16


def binomial_bound(p: float, n: int) -> float:
    """Six standard deviations of the dropped fraction of n independent elements (a false alarm ~1e-9)."""
    return 6 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_rate_and_scale(p, dtype, seed):
    x = randn(N, dtype=dtype)
    y = F_tri.dropout(x, p, seed)
    kept = y != 0
    assert abs((1 - kept.double().mean().item()) - p) < binomial_bound(p, N)
    assert_close(y[kept], x[kept].double() * dropout_scale(p), dtype, "kept values")


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_mask_is_not_correlated_along_the_tensor(p, seed):
    """Each of the eight halves of a Philox call (the low and the high half of each of its four draws: the elements
    i with i mod 8 = h) drops at the rate p on its own, and neighbours (which share a call) drop independently."""
    y = F_tri.dropout(randn(64, 4096), p, seed)
    dropped = (y == 0).double().reshape(-1, 8)  # column h: the elements that take half h of their call
    assert (dropped.mean(0) - p).abs().max() < binomial_bound(p, dropped.shape[0])
    pairs = (y[:, :-1] == 0) & (y[:, 1:] == 0)  # neighbours dropped together: p² if independent
    assert abs(pairs.double().mean().item() - p * p) < binomial_bound(p * p, pairs.numel()) * 2
    for h in range(7):  # the two halves of one call, and two draws of one call
        both = dropped[:, h] * dropped[:, h + 1]
        assert abs(both.mean().item() - p * p) < binomial_bound(p * p, both.numel()) * 2


def philox_4x32_10(seed: int, counters: np.ndarray) -> list[np.ndarray]:
    """The four 32-bit draws of Philox 4x32-10 (Salmon et al., 2011) for counters (c mod 2³², c // 2³², 0, 0) and key
    (seed mod 2³², seed // 2³²), as tl.randint4x makes them."""
    m32 = np.uint64(0xFFFFFFFF)
    c = counters.astype(np.uint64)
    c0, c1, c2, c3 = c & m32, c >> np.uint64(32), np.zeros_like(c), np.zeros_like(c)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        product_a, product_b = round_a * c0, round_b * c2  # 64-bit products of 32-bit factors
        c0, c2 = (product_b >> np.uint64(32)) ^ c1 ^ k0, (product_a >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = product_b & m32, product_a & m32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return [c0, c1, c2, c3]


@pytest.mark.parametrize("n", [1, 7, 8, 4099, 70001])
def test_mask_is_the_documented_one(n, seed):
    """Element i is kept when half i mod 8 of the Philox call at counter i // 8 (the low or high 16 bits of draw
    r_(h // 2)) is at least round(p · 2¹⁶): the mask from an independent Philox in numpy."""
    p = 0.3
    i = np.arange(n, dtype=np.uint64)
    draws = philox_4x32_10(seed, i // np.uint64(8))
    half = i % np.uint64(8)
    r = np.choose((half // np.uint64(2)).astype(np.int64), draws)
    u = np.where(half % np.uint64(2) == 0, r & np.uint64(0xFFFF), r >> np.uint64(16))
    expected = torch.from_numpy(u >= round(p * 2**16))
    kept = F_tri.dropout(torch.ones(n, device=DEVICE), p, seed) != 0
    assert torch.equal(kept.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_reuses_the_mask(dtype, seed):
    p = 0.3
    x = randn(7, 33, 5, dtype=dtype, requires_grad=True)
    y = F_tri.dropout(x, p, seed)
    dy = randn(7, 33, 5, dtype=dtype)
    y.backward(dy)
    kept = y.detach() != 0
    assert torch.equal(x.grad != 0, kept)
    assert_close(x.grad[kept], dy[kept].double() * dropout_scale(p), dtype, "grad of x")


def test_same_seed_same_mask_other_seed_other_mask(seed):
    x = randn(257, 129)
    a, b, c = F_tri.dropout(x, 0.5, seed), F_tri.dropout(x, 0.5, seed), F_tri.dropout(x, 0.5, seed + 1)
    assert torch.equal(a, b)
    differs = ((a == 0) != (c == 0)).double().mean().item()
    assert abs(differs - 0.5) < binomial_bound(0.5, x.numel())  # independent masks disagree half the time


def test_mask_does_not_depend_on_strides(seed):
    x = randn(65, 33)
    assert torch.equal(F_tri.dropout(x.t(), 0.4, seed), F_tri.dropout(x.t().contiguous(), 0.4, seed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_p_zero_and_one_are_exact(dtype, seed):
    x = randn(33, 65, dtype=dtype, requires_grad=True)
    y = F_tri.dropout(x, 0.0, seed)
    assert torch.equal(y, x)
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    x.grad = None
    y = F_tri.dropout(x, 1.0, seed)
    assert not y.any()
    y.backward(torch.ones_like(y))
    assert not x.grad.any()


@pytest.mark.parametrize("p", [np.float64(0.3), np.float32(0.3), np.float32(0.0)])
def test_numpy_rates_in_eager_and_compiled_modules(p, seed):
    """A rate from numpy (a schedule computed with it, say) works in eager mode and under torch.compile, where Dynamo
    turns numpy numbers into tensors."""
    module = TritonDropout(p)
    x = randn(4, 64)
    torch.manual_seed(seed)
    eager = module(x)
    torch.manual_seed(seed)
    compiled = torch.compile(module, backend="eager")(x)
    assert eager.shape == compiled.shape == x.shape
    assert abs((eager == 0).double().mean().item() - float(p)) < 0.25


@pytest.mark.parametrize("p", [0, 0.0, 1e-6, np.float32(0.0)])
def test_nothing_dropped_returns_x_and_draws_no_seed(p, seed):
    """As torch at p = 0: x itself, and torch's generator is left as it was (p below 2⁻¹⁷ drops nothing either)."""
    x = randn(5, 7)
    assert F_tri.dropout(x, p) is x
    torch.manual_seed(seed)
    expected = torch.randint(0, 2**31 - 1, ()).item()
    torch.manual_seed(seed)
    F_tri.dropout(x, p)
    assert torch.randint(0, 2**31 - 1, ()).item() == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_nan_and_inf_are_not_dropped_to_zero(p, dtype, seed):
    """A dropped element is x · 0, as torch computes it (input · mask · scale): NaN and ±inf give NaN, so corrupted
    data shows; p = 1 included (torch: NaN · 0 = NaN). The backward treats dy alike."""
    x = randn(33, 65, dtype=dtype)
    dy = randn(33, 65, dtype=dtype)
    specials = torch.rand(33, 65, device=DEVICE) < 0.2
    values = torch.tensor([float("nan"), float("inf"), float("-inf")], device=DEVICE, dtype=dtype)
    x[specials] = values[torch.randint(0, 3, (int(specials.sum()),), device=DEVICE)]
    dy[specials] = float("nan")
    x.requires_grad_()
    y = F_tri.dropout(x, p, seed)
    keep = F_tri.dropout(torch.ones_like(x), p, seed) != 0  # the same mask: a function of (seed, shape)
    factor = torch.where(keep, dropout_scale(p), 0.0)
    torch.testing.assert_close(y, (x.detach().float() * factor).to(dtype), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(y[specials & ~keep]).all() and torch.isnan(y[specials]).any()
    y.backward(dy)
    torch.testing.assert_close(x.grad, (dy.float() * factor).to(dtype), rtol=0, atol=0, equal_nan=True)
    if p == 1.0:
        torch.testing.assert_close(y, torch.nn.functional.dropout(x.detach(), 1.0), rtol=0, atol=0, equal_nan=True)


def test_module_train_and_eval(seed):
    drop = TritonDropout(0.5)
    x = randn(64, 64)
    torch.manual_seed(seed)
    first = drop(x)
    torch.manual_seed(seed)
    assert torch.equal(drop(x), first)  # the module's seeds come from torch's generator
    assert not torch.equal(drop(x), first)  # and a new one each call
    drop.eval()
    assert drop(x) is x
    assert F_tri.dropout(x, 0.5, training=False) is x


def test_original_functional_entry(seed):
    """TritonDropout.apply(x, p, seed) as in dame-cell/Triformer; module.apply(fn) still walks modules."""
    x = randn(3, 1000)
    assert torch.equal(TritonDropout.apply(x, 0.25, seed), F_tri.dropout(x, 0.25, seed))
    seen = []
    torch.nn.Sequential(TritonDropout(0.1), torch.nn.Identity()).apply(lambda m: seen.append(type(m).__name__))
    assert seen == ["TritonDropout", "Identity", "Sequential"]


def test_bad_inputs():
    x = randn(4, 4)
    for p in (-0.1, 1.5, "0.5", None):
        with pytest.raises(ValueError, match="dropout probability p must be a number in \\[0, 1\\]"):
            F_tri.dropout(x, p, 1)
    with pytest.raises(ValueError, match="p must be a number"):
        TritonDropout(2.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        F_tri.dropout(x, 0.5, 1.5)
    with pytest.raises(ValueError, match="seed must lie in"):
        F_tri.dropout(x, 0.5, -3)
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        F_tri.dropout(torch.ones(4, dtype=torch.int32, device=DEVICE), 0.5, 1)


def test_cpu_tensor_without_interpreter(without_interpreter):
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        F_tri.dropout(torch.randn(8), 0.5, 1)


def _masks_of_successive_graph_runs(make_mask, runs: int = 6) -> list[torch.Tensor]:
    """make_mask() run under torch.compile(mode="reduce-overhead") `runs` times: warm-up, recording, replays."""
    torch._dynamo.reset()
    compiled = torch.compile(make_mask, mode="reduce-overhead", fullgraph=True)
    masks = []
    for _ in range(runs):
        torch.compiler.cudagraph_mark_step_begin()
        masks.append(compiled().clone())
    return masks


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("op", ["dropout", "add_dropout_norm"])
def test_every_graph_replay_draws_a_new_mask(op):
    """Under torch.compile(mode="reduce-overhead") the seed is drawn on the device inside the graph, so each replay
    draws a new mask (a mask frozen at the capture would train one fixed sub-network), and each replay's mask is a
    proper one (rate p)."""
    ones, zeros = torch.ones(4096, 64, device=DEVICE), torch.zeros(4096, 64, device=DEVICE)
    if op == "dropout":
        masks = _masks_of_successive_graph_runs(lambda: F_tri.dropout(ones, 0.5) != 0)
    else:
        masks = _masks_of_successive_graph_runs(lambda: F_tri.add_dropout_norm(zeros, ones, 0.5)[0] != 0)
    for mask in masks:
        assert abs(1 - mask.double().mean().item() - 0.5) < binomial_bound(0.5, mask.numel())
    for earlier, later in zip(masks, masks[1:]):
        assert not torch.equal(earlier, later), "two runs of the compiled graph drew the same mask"


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_every_cuda_graph_replay_draws_a_new_mask():
    """A plain torch.cuda.CUDAGraph capture of a dropout with no seed: each replay draws a new mask."""
    ones = torch.ones(4096, 64, device=DEVICE)
    F_tri.dropout(ones, 0.5)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask = F_tri.dropout(ones, 0.5) != 0
    masks = []
    for _ in range(3):
        graph.replay()
        masks.append(mask.clone())
    for earlier, later in zip(masks, masks[1:]):
        assert not torch.equal(earlier, later), "two replays of the graph drew the same mask"
