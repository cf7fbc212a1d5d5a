"""Fused linear + cross-entropy (functional and modules): loss and the gradients of x, weight and bias against
float64 F.cross_entropy(F.linear(...)); chunking (sizes that do not divide N, the logits never whole); strided
inputs; the accumulating product of the weight gradient (pointer and TMA kernels) on its own; bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, DTYPES, ON_GPU, TOLERANCE, assert_close, make_targets, randn, reference_copy, relative_error

import triformer.functional as F_tri
from triformer import TritonLinearCrossEntropyLoss
from triformer.kernels import cross_entropy as ce_kernels
from triformer.kernels import linear_cross_entropy as lce_kernels
from triformer.kernels import matmul_tma
from triformer.kernels._runtime import cdiv
from triformer.nn import TorchLinearCrossEntropyLoss

# Ignored and padding rows compute −inf − (−inf), log 0 and 1 / 0 in numpy under the interpreter; all masked.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:divide by zero encountered:RuntimeWarning"
)

# (N, H, V, chunk_size): N not a multiple of the chunk, V not a multiple of any block; larger natively.
SHAPE = (2049, 256, 1000, 300) if ON_GPU else (19, 17, 257, 7)


def make_inputs(n, h, v, dtype, bias=True, lead=()):
    x = randn(*lead, n, h, dtype=dtype, requires_grad=True)
    w = randn(v, h, dtype=dtype, scale=h**-0.5, requires_grad=True)
    b = randn(v, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


def reference(x, w, b, targets, **kwargs):
    """The loss in float64 on the CPU, from leaves that collect the gradients."""
    xr, wr, br = (reference_copy(t) for t in (x, w, b))
    loss = F.cross_entropy(F.linear(xr, wr, br).reshape(-1, wr.shape[0]), targets.cpu().reshape(-1), **kwargs)
    if kwargs.get("reduction") == "none":
        loss = loss.view(targets.shape)
    return loss, (xr, wr, br)


def run_and_compare(x, w, b, targets, dtype, dloss_scale=2.0, **kwargs):
    """Ours against the float64 reference: the loss, then the gradients of every input that requires one."""
    ref, ref_leaves = reference(
        x, w, b, targets, **{k: a for k, a in kwargs.items() if k not in ("chunk_size", "accum_dtype")}
    )
    ours = F_tri.linear_cross_entropy(x, w, targets, b, **kwargs)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert_close(ours, ref, dtype, "loss")  # the logits are rounded to the input dtype (as F.linear's)
    dloss = torch.rand(ref.shape, dtype=torch.float64) + 0.5 if ref.dim() else torch.tensor(dloss_scale).double()
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(ours, inputs, dloss.to(DEVICE, torch.float32))
    ref_grads = torch.autograd.grad(
        ref, [r for t, r in zip((x, w, b), ref_leaves) if t is not None and t.requires_grad], dloss
    )
    for name, got, want, t in zip(("x", "weight", "bias"), grads, ref_grads, inputs):
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert_close(got, want, dtype, f"grad of {name}")
    return ours, grads


CASES = [("mean", 0.0), ("sum", 0.1), ("none", 0.0), ("mean", 0.2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction,smoothing", CASES, ids=[f"{r}-ls{s}" for r, s in CASES])
def test_against_float64(reduction, smoothing, dtype, seed):
    n, h, v, chunk = SHAPE
    x, w, b = make_inputs(n, h, v, dtype)
    run_and_compare(
        x, w, b, make_targets((n,), v), dtype, reduction=reduction, label_smoothing=smoothing, chunk_size=chunk
    )


@pytest.mark.parametrize("v", [1000, 65])
def test_vocabulary_and_leading_dims(v, seed):
    """[B, T, H] inputs with [B, T] targets, no bias, a custom ignore_index; V not a multiple of any block."""
    x, w, _ = make_inputs(5, 9, v, torch.float32, bias=False, lead=(2,))
    run_and_compare(x, w, None, make_targets((2, 5), v, ignore_index=3), torch.float32, ignore_index=3, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [1, 5, 11, 64, None])
def test_chunk_sizes(chunk_size, ce_rows, seed):
    """One row a chunk, sizes that do not divide N, exactly N, more than N, and the default."""
    x, w, b = make_inputs(11, 8, 33, torch.float32)
    run_and_compare(x, w, b, make_targets((11,), 33), torch.float32, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_gradient_accumulated_in_its_own_dtype(dtype, seed):
    """accum_dtype=None: dW accumulates in the gradient itself (rounded once per chunk), still within tolerance."""
    n, h, v, chunk = SHAPE
    x, w, b = make_inputs(n, h, v, dtype)
    run_and_compare(x, w, b, make_targets((n,), v), dtype, chunk_size=chunk, accum_dtype=None)


@pytest.mark.parametrize("dtype", DTYPES[1:])  # 16-bit
def test_float32_weight_gradient_is_rounded_once(dtype, seed, monkeypatch):
    """accum_dtype=float32 with a 16-bit weight over many chunks: the slab pass sums every row's share of dW in one
    float32 accumulator, so its error is well below that of the gradient rounded once per chunk; slabs hold no more
    logits than a chunk."""
    n, h, v, chunk = 128, 16, 256, 2
    slabs = []
    real_slab_grad = lce_kernels.slab_grad_

    def counting_slab_grad(z, *args):
        slabs.append(tuple(z.shape))
        return real_slab_grad(z, *args)

    monkeypatch.setattr(lce_kernels, "slab_grad_", counting_slab_grad)
    x = randn(n, h, dtype=dtype)
    w = randn(v, h, dtype=dtype, scale=h**-0.5, requires_grad=True)
    targets = make_targets((n,), v)
    ref_loss, (_, ref_w, _) = reference(x, w, None, targets)
    (want,) = torch.autograd.grad(ref_loss, ref_w)
    errors = {}
    for accum in (torch.float32, None):
        slabs.clear()
        loss = F_tri.linear_cross_entropy(x, w, targets, chunk_size=chunk, accum_dtype=accum)
        (got,) = torch.autograd.grad(loss, w)
        errors[accum] = relative_error(got, want)
        assert bool(slabs) == (accum is not None)
        assert all(rows == n and rows * cols <= chunk * v for rows, cols in slabs)
        assert sum(cols for _, cols in slabs) == (v if slabs else 0)
    assert errors[torch.float32] * 2 < errors[None], errors
    assert errors[torch.float32] < TOLERANCE[dtype]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_slab_gradient_equals_the_cross_entropy_gradient(smoothing, ce_rows, seed):
    """slab_grad_ over column slabs of the logits (widths not a multiple of its block, targets in other slabs,
    ignored and out-of-range targets, a per-row scale, inf and NaN on ignored rows, 0 on a counted one) gives the
    columns of the cross-entropy kernel's gradient."""
    m, v = 37, 203
    logits = randn(m, v, dtype=torch.float32) * 4
    targets = make_targets((m,), v).to(torch.int64)
    targets[3], targets[5] = v + 2, -7  # out of range: NaN rows
    scale = torch.rand(m, device=DEVICE) + 0.5
    targets[0], targets[1], targets[7] = -100, -100, 11
    scale[0], scale[1], scale[7] = float("inf"), float("nan"), 0.0  # ignored rows stay 0 whatever their scale
    want = torch.empty_like(logits)
    stats = torch.empty(3, m, device=DEVICE)
    ce_kernels.cross_entropy_forward(logits, targets, -100, smoothing, want, 1, stats=stats)
    want = torch.where((targets == -100)[:, None], 0.0, want * scale[:, None])  # ignored: 0, as the loss ignores them
    for first, last in ((0, 64), (64, 67), (67, 200), (200, 203)):
        got = logits[:, first:last].contiguous()
        lce_kernels.slab_grad_(got, stats, targets, first, v, -100, smoothing, scale)
        assert torch.equal(got.isnan(), want[:, first:last].isnan())
        assert_close(got.nan_to_num(), want[:, first:last].nan_to_num(), torch.float32, f"columns {first}:{last}")


