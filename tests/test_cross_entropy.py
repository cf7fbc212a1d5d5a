"""Cross-entropy (functional and module): loss and gradient against float64 F.cross_entropy; in-place gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, DTYPES, ON_GPU, assert_close, make_targets, randn
from rowwise import WIDTHS, rows_for

import triformer.functional as F_tri
from triformer import TritonCrossEntropyLoss

# Padding rows and ignored rows compute −inf − (−inf), log 0 and 1 / 0 in numpy under the interpreter; all masked.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:divide by zero encountered:RuntimeWarning"
)


def reference(logits, targets, **kwargs):
    """F.cross_entropy in float64 on the CPU, classes along the last dim, from a leaf that collects the gradient."""
    leaf = logits.detach().double().cpu().requires_grad_()
    v = logits.shape[-1]
    loss = F.cross_entropy(leaf.reshape(-1, v), targets.cpu().reshape(-1), **kwargs)
    if kwargs.get("reduction") == "none":
        loss = loss.view(targets.shape)
    return loss, leaf


def run_and_compare(logits, targets, dtype, dloss_scale=1.0, **kwargs):
    """Ours on a non-leaf copy of `logits` against the reference, loss and gradient, on both paths: the gradient in a
    buffer of its own (the default) and in the logits' storage (inplace_grad=True)."""
    ref, ref_leaf = reference(logits, targets, **{k: a for k, a in kwargs.items() if k != "n_chunks"})
    dloss = torch.rand(ref.shape, dtype=torch.float64) + 0.5 if ref.dim() else torch.tensor(dloss_scale).double()
    ref.backward(dloss)
    rows = logits.reshape(-1, logits.shape[-1])
    own_rows = rows.stride(-1) == 1 and rows.stride(0) >= rows.shape[1]  # what inplace_grad=True can write into
    for inplace in (False, True) if own_rows else (False,):
        leaf = logits.detach().clone().requires_grad_()
        ours = F_tri.cross_entropy(leaf * 1, targets, inplace_grad=inplace, **kwargs)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert_close(ours, ref, torch.float32 if ours.dim() == 0 else dtype, "loss")
        ours.backward(dloss.to(DEVICE, torch.float32))
        assert_close(leaf.grad, ref_leaf.grad, dtype, f"grad of logits (inplace_grad={inplace})")


