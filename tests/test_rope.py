"""Rotary position embedding (functional and modules): outputs and both gradients against float64 references."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from harness import DEVICE, DTYPES, ON_GPU, assert_close, randn, reference_copy
from sm90_compile import assert_compiled_without_spills, child_report, compile_for_sm90, report_each, spilled_bytes
from torch.utils._python_dispatch import TorchDispatchMode

import triformer.functional as F_tri
from triformer import TritonRotaryEmbedding
from triformer.kernels import rope as rope_kernels
from triformer.nn import TorchRotaryEmbedding

GPU_ONLY = "long sequences and many heads: GPU only (the interpreter would take minutes)"


def reference_rope(x64: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin in float64, from the first D/2 columns of the tables."""
    d = x64.shape[-1]
    seq = x64.shape[-2]
    c = cos.detach().double().cpu()[offset : offset + seq, : d // 2]
    s = sin.detach().double().cpu()[offset : offset + seq, : d // 2]
    x1, x2 = x64[..., : d // 2], x64[..., d // 2 :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def random_tables(rows: int, half: int, dtype=torch.float32):
    """cos, sin of random angles (not only RoPE's own frequencies: every pair gets its own rotation)."""
    angles = torch.rand(rows, half, dtype=torch.float64) * 20 - 10
    return angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)


def check(leaves: list[torch.Tensor], views, cos, sin, offset: int, dtype: torch.dtype, grads=None, inplace=False):
    """views(*leaves) → (q, k); ours and the float64 reference on the same rounded inputs: q_rot, k_rot, then the
    gradient of every leaf. grads: (dq_rot, dk_rot) to back-propagate (fresh random ones by default). inplace: q and
    k are views of copies of the leaves (non-leaf tensors, as a projection's outputs are), rotated in place."""
    refs = [reference_copy(t) for t in leaves]
    q, k = views(*(t.clone() for t in leaves)) if inplace else views(*leaves)
    q_rot, k_rot = F_tri.rope(q, k, cos, sin, offset, inplace=inplace)
    q_ref, k_ref = (reference_rope(t, cos, sin, offset) for t in views(*refs))
    for out, ref, x, name in ((q_rot, q_ref, q, "q_rot"), (k_rot, k_ref, k, "k_rot")):
        assert out.dtype == x.dtype and out.shape == x.shape, name
        assert aliases(out, x) if inplace else out.is_contiguous(), name
        assert_close(out, ref, dtype, name)
    if grads is None:
        grads = randn(*q.shape, dtype=dtype), randn(*k.shape, dtype=dtype)
    torch.autograd.backward((q_rot, k_rot), [g.clone() for g in grads] if inplace else grads)  # in place: rotated
    torch.autograd.backward((q_ref, k_ref), [g.detach().double().cpu() for g in grads])
    for i, (leaf, ref) in enumerate(zip(leaves, refs)):
        assert leaf.grad is not None, f"no gradient reached input {i}"
        assert_close(leaf.grad, ref.grad, dtype, f"grad of input {i}")


def aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are views of the same elements (strides of dims longer than 1 compared)."""
    strides = [tuple(s for s, n in zip(t.stride(), t.shape) if n > 1) for t in (a, b)]
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and strides[0] == strides[1]


def plain(q, k):
    return q, k


def qk(b, hq, hk, s, d, dtype):
    return [randn(b, hq, s, d, dtype=dtype, requires_grad=True), randn(b, hk, s, d, dtype=dtype, requires_grad=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16, 64, 40])
@pytest.mark.parametrize("s", [1, 7, 33])
def test_against_float64(s, d, dtype, seed):
    """Contiguous q [2, 3, S, D] and k with one head (grouped-query), positions from a random offset."""
    offset = int(torch.randint(0, 5, ()).item())
    cos, sin = random_tables(s + offset, d // 2)
    check(qk(2, 3, 1, s, d, dtype), plain, cos, sin, offset, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_of_a_fused_qkv_projection(dtype, seed):
    """q and k as permuted views of one [B, S, 3, H, D] tensor (no copy); its v third gets no gradient."""
    b, s, h, d = 2, 7, 3, 40
    fused = randn(b, s, 3, h, d, dtype=dtype, requires_grad=True)
    cos, sin = random_tables(s + 4, d // 2)

    def views(t):
        return t[:, :, 0].permute(0, 2, 1, 3), t[:, :, 1].permute(0, 2, 1, 3)

    check([fused], views, cos, sin, 4, dtype)
    assert not fused.grad[:, :, 2].any()


def test_stride_zero_and_transposed_inputs(seed):
    """q broadcast over the batch (stride 0), k transposed in its last two dims then swapped back (column stride ≠ 1),
    a cos table expanded from one row (stride 0: every position gets the same angle), and gradients with stride 0
    (from a sum) or transposed."""
    dtype = torch.float32
    s, d = 7, 16
    q_base = randn(1, 2, s, d, dtype=dtype, requires_grad=True)
    k_store = randn(2, 1, d, s, dtype=dtype, requires_grad=True)

    def views(qb, ks):
        return qb.expand(2, 2, s, d), ks.transpose(2, 3)

    angle = torch.rand(1, d // 2, dtype=torch.float64) * 6
    cos, sin = (f(angle).float().to(DEVICE).expand(s + 2, d // 2) for f in (torch.cos, torch.sin))
    check([q_base, k_store], views, cos, sin, 2, dtype)
    for t in (q_base, k_store):
        t.grad = None
    grads = (
        torch.ones(1, dtype=dtype, device=DEVICE).expand(2, 2, s, d),
        randn(2, 1, d, s, dtype=dtype).transpose(2, 3),
    )
    check([q_base, k_store], views, cos, sin, 2, dtype, grads=grads)


def test_full_width_tables(seed):
    """Tables [S_max, D] whose halves repeat each other (Hugging Face's layout) give the [S_max, D/2] result."""
    q, k = (t.detach() for t in qk(1, 2, 2, 7, 16, torch.float32))
    cos, sin = random_tables(9, 8)
    half = F_tri.rope(q, k, cos, sin, 2)
    full = F_tri.rope(q, k, cos.repeat(1, 2), sin.repeat(1, 2), 2)
    assert all(torch.equal(a, b) for a, b in zip(half, full))


def test_offset_is_a_slice_of_the_longer_sequence(seed):
    """Rotating positions offset .. offset + S − 1 equals rotating the whole sequence and keeping those positions."""
    q, k = (t.detach() for t in qk(2, 2, 1, 33, 16, torch.float32))
    cos, sin = F_tri.rope_tables(16, 40, device=DEVICE)
    whole = F_tri.rope(q, k, cos, sin, 0)
    part = F_tri.rope(q[:, :, 26:], k[:, :, 26:], cos, sin, 26)
    assert all(torch.equal(w[:, :, 26:], p) for w, p in zip(whole, part))


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_position_blocks_and_head_groups(dtype, seed):
    """Small tiles: four blocks of two positions and head groups of two, one of them holding q's last head and k's
    first (the GPU's launch shape, under the interpreter)."""
    with rope_kernels.interpreter_tiling(2 * 2 * 16, 2):
        grid, per_program, meta = rope_kernels.launch_config(2, 7, 16, 5, torch.device(DEVICE))
        if not ON_GPU:
            assert (grid, per_program, meta["BLOCK_S"]) == ((4, 3, 2), 2, 2)
        cos, sin = random_tables(10, 16)
        check(qk(2, 3, 2, 7, 32, dtype), plain, cos, sin, 3, dtype)


def test_gradient_of_one_input_only(seed):
    """Only k_rot reaches the loss: q gets no gradient (none is computed), k's is the rotation by −θ."""
    q, k = qk(2, 2, 1, 7, 16, torch.float32)
    cos, sin = random_tables(7, 8)
    _, k_rot = F_tri.rope(q, k, cos, sin)
    dk = randn(*k.shape)
    k_rot.backward(dk)
    assert q.grad is None
    kr = reference_copy(k)
    reference_rope(kr, cos, sin, 0).backward(dk.double().cpu())
    assert_close(k.grad, kr.grad, torch.float32, "grad of k")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(dtype, seed):
    """NaN and ±inf in q give NaN/inf exactly where the float64 formula does (position 0 has sin = 0, so
    inf·sin is NaN there, as in torch), out of place and in place."""
    q, k = (t.detach() for t in qk(1, 2, 1, 7, 16, dtype))
    q[0, 0, 0, 3] = float("nan")
    q[0, 0, 0, 12] = float("inf")
    q[0, 1, 4, 5] = float("-inf")
    k[0, 0, 2, 9] = float("nan")
    cos, sin = F_tri.rope_tables(16, 7, device=DEVICE)
    refs = [reference_rope(x.double().cpu(), cos, sin, 0) for x in (q, k)]
    out_of_place = F_tri.rope(q, k, cos, sin)
    in_place = F_tri.rope(q.clone(), k.clone(), cos, sin, inplace=True)
    for out, ref in [*zip(out_of_place, refs), *zip(in_place, refs)]:
        assert torch.equal(out.cpu().isnan(), ref.isnan())
        assert torch.equal(out.cpu().isinf(), ref.isinf())
        finite = ref.isfinite()
        assert ref.isnan().any() and finite.any()
        assert_close(out.cpu()[finite], ref[finite], dtype, "finite part")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s, d", [(1, 16), (7, 40), (33, 64)])
def test_in_place_against_float64(s, d, dtype, seed):
    """inplace=True on contiguous q, k (grouped-query) and on views of a fused [B, S, 3, H, D] projection: the
    values written over q and k, and every gradient."""
    offset = int(torch.randint(0, 5, ()).item())
    cos, sin = random_tables(s + offset, d // 2)
    check(qk(2, 3, 1, s, d, dtype), plain, cos, sin, offset, dtype, inplace=True)
    fused = randn(2, s, 3, 2, d, dtype=dtype, requires_grad=True)

    def views(t):
        return t[:, :, 0].permute(0, 2, 1, 3), t[:, :, 1].permute(0, 2, 1, 3)

    check([fused], views, cos, sin, offset, dtype, inplace=True)
    assert not fused.grad[:, :, 2].any()


def test_in_place_rotates_the_fused_projection_and_its_gradients(seed):
    """inplace=True on views of a fused projection leaves v's third as it was and rotates q's and k's thirds; the
    gradients the caller passed are left as they were (views' gradients go to new tensors, inplace_grad or not)."""
    b, s, h, d = 2, 7, 2, 16
    cos, sin = random_tables(s, d // 2)
    source = randn(b, s, 3, h, d, requires_grad=True)
    for inplace_grad in (False, True):
        source.grad = None
        fused = source * 1
        before = fused.detach().clone()
        q, k = fused[:, :, 0].transpose(1, 2), fused[:, :, 1].transpose(1, 2)
        q_rot, k_rot = F_tri.rope(q, k, cos, sin, inplace=True, inplace_grad=inplace_grad)
        assert torch.equal(fused[:, :, 2], before[:, :, 2])
        expected = F_tri.rope(before[:, :, 0].transpose(1, 2), before[:, :, 1].transpose(1, 2), cos, sin)
        assert torch.equal(q_rot, expected[0]) and torch.equal(k_rot, expected[1])
        shared = randn(b, h, s, d)
        kept = shared.clone()
        torch.autograd.backward((q_rot, k_rot), (shared, shared))
        assert torch.equal(shared, kept), "the caller's gradient is not written"
        rotated = F_tri.rope(kept, kept, cos, -sin)  # the rotation by −θ
        assert torch.equal(source.grad[:, :, 0].transpose(1, 2), rotated[0])
        assert torch.equal(source.grad[:, :, 1].transpose(1, 2), rotated[1])


def test_in_place_gradients_where_declared_private(seed):
    """inplace_grad=True on q and k that are not views: distinct dense incoming gradients are rotated where they
    are; one tensor for both or an expanded one go to new tensors, with the same result; without inplace_grad the
    caller's gradients (slices of one tensor, as a stack's backward hands out) stay as they were."""
    b, h, s, d = 2, 2, 7, 16
    cos, sin = random_tables(s, d // 2)
    source = randn(2, b, h, s, d, requires_grad=True)

    def rotate(inplace_grad):
        source.grad = None
        q, k = source[0] * 1, source[1] * 1
        return F_tri.rope(q, k, cos, sin, inplace=True, inplace_grad=inplace_grad)

    def expect_gradients(dq, dk):
        expected = F_tri.rope(dq, dk, cos, -sin)
        assert torch.equal(source.grad[0], expected[0]) and torch.equal(source.grad[1], expected[1])

    dq, dk = randn(b, h, s, d), randn(b, h, s, d)
    dq_kept, dk_kept = dq.clone(), dk.clone()
    torch.autograd.backward(rotate(True), (dq, dk))
    expect_gradients(dq_kept, dk_kept)
    assert torch.equal(dq, source.grad[0]) and torch.equal(dk, source.grad[1]), "rotated where they were"
    for shared in (randn(b, h, s, d), torch.ones((), device=DEVICE).expand(b, h, s, d)):
        kept = shared.clone()
        torch.autograd.backward(rotate(True), (shared, shared))
        assert torch.equal(shared, kept), "a gradient held twice is not written"
        expect_gradients(kept, kept)
    stacked = randn(2, b, h, s, d)
    kept = stacked.clone()
    torch.stack(rotate(False)).backward(stacked)
    assert torch.equal(stacked, kept), "the caller's gradient is not written"
    expect_gradients(kept[0], kept[1])


def test_in_place_keeps_q_and_k_usable(seed):
    """After rope(q, k, inplace=True) q and k themselves carry the rotation's history (Liger-style use: the
    results ignored), and a gradient that an add hands to q's rotation and to another branch reaches both
    unrotated; create_graph through the rotation raises instead of dropping second-order terms."""
    cos, sin = random_tables(7, 8)
    source = randn(1, 2, 7, 16, requires_grad=True)
    other = randn(1, 2, 7, 16, requires_grad=True)
    q, k = source * 1, source * 2
    F_tri.rope(q, k, cos, sin, inplace=True)
    g = randn(1, 2, 7, 16)
    (q + k + other).backward(g)
    rotated = F_tri.rope(g, g, cos, -sin)
    assert_close(source.grad, (rotated[0] + 2 * rotated[1]).double(), torch.float32, "grad through q and k")
    assert torch.equal(other.grad, g)
    q = source * 1
    q_rot, _ = F_tri.rope(q, source * 2, cos, sin, inplace=True)
    (dq,) = torch.autograd.grad(q_rot, source, g.requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        dq.sum().backward()


def test_in_place_under_torch_compile(seed):
    """fullgraph torch.compile (AOT autograd) of rope(..., inplace=True) on views of a fused projection: the
    rotation computed into new tensors and copied back, the values and gradients of eager mode."""
    cos, sin = random_tables(7, 8)
    w = randn(2, 2, 7, 16)

    def step(source):
        fused = source * 1
        q, k = F_tri.rope(fused[:, :, 0].transpose(1, 2), fused[:, :, 1].transpose(1, 2), cos, sin, inplace=True)
        return (q * w).sum() + (k * w * 2).sum() + (fused * fused).sum()

    source = randn(2, 7, 3, 2, 16, requires_grad=True)
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        source.grad = None
        loss = fn(source)
        loss.backward()
        results.append((loss.detach(), source.grad.clone()))
    assert_close(results[1][0], results[0][0].double(), torch.float32, "loss")
    assert_close(results[1][1], results[0][1].double(), torch.float32, "grad of source")


def test_in_place_under_compiled_autograd(seed):
    """The in-place rotation's backward traced by compiled autograd (its gradients into new tensors there) gives
    eager mode's gradients."""
    cos, sin = random_tables(7, 8)
    source = randn(2, 2, 7, 16, requires_grad=True)
    grads = []
    for compiled in (False, True):
        source.grad = None
        q, k = F_tri.rope(source * 1, source * 2, cos, sin, inplace=True, inplace_grad=True)
        loss = (q * q).sum() + (k * 3).sum()
        if compiled:
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
                loss.backward()
        else:
            loss.backward()
        grads.append(source.grad)
    assert_close(grads[1], grads[0].double(), torch.float32, "grad of source")


def test_double_backward_of_the_out_of_place_rotation(seed):
    """q_rot = R q, so dq = Rᵀ g, and the gradient of ⟨dq, w⟩ with respect to g is R w: the backward's backward
    rotates by +θ."""
    cos, sin = random_tables(7, 8)
    q = randn(1, 2, 7, 16, requires_grad=True)
    k = randn(1, 1, 7, 16)
    g = randn(1, 2, 7, 16, requires_grad=True)
    q_rot, _ = F_tri.rope(q, k, cos, sin)
    (dq,) = torch.autograd.grad(q_rot, q, g, create_graph=True)
    w = randn(1, 2, 7, 16)
    (dq * w).sum().backward()
    assert_close(g.grad, reference_rope(w.double().cpu(), cos, sin, 0), torch.float32, "grad of g")


def test_in_place_is_seen_by_autograd(seed):
    """An op that saved q for its backward raises autograd's in-place error instead of reading the rotated values;
    without gradients the rotation is still in place; the traced path (a dispatch mode) copies the rotation back
    and gives eager mode's values and gradients."""
    cos, sin = random_tables(7, 8)
    source = randn(1, 2, 7, 16, requires_grad=True)
    q, k = source * 1, source * 2
    squared = q * q  # saves q
    F_tri.rope(q, k, cos, sin, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        squared.sum().backward()
    with torch.no_grad():
        q, k = source * 1, source * 2
        q_rot, k_rot = F_tri.rope(q, k, cos, sin, inplace=True)
    assert q_rot is q and k_rot is k
    assert torch.equal(q, F_tri.rope(source.detach(), source.detach(), cos, sin)[0])

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    dq, dk = randn(1, 2, 7, 16), randn(1, 2, 7, 16)
    grads = []
    for mode in (contextlib.nullcontext(), Passthrough()):
        source.grad = None
        with mode:
            q, k = source * 1, source * 2
            q_rot, k_rot = F_tri.rope(q, k, cos, sin, inplace=True)
            assert aliases(q_rot, q) and aliases(k_rot, k)
            torch.autograd.backward((q_rot, k_rot), (dq.clone(), dk.clone()))
        grads.append((q.detach().clone(), source.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_in_place_bad_inputs_get_clear_errors():
    cos, sin = random_tables(7, 8)
    leaf = randn(1, 2, 7, 16, requires_grad=True)
    with pytest.raises(ValueError, match="q, which is a leaf that requires grad"):
        F_tri.rope(leaf, leaf * 1, cos, sin, inplace=True)
    with pytest.raises(ValueError, match=r"k, which is a leaf that requires grad \(or a view of one\)"):
        F_tri.rope(leaf * 1, leaf.transpose(2, 3).transpose(2, 3), cos, sin, inplace=True)
    shared = leaf * 1
    with pytest.raises(ValueError, match="share no element"):
        F_tri.rope(shared, shared, cos, sin, inplace=True)
    wide = randn(1, 2, 7, 24) * 1
    with pytest.raises(ValueError, match="share no element"):
        F_tri.rope(wide[..., :16], wide[..., 8:], cos, sin, inplace=True)
    with pytest.raises(ValueError, match="q .* may address some elements more than once"):
        F_tri.rope(randn(1, 1, 7, 16).expand(1, 2, 7, 16), leaf * 1, cos, sin, inplace=True)
    fused = randn(1, 7, 6, 16, requires_grad=True) * 1
    q, k = fused[:, :, :2].transpose(1, 2), fused.split(2, dim=2)[1].transpose(1, 2)
    kept = q.detach().clone()
    with pytest.raises(ValueError, match="k, a view that autograd does not let be written .* split"):
        F_tri.rope(q, k, cos, sin, inplace=True)  # q sliced (writable), k from a split
    assert torch.equal(q, kept), "nothing written before the error"
    projected = leaf * 1
    with torch.no_grad():
        made_without_grad = projected[:, :1], projected[:, 1:]
    with pytest.raises(ValueError, match="q, a view that autograd does not let be written .* under no_grad"):
        F_tri.rope(*made_without_grad, cos, sin, inplace=True)
    with torch.inference_mode():
        inference = randn(1, 2, 7, 16), randn(1, 2, 7, 16)
    with pytest.raises(ValueError, match="q, an inference tensor, outside inference mode"):
        F_tri.rope(*inference, cos, sin, inplace=True)
    with pytest.raises(TypeError, match="inplace must be True or False"):
        F_tri.rope(leaf, leaf, cos, sin, inplace=1)
    with pytest.raises(TypeError, match="inplace_grad must be True or False"):
        F_tri.rope(leaf, leaf, cos, sin, inplace=True, inplace_grad=None)
    with pytest.raises(ValueError, match="inplace_grad=True rotates the gradients of an in-place rotation"):
        F_tri.rope(leaf, leaf, cos, sin, inplace_grad=True)


def test_bad_inputs_get_clear_errors():
    q = randn(1, 2, 7, 16)
    k = randn(1, 1, 7, 16)
    cos, sin = F_tri.rope_tables(16, 8, device=DEVICE)
    cases = [
        (ValueError, "odd", lambda: F_tri.rope(randn(1, 2, 7, 15), randn(1, 1, 7, 15), cos, sin)),
        (ValueError, "4-D", lambda: F_tri.rope(randn(2, 7, 16), k, cos, sin)),
        (ValueError, "agree in B, S", lambda: F_tri.rope(q, randn(1, 1, 6, 16), cos, sin)),
        (ValueError, "agree in B, S", lambda: F_tri.rope(q, randn(2, 1, 7, 16), cos, sin)),
        (TypeError, "dtype", lambda: F_tri.rope(q, k.half(), cos, sin)),
        (TypeError, "dtype", lambda: F_tri.rope(q.long(), k.long(), cos, sin)),
        (TypeError, "torch.Tensor", lambda: F_tri.rope(q, None, cos, sin)),
        (ValueError, r"\[S_max, D/2\]", lambda: F_tri.rope(q, k, cos[:, :5], sin[:, :5])),
        (ValueError, "same shape", lambda: F_tri.rope(q, k, cos, sin[:7])),
        (ValueError, "do not fit", lambda: F_tri.rope(q, k, cos, sin, offset=2)),
        (ValueError, "do not fit", lambda: F_tri.rope(q, k, cos, sin, offset=-1)),
        (TypeError, "offset must be an int", lambda: F_tri.rope(q, k, cos, sin, offset=True)),
        (ValueError, "requires grad", lambda: F_tri.rope(q, k, cos.clone().requires_grad_(), sin)),
        (ValueError, "cos is a meta tensor", lambda: F_tri.rope(q, k, cos.to("meta"), sin)),
        (ValueError, "even", lambda: TritonRotaryEmbedding(15)),
        (ValueError, "base must be a positive finite number", lambda: F_tri.rope_tables(16, 8, base="1e4")),
        (ValueError, "base must be a positive finite number", lambda: F_tri.rope_tables(16, 8, base=float("inf"))),
        (ValueError, "head_dim=16", lambda: TritonRotaryEmbedding(16, 8)(randn(1, 1, 7, 32), randn(1, 1, 7, 32))),
        (ValueError, "max_seq_len=8", lambda: TorchRotaryEmbedding(16, 8)(q, k, offset=2)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


def test_tables_are_exact():
    """cos, sin of p · base^(−2i/D) in float64 rounded once; the module keeps them float32 through .to(dtype)."""
    cos, sin = F_tri.rope_tables(64, 4096, base=np.float32(500000.0))  # numpy numbers are numbers
    inv_freq = 500000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    angle = torch.arange(4096, dtype=torch.float64)[:, None] * inv_freq[None, :]
    assert cos.dtype == torch.float32
    assert torch.equal(cos, angle.cos().float()) and torch.equal(sin, angle.sin().float())
    module = TritonRotaryEmbedding(64, 128, base=500000.0).to(torch.float16)
    assert module.cos.dtype == torch.float32 and torch.equal(module.cos, cos[:128])
    assert not module.state_dict()  # non-persistent: rebuilt from the constructor, never saved


@pytest.mark.parametrize("module_class", [TritonRotaryEmbedding, TorchRotaryEmbedding])
def test_tables_defined_after_meta_initialisation(module_class):
    """Built on the meta device, then to_empty (uninitialised memory) and load_state_dict (which holds no tables):
    the tables are rebuilt, equal to a module built where it runs; reset_parameters rebuilds them too."""
    built = module_class(40, max_seq_len=16, base=500.0).to(DEVICE)
    with torch.device("meta"):
        module = module_class(40, max_seq_len=16, base=500.0)
    module = module.to_empty(device=DEVICE)
    module.load_state_dict(built.state_dict())
    assert torch.equal(module.cos, built.cos) and torch.equal(module.sin, built.sin)
    module.cos.fill_(float("nan"))
    module.reset_parameters()
    assert torch.equal(module.cos, built.cos)
    with torch.device("meta"):  # to_empty while a meta-device context is still open
        in_context = module_class(40, max_seq_len=16, base=500.0).to_empty(device=DEVICE)
    assert torch.equal(in_context.cos, built.cos)
    tables = module.cos
    with torch.inference_mode():  # a no-op move in an evaluation helper: the same tables, no inference tensors
        module.to(DEVICE)
    assert module.cos is tables and not module.cos.is_inference()


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_twins_agree(dtype, seed):
    """TritonRotaryEmbedding and TorchRotaryEmbedding give the same rotation and gradients (both against float64)."""
    triton_rope = TritonRotaryEmbedding(40, max_seq_len=16).to(DEVICE)
    torch_rope = TorchRotaryEmbedding(40, max_seq_len=16).to(DEVICE)
    q, k = qk(2, 4, 2, 7, 40, dtype)
    qt, kt = (t.detach().clone().requires_grad_() for t in (q, k))
    ours = triton_rope(q, k, offset=5)
    twin = torch_rope(qt, kt, offset=5)
    qr, kr = reference_copy(q), reference_copy(k)
    refs = [reference_rope(t, triton_rope.cos, triton_rope.sin, 5) for t in (qr, kr)]
    grads = [randn(*t.shape, dtype=dtype) for t in (q, k)]
    for outs in (ours, twin, refs):
        torch.autograd.backward(outs, [g.to(outs[0].dtype).to(outs[0].device) for g in grads])
    for name, a, b, ref in (("q_rot", ours[0], twin[0], refs[0]), ("k_rot", ours[1], twin[1], refs[1])):
        assert_close(a, ref, dtype, f"triton {name}")
        assert_close(b, ref, dtype, f"torch {name}")
    for name, a, b, ref in (("q", q, qt, qr), ("k", k, kt, kr)):
        assert_close(a.grad, ref.grad, dtype, f"triton grad of {name}")
        assert_close(b.grad, ref.grad, dtype, f"torch grad of {name}")


@pytest.mark.skipif(not ON_GPU, reason=GPU_ONLY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 32, 8, 2048, 128), (4, 12, 12, 1024, 64), (1, 8, 1, 4097, 80)])
def test_large_on_gpu(shape, dtype, seed):
    """Long sequences, D 128 / 64 / 80, grouped-query and multi-query heads, q and k from one fused projection,
    the GPU's own launch (several head groups)."""
    b, hq, hk, s, d = shape
    fused = randn(b, s, hq + 2 * hk, d, dtype=dtype, requires_grad=True)

    def views(t):
        return t[:, :, :hq].permute(0, 2, 1, 3), t[:, :, hq : hq + hk].permute(0, 2, 1, 3)

    cos, sin = F_tri.rope_tables(d, s + 7, device=DEVICE)
    check([fused], views, cos, sin, 7, dtype)


def test_bench_suite_rows(seed):
    """The rope bench suite: a row per mode and provider, the same bytes for each (q, k in, q_rot, k_rot out and
    the two float32 half tables, twice for forward+backward); torch.compile is an error row off CUDA."""
    from triformer.bench import rope as rope_bench

    rows = rope_bench.run(
        [(1, 2, 7, 16)],
        dtype=torch.float32,
        device=DEVICE,
        progress=False,
        rounds=1,
        names=("triformer", "triformer (in place)", "torch"),
    )
    assert [(r["mode"], r["provider"]) for r in rows] == [
        (mode, provider) for mode in ("fwd", "fwd+bwd") for provider in ("triformer", "triformer (in place)", "torch")
    ]
    for row in rows:
        passes = 1 if row["mode"] == "fwd" else 2
        assert row["error"] == "" and row["shape"] == "1x2x7x16"
        assert row["rate"] * row["ms"] * 1e6 == pytest.approx(passes * (4 * 224 * 4 + 2 * 7 * 8 * 4))
    if not ON_GPU:
        assert isinstance(rope_bench.providers("cpu")["torch.compile"], RuntimeError)


ROPE_TYPES = dict(
    q_ptr="*bf16",
    k_ptr="*bf16",
    qo_ptr="*bf16",
    ko_ptr="*bf16",
    cos_ptr="*fp32",
    sin_ptr="*fp32",
    **{
        name: "i32"
        for name in (
            "S",
            "HALF",
            "HQ",
            "HK",
            "offset",
            "heads_per_program",
            "stride_qb",
            "stride_qh",
            "stride_qs",
            "stride_qd",
            "stride_kb",
            "stride_kh",
            "stride_ks",
            "stride_kd",
            "stride_qob",
            "stride_qoh",
            "stride_qos",
            "stride_qod",
            "stride_kob",
            "stride_koh",
            "stride_kos",
            "stride_kod",
            "stride_cs",
            "stride_cd",
            "stride_ss",
            "stride_sd",
        )
    },
)
# (B, S, D, q and k heads) as the GPU launches them, and arguments Triton would specialize to 1 (constexpr)
COMPILE_CASES = {
    "B4-S4096-D128-H64": ((4, 4096, 128, 64), {}),
    "B8-S1024-D64-H24": ((8, 1024, 64, 24), {}),
    "B1-S1-D40-unit": (
        (1, 1, 40, 2),
        {
            "S": 1,
            "HQ": 1,
            "HK": 1,
            **{f"stride_{t}d": 1 for t in ("q", "k", "qo", "ko", "c", "s")},
        },
    ),
}


def compile_all() -> dict:
    """In a process without the interpreter: case → {kernel: spilled bytes} or the error that stopped it."""
    from triformer.kernels import rope as kernels

    def case(shape, unit):
        b, s, d, heads = shape
        meta = dict(kernels._launch(b, s, d // 2, heads, 8 * 132, kernels.GPU_TILE, heads)[2])
        warps = meta.pop("num_warps")
        flags = {**unit, **meta}
        return {
            f"inverse={inverse}": spilled_bytes(
                compile_for_sm90(kernels._rope_kernel, ROPE_TYPES, {**flags, "INVERSE": inverse}, warps)
            )
            for inverse in (False, True)
        }

    return report_each({name: (lambda args=args: case(*args)) for name, args in COMPILE_CASES.items()})


@pytest.fixture(scope="module")
def compiled():
    return child_report(__file__)


@pytest.mark.skipif(ON_GPU, reason="on a GPU every other test compiles the kernel natively")
@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiles_for_sm90_without_spills(case, compiled):
    """The GPU launches (and arguments specialized to 1) compile for an H100 without spilling registers."""
    assert_compiled_without_spills(compiled, case)


if __name__ == "__main__":
    print(json.dumps(compile_all()))
