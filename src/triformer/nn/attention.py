"""Multi-head self-attention: one fused QKV projection, optional rotary embedding, attention, output projection.

TritonMultiheadAttention runs on triformer's kernels (TritonLinear, triformer.functional.attention and, when given,
TritonRotaryEmbedding); TorchMultiheadAttention is its PyTorch twin with the same parameter names and shapes
(nn.Linear and F.scaled_dot_product_attention), so `twin.load_state_dict(module.state_dict())` gives the same function.

Grouped-query attention: num_kv_heads < num_heads key/value heads, each shared by num_heads / num_kv_heads query heads
(num_kv_heads = 1 is multi-query attention). The QKV projection's output row is laid out as
[q heads | k heads | v heads], each head head_dim = embed_dim / num_heads wide.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import functional as F_tri
from ..functional._library import plain_eager
from ..functional.attention import check_head_dim
from . import TorchLinear, TritonLinear
from .hooks import hooked, replaced_forward
from .rope import TritonRotaryEmbedding


def _check_attention_args(embed_dim, num_heads, num_kv_heads, dropout, rotary) -> int:
    """Validates the constructor's arguments; returns the head dim."""
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads} "
            "(each key/value head serves the same number of query heads)"
        )
    F_tri.check_module_dropout(dropout, "attention dropout")
    head_dim = embed_dim // num_heads
    if rotary is not None and getattr(rotary, "head_dim", head_dim) != head_dim:
        raise ValueError(
            f"rotary embedding has head_dim={rotary.head_dim} but the attention heads are "
            f"embed_dim / num_heads = {head_dim} wide"
        )
    return head_dim


class _MultiheadAttentionBase(nn.Module):
    """What both twins share: arguments, the QKV and output projections, the split into heads."""

    def __init__(
        self,
        linear_cls,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None,
        causal: bool,
        bias: bool,
        dropout: float,
        rotary: nn.Module | None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = _check_attention_args(embed_dim, num_heads, num_kv_heads, dropout, rotary)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.causal = bool(causal)
        self.dropout = float(dropout)  # on the attention probabilities, while training
        qkv_features = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv = linear_cls(embed_dim, qkv_features, bias=bias, activation=None)
        self.out_proj = linear_cls(embed_dim, embed_dim, bias=bias, activation=None)
        self.rotary = rotary

    def split_heads(self, qkv: torch.Tensor):
        """q (B, H, T, D), k and v (B, Hkv, T, D): strided views of the projection's output, no copies. One split
        (not three slices): its backward writes the projection's gradient with one concatenation, where three
        slices' would each fill a zero gradient of the whole output, copy into it, and add the three."""
        B, T, _ = qkv.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        heads = qkv.view(B, T, H + 2 * Hkv, self.head_dim)  # (B, T, H + 2·Hkv, D)
        q, k, v = heads.split([H, Hkv, Hkv], dim=2)  # (B, T, H, D), (B, T, Hkv, D) twice
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D) twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.before_output(x))

    @property
    def output_linear(self) -> nn.Module:
        """The linear that makes the output (a residual block may add its bias itself)."""
        return self.out_proj

    def before_output(self, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs side by side (B, T, embed_dim): what out_proj takes."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, T, embed_dim={self.embed_dim}), got shape {tuple(x.shape)}")
        B, T, C = x.shape
        q, k, v = self.heads(x)
        y = self.attend(q, k, v)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, C)  # heads side by side again: (B, T, C)

    def heads(self, x: torch.Tensor):
        """q (B, H, T, D), k and v (B, Hkv, T, D) of x (B, T, C), q and k rotated when rotary is given."""
        return self.rotated_heads(self.qkv(x))

    def rotated_heads(self, qkv: torch.Tensor):
        """q, k, v of the projection's output qkv (B, T, (H + 2·Hkv)·D), q and k through rotary when given."""
        q, k, v = self.split_heads(qkv)
        return (*self.rotary(q, k), v) if self.rotary is not None else (q, k, v)

    def attend(self, q, k, v) -> torch.Tensor:
        raise NotImplementedError

    def dropout_rate(self) -> float:
        """The rate of dropout on the attention probabilities now: dropout while training, else 0."""
        return self.dropout if self.training else 0.0

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}, dropout={self.dropout}"
        )


class TritonMultiheadAttention(_MultiheadAttentionBase):
    """Self-attention on x (B, T, embed_dim) → (B, T, embed_dim), every op on triformer's Triton kernels.

    qkv: TritonLinear(embed_dim → (num_heads + 2·num_kv_heads)·head_dim); q, k, v are views of its output;
    rotary (a TritonRotaryEmbedding, optional) rotates q and k, in place in qkv's output where nothing else can hold
    it (see heads); triformer.functional.attention(q, k, v, causal);
    out_proj: TritonLinear(embed_dim → embed_dim). dropout: on the attention probabilities while training (the
    mask drawn in the attention kernels, see triformer.functional.attention).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        causal: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        rotary: nn.Module | None = None,
    ):
        super().__init__(TritonLinear, embed_dim, num_heads, num_kv_heads, causal, bias, dropout, rotary)
        check_head_dim(self.head_dim, f"the head dim embed_dim / num_heads = {embed_dim} / {num_heads} =")

    def heads(self, x: torch.Tensor):
        """q, k, v as the twin's; q and k rotated in place in the QKV projection's output (no [B, H, T, D] copies
        of them, which the attention's backward would keep) when that output is private: qkv a TritonLinear (a
        fresh output, saved by nothing) that no hook watches, rotary a TritonRotaryEmbedding, rotated_heads not
        overridden, eager mode; otherwise through rotated_heads, as the twin."""
        qkv, rotary = self.qkv, self.rotary
        private = (
            type(rotary) is TritonRotaryEmbedding
            and type(qkv) is TritonLinear
            and type(self).rotated_heads is _MultiheadAttentionBase.rotated_heads
            and not (hooked(qkv) or hooked(rotary) or replaced_forward(qkv) or replaced_forward(rotary))
        )
        projected = qkv(x)
        if not (private and plain_eager((projected,))):
            return self.rotated_heads(projected)
        B, T, _ = x.shape
        heads = projected.view(B, T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        rotated = rotary.rotate_leading_heads_(heads, self.num_heads + self.num_kv_heads)
        return self.split_heads(rotated.view(B, T, -1))

    def attend(self, q, k, v) -> torch.Tensor:
        return F_tri.attention(q, k, v, causal=self.causal, dropout_p=self.dropout_rate())


class TorchMultiheadAttention(_MultiheadAttentionBase):
    """The PyTorch twin of TritonMultiheadAttention (same parameters): nn.Linear projections and
    F.scaled_dot_product_attention (enable_gqa for grouped-query heads); rotary a TorchRotaryEmbedding."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        causal: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        rotary: nn.Module | None = None,
    ):
        super().__init__(TorchLinear, embed_dim, num_heads, num_kv_heads, causal, bias, dropout, rotary)

    def attend(self, q, k, v) -> torch.Tensor:
        grouped = self.num_kv_heads != self.num_heads
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout_rate(), enable_gqa=grouped
        )
