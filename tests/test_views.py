"""Every op on non-contiguous views of every input, parameter and incoming gradient: strided, transposed, expanded
(row stride 0) and scalar-expanded (every stride 0, as the ones `.sum().backward()` sends back), each against the
float64 reference on the same view of the same values. A kernel that read such a view as contiguous memory would
compute with other elements, or past the end of the allocation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, DTYPES, ON_GPU, assert_close, reference_copy

import triformer.functional as F_tri

# (M, K, N) of the linear; rows M and width N of the row-wise ops. On a GPU multiples of 8 (16-byte rows): the
# contiguous operands take the TMA path there, so a view that falls back to the pointer kernel is compared across.
M, K, N = (264, 136, 72) if ON_GPU else (5, 33, 17)
SEQ = 24 if ON_GPU else 9

REFERENCE_ACTIVATION = {None: lambda z: z, "gelu": lambda z: F.gelu(z, approximate="tanh")}


def layout(shape: tuple, kind: str):
    """(the base tensor's shape, base → a view of `shape` in this layout)."""
    if kind == "contiguous":
        return shape, lambda t: t
    if kind == "strided":  # every other element of a wider last dim
        return (*shape[:-1], 2 * shape[-1]), lambda t: t[..., ::2]
    if kind == "transposed":  # the last two dims swapped
        return (*shape[:-2], shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)
    if kind == "expanded":  # one row repeated: the first dim has stride 0
        return (1, *shape[1:]), lambda t: t.expand(shape)
    if kind == "scalar":  # one value everywhere: every stride 0
        return (), lambda t: t.expand(shape)
    raise ValueError(kind)


def kinds_for(shape: tuple, exclude=()) -> list[str]:
    kinds = ["strided", "scalar"] if len(shape) == 1 else ["strided", "transposed", "expanded", "scalar"]
    return [k for k in kinds if k not in exclude]


def randn(shape, dtype=torch.float32, scale=1.0, requires_grad=False) -> torch.Tensor:
    """harness.randn for any shape, () included."""
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_(requires_grad)


def check_layout(view: torch.Tensor, kind: str) -> None:
    """The view really is what the test says (so the test could fail)."""
    if kind == "contiguous":
        assert view.is_contiguous()
    elif kind in ("expanded", "scalar"):
        assert 0 in view.stride(), view.stride()
    else:
        assert not view.is_contiguous(), view.stride()


class Inputs:
    """Base leaves (ours on the test device, float64 copies for the reference) and their views."""

    def __init__(self, dtype):
        self.dtype, self.ours, self.refs, self.views, self.kinds, self.ref_views = dtype, {}, {}, {}, {}, {}

    def add(self, name, shape, kind="contiguous", requires_grad=True, make=None, scale=1.0):
        base_shape, view = layout(shape, kind)
        if make is None:
            base = randn(base_shape, dtype=self.dtype, scale=scale, requires_grad=requires_grad)
        else:
            base = make(base_shape)
        self.ours[name], self.views[name], self.kinds[name] = base, view, kind
        self.refs[name] = reference_copy(base) if base.is_floating_point() else base.cpu()
        check_layout(view(base), kind)

    def tensors(self, reference=False):
        if not reference:
            return {name: self.views[name](base) for name, base in self.ours.items()}
        self.ref_views = {name: self.views[name](base) for name, base in self.refs.items()}
        for view in self.ref_views.values():
            if view.requires_grad:
                view.retain_grad()
        return self.ref_views

    def compare_grads(self, dtype, floor=0.0):
        for name, base in self.ours.items():
            if base.requires_grad:
                assert base.grad is not None, f"no gradient reached {name}"
                # An expanded view's base collects a sum of the view's gradients, each already rounded to the
                # dtype: measured against the sum of their magnitudes, which bounds that rounding (a unit roundoff
                # of Σ|g|), not against a sum that cancels by chance.
                expanded = self.kinds[name] in ("expanded", "scalar")
                own_floor = self.ref_views[name].grad.abs().sum().item() if expanded else 0.0
                assert_close(
                    base.grad, self.refs[name].grad, dtype, f"grad of {name}", scale_floor=max(floor, own_floor)
                )


def run_case(inputs: Inputs, ours, reference, dy_kind: str, dtype, grad_floor=None):
    out = ours(**inputs.tensors())
    ref = reference(**inputs.tensors(reference=True))
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, "output")
    dy_shape, dy_view = layout(tuple(out.shape), dy_kind)
    dy_base = randn(dy_shape, dtype=torch.float64)
    dy = dy_view(dy_base.to(out.dtype))
    check_layout(dy, dy_kind)
    out.backward(dy)
    ref.backward(dy_view(dy_base.to(out.dtype).double().cpu()))
    inputs.compare_grads(dtype, grad_floor(out) if grad_floor else 0.0)


# ------------------------------------------------------------------------------------------------ cases
# Each case: the op's inputs (name → shape; what layouts to leave out), ours, the float64 reference.


def _linear_case(activation, fused):
    def ours(x, weight, bias):
        return F_tri.linear(x, weight, bias, activation=activation, fused=fused)

    def reference(x, weight, bias):
        return REFERENCE_ACTIVATION[activation](F.linear(x, weight, bias))

    return {"x": (M, K), "weight": (N, K), "bias": (N,)}, {}, ours, reference


