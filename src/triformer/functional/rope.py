"""Rotary position embedding: `rope(q, k, cos, sin, offset)` on Triton kernels, and the tables it reads."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernels import rope as rope_kernels
from ..kernels._runtime import check_same_dtype, check_tensor
from . import _is_number
from ._library import Op, placeholder, plain_eager
from ._overlap import may_share_elements, overlaps_itself


def rope_tables(head_dim: int, max_seq_len: int, base: float = 10000.0, device=None):
    """(cos, sin), float32 [max_seq_len, head_dim / 2]: row p, column i hold cos and sin of θ_p,i = p · base^(−2i/D).

    Angles are formed in float64 and rounded once, so the table is exact to float32 at every position."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(
            f"head_dim must be a positive even int (rotate-half pairs x[i] with x[i + D/2]), got {head_dim!r}"
        )
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    if not _is_number(base) or not 0 < base < math.inf:
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    cpu = torch.device("cpu")  # on the CPU whatever the default device (a meta-device context included)
    inv_freq = float(base) ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=cpu) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=cpu), inv_freq)
    device = torch.get_default_device() if device is None else device
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _check_rope_inputs(q, k, cos, sin, offset) -> None:
    check_tensor(q, "q")
    check_tensor(k, "k")
    check_same_dtype(q, "q", k, "k")
    for t, name in ((q, "q"), (k, "k")):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
    (b, _, s, d), (bk, _, sk, dk) = q.shape, k.shape
    if (bk, sk, dk) != (b, s, d):
        raise ValueError(
            f"k of shape {tuple(k.shape)} does not match q {tuple(q.shape)}: they must agree in B, S "
            f"and D (only the number of heads may differ)"
        )
    if d % 2:
        raise ValueError(f"head dim D={d} is odd: rotate-half RoPE pairs x[i] with x[i + D/2], so D must be even")
    for t, name in ((cos, "cos"), (sin, "sin")):
        check_tensor(t, name)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dim() != 2 or t.shape[1] not in (d // 2, d):
            raise ValueError(
                f"{name} must be a table [S_max, D/2] or [S_max, D] with D={d}, got shape {tuple(t.shape)}"
            )
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad: rope treats the tables as constants (pass {name}.detach())")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0 or offset + s > cos.shape[0]:
        raise ValueError(
            f"positions offset={offset} .. {offset + s - 1} do not fit the tables of {cos.shape[0]} rows (S_max)"
        )


_WRITABLE_VIEW = torch._C._autograd.CreationMeta.DEFAULT


def _check_in_place(q, k) -> None:
    """inplace=True (eager mode, real tensors), before anything is written: q and k (k may be None) are written
    through their strides, so no element may be addressed twice, and autograd must accept the write."""
    grad_mode = torch.is_grad_enabled()
    for t, name in ((q, "q"), (k, "k")):
        if t is None:
            continue
        if overlaps_itself(t):
            raise ValueError(
                f"inplace=True writes the rotation into {name}, but {name} (shape {tuple(t.shape)}, strides "
                f"{t.stride()}) may address some elements more than once (an expanded view?): pass inplace=False"
            )
        if t.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(
                f"inplace=True writes the rotation into {name}, an inference tensor, outside inference mode "
                f"(torch forbids it): pass inplace=False"
            )
        base = t._base if t._base is not None else t
        recorded = grad_mode and base.requires_grad  # autograd must know of the write
        if recorded and base.is_leaf:
            raise ValueError(
                f"inplace=True writes the rotation into {name}, which is a leaf that requires grad "
                f"{'' if t._base is None else '(or a view of one) '}and autograd forbids writing it: pass "
                f"inplace=False, or rotate a non-leaf (e.g. a projection's output)"
            )
        if recorded and t._is_view() and torch._C._autograd._get_creation_meta(t) != _WRITABLE_VIEW:
            raise ValueError(
                f"inplace=True writes the rotation into {name}, a view that autograd does not let be written (made "
                f"by split, chunk or unbind, under no_grad, or in a custom function): take it by slicing, or "
                f"pass inplace=False"
            )
    if k is not None and may_share_elements(q, k):
        raise ValueError(
            "inplace=True needs q and k that share no element, and theirs may (a shared one would be rotated twice): "
            "pass inplace=False"
        )


def _rope_impl(
    q: Tensor | None, k: Tensor | None, cos: Tensor, sin: Tensor, offset: int, inverse: bool
) -> tuple[Tensor, Tensor]:
    """(q, k) rotated by +θ (by −θ when inverse: the backward), new contiguous tensors; a placeholder for None."""
    q_out, k_out = rope_kernels.rotate(q, k, cos, sin, offset, inverse)
    return placeholder(cos) if q_out is None else q_out, placeholder(cos) if k_out is None else k_out


def _rope_fake(q, k, cos, sin, offset, inverse):
    return (
        placeholder(cos) if q is None else q.new_empty(q.shape),
        placeholder(cos) if k is None else k.new_empty(k.shape),
    )


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin, ctx.offset, ctx.inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.set_materialize_grads(False)


def _rope_backward(ctx, dq_rot, dk_rot):
    cos, sin = ctx.saved_tensors
    dq_rot = dq_rot if ctx.needs_input_grad[0] else None
    dk_rot = dk_rot if ctx.needs_input_grad[1] else None
    dq = dk = None
    if dq_rot is not None or dk_rot is not None:
        dq, dk = _rotate_back(dq_rot, dk_rot, cos, sin, ctx.offset, not ctx.inverse)
    return dq, dk, None, None, None, None


_rope_op = Op("rope", _rope_impl, _rope_fake, setup_context=_rope_setup, backward=_rope_backward)


def _rope_in_place_impl(
    q: Tensor | None, k: Tensor | None, cos: Tensor, sin: Tensor, offset: int, inverse: bool
) -> None:
    """q and k (either may be None) rotated in their own storage by +θ (by −θ when inverse)."""
    rope_kernels.rotate(q, k, cos, sin, offset, inverse, in_place=True)


def _rope_in_place_fake(q, k, cos, sin, offset, inverse):
    return None


_rope_in_place_op = Op("rope_", _rope_in_place_impl, _rope_in_place_fake, mutates_args=("q", "k"))


def _private_gradients(dq_rot: Tensor | None, dk_rot: Tensor | None) -> bool:
    """Whether incoming gradients that the caller declared private may be rotated where they are: dense and no
    element of one the other's (one tensor handed to both, as an add's backward does, is not)."""
    present = [g for g in (dq_rot, dk_rot) if g is not None]
    if any(overlaps_itself(g) for g in present):
        return False
    return len(present) < 2 or not may_share_elements(dq_rot, dk_rot)


def _rotate_back(dq_rot, dk_rot, cos, sin, offset: int, inverse: bool = True, in_place: bool = False):
    """(dq, dk): the incoming gradients (either may be None) rotated by −θ (by +θ when not inverse: the backward of
    a backward), where they are when in_place and _private_gradients allows (in plain eager mode: a traced
    backward, compiled autograd's, gets new tensors), else into new tensors through the rope op."""
    if in_place and plain_eager((dq_rot, dk_rot)) and _private_gradients(dq_rot, dk_rot):
        _rope_in_place_op(dq_rot, dk_rot, cos, sin, offset, inverse)
        return dq_rot, dk_rot
    dq, dk = _rope_op(dq_rot, dk_rot, cos, sin, offset, inverse)
    return (None if dq_rot is None else dq), (None if dk_rot is None else dk)


class _RopeInPlace(torch.autograd.Function):
    """rope(..., inplace=True) in eager mode with gradients: q and k (either may be None, then absent from the
    outputs) rotated in their storage, marked dirty, so autograd rebases their history on this rotation and every
    op that saved them fails loudly (a custom op cannot both write into its inputs and have an autograd formula).
    The backward rotates the incoming gradients by −θ into new tensors, or where they are with inplace_grad."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, offset, inplace_grad):
        _rope_in_place_impl(q, k, cos, sin, offset, False)
        written = tuple(t for t in (q, k) if t is not None)
        ctx.mark_dirty(*written)
        ctx.save_for_backward(cos, sin)
        ctx.offset, ctx.inplace_grad, ctx.has_q, ctx.has_k = offset, inplace_grad, q is not None, k is not None
        ctx.set_materialize_grads(False)
        return written if len(written) > 1 else written[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        grads = list(grads)
        dq_rot = grads.pop(0) if ctx.has_q else None
        dk_rot = grads.pop(0) if ctx.has_k else None
        dq_rot = dq_rot if ctx.needs_input_grad[0] else None
        dk_rot = dk_rot if ctx.needs_input_grad[1] else None
        if dq_rot is None and dk_rot is None:
            return None, None, None, None, None, None
        dq, dk = _rotate_back(dq_rot, dk_rot, cos, sin, ctx.offset, in_place=ctx.inplace_grad)
        return dq, dk, None, None, None, None


class _RopeLeadingHeads(torch.autograd.Function):
    """Heads [0, heads) of x [B, T, H_total, D] (q's and k's heads of a fused QKV projection's output, v's after
    them) rotated in x's storage; returns an alias of x, x's version bumped so that any op that saved x fails
    loudly. x's own history is not rebased (mark_dirty would make autograd copy the whole gradient of x's base in
    the backward): only the alias may be used afterwards, which is why this serves TritonMultiheadAttention alone,
    whose views q, k, v are taken from the alias. The backward rotates the same heads of the incoming gradient by
    −θ where it is (it comes from the split of that alias, a tensor nothing else holds)."""

    @staticmethod
    def forward(ctx, x, heads, cos, sin, offset):
        _rope_in_place_impl(x[:, :, :heads].transpose(1, 2), None, cos, sin, offset, False)
        torch.autograd.graph.increment_version(x)
        ctx.save_for_backward(cos, sin)
        ctx.heads, ctx.offset = heads, offset
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if not (plain_eager((grad,)) and _private_gradients(grad, None)):  # compiled autograd: a copy it can plan
            grad = grad.clone(memory_format=torch.contiguous_format)
        _rope_in_place_op(grad[:, :, : ctx.heads].transpose(1, 2), None, cos, sin, ctx.offset, True)
        return grad, None, None, None, None


def rope_leading_heads_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0):
    """Heads [0, heads) of x [B, T, H_total, D] rotated in place as rope rotates q and k (x's other heads kept);
    returns an alias of x, the only tensor to use afterwards (take q, k and v from it; see _RopeLeadingHeads). For
    TritonMultiheadAttention's QKV projection output: a non-leaf x that no op saved, in plain eager mode (checked);
    elsewhere use rope."""
    if x.dim() != 4 or not 0 <= heads <= x.shape[2]:
        raise ValueError(f"x must be [B, T, H_total, D] with heads ≤ H_total, got shape {tuple(x.shape)}, {heads=}")
    if not plain_eager((x, cos, sin)):
        raise RuntimeError("rope_leading_heads_ needs plain eager mode and plain tensors (elsewhere use rope)")
    rotated = x[:, :, :heads].transpose(1, 2)
    _check_rope_inputs(rotated, rotated, cos, sin, offset)
    _check_in_place(rotated, None)
    return _RopeLeadingHeads.apply(x, heads, cos, sin, offset)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offset: int = 0,
    inplace: bool = False,
    inplace_grad: bool = False,
):
    """Rotary position embedding of q [B, Hq, S, D] and k [B, Hk, S, D] (rotate-half convention, as GPT-NeoX and
    LLaMA): x·cos + rotate_half(x)·sin with rotate_half(x) = [−x₂, x₁] for the halves x₁ = x[..., :D/2],
    x₂ = x[..., D/2:]. Returns (q_rot, k_rot) (ops triformer::rope, triformer::rope_).

    inplace=False (default): q and k are left untouched; q_rot and k_rot are new contiguous [B, H, S, D] tensors of
    q's dtype. inplace=True: q and k are rotated in their own storage and returned (the memory saving of
    Liger-Kernel's rope: no [B, H, S, D] outputs), autograd told (their history continues from the rotation; an
    op that saved them raises "modified by an inplace operation" in its backward). With gradients they must not be
    leaves (a projection's output is not) nor views autograd will not let be written (made by split/chunk/unbind
    or under no_grad; slice instead, or let TritonMultiheadAttention rotate inside its projection). They must not
    overlap themselves or each other. All checked in eager mode before anything is written (ValueError, also where
    an overlap cannot be ruled out); skipped under torch.compile / export, where the rotation is computed into new
    tensors and copied back, q first.
    inplace_grad=True (with inplace): the backward rotates the gradients arriving at q and k where they are, as
    Liger-Kernel's does, instead of into new tensors: only for gradients nothing else reads (one from the
    attention's backward, not one the caller passed to backward() or an add handed to another branch too; one
    tensor for both, or overlapping ones, are detected and get new tensors). It applies where q and k are not
    views; views' gradients always get new tensors. Not twice differentiable (create_graph raises).
    q and k may be strided views (e.g. of a fused QKV projection [B, S, 3, H, D]); k may have fewer heads than q
    (grouped-query attention); D must be even. cos and sin: tables [S_max, D/2] (see rope_tables) or [S_max, D]
    whose two halves repeat each other (only the first D/2 columns are read), any float dtype (float32
    recommended), treated as constants. Position p of the sequence takes table row offset + p (generation with a
    cache). Float32 math; both outputs in one kernel launch, the backward (rotation by −θ) likewise.
    """
    _check_rope_inputs(q, k, cos, sin, offset)
    for flag, name in ((inplace, "inplace"), (inplace_grad, "inplace_grad")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if inplace_grad and not inplace:
        raise ValueError("inplace_grad=True rotates the gradients of an in-place rotation: pass inplace=True too")
    if not inplace:
        return _rope_op(q, k, cos, sin, offset, False)
    eager = plain_eager((q, k, cos, sin))
    if eager:
        _check_in_place(q, k)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        _rope_in_place_op(q, k, cos, sin, offset, False)
        return q, k
    if not eager:
        q_rot, k_rot = _rope_op(q, k, cos, sin, offset, False)  # traced: a functional rotation, written back
        return q.copy_(q_rot), k.copy_(k_rot)
    if q._base is None and k._base is None:
        return _RopeInPlace.apply(q, k, cos, sin, offset, inplace_grad)
    # autograd rebases a written view through its base, for a function with one output only; two functions could
    # not tell one gradient handed to both, so theirs go to new tensors
    return _RopeInPlace.apply(q, None, cos, sin, offset, False), _RopeInPlace.apply(None, k, cos, sin, offset, False)
