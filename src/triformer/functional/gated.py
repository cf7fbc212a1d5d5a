"""Gated activations of a fused up-projection: `swiglu(x)`, `geglu(x)`, `gated_activation(x, activation)`."""

from __future__ import annotations

import torch

from ..kernels import gated as gated_kernels
from ..kernels._runtime import check_tensor


def _check_gated_input(x, activation, inplace_grad) -> None:
    check_tensor(x, "x")
    if activation not in gated_kernels.GATED_ACTIVATIONS:
        raise ValueError(f"unknown gated activation {activation!r}; choose one of "
                         f"{list(gated_kernels.GATED_ACTIVATIONS)} (silu: SwiGLU, gelu with tanh: GeGLU)")
    if x.dim() < 1 or x.shape[-1] % 2 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., 2·hidden] (the gate half, then the value half), got shape "
                         f"{tuple(x.shape)}: its last dimension must be even and positive")
    if inplace_grad not in (None, True, False):
        raise TypeError(f"inplace_grad must be None, True or False, got {inplace_grad!r}")


def _grad_in_place(x2d: torch.Tensor, inplace_grad: bool | None) -> bool:
    """Whether the backward writes [da | db] into x's own storage (see gated_activation)."""
    m, width = x2d.shape
    separate_rows = x2d.stride(1) == 1 and (m <= 1 or x2d.stride(0) >= width)
    if inplace_grad is None:
        base = x2d._base if x2d._base is not None else x2d
        return separate_rows and base.grad_fn is not None
    if inplace_grad and not separate_rows:
        raise ValueError(f"inplace_grad=True needs x whose elements do not overlap (unit column stride, rows "
                         f"apart); got strides {x2d.stride()} for rows of {width}")
    return inplace_grad


class _GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, activation, inplace):
        ctx.save_for_backward(x2d)
        ctx.activation, ctx.inplace = activation, inplace
        return gated_kernels.gated_forward(x2d, activation)

    @staticmethod
    def backward(ctx, dh):
        (x2d,) = ctx.saved_tensors
        if not ctx.inplace:
            return gated_kernels.gated_backward(dh, x2d, ctx.activation), None, None
        dx = gated_kernels.gated_backward(dh, x2d, ctx.activation, dx=x2d)
        # Every saver of x (this function too, for a second backward) now fails loudly instead of reading dx.
        torch.autograd.graph.increment_version(x2d)
        return dx, None, None


def gated_activation(x: torch.Tensor, activation: str = "silu", inplace_grad: bool | None = False) -> torch.Tensor:
    """act(a) ⊙ b for x = [a | b] [..., 2·hidden], the two halves of one fused up-projection (a = x[..., :hidden],
    the gate; b = x[..., hidden:]); returns [..., hidden] in x's dtype, contiguous.

    activation: "silu" (SwiGLU) or "gelu" (GeGLU, tanh approximation as F.gelu(approximate="tanh")). The halves
    are read through x's strides (no copy); float32 math. Nothing but x is kept for the backward (act(a) and
    act'(a) are recomputed). By default (inplace_grad=False) the gradient [da | db] is a new tensor and x is
    never written. inplace_grad=None writes it into x's own storage when x is a non-leaf (TritonGatedMLP does this
    with its up-projection's output, which nothing else reads): no [.., 2·hidden] gradient buffer; inplace_grad=True
    does so for any x. Afterwards x holds the gradient; an op that saved x for a later backward (and a second
    backward of this one) then raises autograd's "modified by an inplace operation" instead of reading it (x's
    version is bumped).
    """
    _check_gated_input(x, activation, inplace_grad)
    width = x.shape[-1]
    x2d = x.reshape(-1, width)
    inplace = _grad_in_place(x2d, inplace_grad)
    return _GatedFunction.apply(x2d, activation, inplace).view(*x.shape[:-1], width // 2)


def swiglu(x: torch.Tensor, inplace_grad: bool | None = False) -> torch.Tensor:
    """silu(a) ⊙ b for x = [a | b] [..., 2·hidden] (see gated_activation)."""
    return gated_activation(x, "silu", inplace_grad)


def geglu(x: torch.Tensor, inplace_grad: bool | None = False) -> torch.Tensor:
    """gelu_tanh(a) ⊙ b for x = [a | b] [..., 2·hidden] (see gated_activation)."""
    return gated_activation(x, "gelu", inplace_grad)
