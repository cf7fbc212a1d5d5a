"""LayerNorm and RMSNorm (functional and modules): output and every gradient against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, DTYPES, assert_close, assert_grads_close, randn, reference_copy
from rowwise import WIDTHS, rows_for

import triformer.functional as F_tri
from triformer import TritonLayerNorm, TritonRMSNorm

OPS = {
    "layer_norm": (
        lambda x, w, b, eps: F_tri.layer_norm(x, x.shape[-1], w, b, eps),
        lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps),
    ),
    "rms_norm": (
        lambda x, w, b, eps: F_tri.rms_norm(x, x.shape[-1], w, eps),
        lambda x, w, b, eps: F.rms_norm(x, (x.shape[-1],), w, eps),
    ),
}
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}


def run_and_compare(op, x, w, b, dtype, dy=None):
    """Ours and the float64 reference on the same rounded inputs: output, then dx, dw, db."""
    ours, reference = OPS[op]
    xr, wr, br = (reference_copy(t) for t in (x, w, b))
    ref = reference(xr, wr, br if op == "layer_norm" else None, EPS[op])
    out = ours(x, w, b, EPS[op])
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, ref, dtype, "output")
    if dy is None:
        dy = randn(*x.shape, dtype=x.dtype)
    out.backward(dy)
    dy64 = dy.detach().double().cpu()
    ref.backward(dy64)
    pairs = [("x", x, xr)] + [(n, t, r) for n, t, r in (("weight", w, wr), ("bias", b, br)) if t is not None]
    # dw = Σ_rows dy ⊙ x̂ and db = Σ_rows dy cancel by chance (one column of random signs can sum near zero): their
    # rounding is relative to the terms' size, the norm a sum without cancellation would have
    floors = {"weight": (dy64 * normalized(op, xr.detach(), EPS[op])).norm().item(), "bias": dy64.norm().item()}
    assert_grads_close(pairs, dtype, scale_floors=floors)


def normalized(op: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x̂: x centred (LayerNorm) and divided by its root mean square over the last dim (+ eps)."""
    if op == "layer_norm":
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def make_inputs(op, lead, width, dtype, affine=True, scale=1.0, shift=0.0):
    x = (randn(*lead, width, dtype=torch.float64, scale=scale) + shift).to(dtype).requires_grad_()
    w = randn(width, dtype=dtype, requires_grad=True) if affine else None
    b = randn(width, dtype=dtype, requires_grad=True) if affine and op == "layer_norm" else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("op", OPS)
def test_against_float64(op, width, dtype, row_path, seed):
    # At width 1, x̂ = x / √(x² + eps) is ±1 up to eps / x²: RMSNorm's dx is then a difference of nearly equal
    # numbers, ill-conditioned in any float32 computation. Inputs of the size of √eps keep it well-conditioned.
    scale = 1e-3 if width == 1 else 1.0
    x, w, b = make_inputs(op, (rows_for(width),), width, dtype, scale=scale)
    if op == "layer_norm" and width == 1:
        # x − μ ≡ 0: y = b, dx = dw = 0 and db = Σ dy exactly (the float64 reference carries 1e-14 noise there).
        out = F_tri.layer_norm(x, 1, w, b)
        dy = randn(*x.shape, dtype=dtype)
        out.backward(dy)
        assert torch.equal(out, b.detach().expand_as(out))
        # dx = rstd·(g − x̂·mean(x̂g) − mean(g)) with rstd = 1/√eps ≈ 316: on the GPU the compiler's fused
        # multiply-adds leave a few ulps of that scale instead of exact zeros (seen: |dx| ≤ 1e-5 on an H200).
        natural = dy.abs().max().item() / 1e-5**0.5
        assert x.grad.abs().max() <= 1e-6 * natural and w.grad.abs().max() <= 1e-6 * natural
        # Σ dy over many rows cancels: its rounding is relative to ‖dy‖, not to the (small) sum
        assert_close(b.grad, dy.double().sum(0), dtype, "grad of bias", scale_floor=dy.double().norm().item())
        return
    run_and_compare(op, x, w, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [256, 1024, 4096, 8192])
