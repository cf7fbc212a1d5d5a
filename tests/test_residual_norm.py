"""add_dropout_norm: s = x + dropout(h), y = norm(s), against a float64 reference (the mask read off triformer's
dropout) and against the three separate ops; every gradient, odd shapes, strided and stride-0 views, mixed dtypes,
NaN and inf, outputs poisoned (conftest), bad input."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, DTYPES, ON_GPU, assert_close, dropout_scale, randn

import triformer.functional as F_tri
from triformer.kernels import residual_norm
from triformer.kernels._runtime import overridden

NORMS = ["layernorm", "rmsnorm"]


def keep_scale(shape, p: float, seed: int) -> torch.Tensor:
    """keep / (1 − p̂) in float64 for triformer's dropout mask of (seed, shape)."""
    ones = torch.ones(shape, device=DEVICE, dtype=torch.float32)
    return (F_tri.dropout(ones, p, seed) != 0).double().cpu() * dropout_scale(p)


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t's value rounded to dtype, in float64, with t's exact gradient."""
    return t.detach().to(dtype).double() + (t - t.detach())


def reference(x, h, w, b, p, seed, norm, eps, out_dtype):
    """(s, y) in float64 from float64 leaves, the branch rounded to h's dtype after dropout and the sum to the output
    dtype, as the op rounds them."""
    d = rounded(h * keep_scale(h.shape, p, seed), h.dtype_under_test)
    s = rounded(x + d, out_dtype)
    if norm == "layernorm":
        y = torch.nn.functional.layer_norm(s, s.shape[-1:], w, b, eps)
    else:
        y = torch.nn.functional.rms_norm(s, s.shape[-1:], w, eps)
    return s, y


def leaf64(t):
    return t.detach().double().cpu().requires_grad_(True)


def norm_gradient_scale(s64, w64, gy, norm: str, eps: float) -> float:
    """The largest rstd · |w ⊙ dy| over the rows: the size of the terms whose difference is the norm's part of the
    input gradient. A row whose terms cancel (one element: x̂ = 0) keeps only their rounding, amplified by rstd
    (1/√eps there), so the gradients of x and h are compared against this scale too."""
    s64 = s64.detach()
    if norm == "layernorm":
        spread = s64.var(-1, unbiased=False, keepdim=True)
    else:
        spread = s64.pow(2).mean(-1, keepdim=True)
    rstd = (spread + eps).rsqrt()
    return (rstd * (w64.detach() * gy.double().cpu()).abs()).max().item()


def assert_same_rounding(a: torch.Tensor, b: torch.Tensor, what: str, via_float32: bool = False) -> None:
    """Bit for bit through the interpreter and for 16-bit results. On a GPU a float32 result may differ in its last
    bits: the compiler contracts a product and the sum it feeds into one FMA (one rounding where the separate ops
    round twice), and a strided operand changes the order of a row's reduction. So may a 16-bit result rounded from
    such a float32 value (via_float32: the gradient of a 16-bit branch added to a float32 stream), by its own last
    bit."""
    if ON_GPU and a.dtype == torch.float32:
        assert_close(a, b, torch.float32, what)
    elif ON_GPU and via_float32:  # one unit in the last place (of normal numbers; the subnormal step below them)
        info = torch.finfo(a.dtype)
        torch.testing.assert_close(a, b, rtol=info.eps, atol=info.smallest_normal * info.eps, msg=what)
    else:
        assert torch.equal(a, b), what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 4, 33), (37, 129), (2, 1000)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_float64_reference_and_gradients(shape, norm, dtype, p, seed):
    n = shape[-1]
    x, h = randn(*shape, dtype=dtype, requires_grad=True), randn(*shape, dtype=dtype, requires_grad=True)
    w = randn(n, requires_grad=True)
    b = randn(n, requires_grad=True) if norm == "layernorm" else None
    s, y = F_tri.add_dropout_norm(x, h, p, w, b, eps=1e-5, norm=norm, seed=seed)
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == x.shape
    gs, gy = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    torch.autograd.backward((s, y), (gs, gy))

    refs = [leaf64(t) for t in (x, h, w)] + ([leaf64(b)] if b is not None else [None])
    refs[1].dtype_under_test = dtype
    s64, y64 = reference(*refs, p, seed, norm, 1e-5, dtype)
    torch.autograd.backward((s64, y64), (gs.double().cpu(), gy.double().cpu()))
    assert_close(s, s64, dtype, "s")
    assert_close(y, y64, dtype, "y")
    cancelling = norm_gradient_scale(s64, refs[2], gy, norm, 1e-5)
    for name, t, r in zip(("x", "h", "w", "b"), (x, h, w, b), refs):
        if t is not None:
            floor = max(1e-3 * shape[0] ** 0.5, cancelling if name in "xh" else 0.0)
            assert_close(t.grad, r.grad, dtype, f"grad of {name}", scale_floor=floor)


DTYPE_PAIRS = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.float32, torch.float16, id="fp32-stream-fp16-branch"),
    pytest.param(torch.float16, torch.float32, id="fp16-stream-fp32-branch"),
]


@pytest.mark.parametrize("x_dtype, h_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("used", ["both", "s only", "y only"])
def test_equals_the_three_separate_ops(norm, used, x_dtype, h_dtype, seed):
    """The op is x + dropout(h) followed by the norm, bit for bit, forward and backward, whichever of its outputs
    the loss uses, for every pair of dtypes: each rounding where the separate ops round (float32 results on a GPU:
    to float32 rounding, see assert_same_rounding)."""
    x, h = randn(6, 2, 65, dtype=x_dtype, requires_grad=True), randn(6, 2, 65, dtype=h_dtype, requires_grad=True)
    w, b = randn(65, requires_grad=True), randn(65, requires_grad=True)
    b_used = b if norm == "layernorm" else None
    s, y = F_tri.add_dropout_norm(x, h, 0.4, w, b_used, eps=1e-5, norm=norm, seed=seed)
    s_ref = x + F_tri.dropout(h, 0.4, seed)
    if norm == "layernorm":
        y_ref = F_tri.layer_norm(s_ref, 65, w, b, eps=1e-5)
    else:
        y_ref = F_tri.rms_norm(s_ref, 65, w, eps=1e-5)
    assert_same_rounding(s, s_ref, "s")
    assert_same_rounding(y, y_ref, "y")
    gs, gy = randn(6, 2, 65, dtype=s.dtype), randn(6, 2, 65, dtype=s.dtype)

    def loss(s, y):
        return {"both": (s * gs).sum() + (y * gy).sum(), "s only": (s * gs).sum(), "y only": (y * gy).sum()}[used]

    leaves = (x, h, w) if norm == "rmsnorm" or used == "s only" else (x, h, w, b)
    grads = torch.autograd.grad(loss(s, y), leaves, allow_unused=True)
    grads_ref = torch.autograd.grad(loss(s_ref, y_ref), leaves, allow_unused=True)
    for name, a, r in zip("xhwb", grads, grads_ref):
        assert (a is None) == (r is None), name
        if a is not None:
            assert_same_rounding(a, r, f"grad of {name}", via_float32=s.dtype == torch.float32)


BRANCH_DTYPES = [
    pytest.param(torch.float32, torch.float32, id="fp32-branch-fp32-bias"),
    pytest.param(torch.float16, torch.float16, id="fp16-branch-fp16-bias"),
    pytest.param(torch.float16, torch.float32, id="fp16-branch-fp32-bias"),
    pytest.param(torch.float32, torch.float16, id="fp32-branch-fp16-bias"),
] + [
    pytest.param(h, c, id=f"{name}-gpu", marks=pytest.mark.skipif(not ON_GPU, reason="bf16 needs a GPU"))
    for name, h, c in (
        ("bf16-branch-bf16-bias", torch.bfloat16, torch.bfloat16),
        ("fp16-branch-bf16-bias", torch.float16, torch.bfloat16),
        ("bf16-branch-fp32-bias", torch.bfloat16, torch.float32),
    )
]


@pytest.mark.parametrize("h_dtype, c_dtype", BRANCH_DTYPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("used", ["both", "s only", "y only"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_branch_bias_equals_the_separate_ops(norm, used, p, h_dtype, c_dtype, seed):
    """branch_bias c: s = x + dropout(h + c) (h + c promoted, as torch adds them) followed by the norm, bit for bit,
    forward and backward; c's gradient is Σ_rows of the branch's (float32 results on a GPU: to float32 rounding)."""
    x = randn(5, 3, 72, requires_grad=True)
    h = randn(5, 3, 72, dtype=h_dtype, requires_grad=True)
    c = randn(72, dtype=c_dtype, requires_grad=True)
    w, b = randn(72, requires_grad=True), randn(72, requires_grad=True)
    b_used = b if norm == "layernorm" else None
    s, y = F_tri.add_dropout_norm(x, h, p, w, b_used, eps=1e-5, norm=norm, seed=seed, branch_bias=c)
    s_ref = x + F_tri.dropout(h + c, p, seed)
    if norm == "layernorm":
        y_ref = F_tri.layer_norm(s_ref, 72, w, b, eps=1e-5)
    else:
        y_ref = F_tri.rms_norm(s_ref, 72, w, eps=1e-5)
    assert s.dtype == s_ref.dtype
    assert_same_rounding(s, s_ref, "s")
    assert_same_rounding(y, y_ref, "y")
    gs, gy = randn(5, 3, 72), randn(5, 3, 72)

    def loss(s, y):
        return {"both": (s * gs).sum() + (y * gy).sum(), "s only": (s * gs).sum(), "y only": (y * gy).sum()}[used]

    leaves = (x, h, c, w) if norm == "rmsnorm" or used == "s only" else (x, h, c, w, b)
    grads = torch.autograd.grad(loss(s, y), leaves, allow_unused=True)
    grads_ref = torch.autograd.grad(loss(s_ref, y_ref), leaves, allow_unused=True)
    for name, a, r in zip("xhcwb", grads, grads_ref):
        assert (a is None) == (r is None), name
        if a is None:
            continue
        assert a.dtype == r.dtype, name
        if name == "c":  # a column sum: the order of its additions differs from column_sum's
            assert_close(a, r, c_dtype, "grad of c", scale_floor=15**0.5)
        else:
            assert_same_rounding(a, r, f"grad of {name}", via_float32=True)


@pytest.mark.parametrize("p", [1e-6, 0.3, 1 - 1e-5, 1 - 1e-6])
def test_dropout_is_unbiased_at_any_p(p, seed):
    """The kept elements are scaled by 1 / (1 − p̂) for the rate p̂ the 16-bit draws give (p rounded to 2⁻¹⁶), so the
    expected output is x: p below 2⁻¹⁷ is the identity, p within 2⁻¹⁷ of 1 drops every element; the op and its
    gradient equal the separate ops."""
    x, h = randn(64, 256, requires_grad=True), randn(64, 256, requires_grad=True)
    s, y = F_tri.add_dropout_norm(x, h, p, seed=seed)
    s_ref = x + F_tri.dropout(h, p, seed)
    assert_same_rounding(s, s_ref, "s")
    assert_same_rounding(y, F_tri.layer_norm(s_ref, 256), "y")
    g = randn(64, 256)
    (dh,) = torch.autograd.grad((s * g).sum(), (h,))
    assert_same_rounding(dh, F_tri.dropout(g, p, seed), "grad of h")
    ones = F_tri.dropout(torch.ones(1 << 16, device=DEVICE), p, seed)
    kept = ones[ones != 0]
    assert torch.equal(kept, torch.full_like(kept, dropout_scale(p)))
    if p < 2**-17:
        assert torch.equal(s, x + h)
    elif p > 1 - 2**-17:
        assert torch.equal(s, x) and not ones.any()


def test_only_s_used_leaves_the_norm_out_of_the_gradient(seed):
    """With y unused, a non-finite s (an inf in x) does not reach the gradient through the norm: dx = ds and
    dh = dropout(ds), as when the norm is not in the graph."""
    x, h = randn(4, 32, requires_grad=True), randn(4, 32, requires_grad=True)
    with torch.no_grad():
        x[1, 3] = float("inf")
    s, _ = F_tri.add_dropout_norm(x, h, 0.3, seed=seed)
    gs = randn(4, 32)
    dx, dh = torch.autograd.grad((s * gs).sum(), (x, h))
    assert torch.equal(dx, gs) and torch.equal(dh, F_tri.dropout(gs, 0.3, seed))


def test_float16_branch_on_a_float32_stream(seed):
    """A 16-bit branch (a bf16/fp16 linear's output under autocast) on a float32 residual stream: s and y are
    float32, the gradient of h comes back in h's dtype, as with x + dropout(h)."""
    x, h = randn(9, 48, requires_grad=True), randn(9, 48, dtype=torch.float16, requires_grad=True)
    w, b = randn(48, requires_grad=True), randn(48, requires_grad=True)
    s, y = F_tri.add_dropout_norm(x, h, 0.2, w, b, seed=seed)
    s_ref = x + F_tri.dropout(h, 0.2, seed)
    y_ref = F_tri.layer_norm(s_ref, 48, w, b)
    assert s.dtype == y.dtype == torch.float32 and torch.equal(s, s_ref)
    assert_close(y, y_ref, torch.float32, "y")
    g = randn(9, 48)
    grads = torch.autograd.grad((s * g).sum() + (y * g).sum(), (x, h, w, b))
    grads_ref = torch.autograd.grad((s_ref * g).sum() + (y_ref * g).sum(), (x, h, w, b))
    assert grads[1].dtype == torch.float16
    for name, a, r in zip("xhwb", grads, grads_ref):
        assert_close(a, r, torch.float16 if name == "h" else torch.float32, f"grad of {name}")


NARROW_DTYPES = [d for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize("y_dtype", NARROW_DTYPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_y_in_a_narrower_dtype_equals_the_cast_norm(norm, p, y_dtype, seed):
    """y_dtype (a norm that only feeds linears, under autocast): y equals the float32 norm cast to y_dtype, s stays
    float32, and every gradient equals that of the cast (dy arrives in y_dtype)."""
    x, h = randn(7, 3, 96, requires_grad=True), randn(7, 3, 96, dtype=y_dtype, requires_grad=True)
    w, b = randn(96, requires_grad=True), randn(96, requires_grad=True)
    b_used = b if norm == "layernorm" else None
    s, y = F_tri.add_dropout_norm(x, h, p, w, b_used, eps=1e-5, norm=norm, seed=seed, y_dtype=y_dtype)
    s_ref, y_wide = F_tri.add_dropout_norm(x, h, p, w, b_used, eps=1e-5, norm=norm, seed=seed)
    y_ref = y_wide.to(y_dtype)
    assert s.dtype == torch.float32 and y.dtype == y_dtype
    assert torch.equal(s, s_ref)
    assert_same_rounding(y, y_ref, "y", via_float32=True)
    gs, gy = randn(7, 3, 96), randn(7, 3, 96, dtype=y_dtype)
    leaves = (x, h, w, b) if norm == "layernorm" else (x, h, w)
    grads = torch.autograd.grad((s * gs).sum() + (y * gy).float().sum(), leaves)
    grads_ref = torch.autograd.grad((s_ref * gs).sum() + (y_ref * gy).float().sum(), leaves)
    for name, a, r in zip("xhwb", grads, grads_ref):
        assert a.dtype == r.dtype, name
        assert_same_rounding(a, r, f"grad of {name}", via_float32=True)


def test_strided_and_stride0_views(seed):
    """Transposed x, an expanded (stride-0) h, an expanded weight and a strided bias give the contiguous inputs'
    results."""
    x_base, h_row = randn(40, 24), randn(1, 40)
    w_one, b_base = randn(1), randn(80)
    x, h = x_base.t(), h_row.expand(24, 40)  # [24, 40]
    w, b = w_one.expand(40), b_base[::2]
    leaves = [t.requires_grad_() for t in (x_base, h_row, w_one, b_base)]
    x, h, w, b = x_base.t(), h_row.expand(24, 40), w_one.expand(40), b_base[::2]
    s, y = F_tri.add_dropout_norm(x, h, 0.25, w, b, seed=seed)
    xc, hc, wc, bc = (t.detach().contiguous().requires_grad_() for t in (x, h, w, b))
    s_ref, y_ref = F_tri.add_dropout_norm(xc, hc, 0.25, wc, bc, seed=seed)
    assert torch.equal(s, s_ref)
    assert_same_rounding(y, y_ref, "y")
    g = randn(24, 40)
    grads = torch.autograd.grad((s * g).sum() + (y * g).sum(), leaves)
    grads_ref = torch.autograd.grad((s_ref * g).sum() + (y_ref * g).sum(), (xc, hc, wc, bc))
    assert_close(grads[0], grads_ref[0].t(), torch.float32, "grad of x")
    assert_close(grads[1], grads_ref[1].sum(0, keepdim=True), torch.float32, "grad of the expanded h")
    assert_close(grads[2], grads_ref[2].sum(0, keepdim=True), torch.float32, "grad of the expanded weight")
    assert_close(grads[3][::2], grads_ref[3], torch.float32, "grad of the strided bias")
    assert not grads[3][1::2].any()


@pytest.mark.parametrize("layout", ["strided", "stride-0"])
def test_branch_bias_views(layout, seed):
    """A strided or expanded (stride-0) branch bias gives the contiguous one's results; its gradient reaches the
    base tensor through the view."""
    x, h = randn(24, 40, requires_grad=True), randn(24, 40, requires_grad=True)
    base = randn(80 if layout == "strided" else 1, requires_grad=True)
    c = base[::2] if layout == "strided" else base.expand(40)
    s, y = F_tri.add_dropout_norm(x, h, 0.25, seed=seed, branch_bias=c)
    cc = c.detach().contiguous().requires_grad_()
    s_ref, y_ref = F_tri.add_dropout_norm(x, h, 0.25, seed=seed, branch_bias=cc)
    assert torch.equal(s, s_ref)
    assert_same_rounding(y, y_ref, "y")
    g = randn(24, 40)
    (grad,) = torch.autograd.grad((s * g).sum() + (y * g).sum(), (base,))
    (grad_ref,) = torch.autograd.grad((s_ref * g).sum() + (y_ref * g).sum(), (cc,))
    expected = torch.zeros_like(base)
    if layout == "strided":
        expected[::2] = grad_ref
    else:
        expected[0] = grad_ref.sum()
    assert_close(grad, expected, torch.float32, "grad of the branch bias's base")


def test_nan_and_inf_in_the_branch_bias_propagate_as_in_torch(seed):
    """A NaN or inf in the branch bias reaches its column of s as in x + dropout(h + c): NaN where dropped, itself
    where kept; and the norm spreads a non-finite s to its row of y."""
    x, h, c = randn(4, 32), randn(4, 32), randn(32)
    c[3], c[5] = float("nan"), float("inf")
    s, y = F_tri.add_dropout_norm(x, h, 0.5, seed=seed, branch_bias=c)
    s_ref = x + F_tri.dropout(h + c, 0.5, seed)
    assert torch.equal(torch.isnan(s), torch.isnan(s_ref)) and torch.equal(torch.isinf(s), torch.isinf(s_ref))
    assert torch.isnan(y).all()


def test_nan_and_inf_propagate_as_in_torch(seed):
    """A NaN or inf in h is NaN in s wherever dropped (NaN · 0, as torch's dropout) and itself where kept; a NaN in x
    reaches its row of y."""
    x, h = randn(4, 32), randn(4, 32)
    h[0, 3], h[1, 5], x[2, 7] = float("nan"), float("inf"), float("nan")
    s, y = F_tri.add_dropout_norm(x, h, 0.5, seed=seed)
    s_ref = x + F_tri.dropout(h, 0.5, seed)
    assert torch.equal(torch.isnan(s), torch.isnan(s_ref)) and torch.equal(torch.isinf(s), torch.isinf(s_ref))
    assert torch.isnan(y[2]).all() and not torch.isnan(y[3]).any()


def test_not_training_and_p_zero_draw_no_seed(seed):
    """training=False (or p = 0) is x + h, then the norm; no seed is drawn from torch's generator."""
    x, h = randn(5, 16), randn(5, 16)
    state = torch.get_rng_state()
    s, y = F_tri.add_dropout_norm(x, h, 0.7, training=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(s, x + h)
    assert_close(y, torch.nn.functional.layer_norm((x + h).double(), (16,)), torch.float32, "y")


def test_rows_wider_than_the_kernel_run_as_separate_ops(seed):
    with overridden(residual_norm, MAX_WIDTH=16):
        x, h = randn(3, 40, requires_grad=True), randn(3, 40, requires_grad=True)
        s, y = F_tri.add_dropout_norm(x, h, 0.3, seed=seed)
    s_ref = x + F_tri.dropout(h, 0.3, seed)
    assert torch.equal(s, s_ref) and torch.equal(y, F_tri.layer_norm(s_ref, 40))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"h": "other shape"}, ValueError, "h must have x's shape"),
        ({"norm": "batchnorm"}, ValueError, "is not one of"),
        ({"norm": "rmsnorm", "bias": True}, ValueError, "RMSNorm has no bias"),
        ({"p": 1.5}, ValueError, "p"),
        ({"weight": "wrong size"}, ValueError, "weight must have shape"),
        ({"h": "integer"}, TypeError, "h has dtype"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"y_dtype": torch.int32}, TypeError, "y_dtype must be None or one of"),
        ({"branch_bias": "wrong size"}, ValueError, "branch_bias must have shape"),
    ],
)
def test_bad_input_names_what_is_wrong(kwargs, error, match):
    x = randn(3, 8)
    args = {"h": randn(3, 8), "p": 0.1, "weight": None, "bias": None, "eps": 1e-5, "norm": "layernorm"}
    special = {
        "other shape": randn(3, 9),
        "integer": torch.ones(3, 8, dtype=torch.int64, device=DEVICE),
        "wrong size": randn(9),
        True: randn(8),
    }
    args.update({k: special.get(v, v) if isinstance(v, (str, bool)) and k != "norm" else v for k, v in kwargs.items()})
    with pytest.raises(error, match=match):
        F_tri.add_dropout_norm(x, **args)


@pytest.mark.skipif(not ON_GPU, reason="the seed in device memory is the CUDA-graph path")
def test_seed_in_device_memory(seed):
    x, h = randn(64, 256), randn(64, 256)
    s, _ = F_tri.add_dropout_norm(x, h, 0.5, seed=torch.tensor(seed, device=DEVICE))
    assert torch.equal(s, x + F_tri.dropout(h, 0.5, seed))
