"""TritonLinear / functional.linear: forward and every gradient against float64, fused and unfused."""

from __future__ import annotations

import itertools

import pytest
import torch
from harness import DTYPES, ON_GPU, assert_close, assert_grads_close, randn, reference_copy, well_conditioned_norm

import triformer.functional as F_tri
from triformer import TritonLinear
from triformer.kernels import _runtime

ACTIVATIONS = [None, "relu", "gelu", "silu"]
REFERENCE_ACTIVATION = {
    None: lambda z: z,
    "relu": torch.relu,
    "gelu": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}

# (M, K, N): the grid; on the CPU the full grid runs for fp32, a spread of it for the rest.
SHAPE_GRID = list(itertools.product([1, 7, 129], [1, 33, 300], [1, 65, 257]))
SPREAD = [(1, 1, 1), (7, 33, 65), (129, 300, 257), (129, 1, 65), (1, 300, 257), (7, 33, 1), (64, 96, 32), (96, 33, 64)]
GPU_SHAPES = [
    (1000, 1536, 771),
    (4099, 512, 1024),
    (1024, 512, 768),
    (64, 96, 32),
    (96, 33, 64),
]  # odd and tile-aligned


def reference_linear(x, w, b, activation):
    """act(x·wᵀ + b) in float64 on the CPU, from leaves that collect gradients."""
    z = x @ w.t()
    if b is not None:
        z = z + b
    return REFERENCE_ACTIVATION[activation](z), z


