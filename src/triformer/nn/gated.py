"""Gated feed-forward blocks (SwiGLU, GeGLU): TritonGatedMLP on triformer's kernels and its PyTorch twin.

    x → [a | b] = x·W_upᵀ (+ b_up)  → h = act(a) ⊙ b  → h·W_downᵀ (+ b_down)

with one fused up-projection of 2·hidden outputs (the gate a first, then b), act = silu (SwiGLU) or gelu with the
tanh approximation (GeGLU). Both modules have the parameters up.weight [2·hidden, dim], down.weight [dim, hidden]
(and up.bias, down.bias when bias=True), so a state_dict loads into the twin.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import functional as F_tri
from . import TritonLinear
from .hooks import hooked, replaced_forward

GATED_MLP_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
_TORCH_GATES = {"silu": F.silu, "gelu": lambda a: F.gelu(a, approximate="tanh")}


def _gate_activation(activation: str) -> str:
    if activation not in GATED_MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(GATED_MLP_ACTIVATIONS)}, got {activation!r}")
    return GATED_MLP_ACTIVATIONS[activation]


class _GatedMLP(nn.Module):
    def __init__(self, linear, dim: int, hidden: int, activation: str, bias: bool, device, dtype):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim, self.hidden, self.activation = dim, hidden, activation
        self.gate = _gate_activation(activation)
        self.up = linear(dim, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.down = linear(hidden, dim, bias=bias, device=device, dtype=dtype)

    def residual_projection(self) -> nn.Parameter:
        """The weight that writes into the residual stream (GPT-2's scaled initialisation)."""
        return self.down.weight

    @property
    def output_linear(self) -> nn.Module:
        """The linear that makes the output (a residual block may add its bias itself)."""
        return self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.before_output(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}"


class TritonGatedMLP(_GatedMLP):
    """down(act(a) ⊙ b) with [a | b] = up(x): TritonLinear projections and triformer's gated kernel.
    activation: "swiglu" or "geglu".

    inplace_grad=True (default): the gated kernel's gradient goes into the up-projection's output (no extra
    [.., 2·hidden] buffer; see triformer.functional.gated_activation), so a forward's backward can run once;
    inplace_grad=False: a buffer of its own, for retain_graph=True or several autograd.grad calls on one forward."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "swiglu",
        bias: bool = False,
        device=None,
        dtype=None,
        inplace_grad: bool = True,
    ):
        if not isinstance(inplace_grad, bool):
            raise TypeError(f"inplace_grad must be True or False, got {inplace_grad!r}")
        super().__init__(
            lambda i, o, **kw: TritonLinear(i, o, activation=None, **kw), dim, hidden, activation, bias, device, dtype
        )
        self.inplace_grad = inplace_grad

    def before_output(self, x: torch.Tensor) -> torch.Tensor:
        """act(a) ⊙ b: what the down projection takes. With inplace_grad, the gradient goes into up's output where
        nothing else can hold it: up a TritonLinear (a fresh output) that no hook watches."""
        up = self.up
        private = self.inplace_grad and type(up) is TritonLinear and not (hooked(up) or replaced_forward(up))
        return F_tri.gated_activation(up(x), self.gate, inplace_grad=private)


class TorchGatedMLP(_GatedMLP):
    """The PyTorch twin of TritonGatedMLP: nn.Linear projections, act(a) * b in torch ops (same parameters)."""

    def __init__(self, dim: int, hidden: int, activation: str = "swiglu", bias: bool = False, device=None, dtype=None):
        super().__init__(nn.Linear, dim, hidden, activation, bias, device, dtype)

    def before_output(self, x: torch.Tensor) -> torch.Tensor:
        """act(a) ⊙ b: what the down projection takes."""
        a, b = self.up(x).chunk(2, dim=-1)
        return _TORCH_GATES[self.gate](a) * b
