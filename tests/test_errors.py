"""Clear errors instead of garbage or internal errors, across ops: bf16 under the interpreter, meta tensors, empty
sizes (the result torch gives where it gives one), constructor arguments checked at construction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, DTYPES, INTERPRETER, assert_close, randn, reference_copy, relative_error, tolerance

import triformer.functional as F_tri
from triformer import TritonCrossEntropyLoss, TritonDropout, TritonLayerNorm, TritonLinear, TritonRMSNorm, TritonSoftmax

INTERPRETER_ONLY = "CPU autocast under the interpreter: a GPU computes bf16 natively"


def _ops(dtype, device=DEVICE):
    """(name, call) for every functional op on small inputs of this dtype and device."""

    def t(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    targets = torch.zeros(4, dtype=torch.int64, device=device)
    return [
        ("linear", lambda: F_tri.linear(t(4, 8), t(5, 8), t(5), activation="relu")),
        ("layer_norm", lambda: F_tri.layer_norm(t(4, 8), 8, t(8), t(8))),
        ("layer_norm weight", lambda: F_tri.layer_norm(torch.randn(4, 8, device=device), 8, t(8))),
        ("rms_norm", lambda: F_tri.rms_norm(t(4, 8), 8, t(8))),
        ("softmax", lambda: F_tri.softmax(t(4, 8))),
        ("dropout", lambda: F_tri.dropout(t(4, 8), 0.5, 1)),
        ("cross_entropy", lambda: F_tri.cross_entropy(t(4, 8), targets)),
    ]


@pytest.mark.parametrize("op", range(len(_ops(torch.float32))), ids=[name for name, _ in _ops(torch.float32)])
def test_bf16_under_the_interpreter_says_it_needs_a_gpu(op):
    """The interpreter computes bf16 on the raw bits (2e10 for 1.8): every op refuses it with the reason. Natively
    on a GPU the same calls run."""
    name, call = _ops(torch.bfloat16)[op]
    if INTERPRETER:
        with pytest.raises(TypeError, match="bfloat16 under Triton's interpreter.*bf16 needs a GPU"):
            call()
    else:
        assert torch.isfinite(call()).all()


@pytest.mark.skipif(not INTERPRETER, reason=INTERPRETER_ONLY)
def test_cpu_autocast_to_bf16_says_it_needs_a_gpu(seed):
    """torch.autocast("cpu", dtype=torch.bfloat16) casts the linear's inputs to bf16: the same clear error."""
    layer = TritonLinear(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="bf16 needs a GPU.*autocast"):
            layer(torch.randn(4, 8))


# ------------------------------------------------------------------------------------------------ meta tensors


@pytest.mark.parametrize("op", range(len(_ops(torch.float32))), ids=[name for name, _ in _ops(torch.float32)])
def test_meta_tensors_are_refused_by_name(op):
    """Meta tensors have no data: a clear error naming the tensor, not torch's "Cannot copy out of meta tensor" or an
    autocast dispatch error from inside."""
    name, call = _ops(torch.float32, device="meta")[op]
    with pytest.raises(ValueError, match="is a meta tensor"):
        call()


def test_meta_module_says_what_is_wrong():
    layer = TritonLinear(8, 5, device="meta")
    with pytest.raises(ValueError, match="x is a meta tensor"):
        layer(torch.randn(4, 8, device="meta"))


# ------------------------------------------------------------------------------------------------- empty sizes

