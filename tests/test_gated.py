"""SwiGLU / GeGLU on a fused up-projection (functional and the gated MLP modules) against float64 references."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, DTYPES, ON_GPU, assert_close, randn, reference_copy
from sm90_compile import assert_compiled_without_spills, child_report, compile_for_sm90, report_each, spilled_bytes

import triformer.functional as F_tri
from triformer import TritonGatedMLP
from triformer.functional import gated as gated_functional
from triformer.kernels import gated as gated_kernels
from triformer.nn import TorchGatedMLP

GATES = {"silu": F.silu, "gelu": lambda a: F.gelu(a, approximate="tanh")}
GPU_ONLY = "LLaMA-sized rows: GPU only (the interpreter would take minutes)"


def reference_gate(x64: torch.Tensor, activation: str) -> torch.Tensor:
    a, b = x64.chunk(2, dim=-1)
    return GATES[activation](a) * b


def check(leaf: torch.Tensor, view, activation: str, dtype: torch.dtype, dh=None, inplace_grad=None):
    """view(leaf) → x; ours and the float64 reference on the same rounded inputs: h, then the leaf's gradient."""
    ref_leaf = reference_copy(leaf)
    x = view(leaf)
    h = F_tri.gated_activation(x, activation, inplace_grad=inplace_grad)
    ref = reference_gate(view(ref_leaf), activation)
    assert h.dtype == x.dtype and h.shape == (*x.shape[:-1], x.shape[-1] // 2) and h.is_contiguous()
    assert_close(h, ref, dtype, "h")
    if dh is None:
        dh = randn(*h.shape, dtype=dtype)
    h.backward(dh)
    ref.backward(dh.detach().double().cpu())
    assert_close(leaf.grad, ref_leaf.grad, dtype, "grad of x")


def same(x):
    return x


def non_leaf(x):
    """x as an op's output (as the up-projection's): the gradient then goes into its storage."""
    return x * 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(7, 66), (2, 3, 32), (1, 2), (33, 128)], ids=["7x2*33", "2x3x2*16", "1x2*1", "33x2*64"]
)
@pytest.mark.parametrize("where", ["buffer", "in-place"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_against_float64(activation, where, shape, dtype, seed):
    """Odd hidden sizes and leading dims; the gradient in its own buffer (leaf x) and in x's storage (non-leaf x)."""
    check(randn(*shape, dtype=dtype, requires_grad=True), same if where == "buffer" else non_leaf, activation, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_several_row_and_column_blocks(activation, dtype, seed):
    """Small tiles under the interpreter: 16-column blocks (the last partly masked) and 4-row blocks, 2 × 3 tiles."""
    with gated_kernels.interpreter_tiling(64, 16):
        grid, meta = gated_kernels.launch_config(7, 33)
        if not ON_GPU:
            assert grid == (6,) and (meta["BLOCK_M"], meta["BLOCK_N"]) == (4, 16)
        check(randn(7, 66, dtype=dtype, requires_grad=True), non_leaf, activation, dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_strided_and_stride_zero_inputs(activation, seed):
    """x a column slice of a wider tensor (rows 71 apart), x transposed (column stride ≠ 1), x broadcast from one
    row (row stride 0), and gradients dh with stride 0 (from a sum) or transposed."""
    dtype = torch.float32
    wide = randn(5, 71, dtype=dtype, requires_grad=True)
    check(wide, lambda t: t[:, 3:69], activation, dtype)
    wide.grad = None
    check(wide, lambda t: non_leaf(t)[:, 3:69], activation, dtype, dh=torch.ones(1, device=DEVICE).expand(5, 33))
    stored_t = randn(66, 5, dtype=dtype, requires_grad=True)
    check(stored_t, lambda t: t.t(), activation, dtype, dh=randn(33, 5, dtype=dtype).t())
    stored_t.grad = None
    check(stored_t, lambda t: non_leaf(t).t(), activation, dtype)
    row = randn(1, 66, dtype=dtype, requires_grad=True)
    check(row, lambda t: t.expand(6, 66), activation, dtype)
    row.grad = None
    check(row, lambda t: non_leaf(t).expand(6, 66), activation, dtype)


def test_gradient_goes_into_the_up_projection_output(seed):
    """By default x is never written (non-leaf included: it may be read again after the backward, as logits are);
    inplace_grad=None puts [da | db] into a non-leaf x's storage (no gradient buffer) and leaves a leaf x alone;
    inplace_grad=True writes into any x."""
    leaf = randn(7, 66, requires_grad=True)
    x = non_leaf(leaf)
    kept = x.detach().clone()
    h = F_tri.swiglu(x)
    h.backward(randn(*h.shape))
    assert torch.equal(x.detach(), kept) and not torch.equal(leaf.grad, kept)
    leaf.grad = None
    x = non_leaf(leaf)
    h = F_tri.swiglu(x, inplace_grad=None)
    h.backward(randn(*h.shape))
    assert torch.equal(x.detach(), leaf.grad)
    kept = leaf.detach().clone()
    F_tri.swiglu(leaf, inplace_grad=None).backward(randn(7, 33))
    assert torch.equal(leaf.detach(), kept)
    copy = leaf.detach().clone().requires_grad_()
    F_tri.swiglu(copy, inplace_grad=True).backward(randn(7, 33))
    assert copy.grad.data_ptr() == copy.data_ptr()


def test_module_gradient_goes_into_the_up_projection_output(seed, monkeypatch):
    """TritonGatedMLP's up-projection output (a view that the linear's autograd.Function returns) takes the
    gradient in place; the result equals the out-of-place one. A view of a leaf is never written."""
    mlp = TritonGatedMLP(16, 24).to(DEVICE)
    inputs = randn(3, 5, 16, requires_grad=True)
    calls = []
    into_x = gated_functional._gated_backward_into_x_op
    monkeypatch.setattr(gated_functional, "_gated_backward_into_x_op", lambda *a: calls.append(1) or into_x(*a))
    mlp(inputs).sum().backward()
    assert calls == [1]
    grads = [p.grad.clone() for p in (inputs, *mlp.parameters())]
    for p in (inputs, *mlp.parameters()):
        p.grad = None
    up = mlp.up(inputs)
    mlp.down(F_tri.gated_activation(up, mlp.gate, inplace_grad=False)).sum().backward()
    for (name, p), grad in zip([("x", inputs), *mlp.named_parameters()], grads, strict=True):
        assert_close(grad, p.grad, torch.float32, f"grad of {name}")
    leaf = randn(4, 48, requires_grad=True)
    kept = leaf.detach().clone()
    F_tri.swiglu(leaf[1:], inplace_grad=None).sum().backward()
    assert calls == [1] and torch.equal(leaf.detach(), kept)


def test_second_backward(seed):
    """retain_graph=True: the in-place gradient (the module's default) cannot run twice and says so; with
    inplace_grad=False the module backs up twice as TorchGatedMLP does (every gradient doubled)."""
    x = randn(3, 5, 16)
    mlp = TritonGatedMLP(16, 24).to(DEVICE)
    y = mlp(x)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run again.*inplace_grad=False"):
        y.sum().backward()
    ours = TritonGatedMLP(16, 24, inplace_grad=False).to(DEVICE)
    twin = TorchGatedMLP(16, 24).to(DEVICE)
    twin.load_state_dict(ours.state_dict())
    for module in (ours, twin):
        y = module(x)
        y.sum().backward(retain_graph=True)
        y.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters(), strict=True):
        assert_close(p.grad, q.grad, torch.float32, f"grad of {name} after two backward passes")
    with pytest.raises(TypeError, match="inplace_grad"):
        TritonGatedMLP(16, 24, inplace_grad=None)


def test_module_leaves_a_hooked_up_projection_output_alone(seed):
    """A hook on up (activation capture, say) may keep its output: the gradient then takes a buffer of its own and
    the kept tensor stays what the forward made; likewise for a hook registered for every module."""
    mlp = TritonGatedMLP(16, 24).to(DEVICE)
    inputs = randn(3, 5, 16, requires_grad=True)
    for register in (mlp.up.register_forward_hook, torch.nn.modules.module.register_module_forward_hook):
        kept = {}
        handle = register(lambda module, args, out: kept.setdefault(module, (out, out.detach().clone())) and None)
        try:
            mlp(inputs).sum().backward()
        finally:
            handle.remove()
        out, copy = kept[mlp.up]
        assert torch.equal(out.detach(), copy)


def test_no_write_into_a_view_of_data_that_needs_no_gradient(seed):
    """inplace_grad=None writes only into an op output whose storage is no leaf's: a view that a custom Function
    returns of plain data (which needs no gradient) is left alone."""

    class ViewOf(torch.autograd.Function):
        @staticmethod
        def forward(ctx, data, weight):
            return data.view(data.shape)

        @staticmethod
        def backward(ctx, grad):
            return None, grad.sum()

    data = randn(4, 48)
    kept = data.clone()
    x = ViewOf.apply(data, torch.ones((), device=DEVICE, requires_grad=True))
    F_tri.swiglu(x, inplace_grad=None).sum().backward()
    assert torch.equal(data, kept)


def test_in_place_gradient_is_never_silently_wrong(seed):
    """Another op that saved x raises when its backward runs after ours, and so does a second backward of ours."""
    leaf = randn(5, 16, requires_grad=True)
    x = non_leaf(leaf)
    square = x * x  # saves x; created first, so its backward runs after the gate's
    loss = F_tri.geglu(x, inplace_grad=None).sum() + square.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    h = F_tri.swiglu(non_leaf(leaf), inplace_grad=None)
    h.backward(torch.ones_like(h), retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run again"):
        h.backward(torch.ones_like(h))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_nan_and_inf_propagate(activation, dtype):
    """NaN and ±inf in a or b give NaN/inf in h and in [da | db] exactly where torch's formulas do."""
    x = randn(3, 8, dtype=dtype)
    x[0, 1], x[0, 2], x[1, 0], x[1, 6], x[2, 7] = float("nan"), float("inf"), float("-inf"), float("nan"), float("inf")
    leaf = x.requires_grad_()
    h = F_tri.gated_activation(leaf, activation)
    dh = randn(3, 4, dtype=dtype)
    h.backward(dh)
    ref_leaf = reference_copy(leaf)
    ref = reference_gate(ref_leaf, activation)
    ref.backward(dh.double().cpu())
    for ours, expected in ((h, ref), (leaf.grad, ref_leaf.grad)):
        assert torch.equal(ours.detach().cpu().isnan(), expected.isnan())
        assert torch.equal(ours.detach().cpu().isinf(), expected.isinf())
        finite = expected.isfinite()
        assert_close(ours.detach().cpu()[finite], expected[finite], dtype, "finite part")


def test_named_entries():
    x = randn(3, 10)
    assert torch.equal(F_tri.swiglu(x), F_tri.gated_activation(x, "silu"))
    assert torch.equal(F_tri.geglu(x), F_tri.gated_activation(x, "gelu"))


def test_bad_inputs_get_clear_errors():
    x = randn(4, 10)
    cases = [
        (ValueError, "even", lambda: F_tri.swiglu(randn(4, 9))),
        (ValueError, "even", lambda: F_tri.swiglu(randn(4, 0))),
        (ValueError, r"\[\.\.\., 2·hidden\]", lambda: F_tri.swiglu(torch.tensor(1.0, device=DEVICE))),
        (TypeError, "dtype", lambda: F_tri.geglu(x.long())),
        (TypeError, "torch.Tensor", lambda: F_tri.swiglu(x.tolist())),
        (ValueError, "unknown gated activation", lambda: F_tri.gated_activation(x, "relu")),
        (ValueError, "do not overlap", lambda: F_tri.swiglu(randn(1, 10).expand(4, 10), inplace_grad=True)),
        (ValueError, "do not overlap", lambda: F_tri.swiglu(randn(10, 4).t(), inplace_grad=True)),
        (TypeError, "inplace_grad", lambda: F_tri.swiglu(x, inplace_grad="yes")),
        (ValueError, "activation must be one of", lambda: TritonGatedMLP(8, 4, activation="gelu")),
        (ValueError, "hidden must be a positive int", lambda: TorchGatedMLP(8, 0)),
        (ValueError, "in_features", lambda: TritonGatedMLP(8, 4).to(DEVICE)(randn(3, 7))),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_module_twins_agree(activation, bias, dtype, seed):
    """TritonGatedMLP and TorchGatedMLP with one state_dict: the same outputs and gradients of x and every
    parameter (each against the float64 twin)."""
    ours = TritonGatedMLP(24, 33, activation=activation, bias=bias).to(DEVICE, dtype)
    twin = TorchGatedMLP(24, 33, activation=activation, bias=bias).to(DEVICE, dtype)
    twin.load_state_dict(ours.state_dict())
    reference = TorchGatedMLP(24, 33, activation=activation, bias=bias).double()
    reference.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in twin.named_parameters()]
    x = randn(2, 5, 24, dtype=dtype, requires_grad=True)
    xt, xr = x.detach().clone().requires_grad_(), reference_copy(x)
    dy = randn(2, 5, 24, dtype=dtype)
    outs = [module(inp) for module, inp in ((ours, x), (twin, xt), (reference, xr))]
    for out in outs:
        out.backward(dy.to(out.device, out.dtype))
    for name, out, inp, module in (("triton", outs[0], x, ours), ("torch", outs[1], xt, twin)):
        assert_close(out, outs[2], dtype, f"{name} output")
        assert_close(inp.grad, xr.grad, dtype, f"{name} grad of x")
        for (pname, p), (_, pr) in zip(module.named_parameters(), reference.named_parameters()):
            assert_close(p.grad, pr.grad, dtype, f"{name} grad of {pname}")
    assert ours.residual_projection() is ours.down.weight


@pytest.mark.skipif(not ON_GPU, reason=GPU_ONLY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["buffer", "in-place"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("shape", [(1024, 2 * 11008), (4097, 2 * 3072), (513, 2 * 1377)])
def test_large_on_gpu(shape, activation, where, dtype, seed):
    check(randn(*shape, dtype=dtype, requires_grad=True), same if where == "buffer" else non_leaf, activation, dtype)


def test_bench_suite_rows(seed):
    """The gated_mlp bench suite: a row per op, mode and provider, the same bytes for each (forward: a, b in and h
    out; forward+backward also dh, a, b in and da, db out)."""
    from triformer.bench import gated_mlp as gated_bench

    names = ("triformer", "triformer (grad buffer)", "torch")
    rows = gated_bench.run([(5, 9)], dtype=torch.float32, device=DEVICE, progress=False, rounds=1, names=names)
    assert [(r["op"], r["mode"], r["provider"]) for r in rows] == [
        (op, mode, name) for op in ("swiglu", "geglu") for mode in ("fwd", "fwd+bwd") for name in names
    ]
    for row in rows:
        assert row["error"] == "" and row["shape"] == "5x9"
        elements = 3 * 45 if row["mode"] == "fwd" else 8 * 45
        assert row["rate"] * row["ms"] * 1e6 == pytest.approx(elements * 4)
    if not ON_GPU:
        assert isinstance(gated_bench.providers("cpu")["torch.compile"], RuntimeError)


FORWARD_TYPES = dict(x_ptr="*bf16", h_ptr="*bf16", M="i32", N="i32", stride_xm="i32", stride_xn="i32", stride_hm="i32")
BACKWARD_TYPES = dict(
    dh_ptr="*bf16",
    x_ptr="*bf16",
    dx_ptr="*bf16",
    M="i32",
    N="i32",
    stride_dhm="i32",
    stride_dhn="i32",
    stride_xm="i32",
    stride_xn="i32",
    stride_dxm="i32",
    stride_dxn="i32",
)
# [M, hidden] as the GPU launches them; unit column strides specialized to 1 (constexpr) as Triton does
COMPILE_CASES = [f"{act}-{m}x{n}" for act in ("silu", "gelu") for m, n in ((8192, 11008), (16384, 3072), (7, 33))]


def compile_all() -> dict:
    """In a process without the interpreter: case → {kernel: spilled bytes} or the error that stopped it."""
    from triformer.kernels import gated as kernels
    from triformer.kernels.activation import activation_code

    def case(name):
        act, _, shape = name.partition("-")
        m, n = map(int, shape.split("x"))
        meta = dict(kernels._launch(m, n, kernels.GPU_TILE, kernels.GPU_MAX_BLOCK_N)[1])
        warps = meta.pop("num_warps")
        flags = {**meta, "ACT": activation_code(act)}
        return {
            "forward": spilled_bytes(
                compile_for_sm90(kernels._gated_forward_kernel, FORWARD_TYPES, {**flags, "stride_xn": 1}, warps)
            ),
            "backward": spilled_bytes(
                compile_for_sm90(
                    kernels._gated_backward_kernel,
                    BACKWARD_TYPES,
                    {**flags, "stride_xn": 1, "stride_dhn": 1, "stride_dxn": 1},
                    warps,
                )
            ),
        }

    return report_each({name: (lambda name=name: case(name)) for name in COMPILE_CASES})


@pytest.fixture(scope="module")
def compiled():
    return child_report(__file__)


@pytest.mark.skipif(ON_GPU, reason="on a GPU every other test compiles the kernels natively")
@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiles_for_sm90_without_spills(case, compiled):
    """The GPU launches compile for an H100 without spilling registers."""
    assert_compiled_without_spills(compiled, case)


if __name__ == "__main__":
    print(json.dumps(compile_all()))