def test_slab_pass_keeps_the_precision_of_large_logits(seed):
    """Logits near 1e4 (fp16): the slab pass subtracts the row max before the exponential (a rounded float32
    log-sum-exp would cost |lse|·2⁻²⁴ of every probability), so its weight gradient is as accurate as the one-chunk
    path's, both against float64 math on the same fp16-rounded logits."""
    n, h, v = 48, 16, 64
    x = randn(n, h, dtype=torch.float16)
    w = randn(v, h, dtype=torch.float16, scale=h**-0.5 * 16, requires_grad=True)
    b = torch.full((v,), 1e4, device=DEVICE, dtype=torch.float16)
    targets = make_targets((n,), v, ignored=0.0)
    x64, w64 = x.double().cpu(), w.detach().double().cpu()
    z = F.linear(x64, w64, b.double().cpu()).half().double().requires_grad_()  # the logits as the kernels round them
    (dz,) = torch.autograd.grad(F.cross_entropy(z, targets.cpu()), z)
    want = dz.t() @ x64
    errors = []
    for chunk in (n, 4):  # one chunk (no slab pass), then 12 chunks and the slab pass
        (got,) = torch.autograd.grad(F_tri.linear_cross_entropy(x, w, targets, b, chunk_size=chunk), w)
        errors.append(relative_error(got, want))
    assert errors[1] <= 1.05 * errors[0], errors  # a rounded float32 lse: 1.15–1.25× here


