"""Drop-in nn.Modules whose forward and backward run on triformer's Triton kernels."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as TF
from .kernels.activation import activation_code

_TORCH_ACTIVATIONS = {
    None: lambda z: z,
    "relu": torch.relu,
    "gelu": lambda z: nn.functional.gelu(z, approximate="tanh"),
    "silu": nn.functional.silu,
}


class TritonLinear(nn.Module):
    """y = act(x·Wᵀ + b) with the activation fused into the matmul (or not: fused=False, for the ablation).

    Parameters and initialisation as nn.Linear; activation in (None, "relu", "gelu" (tanh approximation), "silu").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = "relu",
                 fused: bool = True, device=None, dtype=None):
        super().__init__()
        activation_code(activation)
        self.in_features, self.out_features = in_features, out_features
        self.activation = None if activation == "none" else activation
        self.fused = fused
        self.weight = nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.linear(x, self.weight, self.bias, activation=self.activation, fused=self.fused)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation}, fused={self.fused}")


class TorchLinear(nn.Linear):
    """The PyTorch reference of TritonLinear: nn.Linear followed by the same activation (same parameter names)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = "relu",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        activation_code(activation)
        self.activation = None if activation == "none" else activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TORCH_ACTIVATIONS[self.activation](super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