@pytest.mark.parametrize("op", OPS)
def test_rows_that_fill_their_block(op, width, dtype, seed):
    """Rows held whole at the widths whose forward launches differ (several rows a program; w and b loaded before
    the reductions; LayerNorm's rows of 8192 loading them after, on 16 warps), a row count that leaves the last
    program's extra rows masked, and (float32) a large common offset."""
    run_and_compare(op, *make_inputs(op, (rows_for(width),), width, dtype), dtype)
    run_and_compare(
        op, *make_inputs(op, (rows_for(width),), width, dtype, shift=1e4 if dtype == torch.float32 else 0), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_leading_dims_and_no_affine(op, dtype, seed):
    run_and_compare(op, *make_inputs(op, (2, 3, 5), 65, dtype), dtype)
    run_and_compare(op, *make_inputs(op, (2, 3, 5), 65, dtype, affine=False), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_values_of_1e4(op, dtype, row_path, seed):
    run_and_compare(op, *make_inputs(op, (5,), 257, dtype, scale=1e4), dtype)


@pytest.mark.parametrize("op", OPS)
def test_large_offset_small_noise(op, row_path, seed):
    """1e4 + N(0, 1) in float32: a one-pass variance (E[x²] − μ²) would cancel to nothing."""
    run_and_compare(op, *make_inputs(op, (5,), 257, torch.float32, shift=1e4), torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_strided_inputs_and_gradients(op, seed):
    """Transposed x (column stride ≠ 1), a row-sliced x (row stride ≠ N) and a transposed dy."""
    dtype = torch.float32
    x_t = randn(129, 6, dtype=dtype).t().requires_grad_()  # [6, 129], strides (1, 6)
    w = randn(129, dtype=dtype, requires_grad=True)
    b = randn(129, dtype=dtype, requires_grad=True) if op == "layer_norm" else None
    run_and_compare(op, x_t, w, b, dtype, dy=randn(129, 6, dtype=dtype).t())
    wide = randn(6, 300, dtype=dtype)
    x_sliced = wide[:, 10:139].detach().requires_grad_()  # [6, 129], strides (300, 1): a view, no copy needed
    w.grad = None
    if b is not None:
        b.grad = None
    run_and_compare(op, x_sliced, w, b, dtype)


def test_mixed_parameter_dtype(seed):
    """float16 activations with float32 parameters (bf16/fp16 autocast keeps parameters float32)."""
    x = randn(5, 257, dtype=torch.float16, requires_grad=True)
    w = randn(257, dtype=torch.float32, requires_grad=True)
    b = randn(257, dtype=torch.float32, requires_grad=True)
    run_and_compare("layer_norm", x, w, b, torch.float16)
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_multi_dim_normalized_shape(seed):
    x = randn(3, 4, 5, 7, dtype=torch.float32, requires_grad=True)
    w = randn(5, 7, requires_grad=True)
    b = randn(5, 7, requires_grad=True)
    xr, wr, br = (reference_copy(t) for t in (x, w, b))
    out = F_tri.layer_norm(x, (5, 7), w, b)
    ref = F.layer_norm(xr, (5, 7), wr, br)
    assert_close(out, ref, torch.float32, "output")
    dy = randn(*x.shape)
    out.backward(dy)
    ref.backward(dy.double().cpu())
    assert_grads_close([("x", x, xr), ("weight", w, wr), ("bias", b, br)], torch.float32)


def test_weight_gradient_is_deterministic(seed):
    """dw and db are per-program partial sums reduced in a fixed order: identical bits run after run."""
    x = randn(1029, 96, requires_grad=True)
    w = randn(96, requires_grad=True)
    b = randn(96, requires_grad=True)
    dy = randn(1029, 96)
    grads = []
    for _ in range(2):
        grads.append(torch.autograd.grad(F_tri.layer_norm(x, 96, w, b), (w, b), dy))
    assert all(torch.equal(a, c) for a, c in zip(*grads))


def test_frozen_parameters_get_no_gradient(seed):
    x = randn(7, 33, requires_grad=True)
    w = randn(33)
    b = randn(33, requires_grad=True)
    xr, wr, br = (reference_copy(t) for t in (x, w, b))
    F_tri.layer_norm(x, 33, w, b).backward(torch.ones(7, 33, device=DEVICE))
    F.layer_norm(xr, (33,), wr, br).backward(torch.ones(7, 33, dtype=torch.float64))
    assert w.grad is None
    assert_grads_close([("x", x, xr), ("bias", b, br)], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_match_torch_modules(dtype, seed):
    """Same parameter names as nn.LayerNorm / nn.RMSNorm: a state_dict loads across and the outputs agree."""
    ours_ln = TritonLayerNorm(48, device=DEVICE, dtype=dtype)
    torch_ln = torch.nn.LayerNorm(48, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        ours_ln.weight.copy_(randn(48, dtype=dtype))
        ours_ln.bias.copy_(randn(48, dtype=dtype))
    torch_ln.load_state_dict(ours_ln.state_dict())
    ours_rms = TritonRMSNorm(48, device=DEVICE, dtype=dtype)
    torch_rms = torch.nn.RMSNorm(48, eps=1e-6, device=DEVICE, dtype=torch.float64)
    torch_rms.load_state_dict(ours_rms.state_dict())
    x = randn(2, 9, 48, dtype=dtype)
    assert_close(ours_ln(x), torch_ln(x.double()), dtype, "TritonLayerNorm")
    assert_close(ours_rms(x), torch_rms(x.double()), dtype, "TritonRMSNorm")
    assert TritonLayerNorm(48, bias=False).bias is None
    assert TritonLayerNorm(48, elementwise_affine=False).weight is None


def test_empty_batch():
    x = randn(0, 33, requires_grad=True)
    w = randn(33, requires_grad=True)
    out = F_tri.rms_norm(x, 33, w)
    out.sum().backward()
    assert out.shape == (0, 33) and x.grad.shape == (0, 33) and torch.equal(w.grad, torch.zeros_like(w))


def test_bad_inputs():
    x = randn(4, 8)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        F_tri.layer_norm(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), 8)
    with pytest.raises(ValueError, match=r"does not end in normalized_shape \(6,\)"):
        F_tri.layer_norm(x, 6)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        F_tri.layer_norm(x, 8, randn(7))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        F_tri.layer_norm(x, 8, randn(8), randn(8, 1))
    with pytest.raises(TypeError, match="weight has dtype torch.int32"):
        F_tri.rms_norm(x, 8, torch.ones(8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="normalized_shape must be a positive int"):
        F_tri.rms_norm(x, 0)


def test_cpu_tensor_without_interpreter(without_interpreter):
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        F_tri.layer_norm(torch.randn(2, 8), 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        TritonRMSNorm(8)(torch.randn(2, 8))