def test_slab_target_term_ignores_a_recomputed_target_logit(monkeypatch, seed):
    """Confident rows (p_t ≈ 1, gradient e^(x_t − lse) − 1 ≈ 0): the slab pass forms the target's term from the x_t
    the chunk read, so slab products that round every logit one unit of fp16 higher (another tile or kernel may)
    move the weight gradient by about that unit, where a recomputed x_t would move the target terms wholly."""
    n, h, v = 32, 16, 48
    targets = make_targets((n,), v, ignored=0.0)
    w = torch.nn.functional.normalize(randn(v, h), dim=1)
    x = (12.0 * w[targets]).half()  # each row's target logit 12, the others ≈ 12·cos: p_t ≈ 1
    w = w.half().requires_grad_()
    (exact,) = torch.autograd.grad(F_tri.linear_cross_entropy(x, w, targets, chunk_size=4), w)
    real_matmul = lce_kernels.matmul

    def one_unit_up(a, b_, **kwargs):
        out, pre = real_matmul(a, b_, **kwargs)
        if out.shape[0] == n:  # a slab's product: every logit one fp16 unit higher
            out = torch.nextafter(out, torch.full_like(out, float("inf")))
        return out, pre

    monkeypatch.setattr(lce_kernels, "matmul", one_unit_up)
    (shifted,) = torch.autograd.grad(F_tri.linear_cross_entropy(x, w, targets, chunk_size=4), w)
    change = relative_error(shifted, exact)
    assert change < 2e-2, change  # a recomputed x_t: 0.6 here