CASES = [("mean", 0.0), ("sum", 0.1), ("none", 0.0), ("mean", 0.2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction,smoothing", CASES, ids=[f"{r}-ls{s}" for r, s in CASES])
@pytest.mark.parametrize("v", WIDTHS)
def test_against_float64(v, reduction, smoothing, dtype, seed):
    m = 2 * rows_for(v) + 1
    logits = randn(m, v, dtype=dtype, scale=3.0)
    run_and_compare(logits, make_targets((m,), v), dtype, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("v", [1000, 4097, 20011])
def test_looped_vocabulary(v, reduction, row_path, ce_rows, seed):
    logits = randn(5, v, scale=3.0)
    run_and_compare(logits, make_targets((5,), v), torch.float32, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_time_vocab_logits(dtype, seed):
    logits = randn(3, 7, 129, dtype=dtype)
    run_and_compare(logits, make_targets((3, 7), 129), dtype)
    run_and_compare(logits, make_targets((3, 7), 129), dtype, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_of_1e4(dtype, row_path, ce_rows, seed):
    logits = randn(9, 1000, dtype=dtype, scale=1e4)
    run_and_compare(logits, make_targets((9,), 1000), dtype, reduction="sum", label_smoothing=0.1)
    logits = (1e4 + randn(9, 1000, dtype=torch.float64)).to(dtype)  # e^x overflows without the max shift
    run_and_compare(logits, make_targets((9,), 1000), dtype)


def test_incoming_gradient_scales(ce_rows, seed):
    """loss · 3 (the backward's scaling pass) and a custom ignore_index."""
    logits = randn(11, 65)
    run_and_compare(logits, make_targets((11,), 65, ignore_index=7), torch.float32, dloss_scale=3.0, ignore_index=7)


@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
def test_float16_gradient_under_a_loss_scale_keeps_small_probabilities(inplace, seed):
    """A float16 mean loss times a GradScaler-like scale: the gradient of the classes with small probabilities,
    p / N before the scale, is as exact as float16 allows after it (the forward keeps p, the backward applies
    scale / N), not rounded to subnormals or 0 before the scale arrives."""
    m, v, loss_scale = 1024, 1024, 2.0**14
    logits = randn(m, v, dtype=torch.float16)
    targets = make_targets((m,), v)
    ref, ref_leaf = reference(logits, targets)
    (ref * loss_scale).backward()
    leaf = logits.detach().clone().requires_grad_()
    (F_tri.cross_entropy(leaf * 1, targets, inplace_grad=inplace) * loss_scale).backward()
    others = torch.ones(m, v, dtype=torch.bool)
    others[torch.arange(m), targets.clamp(min=0).cpu()] = False  # the non-target classes (ignored rows: zeros)
    assert (leaf.grad.cpu()[others] != 0).sum() == (ref_leaf.grad[others] != 0).sum(), "gradients rounded to 0"
    assert_close(leaf.grad.cpu()[others], ref_leaf.grad[others], torch.float16, "non-target gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(reduction, ce_rows, seed):
    """As torch: "mean" gives NaN (0 / 0), "sum" 0, "none" zeros; the gradient is zero in every case."""
    logits = randn(5, 33, requires_grad=True)
    targets = torch.full((5,), -100, device=DEVICE)
    ours = F_tri.cross_entropy(logits, targets, reduction=reduction)
    ref = F.cross_entropy(logits.detach().double().cpu(), targets.cpu(), reduction=reduction)
    assert torch.equal(ours.isnan().cpu(), ref.isnan())
    assert torch.equal(ours.nan_to_num().cpu().double(), ref.nan_to_num())
    ours.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inf_and_nan_incoming_gradients_leave_ignored_rows_at_zero(reduction, inplace, ce_rows, seed):
    """As torch: an ignored row's gradient is 0 whatever its incoming gradient (inf, NaN); a NaN reaches its own
    row only; finite incoming gradients as before."""
    logits = randn(4, 10, requires_grad=True)
    targets = torch.tensor([1, -100, 3, -100], device=DEVICE)
    if reduction == "none":
        dloss = torch.tensor([2.0, float("inf"), float("nan"), float("nan")], device=DEVICE)
    else:
        dloss = torch.tensor(float("inf"), device=DEVICE)
    work = logits * 1.0 if inplace else logits  # inplace_grad overwrites these logits with their gradient
    loss = F_tri.cross_entropy(work, targets, reduction=reduction, inplace_grad=inplace)
    (ours,) = torch.autograd.grad(loss, logits, dloss)
    assert not ours[1].any() and not ours[3].any()
    if reduction == "none":
        ref_logits = logits.detach().double().cpu().requires_grad_()
        ref_loss = F.cross_entropy(ref_logits, targets.cpu(), reduction="none")
        (ref,) = torch.autograd.grad(ref_loss, ref_logits, dloss.double().cpu())
        assert ours[2].isnan().all() and ref[2].isnan().all()
        assert_close(ours[0], ref[0], torch.float32, "row of a finite incoming gradient")
    else:
        assert not ours[0].isfinite().any() and not ours[2].isfinite().any()


def test_which_rows_take_one_row_a_program(monkeypatch):
    """On a GPU of 132 SMs (faked): rows of 16384 logits or more always, rows of 8192 or more while fewer than four
    a SM, narrower rows never."""
    from types import SimpleNamespace

    from triformer.kernels import cross_entropy
    from triformer.kernels._runtime import assume_interpreter

    monkeypatch.setattr(cross_entropy, "device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    with assume_interpreter(False):
        assert cross_entropy.one_row_tiling(8192, 50304, cuda) and cross_entropy.one_row_tiling(1, 16384, cuda)
        assert cross_entropy.one_row_tiling(527, 8192, cuda) and not cross_entropy.one_row_tiling(528, 8192, cuda)
        assert not cross_entropy.one_row_tiling(4, 8191, cuda) and not cross_entropy.one_row_tiling(0, 50304, cuda)
    with assume_interpreter(True):  # the interpreter: the usual tiling unless forced
        assert not cross_entropy.one_row_tiling(8192, 50304, cuda)


def test_wide_rows_take_one_row_a_program_on_the_measured_blocks():
    """The one-row tiling's block on 132 SMs, as measured (reports/NOTES.md): the wide block where the programs are
    few (a 128-row chunk; 256 rows of a 128256 vocabulary), the narrower one for more rows, with label smoothing and
    where the SMs are unknown; never wider than the vocabulary."""
    from triformer.kernels import cross_entropy

    block = cross_entropy.one_row_block
    assert block(128, 50304, 132) == block(256, 128256, 132) == 32768
    assert block(256, 50304, 132) == block(8192, 50304, 132) == block(8192, 128256, 132) == 16384
    assert block(128, 50304, 132, smooth=True) == block(128, 50304, None) == 16384
    assert block(4, 100, 132) == 128
    meta = cross_entropy.launch_meta(128, 50304, one_row=True, sms=132)
    assert meta == {"BLOCK_M": 1, "BLOCK_N": 32768, "num_warps": 32}


def test_n_chunks_same_result(seed):
    logits = randn(13, 257)
    targets = make_targets((13,), 257)
    for n_chunks in (2, 5, 13):
        run_and_compare(logits, targets, torch.float32, n_chunks=n_chunks)


def test_strided_logits(ce_rows, seed):
    """A time-shifted [B, T−1, V] slice (not viewable as rows: copied once) and a transposed [V, N] tensor."""
    logits = randn(2, 9, 129)[:, :-1]
    run_and_compare(logits, make_targets((2, 8), 129), torch.float32)
    logits = randn(129, 10).t()
    run_and_compare(logits, make_targets((10,), 129), torch.float32)


def test_where_the_gradient_goes(seed):
    """By default the gradient gets a buffer of its own and no logits are touched, leaf or not; inplace_grad=True
    writes it into the logits' storage (leaves included); without a gradient wanted nothing is written."""
    base = randn(6, 65)
    targets = make_targets((6,), 65)
    leaf = base.clone().requires_grad_()
    F_tri.cross_entropy(leaf, targets).backward()
    assert torch.equal(leaf.detach(), base)

    logits = leaf * 1
    F_tri.cross_entropy(logits, targets).backward()
    assert torch.equal(logits.detach(), base)
    assert TritonCrossEntropyLoss().inplace_grad is False

    leaf.grad = None
    logits = leaf * 1
    loss = F_tri.cross_entropy(logits, targets, inplace_grad=True)
    loss.backward()
    assert torch.equal(logits.detach(), leaf.grad)  # the gradient sits in the logits' storage

    own = base.clone().requires_grad_()
    F_tri.cross_entropy(own, targets, inplace_grad=True).backward()
    assert torch.equal(own.detach(), own.grad)

    with torch.no_grad():
        logits = leaf * 1
        F_tri.cross_entropy(logits, targets, inplace_grad=True)
    assert torch.equal(logits, base)  # no gradient wanted: nothing written


def test_logits_stay_usable_after_the_loss_by_default(seed):
    """The default leaves the logits as they are: accuracy read off them after loss.backward() is the accuracy,
    and another op using them afterwards gets the right values and gradient (PyTorch's behaviour; the in-place
    gradient had turned the accuracy to 0 and both losses' gradients wrong, silently)."""
    x = randn(12, 16, requires_grad=True)
    w = randn(33, 16, requires_grad=True)
    xr, wr = (t.detach().double().cpu().requires_grad_() for t in (x, w))
    logits_ref = xr @ wr.t()
    targets = make_targets((12,), 33, ignored=0.0)
    targets[:6] = logits_ref[:6].argmax(-1).to(DEVICE)  # half the rows right
    expected_accuracy = (logits_ref.argmax(-1) == targets.cpu()).double().mean()
    assert expected_accuracy >= 0.5
    logits = x @ w.t()  # a non-leaf, as an LM head's output
    loss = F_tri.cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    assert (logits.argmax(-1).cpu() == targets.cpu()).double().mean() == expected_accuracy
    other = make_targets((12,), 33, ignored=0.0)
    second = F.cross_entropy(logits, other) + (logits**2).mean()  # another consumer, after the loss
    second_ref = F.cross_entropy(logits_ref, other.cpu()) + (logits_ref**2).mean()
    assert_close(second, second_ref, torch.float32, "the other consumer's loss")
    second.backward()
    (F.cross_entropy(logits_ref, targets.cpu()) + second_ref).backward()
    assert_close(w.grad, wr.grad, torch.float32, "grad of the weight from both losses")
    assert_close(x.grad, xr.grad, torch.float32, "grad of the input from both losses")


def test_overwritten_logits_are_guarded(seed):
    """With inplace_grad=True, reusing logits that hold a gradient, or an op that saved them for its backward (their
    version is bumped), fails loudly; a second backward fails too."""
    leaf = randn(4, 33, requires_grad=True)
    targets = make_targets((4,), 33, ignored=0.0)
    logits = leaf * 1
    F_tri.cross_entropy(logits, targets, inplace_grad=True)
    with pytest.raises(ValueError, match="already hold the gradient"):
        F_tri.cross_entropy(logits, targets)
    logits = torch.tanh(leaf)  # tanh saves its output for the backward
    loss = F_tri.cross_entropy(logits, targets, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    logits = torch.tanh(leaf)
    F_tri.cross_entropy(logits, targets).backward()  # the default touches nothing tanh saved
    loss = F_tri.cross_entropy(leaf * 1, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="its backward can run only once"):
        loss.backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_matches_torch(dtype, seed):
    logits = randn(4, 5, 33, dtype=dtype)
    targets = make_targets((4, 5), 33)
    ours = TritonCrossEntropyLoss(label_smoothing=0.05)(logits, targets)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.05)(
        logits.double().cpu().reshape(-1, 33), targets.cpu().reshape(-1)
    )
    assert_close(ours, ref, torch.float32, "loss")


@pytest.mark.skipif(not ON_GPU, reason="peak memory is measured with torch.cuda's allocator statistics")
def test_no_extra_memory_for_the_gradient(seed):
    """Forward+backward with inplace_grad=True allocates nothing of the logits' size: the gradient goes into their
    storage."""
    leaf = randn(4096, 8192, dtype=torch.bfloat16, requires_grad=True)
    targets = make_targets((4096,), 8192)
    logits = leaf * 1
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (grad,) = torch.autograd.grad(F_tri.cross_entropy(logits, targets, inplace_grad=True), logits)
    extra = torch.cuda.max_memory_allocated() - base
    assert grad.data_ptr() == logits.data_ptr()
    assert extra < logits.numel() * logits.element_size() // 8, f"{extra / 2**20:.0f} MiB extra"


def test_bad_inputs():
    logits = randn(4, 10)
    good = make_targets((4,), 10, ignored=0.0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\) or equal ignore_index=-100; found 10"):
        F_tri.cross_entropy(logits, torch.tensor([0, 10, 1, 2], device=DEVICE))
        F_tri.check_targets()  # on a GPU the call does not wait for its check
    with pytest.raises(ValueError, match="found -1"):
        F_tri.cross_entropy(logits, torch.tensor([0, -1, 1, 2], device=DEVICE))
        F_tri.check_targets()
    with pytest.raises(TypeError, match="targets has dtype torch.float32"):
        F_tri.cross_entropy(logits, good.float())
    with pytest.raises(ValueError, match=r"targets of shape \(3,\) do not match logits \(4, 10\)"):
        F_tri.cross_entropy(logits, good[:3])
    with pytest.raises(TypeError, match="logits has dtype torch.int64"):
        F_tri.cross_entropy(torch.ones(4, 10, dtype=torch.int64, device=DEVICE), good)
    with pytest.raises(ValueError, match="reduction must be one of"):
        F_tri.cross_entropy(logits, good, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        TritonCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        F_tri.cross_entropy(logits, good, label_smoothing=1.5)
    F_tri.cross_entropy(logits, good, label_smoothing=np.float32(0.1))  # a numpy number is a number
    with pytest.raises(ValueError, match="n_chunks must be a positive int"):
        F_tri.cross_entropy(logits, good, n_chunks=0)
    for bad in (randn(1, 10, requires_grad=True).expand(4, 10), randn(10, 4, requires_grad=True).t()):
        with pytest.raises(ValueError, match="inplace_grad=True needs logits with unit stride along the classes"):
            F_tri.cross_entropy(bad, good, inplace_grad=True)
    with pytest.raises(TypeError, match="inplace_grad must be True or False, got None"):
        F_tri.cross_entropy(logits, good, inplace_grad=None)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(label_smoothing=2), ValueError, "label_smoothing must lie in \\[0, 1\\], got 2"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing must lie in"),
        (dict(label_smoothing="0.1"), ValueError, "label_smoothing must lie in"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(n_chunks=0), ValueError, "n_chunks must be a positive int"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(inplace_grad="yes"), TypeError, "inplace_grad must be True or False"),
    ],
)
def test_module_arguments_checked_at_construction(kwargs, error, message):
    """A bad argument fails when the module is built, not at its first call (label_smoothing=2 was accepted)."""
    with pytest.raises(error, match=message):
        TritonCrossEntropyLoss(**kwargs)


def test_count_targets():
    """One launch counts the valid targets and those out of range, and keeps the first of these in row order."""
    from triformer.kernels import cross_entropy as ce_kernels

    targets = torch.tensor([3, -100, 11, 9, -100, -2, 10], device=DEVICE)
    assert ce_kernels.count_targets(targets, 10, -100).tolist() == [5, 3, 11]
    assert ce_kernels.count_targets(targets[1::2], 10, -100).tolist() == [2, 1, -2]  # strided: read as the view
    assert ce_kernels.count_targets(torch.tensor([0, 9], device=DEVICE), 10, -100).tolist() == [2, 0, 0]


def test_strided_targets(seed):
    """A targets view with a stride (every other class index of a longer tensor) is read as the view, not as the
    memory under it."""
    targets = make_targets((8,), 10, ignored=0.0)[::2]
    assert targets.stride(0) == 2
    run_and_compare(randn(4, 10), targets, torch.float32)


def test_out_of_range_target_is_reported_and_later_calls_work():
    """A target out of range raises a ValueError naming it (at the call on the CPU, by check_targets() on a GPU,
    whose call does not wait for the device), in both gradient modes; the next calls with good targets are right."""
    for inplace in (False, True):
        leaf = randn(6, 37, requires_grad=True)
        bad = make_targets((6,), 37, ignored=0.0)
        bad[4] = 37
        with pytest.raises(ValueError, match="found 37"):
            F_tri.cross_entropy(leaf * 1, bad, inplace_grad=inplace)
            F_tri.check_targets()
        good = make_targets((6,), 37, ignored=0.0)
        reference = F.cross_entropy(leaf.detach().double(), good)
        assert_close(
            F_tri.cross_entropy(leaf * 1, good, inplace_grad=inplace),
            reference,
            torch.float32,
            "loss after the rejected call",
        )
        F_tri.check_targets()


def test_cpu_tensor_without_interpreter(without_interpreter):
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        F_tri.cross_entropy(torch.randn(2, 8), torch.zeros(2, dtype=torch.int64))


def test_kernel_guards_targets_out_of_range(ce_rows, seed):
    """The kernel turns an out-of-range target into a NaN loss and gradient for that row only, without reading
    outside the row (so no mode gives a wrong loss: not even a CUDA graph, where nothing reads the check back)."""
    from triformer.kernels import cross_entropy as ce_kernels

    logits = randn(4, 10)
    targets = torch.tensor([3, 10, -1, 9], device=DEVICE)
    grad = torch.empty_like(logits)
    losses = ce_kernels.cross_entropy_forward(logits, targets, -100, 0.0, grad, 1)
    assert torch.isnan(losses[1:3]).all() and torch.isnan(grad[1:3]).all()
    good = torch.tensor([0, 3])
    ref = F.cross_entropy(logits[good].double(), targets[good], reduction="none")
    assert_close(losses[good], ref, torch.float32, "loss of the rows with valid targets")
    ref_grad = torch.softmax(logits[good].double(), -1) - F.one_hot(targets[good], 10).double()
    assert_close(grad[good], ref_grad, torch.float32, "gradient of the rows with valid targets")


@pytest.mark.parametrize("n_chunks", [1, 3])
def test_kernel_writes_losses_into_the_rows_it_is_given(n_chunks, ce_rows, seed):
    """cross_entropy_forward(out=rows of a larger tensor) writes every one of those rows (0 for an ignored target,
    NaN for one out of range) and returns them; the rows around stay as they were."""
    from triformer.kernels import cross_entropy as ce_kernels

    logits = randn(7, 10)
    targets = torch.tensor([3, -100, 10, 0, 9, -100, 5], device=DEVICE)
    whole = torch.full((11,), 7.0, device=DEVICE)
    losses = ce_kernels.cross_entropy_forward(logits, targets, -100, 0.0, None, n_chunks, out=whole[2:9])
    assert losses.data_ptr() == whole[2:9].data_ptr()
    assert (whole[:2] == 7).all() and (whole[9:] == 7).all()
    assert whole[3] == 0 and whole[7] == 0 and torch.isnan(whole[4])
    good = torch.tensor([0, 3, 4, 6])
    ref = F.cross_entropy(logits[good].double(), targets[good], reduction="none")
    assert_close(losses[good], ref, torch.float32, "losses of the rows with valid targets")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
@pytest.mark.parametrize("leaf", [True, False], ids=["leaf-logits", "computed-logits"])
def test_forward_and_backward_capture_in_a_cuda_graph(leaf, inplace, reduction, seed):
    """Training steps captured in a CUDA graph (torch.compile's reduce-overhead mode, manual graphs; the benchmark
    captures many in one graph) replay the loss and gradient eager mode gives, wherever the gradient goes."""
    original = randn(64, 1000, dtype=torch.bfloat16)
    source = original.clone().requires_grad_(True)
    targets = torch.randint(0, 1000, (64,), device=DEVICE)
    targets[::7] = -100

    def step():
        with torch.no_grad():
            source.copy_(original)  # fresh logits, as a model's next forward would compute them
        logits = source if leaf else source * 2.0
        loss = F_tri.cross_entropy(logits, targets, reduction=reduction, inplace_grad=inplace)
        (grad,) = torch.autograd.grad(loss.sum(), source)
        return loss.detach().clone(), grad.clone()

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [step() for _ in range(3)]
    graph.replay()
    torch.cuda.synchronize()
    for replayed in captured:
        for name, got, want in zip(("loss", "gradient"), replayed, expected):
            assert torch.equal(got, want), f"{name} replayed from the graph differs from eager mode"