def run_and_compare(x, w, b, activation, fused, dtype):
    """Forward and backward of ours and of the float64 reference, then every output and gradient compared."""
    xr, wr, br = (reference_copy(t) for t in (x, w, b))
    ref, z_ref = reference_linear(xr, wr, br, activation)
    dy = torch.randn(ref.shape, dtype=torch.float64)
    if activation == "relu":
        # Where Z is within rounding distance of relu's kink the derivative depends on the last bit of Z:
        # those elements get no upstream gradient (in both computations), so the comparison stays exact.
        dy = dy * (z_ref.detach().abs() > 1e-2 * z_ref.detach().abs().mean())
    out = F_tri.linear(x, w, b, activation=activation, fused=fused)
    assert out.dtype == dtype and out.shape == ref.shape
    # The output as a dot product of K + 1 terms: [x, 1]·[w, b].
    x_ones = torch.cat([xr.reshape(-1, xr.shape[-1]), torch.ones(out.numel() // wr.shape[0], 1, dtype=xr.dtype)], 1)
    w_bias = torch.cat([wr, (br if br is not None else torch.zeros(wr.shape[0], dtype=wr.dtype))[:, None]], 1)
    assert_close(out, ref, dtype, "output", scale_floor=well_conditioned_norm(x_ones, w_bias.t()))
    out.backward(dy.to(device=out.device, dtype=dtype))
    ref.backward(dy)
    # Each gradient's floor is its norm without chance cancellation, with dY standing for dZ = dY ⊙ act'(Z):
    # act' is at most ~1.1 for every activation here, but near its zeros (silu at z ≈ −1.28) Z's rounding
    # to the storage dtype legitimately moves dZ by |dY|·|act''|·ulp(Z), as in PyTorch's own autograd.
    dy2d = dy.reshape(-1, dy.shape[-1])
    floors = {
        "x": well_conditioned_norm(dy2d, wr),
        "weight": well_conditioned_norm(dy2d.t(), xr.reshape(-1, xr.shape[-1])),
        "bias": well_conditioned_norm(dy2d.t(), torch.ones(dy2d.shape[0], 1, dtype=torch.float64)),
    }
    pairs = [("x", x, xr), ("weight", w, wr)] + ([("bias", b, br)] if b is not None else [])
    assert_grads_close(pairs, dtype, scale_floors=floors)


def make_inputs(M, K, N, dtype, bias=True, lead=()):
    scale = K**-0.5
    x = randn(*lead, M, K, dtype=dtype, requires_grad=True)
    w = randn(N, K, dtype=dtype, scale=scale, requires_grad=True)
    b = randn(N, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M,K,N", SHAPE_GRID + (GPU_SHAPES if ON_GPU else []))
def test_linear_fp32_shape_grid(M, K, N, activation, fused, seed):
    run_and_compare(*make_inputs(M, K, N, torch.float32), activation, fused, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M,K,N", (SHAPE_GRID + GPU_SHAPES) if ON_GPU else SPREAD)
def test_linear_dtypes_bias(M, K, N, activation, fused, bias, dtype, seed):
    run_and_compare(*make_inputs(M, K, N, dtype, bias), activation, fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_linear_3d_input(activation, fused, dtype, seed):
    run_and_compare(*make_inputs(5, 33, 65, dtype, lead=(3,)), activation, fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted-3d"])
def test_linear_non_contiguous_input(layout, fused, dtype, seed):
    K, N = 33, 65
    if layout == "transposed":
        base = randn(K, 37, dtype=dtype)
        x = base.t()
    elif layout == "sliced":
        base = randn(37, 2 * K + 3, dtype=dtype)
        x = base[:, 3::2]
    else:
        base = randn(K, 3, 11, dtype=dtype)
        x = base.permute(1, 2, 0)
    assert not x.is_contiguous()
    x = x.detach().requires_grad_(True)  # a non-contiguous leaf
    w = randn(N, K, dtype=dtype, scale=K**-0.5, requires_grad=True)
    b = randn(N, dtype=dtype, requires_grad=True)
    run_and_compare(x, w, b, "silu", fused, dtype)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_non_contiguous_upstream_gradient(fused, seed):
    x, w, b = make_inputs(7, 33, 65, torch.float32)
    out = F_tri.linear(x, w, b, activation="gelu", fused=fused)
    out.sum().backward()  # dy is an expanded (stride-0) tensor
    xr, wr, br = (reference_copy(t) for t in (x, w, b))
    reference_linear(xr, wr, br, "gelu")[0].sum().backward()
    assert_grads_close([("x", x, xr), ("weight", w, wr), ("bias", b, br)], torch.float32)


def test_only_some_gradients(seed):
    """Frozen weights: only dX is computed; frozen input: only dW and db."""
    x, w, b = make_inputs(7, 33, 65, torch.float32)
    w.requires_grad_(False)
    b.requires_grad_(False)
    F_tri.linear(x, w, b, activation="relu").sum().backward()
    assert x.grad is not None and w.grad is None
    x2, w2, b2 = make_inputs(7, 33, 65, torch.float32)
    x2.requires_grad_(False)
    F_tri.linear(x2, w2, b2, activation="gelu").sum().backward()
    assert w2.grad is not None and b2.grad is not None


def test_module_matches_nn_linear_init_and_repr(seed):
    layer = TritonLinear(33, 65, activation="gelu", fused=False)
    assert layer.weight.shape == (65, 33) and layer.bias.shape == (65,)
    bound = 33**-0.5
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer.weight.std() > bound / 4  # actually initialised, not left empty
    assert "activation=gelu" in repr(layer) and "fused=False" in repr(layer)
    assert TritonLinear(4, 5, bias=False).bias is None


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_module_forward_backward(activation, seed):
    torch_layer = torch.nn.Linear(33, 65, device="cuda" if ON_GPU else "cpu")
    layer = TritonLinear(33, 65, activation=activation, device=torch_layer.weight.device)
    layer.load_state_dict(torch_layer.state_dict())
    x = randn(4, 9, 33, requires_grad=True)
    out = layer(x)
    ref = REFERENCE_ACTIVATION[activation](torch_layer(x))
    assert_close(out, ref, torch.float32, "module output", tol=1e-5)


def assert_same_nans_and_close(out, ref, dtype, what):
    """NaN exactly where the float64 reference has NaN, the other elements within tolerance."""
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out).cpu(), nan), f"{what}: NaN at other places than torch's"
    if not nan.all():
        assert_close(out.detach().cpu()[~nan], ref[~nan], dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates_as_in_torch(activation, fused, dtype, seed):
    """A NaN in x poisons its output row for every activation (relu too: torch.relu(NaN) is NaN; corrupted data must
    not pass silently), and every gradient has NaN exactly where torch's has: relu's derivative lets dy through at
    a NaN (torch's threshold_backward), so with relu only dW's column of the NaN is NaN; gelu's and silu's dZ row
    is NaN, so dX's row, all of dW and db are. (K and N are multiples of 8: 16-bit products take TMA on a GPU.)"""
    x, w, b = make_inputs(7, 40, 72, dtype)
    with torch.no_grad():
        x[2, 5] = float("nan")
    xr, wr, br = (reference_copy(t) for t in (x, w, b))
    ref, z_ref = reference_linear(xr, wr, br, activation)
    dy = torch.randn(ref.shape, dtype=torch.float64)
    if activation == "relu":  # no upstream gradient at the kink (see run_and_compare); the NaN row keeps its own
        dy = dy * ~(z_ref.detach().abs() <= 1e-2 * z_ref.detach().nan_to_num().abs().mean())
    out = F_tri.linear(x, w, b, activation=activation, fused=fused)
    rows_with_nan = torch.isnan(out).any(-1).cpu()
    assert torch.isnan(out[2]).all() and rows_with_nan.sum() == 1
    assert_same_nans_and_close(out, ref.detach(), dtype, "output")
    out.backward(dy.to(device=out.device, dtype=dtype))
    ref.backward(dy)
    for name, ours, theirs in (("x", x, xr), ("weight", w, wr), ("bias", b, br)):
        assert_same_nans_and_close(ours.grad, theirs.grad, dtype, f"grad of {name}")
    assert torch.isnan(w.grad[:, 5]).all()
    assert torch.isnan(b.grad).any() == (activation in ("gelu", "silu"))


# ----------------------------------------------------------------------------------------------- bad input


def test_errors_name_what_is_wrong():
    dev = "cuda" if ON_GPU else "cpu"
    x = torch.randn(4, 8, device=dev)
    w = torch.randn(5, 8, device=dev)
    with pytest.raises(ValueError, match="last dimension 7.*in_features=8"):
        F_tri.linear(torch.randn(4, 7, device=dev), w)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        F_tri.linear(torch.ones(4, 8, dtype=torch.int64, device=dev), w)
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        F_tri.linear(x, w.half())
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        F_tri.linear(x, w, activation="tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        TritonLinear(8, 5, activation="swish")
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        F_tri.linear(x, w, torch.randn(6, device=dev))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        F_tri.linear(x, w[None])


def test_cpu_tensor_without_interpreter_says_how_to_run(without_interpreter):
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        F_tri.linear(torch.randn(2, 3), torch.randn(4, 3))


def test_poisoned_outputs_are_overwritten(seed):
    """Poisoning is on in every test (conftest): a kernel that leaves an element unwritten fails; check it does."""
    assert _runtime.POISON_OUTPUTS
    x, w, b = make_inputs(33, 7, 65, torch.float32)
    out = F_tri.linear(x, w, b, activation="relu")
    assert not torch.isnan(out).any()


def test_matmul_writes_into_a_block_of_rows_it_is_given(seed):
    """matmul(..., out=rows of a larger tensor) writes exactly those rows (bias and activation included) and
    returns them; the rows around stay as they were."""
    from triformer.kernels.matmul import matmul

    a, b, bias = randn(5, 16), randn(16, 24), randn(24)
    whole = torch.full((9, 24), float("nan"), device=a.device)
    c, preact = matmul(a, b, bias=bias, activation="relu", out=whole[2:7])
    assert c.data_ptr() == whole[2:7].data_ptr() and preact is None
    assert_close(whole[2:7], torch.relu(a.double() @ b.double() + bias.double()), torch.float32, "the block")
    assert torch.isnan(whole[:2]).all() and torch.isnan(whole[7:]).all()
    with pytest.raises(AssertionError, match="aliases"):
        matmul(a, b[:, :16], out=a)
    with pytest.raises(AssertionError, match="dense rows"):
        matmul(a[:1], b, out=torch.zeros(2, 48, device=a.device)[:1, :24])