ACTIVATIONS = [None, "relu", "gelu", "silu"]
REFERENCE_ACTIVATION = {
    None: lambda z: z,
    "relu": torch.relu,
    "gelu": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def _linear_like_torch(x_shape, n, activation, fused, bias=True):
    """Ours and torch (float64) on the same inputs: output and every gradient, exactly where the sizes are empty."""
    k = x_shape[-1]
    x = randn(*x_shape, requires_grad=True)
    w = randn(n, k, requires_grad=True)
    b = randn(n, requires_grad=True) if bias else None
    refs = [reference_copy(t) for t in (x, w, b)]
    out = F_tri.linear(x, w, b, activation=activation, fused=fused)
    ref = REFERENCE_ACTIVATION[activation](F.linear(*refs))
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32, "output")
    dy = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(dy.to(DEVICE, torch.float32))
    ref.backward(dy)
    for name, ours, theirs in zip(("x", "weight", "bias"), (x, w, b), refs):
        if ours is not None:
            assert ours.grad is not None and ours.grad.shape == ours.shape, name
            assert_close(ours.grad, theirs.grad, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_empty_batch_linear_gives_what_torch_gives(activation, fused, seed):
    """M = 0 (with a bias, and with leading dims): an empty output, dX empty, dW and db zeros, as torch (the
    backward raised a reshape error)."""
    _linear_like_torch((0, 33), 17, activation, fused)
    _linear_like_torch((2, 0, 33), 17, activation, fused)
    _linear_like_torch((0, 33), 17, activation, fused, bias=False)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_zero_features_linear_gives_what_torch_gives(activation, fused, seed):
    """K = 0: act(bias) in every row, db = Σ dy ⊙ act'(b), dW and dX empty, as torch (the forward raised a reshape
    error); N = 0: an empty output and dX zeros."""
    _linear_like_torch((7, 0), 17, activation, fused)
    _linear_like_torch((7, 33), 0, activation, fused)


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_softmax_over_an_empty_last_dim(causal, seed):
    """softmax over a last dim of 0 elements: an empty result and an empty gradient, as torch.softmax."""
    x = randn(2, 3, 0, requires_grad=True)
    out = F_tri.softmax(x, causal=causal)
    assert out.shape == (2, 3, 0)
    out.backward(torch.ones_like(out))
    assert x.grad.shape == (2, 3, 0)
    assert F_tri.softmax(randn(3, 0, 4), dim=1).shape == (3, 0, 4)


# ----------------------------------------------------------------------------------------------------- eps=None


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_eps_none_is_the_dtypes_epsilon(dtype, seed):
    """TritonRMSNorm(eps=None) and rms_norm(eps=None) take torch.finfo(x.dtype).eps, as nn.RMSNorm(eps=None) (they
    raised a TypeError from float(None)). Inputs of 1e-3 make the eps visible: mean(x²) ≈ 1e-6."""
    x = randn(5, 33, dtype=dtype, scale=1e-3, requires_grad=True)
    module = TritonRMSNorm(33, eps=None, device=DEVICE, dtype=dtype)
    xr = reference_copy(x)
    ref = F.rms_norm(xr, (33,), None, torch.finfo(dtype).eps)
    out = module(x)
    assert_close(out, ref, dtype, "output")
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    assert_close(x.grad, xr.grad, dtype, "grad of x", scale_floor=xr.grad.norm().item())
    assert_close(F_tri.rms_norm(x, 33, eps=None), ref, dtype, "functional output")
    if dtype == torch.float32:  # the default eps (1e-6) would be 8x the dtype's epsilon: visibly different
        assert relative_error(F_tri.rms_norm(x, 33), ref) > 100 * tolerance(dtype)


# ------------------------------------------------------------------------------------------- constructor checks


@pytest.mark.parametrize(
    "build,error,message",
    [
        (lambda: TritonLayerNorm(8, eps=-1e-5), ValueError, "eps must be a finite number ≥ 0, got -1e-05"),
        (lambda: TritonLayerNorm(8, eps=float("nan")), ValueError, "eps must be a finite number ≥ 0"),
        (lambda: TritonLayerNorm(8, eps=None), ValueError, "eps must be a finite number ≥ 0"),
        (lambda: TritonLayerNorm((8, 0)), ValueError, "normalized_shape must be a positive int"),
        (lambda: TritonLayerNorm(8, elementwise_affine="no"), TypeError, "elementwise_affine must be True or False"),
        (lambda: TritonRMSNorm(0), ValueError, "normalized_shape must be a positive int"),
        (lambda: TritonRMSNorm(-3), ValueError, "normalized_shape must be a positive int"),
        (lambda: TritonRMSNorm(8, eps=-1.0), ValueError, "eps must be a finite number ≥ 0 or None"),
        (lambda: TritonRMSNorm(8, eps="1e-6"), ValueError, "eps must be a finite number ≥ 0 or None"),
        (lambda: TritonLinear(-1, 5), ValueError, "in_features must be an int ≥ 0, got -1"),
        (lambda: TritonLinear(8, 2.5), ValueError, "out_features must be an int ≥ 0, got 2.5"),
        (lambda: TritonLinear(8, 5, fused="yes"), TypeError, "fused must be True or False"),
        (lambda: TritonLinear(8, 5, activation="swish"), ValueError, "unknown activation 'swish'"),
        (lambda: TritonSoftmax(dim="last"), TypeError, "dim must be an int"),
        (lambda: TritonSoftmax(causal=1), TypeError, "causal must be True or False"),
        (lambda: TritonDropout(1.5), ValueError, "p must be a number in \\[0, 1\\]"),
        (lambda: TritonDropout(float("nan")), ValueError, "p must be a number in \\[0, 1\\]"),
        (lambda: TritonCrossEntropyLoss(label_smoothing=2), ValueError, "label_smoothing must lie in \\[0, 1\\]"),
    ],
    ids=[
        "layernorm-eps-negative",
        "layernorm-eps-nan",
        "layernorm-eps-none",
        "layernorm-shape-zero",
        "layernorm-affine-not-bool",
        "rmsnorm-size-zero",
        "rmsnorm-size-negative",
        "rmsnorm-eps-negative",
        "rmsnorm-eps-string",
        "linear-in-negative",
        "linear-out-float",
        "linear-fused-not-bool",
        "linear-unknown-activation",
        "softmax-dim-string",
        "softmax-causal-int",
        "dropout-p-1.5",
        "dropout-p-nan",
        "crossentropy-smoothing-2",
    ],
)
def test_module_arguments_are_checked_at_construction(build, error, message):
    """A bad argument fails where the module is built, with the argument named, not at the first call."""
    with pytest.raises(error, match=message):
        build()


def test_functional_eps_is_checked():
    x = randn(4, 8)
    for eps in (-1.0, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="eps must be a finite number ≥ 0"):
            F_tri.layer_norm(x, 8, eps=eps)
    with pytest.raises(ValueError, match="eps must be a finite number ≥ 0 or None"):
        F_tri.rms_norm(x, 8, eps=-1.0)
