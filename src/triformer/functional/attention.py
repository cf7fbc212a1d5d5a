"""Scaled dot-product attention on the flash kernels (triformer.kernels.attention), forward and backward."""

from __future__ import annotations

import math

import torch

from ..kernels import attention as attention_kernels
from ..kernels._runtime import check_same_dtype, check_tensor


def _check_attention_inputs(q, k, v, causal, scale) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension: shape {tuple(t.shape)}")
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
        raise ValueError(f"q has {h} heads, not a multiple of the {h_kv} heads of k and v (grouped-query attention "
                         "needs Hq = G·Hkv)")
    if d % 8 or d > attention_kernels.MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: it must be a multiple of 8 and at most "
                         f"{attention_kernels.MAX_HEAD_DIM}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number ≥ 0, got {scale}")


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = attention_kernels.attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = attention_kernels.attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale,
                                                          need_dq=need_q, need_dkdv=need_k or need_v)
        return dq, dk if need_k else None, dv if need_v else None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ [+ causal mask]) v, as F.scaled_dot_product_attention(q, k, v, is_causal=causal,
    scale=scale, enable_gqa=True) computes it, on flash kernels: no S×S matrix in memory, forward or backward.

    q [B, Hq, S, D], k and v [B, Hkv, S, D] with Hq a multiple of Hkv (multi-query and grouped-query attention:
    query head h uses kv head h // (Hq // Hkv)); any strides (e.g. views of a fused [B, S, 3, H, D] projection);
    D a multiple of 8 up to 256; any S ≥ 1; float32, float16 or bfloat16 with float32 softmax statistics.
    causal: key j is masked for query i when j > i. scale: default 1/√D. Returns o [B, Hq, S, D] (contiguous,
    q's dtype). Under autocast the inputs are cast to the autocast dtype. No dropout on the attention
    probabilities.
    """
    from . import _cast_for_autocast

    q, k, v = _cast_for_autocast(q, k, v)
    _check_attention_inputs(q, k, v, causal, scale)
    scale = attention_kernels.default_scale(q.shape[-1]) if scale is None else float(scale)
    return _AttentionFunction.apply(q, k, v, causal, scale)
