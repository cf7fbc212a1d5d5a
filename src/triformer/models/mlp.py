"""TritonMLP: the classifier of dame-cell/Triformer's demo (input → h → 2h → classes), built from triformer.nn."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import TorchLinear, TritonLinear

BACKENDS = ("triton", "torch")


def make_linear(
    in_features: int, out_features: int, activation: str | None, backend: str, fused: bool = True, bias: bool = True
):
    """A TritonLinear, or with backend="torch" the nn.Linear reference with identical parameters."""
    if backend == "triton":
        return TritonLinear(in_features, out_features, bias=bias, activation=activation, fused=fused)
    if backend == "torch":
        return TorchLinear(in_features, out_features, bias=bias, activation=activation)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


class TritonMLP(nn.Module):
    """Flattens image batches, then input→h (activation), h→2h (activation), 2h→classes (none: logits).

    `activation` ("relu", "gelu" (tanh form) or "silu") is the same function in both backends.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        hidden_size: int = 768,
        fused: bool = True,
        backend: str = "triton",
        activation: str = "relu",
    ):
        super().__init__()
        if activation in (None, "none"):
            raise ValueError("TritonMLP needs an activation between its layers (relu, gelu or silu), got none")
        self.backend, self.fused = backend, fused
        self.fc1 = make_linear(input_size, hidden_size, activation, backend, fused)
        self.fc2 = make_linear(hidden_size, 2 * hidden_size, activation, backend, fused)
        self.fc3 = make_linear(2 * hidden_size, num_classes, None, backend, fused)
        self.activation = self.fc1.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(self.fc2(self.fc1(x)))