def test_slab_columns():
    """As few slabs as keep their logits no larger than a chunk's, as equal as whole 128-column tiles allow where they
    cost at most an eighth of a chunk's width (else 8-column multiples, 16-byte rows), at least one column."""
    assert lce_kernels.slab_columns(8192, 50304, 1024) == 5632  # 6288 a chunk's: 9 slabs (8 of 6272 + 128), evened
    assert lce_kernels.slab_columns(8192, 50304, 128) == 768  # 786 a chunk's: 66 slabs, the last of 384
    assert lce_kernels.slab_columns(8192, 128256, 256) == 3968  # 4008 a chunk's: 33 slabs
    assert lce_kernels.slab_columns(8192, 500, 1024) == 56  # 62 a chunk's, under 128: 9 slabs of 8-column multiples
    assert lce_kernels.slab_columns(1024, 2550, 102) == 232  # 254 a chunk's: 11 slabs of 8-column multiples, not 20
    assert lce_kernels.slab_columns(1000, 333, 7) == 2  # 2 a chunk's, under 8: 167 slabs of 2 columns, the last of 1
    assert lce_kernels.slab_columns(100, 7, 3) == 1
    assert lce_kernels.slab_columns(2, 17, 1) == 8  # a budget of 8 columns: 8 + 8 + 1, not 6 + 6 + 5
    for n, v, chunk in ((8192, 50304, 1024), (8192, 128256, 256), (8192, 50304, 128), (1024, 2550, 102), (41, 33, 9)):
        cols = lce_kernels.slab_columns(n, v, chunk)
        assert 1 <= cols <= v and n * cols <= max(chunk * v, n)
        budget = chunk * v // n
        whole_tiles = budget >= 128 and budget % 128 <= budget // 8
        assert cols % 128 == 0 if whole_tiles else cols % 8 == 0 or cols == v or budget < 8
        assert v - (cdiv(v, cols) - 1) * cols >= 1  # no empty last slab


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_linear_then_cross_entropy(dtype, seed):
    """The same numbers as triformer's own cross_entropy(linear(x)) on the full logits."""
    n, h, v, chunk = SHAPE
    x, w, b = make_inputs(n, h, v, dtype)
    targets = make_targets((n,), v)
    ours = F_tri.linear_cross_entropy(x, w, targets, b, label_smoothing=0.1, chunk_size=chunk)
    grads = torch.autograd.grad(ours, (x, w, b))
    unfused = F_tri.cross_entropy(F_tri.linear(x, w, b, activation=None), targets, label_smoothing=0.1)
    unfused_grads = torch.autograd.grad(unfused, (x, w, b))
    # Both round the logits and their gradient to the input dtype alike; only sums may run in another order.
    assert_close(ours, unfused, dtype, "loss", tol=TOLERANCE[dtype] / 10)
    for name, got, want in zip(("x", "weight", "bias"), grads, unfused_grads):
        assert_close(got, want, dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES[:2])  # fp16: the slab pass
def test_only_some_inputs_need_gradients(dtype, seed):
    """Gradients are computed only for what requires them; no gradient at all runs the loss alone."""
    x, w, b = make_inputs(9, 8, 33, dtype)
    targets = make_targets((9,), 33)
    w.requires_grad_(False)
    run_and_compare(x, w, b, targets, dtype, chunk_size=4)
    x.requires_grad_(False)
    w.requires_grad_(True)
    b.requires_grad_(False)
    run_and_compare(x, w, b, targets, dtype, chunk_size=4)
    b.requires_grad_(True)
    run_and_compare(x, w, b, targets, dtype, chunk_size=4, reduction="none", label_smoothing=0.1)
    with torch.no_grad():
        loss = F_tri.linear_cross_entropy(x, w, targets, b, chunk_size=4)
    assert_close(loss, reference(x, w, b, targets)[0], dtype, "loss under no_grad")


@pytest.mark.parametrize("dtype", DTYPES[:2])  # fp16: the slab pass
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(reduction, dtype, seed):
    """As torch: "mean" gives NaN (0 / 0), "sum" 0, "none" zeros; every gradient is zero."""
    x, w, b = make_inputs(6, 8, 33, dtype)
    targets = torch.full((6,), -100, device=DEVICE)
    ours = F_tri.linear_cross_entropy(x, w, targets, b, reduction=reduction, chunk_size=4)
    ref = F.cross_entropy(F.linear(*(t.detach().double().cpu() for t in (x, w, b))), targets.cpu(), reduction=reduction)
    assert torch.equal(ours.isnan().cpu(), ref.isnan())
    assert torch.equal(ours.nan_to_num().cpu().double(), ref.nan_to_num())
    for grad in torch.autograd.grad(ours.sum(), (x, w, b)):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", DTYPES[:2])  # fp16: the slab pass
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inf_and_nan_incoming_gradients_leave_ignored_rows_at_zero(reduction, dtype, seed):
    """As torch: an ignored row's gradient of x is 0 whatever its incoming gradient (inf, NaN), and it adds nothing
    to the weight's gradient; rows of finite incoming gradients as before."""
    x, w, b = make_inputs(6, 8, 33, dtype)
    targets = torch.tensor([1, -100, 3, -100, 5, 0], device=DEVICE)
    if reduction == "none":
        dloss = torch.tensor([1.0, float("inf"), 2.0, float("nan"), 1.0, 3.0], device=DEVICE)
    else:
        dloss = torch.tensor(float("inf"), device=DEVICE)
    loss = F_tri.linear_cross_entropy(x, w, targets, b, reduction=reduction, chunk_size=2)
    dx, dw = torch.autograd.grad(loss, (x, w), dloss)
    assert not dx[1].any() and not dx[3].any()
    if reduction == "none":
        ref, (xr, wr, _) = reference(x, w, b, targets, reduction="none")
        ref_dx, ref_dw = torch.autograd.grad(ref, (xr, wr), dloss.nan_to_num(posinf=0.0).double().cpu())
        assert_close(dx, ref_dx, dtype, "grad of x")
        assert_close(dw, ref_dw, dtype, "grad of weight")
    else:
        assert not dx[0].isfinite().any() and not dw.isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES[:2])  # fp16: the slab pass
