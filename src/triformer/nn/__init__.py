"""Drop-in nn.Modules whose forward and backward run on triformer's Triton kernels."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import functional as F_tri
from .._compat import relu_or_none, renamed_arguments
from ..kernels.activation import canonical_activation

_TORCH_ACTIVATIONS = {
    None: lambda z: z,
    "relu": torch.relu,
    "gelu": lambda z: nn.functional.gelu(z, approximate="tanh"),
    "silu": nn.functional.silu,
}


def _check_size(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int ≥ 0, got {value!r}")


def _check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


class TritonLinear(nn.Module):
    """y = act(x·Wᵀ + b) with the activation fused into the matmul (or not: fused=False, for the ablation).

    Parameters and initialisation as nn.Linear; activation in (None, "relu", "gelu" (tanh approximation), "silu").
    Unlike nn.Linear, the default activation is ReLU (the original TritonLinear's, a fused linear + ReLU): pass
    activation=None for a drop-in nn.Linear.
    """

    @renamed_arguments(use_relu=("activation", relu_or_none))
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | None = "relu",
        fused: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_size(in_features, "in_features")
        _check_size(out_features, "out_features")
        _check_flag(fused, "fused")
        self.in_features, self.out_features = in_features, out_features
        self.activation = canonical_activation(activation)
        self.fused = fused
        self.weight = nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_tri.linear(x, self.weight, self.bias, activation=self.activation, fused=self.fused)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activation={self.activation}, fused={self.fused}"
        )


class TorchLinear(nn.Linear):
    """The PyTorch reference of TritonLinear: nn.Linear followed by the same activation (same parameter names)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | None = "relu",
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = canonical_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TORCH_ACTIVATIONS[self.activation](super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class TritonLayerNorm(nn.Module):
    """y = (x − μ) / √(σ² + eps) · weight + bias over the last dim(s), as nn.LayerNorm (same parameters)."""

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.normalized_shape = F_tri._check_normalized_shape(normalized_shape)
        F_tri._check_eps(eps)
        _check_flag(elementwise_affine, "elementwise_affine")
        _check_flag(bias, "bias")
        self.eps, self.elementwise_affine = eps, elementwise_affine
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory)) if elementwise_affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_tri.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class TritonRMSNorm(nn.Module):
    """y = x / √(mean(x²) + eps) · weight over the last dim, as nn.RMSNorm(hidden_size, eps) (same parameter);
    eps=None is the input dtype's machine epsilon, as nn.RMSNorm takes it. The default differs: eps=1e-6 (the
    original triformer's and LLaMA's), where nn.RMSNorm defaults to None; pass eps=None for nn.RMSNorm's."""

    def __init__(self, hidden_size: int, eps: float | None = 1e-6, device=None, dtype=None):
        super().__init__()
        F_tri._check_normalized_shape(hidden_size)
        F_tri._check_eps(eps, allow_none=True)
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_tri.rms_norm(x, self.hidden_size, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class TritonSoftmax(nn.Module):
    """softmax along dim; causal=True masks key j > query i over the last two dims (attention scores)."""

    @renamed_arguments(is_causal="causal")
    def __init__(self, dim: int = -1, causal: bool = False):
        super().__init__()
        if isinstance(dim, bool):
            raise TypeError(
                "TritonSoftmax: dim must be an int, got a bool (dame-cell/Triformer's TritonSoftmax took "
                "is_causal first: pass causal=True or is_causal=True)"
            )
        if not isinstance(dim, int):
            raise TypeError(f"TritonSoftmax: dim must be an int, got {dim!r}")
        _check_flag(causal, "causal")
        self.dim, self.causal = dim, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_tri.softmax(x, self.dim, self.causal)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, causal={self.causal}"


@renamed_arguments(dropout_prob="p")
def _dropout_apply(x: torch.Tensor, p: float = 0.5, seed: int | None = None) -> torch.Tensor:
    """TritonDropout.apply(x, p, seed): dropout in training mode, dame-cell/Triformer's functional entry."""
    return F_tri.dropout(x, p, seed, training=True)


class _ClassOrInstanceApply:
    """`TritonDropout.apply(x, p, seed)` on the class is functional dropout (as in dame-cell/Triformer), while
    `module.apply(fn)` on an instance stays nn.Module.apply, so model.apply(init_fn) still walks every module."""

    def __get__(self, instance, owner):
        if instance is None:
            return _dropout_apply
        return functools.partial(nn.Module.apply, instance)


class TritonDropout(nn.Module):
    """Dropout with a seeded counter-based mask (Philox); identity in eval mode. Each training call draws a fresh
    seed from torch's default CPU generator; the backward regenerates the same mask instead of storing it."""

    apply = _ClassOrInstanceApply()

    def __init__(self, p: float = 0.5):
        super().__init__()
        F_tri._check_dropout_args(p, None)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_tri.dropout(x, self.p, None, training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class TritonCrossEntropyLoss(nn.Module):
    """Cross-entropy of logits [N, V] or [B, T, V] against int64 targets [N] or [B, T] (classes along the last dim).

    ignore_index, reduction ("mean" over non-ignored targets, "sum", "none") and label_smoothing as
    nn.CrossEntropyLoss. The gradient is computed in the forward into a buffer of its own; inplace_grad=True writes
    it into the logits' storage instead (the memory saving; the logits are then spent): see
    triformer.functional.cross_entropy for inplace_grad and n_chunks.
    """

    @renamed_arguments(pad_token_id="ignore_index")
    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        n_chunks: int = 1,
        inplace_grad: bool = False,
    ):
        super().__init__()
        F_tri._check_cross_entropy_options(ignore_index, reduction, label_smoothing, n_chunks, inplace_grad)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.n_chunks, self.inplace_grad = n_chunks, inplace_grad

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F_tri.cross_entropy(
            logits, targets, self.ignore_index, self.reduction, self.label_smoothing, self.n_chunks, self.inplace_grad
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, n_chunks={self.n_chunks}, inplace_grad={self.inplace_grad}"
        )


from .attention import TorchMultiheadAttention, TritonMultiheadAttention  # noqa: E402
from .gated import TorchGatedMLP, TritonGatedMLP  # noqa: E402
from .linear_cross_entropy import TorchLinearCrossEntropyLoss, TritonLinearCrossEntropyLoss  # noqa: E402
from .rope import TorchRotaryEmbedding, TritonRotaryEmbedding  # noqa: E402
