"""A GPT language model (decoder-only transformer) built from triformer.nn, after nanoGPT's model.py.

    idx (B, T) → token embedding (+ learned position embedding, or RoPE inside attention) → dropout
               → n_layer pre-norm blocks (causal self-attention, MLP) → final norm → LM head tied to the embedding
               → logits (B, T, V) and, with targets, the cross-entropy loss (the fused head: the loss only)

backend="torch" builds the twin with the same parameter names on nn.Linear, nn.LayerNorm / nn.RMSNorm,
F.scaled_dot_product_attention and F.cross_entropy: `twin.load_state_dict(model.state_dict())` gives the same
function, and with the same seed both start from the same weights. torch_parts puts single parts on PyTorch
(torch_parts=("attention",): SDPA inside an otherwise triformer model), for ablations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import nn as tnn
from .blocks import (
    MLPS,
    NORMS,
    Block,
    by_backend,
    check_choice,
    check_heads,
    init_gpt2_,
    make_dropout,
    make_norm,
    make_rotary,
    part_backends,
    parts_tuple,
    run_blocks,
)
from .mlp import make_linear


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256  # longest context
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # < n_head: grouped-query attention (None: n_head)
    n_embd: int = 384
    dropout: float = 0.0  # on the embeddings and on each residual branch
    attn_dropout: float = 0.0  # on the attention probabilities (nanoGPT uses dropout for both)
    bias: bool = True  # in the linears and LayerNorms
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu (4·n_embd, GPT-2) | swiglu | geglu (gated, 8/3·n_embd)
    mlp_hidden: int | None = None  # the MLP's hidden width (None: the default of its kind)
    rope: bool = False  # rotary position embedding instead of a learned one
    fused_head: bool = False  # loss by fused linear + cross-entropy (no (B, T, V) logits) instead of logits + CE
    fused_residual: bool = True  # triformer norms and dropout: each residual add + dropout + next norm as one op
    backend: str = "triton"  # triton | torch (the twin)
    torch_parts: tuple[str, ...] = ()  # parts on PyTorch whatever the backend: attention, norm, mlp, head, dropout

    def __post_init__(self):
        self.torch_parts = parts_tuple(self.torch_parts)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden"):
            value = getattr(self, name)
            if name == "mlp_hidden" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        check_choice("norm", self.norm, NORMS)
        check_choice("mlp", self.mlp, MLPS)
        backends = part_backends(self.backend, self.torch_parts)
        check_heads(self.n_embd, self.n_head, backends["attention"], self.rope)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        head_dim = c.n_embd // c.n_head
        backends = part_backends(c.backend, c.torch_parts)
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = None if c.rope else nn.Embedding(c.block_size, c.n_embd)
        self.rotary = make_rotary(head_dim, c.block_size, backends["attention"]) if c.rope else None
        self.drop = make_dropout(c.dropout, backends["dropout"])
        self.blocks = nn.ModuleList(
            Block(
                c.n_embd,
                c.n_head,
                n_kv_head=c.n_kv_head,
                causal=True,
                norm=c.norm,
                mlp=c.mlp,
                mlp_hidden=c.mlp_hidden,
                bias=c.bias,
                dropout=c.dropout,
                attn_dropout=c.attn_dropout,
                rotary=self.rotary,
                backend=backends,
            )
            for _ in range(c.n_layer)
        )
        self.ln_f = make_norm(c.norm, c.n_embd, c.bias, backends["norm"])
        self.lm_head = make_linear(c.n_embd, c.vocab_size, None, backends["head"], bias=False)
        self.wte.weight = self.lm_head.weight  # tied input and output embeddings
        if c.fused_head:
            self.loss_fn = by_backend(
                backends["head"], tnn.TritonLinearCrossEntropyLoss, tnn.TorchLinearCrossEntropyLoss
            )()
        else:
            self.loss_fn = by_backend(backends["head"], tnn.TritonCrossEntropyLoss, nn.CrossEntropyLoss)()
        init_gpt2_(self, c.n_layer)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the position embedding (the token embedding is the LM head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM's estimate: 6·N + 12·n_layer·n_embd·T."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)

    def features(self, idx: torch.Tensor, into_head: bool = False) -> torch.Tensor:
        """The final-normed hidden states (B, T, C) of token ids idx (B, T). into_head: they only feed the LM head,
        so under autocast they may come in the autocast dtype it casts them to (models/blocks.run_blocks)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be token ids (B, T), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))  # + (T, C)
        x = self.drop(x)
        fused = self.config.fused_residual
        return run_blocks(self.blocks, x, self.ln_f, fused, final_into_linear=into_head)  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(logits (B, T, V), loss): the loss is None without targets, else the mean cross-entropy over the targets
        (B, T) that are not -100. With fused_head and targets the logits are None: that head never makes them."""
        x = self.features(idx, into_head=True)  # (B, T, C)
        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        if self.config.fused_head:
            return None, self.loss_fn(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(x)  # (B, T, V)
        return logits, self.loss_fn(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """Appends max_new_tokens sampled tokens to idx (B, T), each conditioned on the last block_size tokens;
        samples from softmax(logits / temperature), restricted to the top_k most likely tokens when given.
        Runs in eval mode (no dropout) and restores the mode it found."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if idx.dim() != 2 or (idx.shape[1] == 0 and max_new_tokens > 0):
            raise ValueError(f"idx must be a prompt (B, T) of at least one token, got shape {tuple(idx.shape)}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                context = idx[:, -self.config.block_size :]  # (B, ≤ block_size)
                logits = self.lm_head(self.features(context, into_head=True)[:, -1, :]).float() / temperature  # (B, V)
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, -math.inf)
                next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
                idx = torch.cat((idx, next_token), dim=1)  # (B, T + 1)
        finally:
            self.train(was_training)
        return idx