def test_strided_and_broadcast_views(dtype, seed):
    """x a time-shifted [B, T−1, H] slice and a stride-0 broadcast row; weight a transposed view and a column
    step; bias with a step and broadcast; targets with a step and broadcast."""
    v, h = 33, 8
    x_shifted = randn(2, 6, h, dtype=dtype, requires_grad=True)
    w_t = randn(h, v, dtype=dtype, scale=h**-0.5, requires_grad=True)
    b_step = randn(2 * v, dtype=dtype, requires_grad=True)
    targets = make_targets((2, 10), v)[:, ::2]
    run_and_compare(x_shifted[:, :-1], w_t.t(), b_step[::2], targets, dtype, chunk_size=3)
    x_row = randn(1, h, dtype=dtype, requires_grad=True)
    w_step = randn(v, 2 * h, dtype=dtype, scale=h**-0.5, requires_grad=True)
    b_row = randn(1, dtype=dtype, requires_grad=True)
    target = make_targets((1,), v, ignored=0.0)
    run_and_compare(x_row.expand(7, h), w_step[:, ::2], b_row.expand(v), target.expand(7), dtype, chunk_size=3)


def test_out_of_range_targets_raise(seed):
    """At the call on the CPU; on a GPU (where the call does not wait for its check) by check_targets()."""
    x, w, b = make_inputs(5, 8, 10, torch.float32)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\) or equal ignore_index=-100; found 10"):
        F_tri.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3, 10], device=DEVICE), b, chunk_size=2)
        F_tri.check_targets()
    with pytest.raises(ValueError, match="found -1"):
        F_tri.linear_cross_entropy(x, w, torch.tensor([0, -1, 2, 3, 4], device=DEVICE), b, reduction="none")
        F_tri.check_targets()


