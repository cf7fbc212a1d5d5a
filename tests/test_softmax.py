"""Softmax, plain and causal (functional and module): output and gradient against float64 torch.softmax."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, DTYPES, assert_close, assert_grads_close, randn, reference_copy
from rowwise import WIDTHS, rows_for

import triformer.functional as F_tri
from triformer import TritonSoftmax

# Padding rows and −inf rows compute −inf − (−inf) in numpy under the interpreter (NaN where torch has NaN too).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def reference_softmax(x, dim=-1, causal=False):
    """torch.softmax in float64; causal masks key j > query i over the last two dims with −inf."""
    if causal:
        s_q, s_k = x.shape[-2:]
        x = x.masked_fill(torch.ones(s_q, s_k, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(x, dim)


def run_and_compare(x, dtype, dim=-1, causal=False, dy=None):
    xr = reference_copy(x)
    ref = reference_softmax(xr, dim, causal)
    out = F_tri.softmax(x, dim, causal)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, ref, dtype, "output")
    if dy is None:
        dy = randn(*x.shape, dtype=dtype)
    out.backward(dy)
    ref.backward(dy.detach().double().cpu())
    assert_grads_close([("x", x, xr)], dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("width", WIDTHS)
def test_against_float64(width, causal, dtype, row_path, seed):
    # [batch 2, S_q queries, S_k = width keys]: S_q < S_k, so causal rows see a growing prefix of the keys.
    x = randn(2, rows_for(width), width, dtype=dtype, requires_grad=True)
    run_and_compare(x, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2048, 4096, 8192])
def test_whole_rows_at_each_launch(width, dtype, seed):
    """Rows held whole, one a program, at the widths whose launches differ (on a GPU the backward runs them on 4, 4
    and 8 warps, the forward on 8, 8 and 16)."""
    run_and_compare(randn(rows_for(width), width, dtype=dtype, requires_grad=True), dtype)


@pytest.mark.parametrize("s_q,s_k", [(9, 4), (5, 5), (1, 7)])
def test_causal_square_and_tall(s_q, s_k, seed):
    """More queries than keys (later rows see every key), square, and a single query."""
    out = run_and_compare(randn(3, s_q, s_k, requires_grad=True), torch.float32, causal=True)
    assert not out.detach().cpu().masked_select(torch.ones(s_q, s_k, dtype=torch.bool).triu(1)).any()


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_other_dims(dim, seed):
    x = randn(6, 7, 33, requires_grad=True)
    run_and_compare(x, torch.float32, dim=dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_of_1e4(dtype, row_path, seed):
    """±1e4 + N(0, 1): e^x overflows without the max shift; the +1e4 entries share the mass (a live gradient)."""
    sign = torch.randint(0, 2, (5, 1000), dtype=torch.float64) * 2 - 1
    x = (1e4 * sign + torch.randn(5, 1000, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)
    run_and_compare(x.requires_grad_(), dtype)


def test_rows_of_minus_infinity(row_path, seed):
    """Rows −inf everywhere give NaN (as torch.softmax), partly −inf rows are exact, other rows unaffected."""
    x = randn(6, 1000)
    x[1] = float("-inf")
    x[3, ::2] = float("-inf")
    x[4, :700] = float("-inf")  # the first blocks of the looped path are all −inf
    x.requires_grad_()
    out = F_tri.softmax(x)
    ref = torch.softmax(x.detach().double().cpu(), -1)
    assert out[1].isnan().all() and ref[1].isnan().all()
    finite = [0, 2, 3, 4, 5]
    assert_close(out[finite], ref[finite], torch.float32, "finite rows")
    assert not out[3, ::2].any() and not out[4, :700].any()
    dy = randn(6, 1000)
    out.backward(dy)
    assert x.grad[1].isnan().all()
    xr = x.detach().double().cpu()[finite].requires_grad_()
    torch.softmax(xr, -1).backward(dy[finite].double().cpu())
    assert_close(x.grad[finite], xr.grad, torch.float32, "grad of finite rows")


def test_strided_inputs(seed):
    x = randn(129, 6).t().requires_grad_()  # column stride 6
    run_and_compare(x, torch.float32, dy=randn(129, 6).t())
    x = randn(6, 300)[:, 7:140].detach().requires_grad_()  # row stride 300
    run_and_compare(x, torch.float32, causal=True)


def test_module(seed):
    x = randn(2, 3, 5, 5)
    ref = reference_softmax(x.double().cpu(), causal=True)
    assert_close(TritonSoftmax(causal=True)(x), ref, torch.float32, "causal")
    assert_close(TritonSoftmax(dim=1)(x), torch.softmax(x.double().cpu(), 1), torch.float32, "dim=1")


def test_bad_inputs():
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        F_tri.softmax(torch.ones(3, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="causal softmax runs over the last dim"):
        F_tri.softmax(randn(3, 4), dim=0, causal=True)
    with pytest.raises(ValueError, match="causal softmax runs over the last dim"):
        F_tri.softmax(randn(4), causal=True)
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        F_tri.softmax(randn(3, 4), dim=2)


def test_cpu_tensor_without_interpreter(without_interpreter):
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        F_tri.softmax(torch.randn(2, 8))
