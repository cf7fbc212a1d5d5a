"""The transformer block shared by the GPT and the ViT, its parts per backend, and GPT-2's initialisation.

Every part comes in two twins with the same parameter names and shapes: backend="triton" builds it from triformer.nn,
backend="torch" from the PyTorch modules (nn.Linear, nn.LayerNorm / nn.RMSNorm, F.scaled_dot_product_attention),
so a model's state_dict loads into its twin. `part_backends` gives each part (PARTS) its own backend, so one part at
a time can run on PyTorch inside a triformer model (the ablation's swaps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .. import functional as F_tri
from .. import nn as tnn
from ..functional.attention import check_head_dim
from ..nn.hooks import hooked_globally, hooked_itself, replaced_forward
from .mlp import BACKENDS, make_linear

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "geglu")
LAYER_NORM_EPS, RMS_NORM_EPS = 1e-5, 1e-6
# The parts of a model that can run on either backend: attention (its projections, RoPE and the attention itself),
# the norms, the MLP, the head (the output linear and the loss) and dropout.
PARTS = ("attention", "norm", "mlp", "head", "dropout")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def by_backend(backend: str, triton_cls, torch_cls):
    """The class for this backend (a clear error for an unknown one)."""
    check_choice("backend", backend, BACKENDS)
    return triton_cls if backend == "triton" else torch_cls


def parts_tuple(torch_parts) -> tuple[str, ...]:
    """torch_parts as a tuple of part names (a list or tuple of them; a lone string is refused, not split)."""
    if isinstance(torch_parts, str) or not isinstance(torch_parts, (list, tuple)):
        raise TypeError(f"torch_parts must be a list or tuple of part names such as ['attention'], got {torch_parts!r}")
    return tuple(torch_parts)


def part_backends(backend: str, torch_parts=()) -> dict[str, str]:
    """{part: backend} for every part in PARTS: `backend`, except the parts named in torch_parts, which run on torch."""
    check_choice("backend", backend, BACKENDS)
    torch_parts = parts_tuple(torch_parts)
    unknown = sorted(set(torch_parts) - set(PARTS))
    if unknown:
        raise ValueError(f"torch_parts {unknown} are not parts of the model; choose from {PARTS}")
    return {part: "torch" if part in torch_parts else backend for part in PARTS}


def check_heads(n_embd: int, n_head: int, attention_backend: str, rope: bool = False) -> None:
    """n_embd splits into n_head heads that the attention backend takes (triformer's: check_head_dim), even ones for
    RoPE."""
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
    head_dim = n_embd // n_head
    if attention_backend == "triton":
        try:
            check_head_dim(head_dim, "the head dim n_embd / n_head =")
        except ValueError as error:
            raise ValueError(f"{error}; or run the attention on torch (torch_parts=['attention'])") from None
    if rope and head_dim % 2:
        raise ValueError(f"rope needs an even head dim, got n_embd / n_head = {head_dim}")


def make_norm(kind: str, dim: int, bias: bool, backend: str) -> nn.Module:
    """LayerNorm (bias optional) or RMSNorm over the last dim."""
    check_choice("norm", kind, NORMS)
    if kind == "layernorm":
        return by_backend(backend, tnn.TritonLayerNorm, nn.LayerNorm)(dim, eps=LAYER_NORM_EPS, bias=bias)
    return by_backend(backend, tnn.TritonRMSNorm, nn.RMSNorm)(dim, eps=RMS_NORM_EPS)


def make_dropout(p: float, backend: str) -> nn.Module:
    """Dropout on the residual stream (nn.Identity when p == 0: no kernel launched for nothing)."""
    F_tri.check_module_dropout(p)
    cls = by_backend(backend, tnn.TritonDropout, nn.Dropout)
    return cls(p) if p > 0 else nn.Identity()


def make_rotary(head_dim: int, max_seq_len: int, backend: str) -> nn.Module:
    """Rotary position embedding (rotate-half convention) applied to q and k of every attention layer."""
    return by_backend(backend, tnn.TritonRotaryEmbedding, tnn.TorchRotaryEmbedding)(head_dim, max_seq_len=max_seq_len)


class MLP(nn.Module):
    """x → gelu(x·W_fcᵀ + b) → ·W_projᵀ + b: the GPT-2 feed-forward (tanh gelu fused into the first linear)."""

    def __init__(self, dim: int, hidden: int, bias: bool, backend: str):
        super().__init__()
        self.fc = make_linear(dim, hidden, "gelu", backend, bias=bias)
        self.proj = make_linear(hidden, dim, None, backend, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.before_output(x))  # (B, T, C) → (B, T, hidden) → (B, T, C)

    @property
    def output_linear(self) -> nn.Module:
        """The linear that makes the output (a residual block may add its bias itself)."""
        return self.proj

    def before_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # (B, T, hidden)

    def residual_projection(self) -> nn.Parameter:
        return self.proj.weight


def make_mlp(kind: str, dim: int, hidden: int, bias: bool, backend: str) -> nn.Module:
    """The GPT-2 MLP ("gelu") or a gated MLP ("swiglu": silu(a)·b, "geglu": gelu_tanh(a)·b)."""
    check_choice("mlp", kind, MLPS)
    if kind == "gelu":
        return MLP(dim, hidden, bias, backend)
    return by_backend(backend, tnn.TritonGatedMLP, tnn.TorchGatedMLP)(dim, hidden, activation=kind, bias=bias)


def default_mlp_hidden(kind: str, dim: int) -> int:
    """4·dim for gelu; for a gated MLP 8/3·dim rounded up to a multiple of 8, the same parameter count (LLaMA)."""
    if kind == "gelu":
        return 4 * dim
    return math.ceil(math.ceil(8 * dim / 3) / 8) * 8


def branch_before_bias(branch: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(branch(x) without its output linear's bias, that bias or None) for an attention or MLP branch: the residual
    op adds the bias (and sums its gradient) in the pass it makes anyway."""
    linear = branch.output_linear
    if getattr(linear, "activation", None) is not None:  # act(x·Wᵀ + c) cannot take c afterwards
        raise ValueError(f"the branch's output linear has activation={linear.activation!r}; it must have none")
    inner = branch.before_output(x)
    if isinstance(linear, tnn.TritonLinear):
        return F_tri.linear(inner, linear.weight, None, fused=linear.fused), linear.bias
    return nn.functional.linear(inner, linear.weight), linear.bias


def add_dropout_norm(
    norm: nn.Module, x: torch.Tensor, branch: nn.Module, h: torch.Tensor, p: float, training: bool, into_linear: bool
):
    """(s, norm(s)) for s = x + dropout(branch(h), p) in one op (triformer's add_dropout_norm) with a TritonLayerNorm
    or TritonRMSNorm's parameters, the branch's output bias added by that op (branch_before_bias). into_linear:
    norm(s) only feeds linears, so under autocast it is made in the autocast dtype the linears would cast it to (the
    same values, without the float32 copy)."""
    y_dtype = F_tri._autocast_dtype(x.device.type) if into_linear else None
    out, c = branch_before_bias(branch, h)
    weight, bias, kind = (
        (norm.weight, None, "rmsnorm") if isinstance(norm, tnn.TritonRMSNorm) else (norm.weight, norm.bias, "layernorm")
    )
    return F_tri.add_dropout_norm(x, out, p, weight, bias, norm.eps, kind, training, y_dtype=y_dtype, branch_bias=c)


# What Block.forward_fused knows how to compute without calling the module: exact types, since a subclass or a
# wrapper (LoRA on an output linear, say) may compute something else.
_FUSED_NORMS = (tnn.TritonLayerNorm, tnn.TritonRMSNorm)
_FUSED_DROPOUTS = (tnn.TritonDropout, nn.Identity)
_FUSED_BRANCHES = (
    tnn.TritonMultiheadAttention,
    tnn.TorchMultiheadAttention,
    MLP,
    tnn.TritonGatedMLP,
    tnn.TorchGatedMLP,
)
_FUSED_OUTPUT_LINEARS = (tnn.TritonLinear, tnn.TorchLinear, nn.Linear)


def _plain(module: nn.Module, types: tuple) -> bool:
    """Whether module is exactly one of types, with its class's forward and no hooks of its own: what its forward
    computes is known, so the fused path may do its work without calling it (hooks for every module: checked once
    by the callers)."""
    return type(module) in types and not (hooked_itself(module) or replaced_forward(module))


class Block(nn.Module):
    """Pre-norm transformer block on x (B, T, C):
    x + dropout(attention(norm_1(x))), then x + dropout(mlp(norm_2(x))).

    With its norms and dropout on triformer (`fusable`), a stack of blocks can run through forward_fused instead:
    each residual add, its dropout and the norm that reads the sum in one op (run_blocks)."""

    def __init__(
        self,
        dim: int,
        n_head: int,
        *,
        n_kv_head: int | None = None,
        causal: bool,
        norm: str = "layernorm",
        mlp: str = "gelu",
        mlp_hidden: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        rotary: nn.Module | None = None,
        backend: str | Mapping[str, str] = "triton",
    ):
        """backend: one for every part, or {part: backend} as part_backends gives. dropout: on the residual branches;
        attn_dropout: on the attention probabilities."""
        super().__init__()
        backends = backend if isinstance(backend, Mapping) else part_backends(backend)
        attention = by_backend(backends["attention"], tnn.TritonMultiheadAttention, tnn.TorchMultiheadAttention)
        self.ln_1 = make_norm(norm, dim, bias, backends["norm"])
        self.attn = attention(dim, n_head, n_kv_head, causal=causal, bias=bias, dropout=attn_dropout, rotary=rotary)
        self.ln_2 = make_norm(norm, dim, bias, backends["norm"])
        self.mlp = make_mlp(mlp, dim, mlp_hidden or default_mlp_hidden(mlp, dim), bias, backends["mlp"])
        self.drop = make_dropout(dropout, backends["dropout"])

    @property
    def fusable(self) -> bool:
        """Whether forward_fused computes what forward does: the norms and dropout on triformer, the block and its
        parts of the types it knows with their classes' forwards and no hooks (it calls the branches' parts and
        applies the norms and dropout through their parameters, so a replaced, wrapped or watched part would be
        skipped), and output linears without an activation (the residual op adds their bias)."""
        branches = (self.attn, self.mlp)
        outputs = [b.output_linear for b in branches if _plain(b, _FUSED_BRANCHES)]
        return (
            not hooked_globally()
            and _plain(self, (Block,))
            and _plain(self.ln_1, _FUSED_NORMS)
            and _plain(self.ln_2, _FUSED_NORMS)
            and _plain(self.drop, _FUSED_DROPOUTS)
            and len(outputs) == 2
            and all(_plain(o, _FUSED_OUTPUT_LINEARS) and getattr(o, "activation", None) is None for o in outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))  # (B, T, C)
        x = x + self.drop(self.mlp(self.ln_2(x)))  # (B, T, C)
        return x

    def forward_fused(
        self, x: torch.Tensor, h: torch.Tensor, next_norm: nn.Module, next_into_linear: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(x), next_norm(forward(x))) given h = ln_1(x), the residual adds fused with the norms after them.
        next_into_linear: next_norm's output only feeds linears (see add_dropout_norm); ln_2's always does."""
        p = self.drop.p if isinstance(self.drop, tnn.TritonDropout) else 0.0
        training = self.drop.training
        x, h = add_dropout_norm(self.ln_2, x, self.attn, h, p, training, True)  # (B, T, C) each
        return add_dropout_norm(next_norm, x, self.mlp, h, p, training, next_into_linear)

    def residual_projections(self) -> list[nn.Parameter]:
        """The two weights that write into the residual stream (GPT-2 scales their initialisation)."""
        return [self.attn.out_proj.weight, self.mlp.residual_projection()]


def can_fuse(blocks: nn.ModuleList, final_norm: nn.Module) -> bool:
    """Whether run_blocks may take Block.forward_fused: every block a fusable Block (no hooks for every module
    either), final_norm a triformer norm without hooks."""
    fusable_blocks = len(blocks) > 0 and all(isinstance(b, Block) and b.fusable for b in blocks)
    return fusable_blocks and _plain(final_norm, _FUSED_NORMS)


def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, final_norm: nn.Module, fused: bool, final_into_linear: bool = False
) -> torch.Tensor:
    """final_norm(the blocks applied to x in turn); fused and can_fuse(blocks, final_norm): through
    Block.forward_fused, one op for each residual add with its dropout and the next norm (otherwise block by block).
    final_into_linear: the result only feeds linears (under autocast it may come in the autocast dtype:
    Block.forward_fused)."""
    if not (fused and can_fuse(blocks, final_norm)):
        for block in blocks:
            x = block(x)  # (B, T, C)
        return final_norm(x)
    h = blocks[0].ln_1(x)
    last = len(blocks) - 1
    for i, (block, next_norm) in enumerate(zip(blocks, [*(b.ln_1 for b in blocks[1:]), final_norm])):
        x, h = block.forward_fused(x, h, next_norm, i < last or final_into_linear)  # (B, T, C) each
    return h


@torch.no_grad()
def init_gpt2_(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2's initialisation, in place: every matrix (linear weights, embeddings) N(0, std²), biases 0, norm weights
    1; the residual projections of each Block N(0, (std / √(2·n_layer))²), so the residual stream's variance does not
    grow with depth. Same draws in the same order for both backends (same parameter names)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)
    for block in model.modules():
        if isinstance(block, Block):
            for p in block.residual_projections():
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer))
