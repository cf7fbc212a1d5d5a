"""Scaled dot-product attention on the flash kernels (triformer.kernels.attention), forward and backward."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels import attention as attention_kernels
from ..kernels import dropout as dropout_kernels
from ..kernels._runtime import check_same_dtype, check_tensor
from . import _is_number, _seed_value
from ._library import Op, or_placeholder, placeholder


def check_head_dim(d: int, what: str = "head dim") -> None:
    """The head dims the kernels take: multiples of 8 up to MAX_HEAD_DIM."""
    if d % 8 or d > attention_kernels.MAX_HEAD_DIM:
        raise ValueError(
            f"{what} {d} is not supported: it must be a multiple of 8 and at most {attention_kernels.MAX_HEAD_DIM}"
        )


def _check_attention_inputs(q, k, v, causal, scale) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.shape[1] == 0 or t.shape[3] == 0:
            raise ValueError(f"{name} has no heads or an empty head dim: shape {tuple(t.shape)}")
    check_same_dtype(q, "q", k, "k")
    check_same_dtype(q, "q", v, "v")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, H_kv, S, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, h, s, d), (bk, h_kv, sk, dk) = q.shape, k.shape
    if bk != b:
        raise ValueError(f"q has batch size {b} but k and v have {bk}")
    if dk != d:
        raise ValueError(f"q has head dim {d} but k and v have {dk}; they must match")
    if sk != s:
        raise ValueError(f"q has sequence length {s} but k and v have {sk}; attention takes one length for both")
    if h % h_kv:
        raise ValueError(
            f"q has {h} heads, not a multiple of the {h_kv} heads of k and v (grouped-query attention needs Hq = G·Hkv)"
        )
    check_head_dim(d)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        if not _is_number(scale):
            raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number ≥ 0, got {scale}")


def _seed_arg(dropout_p: float, seed: Tensor | None) -> int | Tensor:
    """The kernels' seed: as the dropout op passes it (an int for a CPU seed); none where dropout_p drops nothing."""
    if seed is None:
        if dropout_kernels.drops_any(dropout_p):
            raise ValueError(f"dropout_p = {dropout_p} needs a seed (a one-element integer tensor)")
        return 0
    return _seed_value(seed)


def _attention_impl(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, dropout_p: float, seed: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(o [B, Hq, S, D] laid out as [B, S, Hq, D], lse [B, Hq, S] float32, base 2) for validated inputs; dropout on
    the probabilities at rate dropout_p with the mask of seed (None when dropout_p drops nothing)."""
    return attention_kernels.attention_forward(
        q, k, v, causal, scale, dropout_p=dropout_p, seed=_seed_arg(dropout_p, seed)
    )


def _attention_fake(q, k, v, causal, scale, dropout_p, seed):
    return attention_kernels.sequence_major_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_setup(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.scale, ctx.dropout_p, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, do, _):
    if do is None:
        return None, None, None, None, None, None, None
    q, k, v, o, lse, seed = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    dq, dk, dv = _attention_backward_op(
        do, q, k, v, o, lse, ctx.causal, ctx.scale, need_q, need_k or need_v, ctx.dropout_p, seed
    )
    return dq if need_q else None, dk if need_k else None, dv if need_v else None, None, None, None, None


def _attention_backward_impl(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    need_dq: bool,
    need_dkdv: bool,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of _attention_impl's o for the incoming do; placeholders where not needed."""
    dq, dk, dv = attention_kernels.attention_backward(
        do,
        q,
        k,
        v,
        o,
        lse,
        causal,
        scale,
        need_dq=need_dq,
        need_dkdv=need_dkdv,
        dropout_p=dropout_p,
        seed=_seed_arg(dropout_p, seed),
    )
    return or_placeholder(dq, lse), or_placeholder(dk, lse), or_placeholder(dv, lse)


def _attention_backward_fake(do, q, k, v, o, lse, causal, scale, need_dq, need_dkdv, dropout_p, seed):
    return (
        attention_kernels.gradient_like(q) if need_dq else placeholder(lse),
        attention_kernels.gradient_like(k) if need_dkdv else placeholder(lse),
        attention_kernels.gradient_like(v) if need_dkdv else placeholder(lse),
    )


_attention_backward_op = Op("attention_backward", _attention_backward_impl, _attention_backward_fake)
_attention_op = Op(
    "attention", _attention_impl, _attention_fake, setup_context=_attention_setup, backward=_attention_backward
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale · q kᵀ [+ causal mask]) v, as F.scaled_dot_product_attention(q, k, v, is_causal=causal,
    scale=scale, dropout_p=dropout_p, enable_gqa=True) computes it, on flash kernels: no S×S matrix in memory,
    forward or backward (op triformer::attention).

    q [B, Hq, S, D], k and v [B, Hkv, S, D] with Hq a multiple of Hkv (multi-query and grouped-query attention:
    query head h uses kv head h // (Hq // Hkv)); any strides (e.g. views of a fused [B, S, 3, H, D] projection);
    D a multiple of 8 up to 256; any S and B (empty ones give an empty o); float32, float16 or bfloat16 with float32
    softmax statistics. causal: key j is masked for query i when j > i. scale: default 1/√D. Returns o [B, Hq, S, D]
    in q's dtype, laid out as [B, S, Hq, D] (o.transpose(1, 2) is contiguous: heads side by side for the output
    projection, as SDPA's flash kernels return it). Under autocast the inputs are cast to the autocast dtype.
    dropout_p: each probability is dropped with probability p̂ (dropout_p rounded to a multiple of 2⁻¹⁶, as
    triformer.functional.dropout rounds it) and the kept ones scaled by 1 / (1 − p̂), after the softmax's sum; the
    mask is a function of (seed, the shapes) drawn again in the backward (nothing stored); seed as
    triformer.functional.dropout takes it (None: drawn from torch's generator). Pass dropout_p=0 outside training, as
    with SDPA.
    """
    from . import _cast_for_autocast, _check_dropout_args, _seed_tensor

    q, k, v = _cast_for_autocast(q, k, v)
    _check_attention_inputs(q, k, v, causal, scale)
    _check_dropout_args(dropout_p, seed)
    scale = attention_kernels.default_scale(q.shape[-1]) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed = _seed_tensor(seed, q) if dropout_kernels.drops_any(dropout_p) else None
    return _attention_op(q, k, v, causal, scale, dropout_p if seed is not None else 0.0, seed)[0]
