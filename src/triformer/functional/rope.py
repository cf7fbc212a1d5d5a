"""Rotary position embedding: `rope(q, k, cos, sin, offset)` on Triton kernels, and the tables it reads."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels import rope as rope_kernels
from ..kernels._runtime import check_same_dtype, check_tensor
from . import _is_number
from ._library import Op, placeholder


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
    inv_freq = float(base) ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
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
    _, _, cos, sin, ctx.offset, _ = inputs
    ctx.save_for_backward(cos, sin)
    ctx.set_materialize_grads(False)


def _rope_backward(ctx, dq_rot, dk_rot):
    cos, sin = ctx.saved_tensors
    dq_rot = dq_rot if ctx.needs_input_grad[0] else None
    dk_rot = dk_rot if ctx.needs_input_grad[1] else None
    dq = dk = None
    if dq_rot is not None or dk_rot is not None:
        dq, dk = _rope_op(dq_rot, dk_rot, cos, sin, ctx.offset, True)
    return (None if dq_rot is None else dq), (None if dk_rot is None else dk), None, None, None, None


_rope_op = Op("rope", _rope_impl, _rope_fake, setup_context=_rope_setup, backward=_rope_backward)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0):
    """Rotary position embedding of q [B, Hq, S, D] and k [B, Hk, S, D] (rotate-half convention, as GPT-NeoX and
    LLaMA): x·cos + rotate_half(x)·sin with rotate_half(x) = [−x₂, x₁] for the halves x₁ = x[..., :D/2],
    x₂ = x[..., D/2:]. Returns (q_rot, k_rot) (op triformer::rope).

    OUT OF PLACE: q and k are left untouched; q_rot and k_rot are new contiguous [B, H, S, D] tensors of q's dtype.
    q and k may be strided views (e.g. of a fused QKV projection [B, S, 3, H, D]); k may have fewer heads than q
    (grouped-query attention); D must be even. cos and sin: tables [S_max, D/2] (see rope_tables) or [S_max, D]
    whose two halves repeat each other (only the first D/2 columns are read), any float dtype (float32
    recommended), treated as constants. Position p of the sequence takes table row offset + p (generation with a
    cache). Float32 math; both outputs in one kernel launch, the backward (rotation by −θ) likewise.
    """
    _check_rope_inputs(q, k, cos, sin, offset)
    return _rope_op(q, k, cos, sin, offset, False)
