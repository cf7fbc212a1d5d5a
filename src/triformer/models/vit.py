"""A Vision Transformer classifier built from triformer.nn, with the same blocks as the GPT (non-causal attention).

    images (B, C, H, W) → patches (B, N, C·p·p) → patch embedding (a linear) → [class token] + position embedding
                        → dropout → n_layer pre-norm blocks → final norm → class token or mean over patches
                        → head → logits (B, num_classes), and the cross-entropy loss when labels are given

backend="torch" builds the twin with the same parameter names (nn.Linear, nn.LayerNorm, SDPA, F.cross_entropy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import nn as tnn
from .blocks import Block, by_backend, check_choice, check_heads, init_gpt2_, make_dropout, make_norm, run_blocks
from .mlp import make_linear

POOLS = ("cls", "mean")


@dataclass
class ViTConfig:
    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    num_classes: int = 10
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 64
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio · n_embd
    dropout: float = 0.0  # on the embeddings and on each residual branch
    attn_dropout: float = 0.0  # on the attention probabilities
    pool: str = "cls"  # cls: a learned class token | mean: the mean over patch tokens
    fused_residual: bool = True  # each residual add + dropout + next norm as one op (triton backend)
    backend: str = "triton"  # triton | torch (the twin)

    def __post_init__(self):
        for name in ("image_size", "patch_size", "channels", "num_classes", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        check_choice("pool", self.pool, POOLS)
        by_backend(self.backend, None, None)
        check_heads(self.n_embd, self.n_head, self.backend)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        patch_dim = c.channels * c.patch_size**2
        n_tokens = c.num_patches + (c.pool == "cls")
        self.patch_embed = make_linear(patch_dim, c.n_embd, None, c.backend)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.n_embd)) if c.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, c.n_embd))
        self.drop = make_dropout(c.dropout, c.backend)
        self.blocks = nn.ModuleList(
            Block(
                c.n_embd,
                c.n_head,
                causal=False,
                mlp_hidden=round(c.mlp_ratio * c.n_embd),
                dropout=c.dropout,
                attn_dropout=c.attn_dropout,
                backend=c.backend,
            )
            for _ in range(c.n_layer)
        )
        self.ln_f = make_norm("layernorm", c.n_embd, True, c.backend)
        self.head = make_linear(c.n_embd, c.num_classes, None, c.backend)
        # The logits are returned with the loss: the cross-entropy keeps them (its gradient in a buffer of its own).
        self.loss_fn = tnn.TritonCrossEntropyLoss() if c.backend == "triton" else nn.CrossEntropyLoss()
        init_gpt2_(self, c.n_layer)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, N, C·p·p): non-overlapping p×p patches in row-major order, each flattened as (C, p, p)
        (the layout of a Conv2d weight with kernel = stride = p)."""
        c = self.config
        expected = (c.channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got shape {tuple(images.shape)}")
        B, p, g = images.shape[0], c.patch_size, c.image_size // c.patch_size
        x = images.reshape(B, c.channels, g, p, g, p)  # (B, C, gh, p, gw, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, c.channels * p * p)  # (B, N, C·p·p)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """(logits (B, num_classes), mean cross-entropy loss or None without labels)."""
        x = self.patch_embed(self.patchify(images))  # (B, N, C)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, C)
        x = self.drop(x + self.pos_embed)
        x = run_blocks(self.blocks, x, self.ln_f, self.config.fused_residual)  # (B, tokens, C), final-normed
        pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, C)
        logits = self.head(pooled)  # (B, num_classes)
        loss = None if labels is None else self.loss_fn(logits, labels)
        return logits, loss
