"""Rotary position embedding modules: TritonRotaryEmbedding (triformer's kernel) and its PyTorch twin."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F_tri
from ..functional.rope import rope_leading_heads_


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[−x₂, x₁] for the halves x₁ = x[..., :D/2], x₂ = x[..., D/2:] (GPT-NeoX, LLaMA)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def torch_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0):
    """x·cos + rotate_half(x)·sin for q, k [B, H, S, D] in plain torch ops, as Hugging Face's LLaMA writes it: the
    half tables [S_max, D/2] are repeated to [S, D] and cast to q's dtype."""
    seq = q.shape[-2]
    cos = cos[offset : offset + seq].repeat(1, 2).to(q.dtype)
    sin = sin[offset : offset + seq].repeat(1, 2).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class _RotaryTables(nn.Module):
    """Holds cos and sin [max_seq_len, head_dim / 2] (float32, non-persistent buffers: rebuilt, not saved)."""

    def __init__(self, head_dim: int, max_seq_len: int = 2048, base: float = 10000.0, device=None):
        super().__init__()
        cos, sin = F_tri.rope_tables(head_dim, max_seq_len, base, device)
        self.head_dim, self.max_seq_len, self.base = head_dim, max_seq_len, base
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        """Rebuild the tables where they are (what a meta-device initialisation calls after to_empty): written into
        the buffers when they are float32 (the same tensors: shared memory, CUDA graphs and DDP's buffer lists keep
        them), else new float32 ones; never inference tensors, even under torch.inference_mode."""
        with torch.inference_mode(False), torch.no_grad():
            fresh_tables = F_tri.rope_tables(self.head_dim, self.max_seq_len, self.base, torch.device("cpu"))
            for name, fresh in zip(("cos", "sin"), fresh_tables):
                table = getattr(self, name)
                if table.dtype == torch.float32 and not table.is_inference():
                    table.copy_(fresh)
                else:
                    setattr(self, name, fresh.to(table.device))

    def _apply(self, fn, recurse=True):
        """Module.to / .half() / .cuda() / .to_empty(): the tables follow the device, rebuilt there in float32
        (exact after a dtype cast rounded them, defined after to_empty left them uninitialised; load_state_dict does
        not restore them, being non-persistent)."""
        super()._apply(fn, recurse)
        self.reset_parameters()
        return self

    def _check(self, q: torch.Tensor, offset: int) -> None:
        if q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q has head dim {q.shape[-1]} but this rotary embedding was built for head_dim={self.head_dim}"
            )
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        if offset + q.shape[-2] > self.max_seq_len:
            raise ValueError(f"positions up to {offset + q.shape[-2] - 1} exceed max_seq_len={self.max_seq_len}")

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, base={self.base}"


class TritonRotaryEmbedding(_RotaryTables):
    """forward(q [B, Hq, S, D], k [B, Hk, S, D], offset=0, inplace=False) → (q_rot, k_rot): rotate-half RoPE on
    triformer's kernel (out of place, or in place in q's and k's storage: see triformer.functional.rope), positions
    offset .. offset + S − 1, θ_p,i = p · base^(−2i/D)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0, inplace: bool = False):
        self._check(q, offset)
        return F_tri.rope(q, k, self.cos, self.sin, offset, inplace, inplace_grad=False)

    def rotate_leading_heads_(self, x: torch.Tensor, heads: int, offset: int = 0) -> torch.Tensor:
        """Heads [0, heads) of x [B, T, H_total, D] rotated in place, the others kept; returns an alias of x (see
        triformer.functional.rope.rope_leading_heads_: eager mode, a non-leaf x that no op saved)."""
        self._check(x.transpose(1, 2), offset)  # [B, H_total, T, D], as q
        return rope_leading_heads_(x, heads, self.cos, self.sin, offset)


class TorchRotaryEmbedding(_RotaryTables):
    """The PyTorch twin of TritonRotaryEmbedding (same constructor and tables): torch_rope in plain torch ops."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        self._check(q, offset)
        return torch_rope(q, k, self.cos, self.sin, offset)