def test_bad_inputs():
    x, w, b = make_inputs(4, 8, 10, torch.float32)
    t = make_targets((4,), 10, ignored=0.0)
    lce = F_tri.linear_cross_entropy
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        lce(x, w.half(), t)
    with pytest.raises(TypeError, match="bias has dtype torch.float16"):
        lce(x, w, t, b.half())
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        lce(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), w, t)
    with pytest.raises(TypeError, match="targets has dtype torch.float32"):
        lce(x, w, t.float())
    with pytest.raises(ValueError, match=r"x of shape \(4, 7\) must be \[\.\.\., H\] with H = 8"):
        lce(x[:, :7], w, t)
    with pytest.raises(ValueError, match=r"weight must be 2-D \[V, H\]"):
        lce(x, w[None], t)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        lce(x, w, t, b[:9])
    with pytest.raises(ValueError, match=r"targets of shape \(3,\) do not match x \(4, 8\)"):
        lce(x, w, t[:3])
    with pytest.raises(ValueError, match="reduction must be one of"):
        lce(x, w, t, reduction="avg")
    for smoothing in (-0.1, "0.1", True, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing must lie in"):
            lce(x, w, t, label_smoothing=smoothing)
    for chunk in (0, True, 2.5):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            lce(x, w, t, chunk_size=chunk)
    with pytest.raises(ValueError, match="accum_dtype must be torch.float32 or None"):
        lce(x, w, t, accum_dtype=torch.float16)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        lce(x, w, t, ignore_index=1.5)
    if ON_GPU:
        with pytest.raises(ValueError, match="targets are on cpu"):
            lce(x, w, t.cpu())


def test_module_constructor_validates():
    with pytest.raises(ValueError, match="reduction must be one of"):
        TritonLinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        TorchLinearCrossEntropyLoss(label_smoothing=2.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        TritonLinearCrossEntropyLoss(chunk_size=0)
    with pytest.raises(ValueError, match="accum_dtype must be"):
        TritonLinearCrossEntropyLoss(accum_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        TritonLinearCrossEntropyLoss(ignore_index=None)


def test_cpu_tensor_without_interpreter(without_interpreter):
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        F_tri.linear_cross_entropy(torch.randn(2, 8), torch.randn(5, 8), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_as_tied_head_matches_twin(dtype, seed):
    """A GPT head with tied embeddings: the embedding's weight passed to forward; the twin gives the same loss and
    gradients (the embedding's gradient collects both uses)."""
    v, h = 65, 16
    embedding = torch.nn.Embedding(v, h, device=DEVICE, dtype=dtype)
    tokens = torch.randint(0, v, (2, 7), device=DEVICE)
    targets = make_targets((2, 7), v)
    losses, grads = [], []
    for head in (
        TritonLinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=5),
        TorchLinearCrossEntropyLoss(label_smoothing=0.1),
    ):
        embedding.zero_grad()
        hidden = torch.tanh(embedding(tokens).float()).to(dtype)
        loss = head(hidden, embedding.weight, targets)
        loss.backward()
        losses.append(loss)
        grads.append(embedding.weight.grad.clone())
    assert_close(losses[0], losses[1].double(), torch.float32 if dtype == torch.float32 else dtype, "loss")
    assert_close(grads[0], grads[1], dtype, "grad of the tied embedding", tol=2 * TOLERANCE[dtype])


def test_autocast_runs_in_its_dtype(seed):
    """Under autocast x, weight and bias are cast as F.linear casts them; the gradients come back in float32."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    x, w, b = make_inputs(9, 8, 33, torch.float32)
    targets = make_targets((9,), 33)
    with torch.autocast(DEVICE, dtype=dtype):
        loss = F_tri.linear_cross_entropy(x, w, targets, b, chunk_size=4)
    grads = torch.autograd.grad(loss, (x, w, b))
    rounded = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    ref, leaves = reference(*rounded, targets)
    assert_close(loss, ref, dtype, "loss")
    for name, got, want in zip(("x", "weight", "bias"), grads, torch.autograd.grad(ref, leaves)):
        assert got.dtype == torch.float32
        assert_close(got, want, dtype, f"grad of {name}")


def test_backward_of_stored_gradients_runs_once(seed):
    x, w, b = make_inputs(5, 8, 10, torch.float32)
    targets = make_targets((5,), 10)
    loss = F_tri.linear_cross_entropy(x, w, targets, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="its backward can run only once"):
        loss.backward()
    losses = F_tri.linear_cross_entropy(x, w, targets, b, reduction="none")  # recomputed: any number of times
    first = torch.autograd.grad(losses.sum(), x, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(losses.sum(), x)[0], first)


def test_logits_exist_one_chunk_at_a_time(monkeypatch, seed):
    """The forward products make logits of at most chunk_size rows, one chunk after another: never [N, V]. The
    default chunk holds at most 1/8 of the rows (so of the full logits)."""
    products = []
    real_matmul = lce_kernels.matmul

    def counting_matmul(a, b, **kwargs):
        out = real_matmul(a, b, **kwargs)
        products.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(lce_kernels, "matmul", counting_matmul)
    n, h, v = 41, 8, 33
    x, w, b = make_inputs(n, h, v, torch.float32)
    targets = make_targets((n,), v)
    for chunk_size, chunks in ((9, 5), (None, 9)):
        products.clear()
        run_and_compare(x, w, b, targets, torch.float32, chunk_size=chunk_size)
        logits = [shape for shape in products if shape[1] == v]
        assert len(logits) == chunks and sum(rows for rows, _ in logits) == n
        assert max(rows for rows, _ in logits) <= (chunk_size or n // 8)
    assert lce_kernels.default_chunk_rows(8192, 50304, 2) == 1024
    assert lce_kernels.default_chunk_rows(8192, 128256, 2) == 1024
    assert lce_kernels.default_chunk_rows(8192, 128256, 4) == 512  # 256 MiB: 523 rows, whole 128-row tiles
    assert lce_kernels.default_chunk_rows(5, 33, 4) == 1


def test_slab_pass_lends_the_dw_memory_to_the_chunk_products(monkeypatch, seed):
    """dW by the slab pass is written only after the row chunks, so each chunk's logits and dx products may stage
    their split-K partials and TMA descriptors in dW's memory; dW summed chunk by chunk (accum_dtype=None) is live,
    and lends nothing; the slab pass's own products lend nothing either."""
    scratches = {"logits": [], "dx": [], "slab": []}
    real_matmul = lce_kernels.matmul
    n, h, v = 41, 8, 33

    def spying_matmul(a, b, **kwargs):
        kind = "dx" if "out" in kwargs else "logits" if a.shape[0] < n else "slab"  # dx products write into dx
        scratches[kind].append(kwargs.get("scratch"))
        return real_matmul(a, b, **kwargs)

    monkeypatch.setattr(lce_kernels, "matmul", spying_matmul)
    x, w, b = make_inputs(n, h, v, torch.float16)
    targets = make_targets((n,), v)
    for accum_dtype, lent in ((torch.float32, True), (None, False)):
        for calls in scratches.values():
            calls.clear()
        loss = F_tri.linear_cross_entropy(x, w, targets, b, chunk_size=9, accum_dtype=accum_dtype)
        torch.autograd.grad(loss, (x, w, b))
        assert len(scratches["logits"]) == len(scratches["dx"]) == 5
        assert bool(scratches["slab"]) == lent and all(scratch is None for scratch in scratches["slab"])
        for scratch in scratches["logits"] + scratches["dx"]:
            assert (scratch is not None) == lent
            assert scratch is None or (scratch.dtype == w.dtype and scratch.numel() <= w.numel())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_rows_stats_and_losses_wait_in_dw_last_slab(reduction, monkeypatch, seed):
    """With room in the rows of dW that the slab pass writes last, the rows' stats (and the per-row losses, which a
    "mean" reduces before the slab pass) wait there instead of in buffers of their own: the same results bit for
    bit; without room, buffers of their own."""
    n, h, v = 64, 256, 100  # 24-column slabs: the last one's 4 rows of dW hold 2 KiB, the workspace takes 1 KiB
    x, w, b = make_inputs(n, h, v, torch.float16)
    targets = make_targets((n,), v)
    real = lce_kernels.last_slab_workspace
    lent = []

    def spying(dw, last_slab_row, floats):
        lent.append(real(dw, last_slab_row, floats)[0] is not None)
        return real(dw, last_slab_row, floats)

    def results():
        loss = F_tri.linear_cross_entropy(x, w, targets, b, reduction=reduction, chunk_size=16)
        return (loss, *torch.autograd.grad(loss.sum(), (x, w, b)))

    monkeypatch.setattr(lce_kernels, "last_slab_workspace", spying)
    in_dw = results()
    monkeypatch.setattr(lce_kernels, "last_slab_workspace", lambda dw, row, floats: (None, dw.view(-1)))
    own_buffers = results()
    assert lent == [True]
    for ours, theirs in zip(in_dw, own_buffers, strict=True):
        assert torch.equal(ours, theirs)
    dw = torch.empty(v, h, dtype=torch.float16)
    assert real(dw, 96, 4 * n)[0] is not None and real(dw, 96, 4 * n + 512)[0] is None


@pytest.mark.skipif(not ON_GPU, reason="peak memory is measured with torch.cuda's allocator statistics")
@pytest.mark.parametrize("accum_dtype", [torch.float32, None])
def test_peak_memory_is_one_chunk_and_the_gradients(accum_dtype, seed):
    n, h, v = 8192, 512, 16384
    x, w, b = make_inputs(n, h, v, torch.bfloat16)
    targets = make_targets((n,), v)
    step = lambda: torch.autograd.grad(
        F_tri.linear_cross_entropy(x, w, targets, b, accum_dtype=accum_dtype),  # noqa
        (x, w, b),
    )
    step()  # compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    extra = torch.cuda.max_memory_allocated() - base
    chunk = lce_kernels.default_chunk_rows(n, v, 2)
    gradients = (n * h + v * h + v) * 2
    # One chunk's (or slab's) logits, the dx product's split-K partials (in dW's memory in the slab pass), float32
    # losses, log-sum-exps and column sums, the bias sums: no float32 [V, H] buffer.
    allowed = gradients + chunk * (v + h) * 2 + 4 * (2 * n + 3 * v) + 2**20
    assert extra <= allowed, f"{extra / 2**20:.1f} MiB extra, allowed {allowed / 2**20:.1f}"
    assert chunk * v * 2 <= n * v * 2 // 8  # the default chunk's logits: at most 1/8 of the full logits


# ------------------------------------------------------------------ the accumulating product on its own

TMA_SKIP = pytest.mark.skipif(
    ON_GPU and torch.cuda.get_device_capability()[0] < 9, reason="TMA needs compute capability 9.0 (Hopper)"
)
DTYPES_16 = [d for d in DTYPES if d.values[0] != torch.float32]


def _accumulate_reference(a, bmat, c, alpha):
    out = alpha.double().cpu() * (a.double().cpu() @ bmat.double().cpu())
    return out if c is None else out + c.double().cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_pointer_product_accumulates(accumulate, dtype, seed):
    """D = α·Gᵀ·x (+ C) with Gᵀ a transposed view (as the weight gradient reads it), C float32, D of any
    dtype."""
    m, n, k = 45, 37, 19
    g = randn(k, m, dtype=dtype)
    x = randn(k, n, dtype=dtype)
    c = randn(m, n, dtype=torch.float32) if accumulate else None
    d = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    alpha = torch.tensor(0.37, device=DEVICE)
    meta = lce_kernels._INTERPRETER_META if not ON_GPU else {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}
    lce_kernels.launch_pointer(g.t(), x, c, d, alpha, meta)
    assert_close(d, _accumulate_reference(g.t(), x, c, alpha), dtype, "D")


@TMA_SKIP
@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("programs", [1, 5])
def test_tma_product_accumulates(programs, dtype, seed):
    """The persistent TMA kernel (emulated by the interpreter): Gᵀ transposed, edges in M and N, C float32 into D of
    the input dtype, then C = D itself (in place)."""
    m, n, k = 72, 40, 24
    g, x = randn(k, m, dtype=dtype), randn(k, n, dtype=dtype)
    c = randn(m, n, dtype=torch.float32)
    d = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    alpha = torch.tensor(1.5, device=DEVICE)
    views = ((g, True), (x, False))
    meta = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
    lce_kernels.launch_tma(views, c, d, alpha, meta, programs)
    expected = _accumulate_reference(g.t(), x, c, alpha)
    assert_close(d, expected, dtype, "D = C + α·A·B")
    lce_kernels.launch_tma(views, d, d, None, meta, programs)
    assert_close(d, expected + g.t().double().cpu() @ x.double().cpu(), dtype, "D += A·B in place", tol=4e-3)


@pytest.mark.skipif(not ON_GPU, reason="the TMA path is taken on a Hopper GPU only")
def test_hopper_takes_the_tma_path():
    g = randn(64, 256, dtype=torch.bfloat16)
    x = randn(64, 128, dtype=torch.bfloat16)
    d = torch.empty(256, 128, device=DEVICE, dtype=torch.float32)
    expect = torch.cuda.get_device_capability()[0] >= 9
    assert (matmul_tma.tma_views(g.t(), x, d) is not None) == expect