def _norm_case(center):
    # One value everywhere in x is a constant row: x − μ = 0, so dw = Σ dy·x̂ = 0 (a relative error of nothing).
    shapes = {"x": (M, N), "weight": (N,), "bias": (N,)} if center else {"x": (M, N), "weight": (N,)}
    exclude = {"x": ("scalar",)}
    if center:
        return (
            shapes,
            exclude,
            (lambda x, weight, bias: F_tri.layer_norm(x, N, weight, bias)),
            (lambda x, weight, bias: F.layer_norm(x, (N,), weight, bias)),
        )
    return (
        shapes,
        exclude,
        (lambda x, weight: F_tri.rms_norm(x, N, weight)),
        (lambda x, weight: F.rms_norm(x, (N,), weight, 1e-6)),
    )


def _softmax_case(causal):
    def reference(x):
        if causal:
            x = x.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(x, -1)

    return {"x": (3, SEQ, SEQ)}, {}, (lambda x: F_tri.softmax(x, causal=causal)), reference


CASES = {
    **{
        f"linear-{'fused' if fused else 'unfused'}-{act or 'none'}": _linear_case(act, fused)
        for fused in (True, False)
        for act in (None, "gelu")
    },
    "layer_norm": _norm_case(True),
    "rms_norm": _norm_case(False),
    "softmax": _softmax_case(False),
    "softmax-causal": _softmax_case(True),
}


def _input_params():
    params = []
    for case, (shapes, exclude, _, _) in CASES.items():
        for name, shape in shapes.items():
            params += [
                pytest.param(case, name, kind, id=f"{case}-{name}-{kind}")
                for kind in kinds_for(shape, exclude.get(name, ()))
            ]
    return params


def _inputs(case, dtype, name=None, kind="contiguous"):
    shapes = CASES[case][0]
    inputs = Inputs(dtype)
    for n, shape in shapes.items():
        scale = K**-0.5 if (case.startswith("linear") and n == "weight") else 1.0
        inputs.add(n, shape, kind if n == name else "contiguous", scale=scale)
    return inputs


def _softmax_floor(case):
    """Where every dy of a row is equal (scalar dy), softmax's dx = y·(dy − Σ y·dy) is 0 up to rounding: measured
    against ‖y‖·|dy| instead."""
    if case.startswith("softmax"):
        return lambda out: out.detach().double().norm().item()
    return None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,name,kind", _input_params())
def test_input_views(case, name, kind, dtype, seed):
    _, _, ours, reference = CASES[case]
    run_case(_inputs(case, dtype, name, kind), ours, reference, "contiguous", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dy_kind", ["strided", "transposed", "expanded", "scalar"])
@pytest.mark.parametrize("case", list(CASES))
def test_incoming_gradient_views(case, dy_kind, dtype, seed):
    _, _, ours, reference = CASES[case]
    run_case(
        _inputs(case, dtype),
        ours,
        reference,
        dy_kind,
        dtype,
        grad_floor=_softmax_floor(case) if dy_kind == "scalar" else None,
    )


# ------------------------------------------------------------------------------------------- cross-entropy


def _targets(shape):
    return torch.randint(0, N, shape, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name,kind",
    [("logits", k) for k in kinds_for((M, N))]
    + [("targets", k) for k in kinds_for((M,))]
    + [("dloss", k) for k in kinds_for((M,))],
)
def test_cross_entropy_views(name, kind, dtype, seed):
    """Logits and targets in every layout, and the incoming gradient of reduction="none"."""
    inputs = Inputs(dtype)
    inputs.add("logits", (M, N), kind if name == "logits" else "contiguous")
    inputs.add("targets", (M,), kind if name == "targets" else "contiguous", requires_grad=False, make=_targets)
    run_case(
        inputs,
        lambda logits, targets: F_tri.cross_entropy(logits, targets, reduction="none"),
        lambda logits, targets: F.cross_entropy(logits, targets, reduction="none"),
        kind if name == "dloss" else "contiguous",
        dtype,
    )


# ------------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,kind", [("x", k) for k in kinds_for((M, N))] + [("dy", k) for k in kinds_for((M, N))])
def test_dropout_views(name, kind, dtype, seed):
    """The mask is a function of (seed, shape): a view gives exactly what its contiguous copy gives, forward and
    backward."""
    x_shape, x_view = layout((M, N), kind if name == "x" else "contiguous")
    dy_shape, dy_view = layout((M, N), kind if name == "dy" else "contiguous")
    x_base = randn(x_shape, dtype=dtype, requires_grad=True)
    dy = dy_view(randn(dy_shape, dtype=dtype))
    x = x_view(x_base)
    check_layout(x if name == "x" else dy, kind)
    copy = x.detach().contiguous().requires_grad_()
    out, expected = F_tri.dropout(x, 0.4, seed), F_tri.dropout(copy, 0.4, seed)
    assert torch.equal(out, expected)
    out.backward(dy)
    expected.backward(dy.contiguous())
    # x_base.grad is copy.grad summed over what the view repeats (the view's own backward)
    reduced = torch.autograd.grad(x_view(x_base), x_base, copy.grad)[0]
    assert torch.equal(x_base.grad, reduced)


def test_tma_takes_no_overlapping_rows():
    """A row stride of 0 is 16-byte aligned too, but no TMA descriptor layout: such operands (an expanded weight,
    a row-expanded dy) take the pointer kernel."""
    from triformer.kernels import matmul_tma

    rows = torch.empty(8, 64, dtype=torch.float16)
    assert matmul_tma._rows_addressable(rows)
    assert not matmul_tma._rows_addressable(rows[:1].expand(8, 64))
    assert matmul_tma._tma_view(rows[:1].expand(8, 64).t()) is None
