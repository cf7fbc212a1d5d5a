"""Gated activations of a fused up-projection: `swiglu(x)`, `geglu(x)`, `gated_activation(x, activation)`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import gated as gated_kernels
from ..kernels._runtime import check_tensor
from ._library import Op


def _check_gated_input(x, activation, inplace_grad) -> None:
    check_tensor(x, "x")
    if activation not in gated_kernels.GATED_ACTIVATIONS:
        raise ValueError(
            f"unknown gated activation {activation!r}; choose one of "
            f"{list(gated_kernels.GATED_ACTIVATIONS)} (silu: SwiGLU, gelu with tanh: GeGLU)"
        )
    if x.dim() < 1 or x.shape[-1] % 2 or x.shape[-1] == 0:
        raise ValueError(
            f"x must be [..., 2·hidden] (the gate half, then the value half), got shape "
            f"{tuple(x.shape)}: its last dimension must be even and positive"
        )
    if inplace_grad not in (None, True, False):
        raise TypeError(f"inplace_grad must be None, True or False, got {inplace_grad!r}")


def _grad_in_place(x: torch.Tensor, inplace_grad: bool | None) -> bool:
    """Whether the backward writes [da | db] into x's own storage (see gated_activation)."""
    if inplace_grad is False:
        return False
    width = x.shape[-1]
    x2d = x.reshape(-1, width)
    separate_rows = x2d.stride(1) == 1 and (x2d.shape[0] <= 1 or x2d.stride(0) >= width)
    if inplace_grad and not separate_rows:
        raise ValueError(
            f"inplace_grad=True needs x whose elements do not overlap (unit column stride, rows "
            f"apart); got strides {x2d.stride()} for rows of {width}"
        )
    if torch.compiler.is_compiling():  # x's storage and history are not Dynamo's to read; Inductor plans memory
        return False
    # the gradient is written through x's rows, so they must be a view of x (not a copy that reshape made)
    rows_of_x = x.dim() == 2 or x2d.data_ptr() == x.data_ptr()
    if inplace_grad is None:
        return separate_rows and rows_of_x and _op_output(x)
    return rows_of_x


def _op_output(x: torch.Tensor) -> bool:
    """Whether x is a non-leaf whose storage is no leaf's: x has a grad_fn, and so has its base if it is a view."""
    base = x._base if x._base is not None else x
    return base.grad_fn is not None


def _gated_impl(x: Tensor, activation: str, inplace_grad: bool) -> Tensor:
    """h = act(a) ⊙ b for x = [a | b] [..., 2·hidden]: a new contiguous [..., hidden] (inplace_grad is the
    backward's: see setup_context)."""
    width = x.shape[-1]
    h = gated_kernels.gated_forward(x.reshape(-1, width), activation)
    return h.view(*x.shape[:-1], width // 2)


def _gated_fake(x, activation, inplace_grad):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _gated_setup(ctx, inputs, output):
    x, ctx.activation, ctx.inplace = inputs
    ctx.save_for_backward(x)
    ctx.backward_done = False


def _gated_backward(ctx, dh):
    if ctx.inplace and ctx.backward_done:
        raise RuntimeError(
            "the gated activation's backward ran before and wrote its gradient over its input (the up-projection's "
            "output; inplace_grad), so it cannot run again (retain_graph=True, or a second autograd.grad): build "
            "TritonGatedMLP(..., inplace_grad=False), or call gated_activation with inplace_grad=False. Gradients "
            "of the layers after it may already have been accumulated by this second pass."
        )
    ctx.backward_done = True
    (x,) = ctx.saved_tensors
    if not ctx.inplace:
        return _gated_backward_op(dh, x, ctx.activation), None, None
    # x's version is bumped: every saver of x (this function too, for a second backward) now fails loudly
    _gated_backward_into_x_op(dh, x, ctx.activation)
    return x.view(x.shape), None, None  # a fresh alias, which a leaf's .grad takes without a copy


def _gated_backward_impl(dh: Tensor, x: Tensor, activation: str) -> Tensor:
    """[da | db] for dh [..., hidden] and x [..., 2·hidden], a new contiguous tensor of x's shape."""
    width = x.shape[-1]
    return gated_kernels.gated_backward(dh.reshape(-1, width // 2), x.reshape(-1, width), activation).view(x.shape)


def _gated_backward_fake(dh, x, activation):
    return x.new_empty(x.shape)


def _gated_backward_into_x_impl(dh: Tensor, x: Tensor, activation: str) -> None:
    """[da | db] written over x (whose elements must not overlap)."""
    width = x.shape[-1]
    x2d = x.reshape(-1, width)
    gated_kernels.gated_backward(dh.reshape(-1, width // 2), x2d, activation, dx=x2d)
    if x2d.data_ptr() != x.data_ptr():  # reshape had to copy x
        x.copy_(x2d.view(x.shape))


def _gated_backward_into_x_fake(dh, x, activation):
    return None


_gated_backward_op = Op("gated_backward", _gated_backward_impl, _gated_backward_fake)
_gated_backward_into_x_op = Op(
    "gated_backward_into_x_", _gated_backward_into_x_impl, _gated_backward_into_x_fake, mutates_args=("x",)
)
_gated_op = Op("gated", _gated_impl, _gated_fake, setup_context=_gated_setup, backward=_gated_backward)


def gated_activation(x: torch.Tensor, activation: str = "silu", inplace_grad: bool | None = False) -> torch.Tensor:
    """act(a) ⊙ b for x = [a | b] [..., 2·hidden], the two halves of one fused up-projection (a = x[..., :hidden],
    the gate; b = x[..., hidden:]); returns [..., hidden] in x's dtype, contiguous.

    activation: "silu" (SwiGLU) or "gelu" (GeGLU, tanh approximation as F.gelu(approximate="tanh")). The halves
    are read through x's strides (no copy); float32 math. Nothing but x is kept for the backward (act(a) and
    act'(a) are recomputed). By default (inplace_grad=False) the gradient [da | db] is a new tensor and x is
    never written. inplace_grad=None writes it into x's own storage when x is a non-leaf whose base (if x is a view)
    is one too: no [.., 2·hidden] gradient buffer; inplace_grad=True does so for any x (TritonGatedMLP passes it for
    its up-projection's output when no hook could have kept that output). Afterwards x holds the gradient; an op
    that saved x for a later backward then raises autograd's "modified by an inplace operation" instead of reading
    it (x's version is bumped), and a second backward of this one (retain_graph=True) raises a RuntimeError.
    Eager mode only: under torch.compile the gradient takes a buffer of its own, whose memory Inductor plans (ops
    triformer::gated, gated_backward, gated_backward_into_x_).
    """
    _check_gated_input(x, activation, inplace_grad)
    return _gated_op(x, activation, _grad_in_place(x, inplace_grad))


def swiglu(x: torch.Tensor, inplace_grad: bool | None = False) -> torch.Tensor:
    """silu(a) ⊙ b for x = [a | b] [..., 2·hidden] (see gated_activation)."""
    return gated_activation(x, "silu", inplace_grad)


def geglu(x: torch.Tensor, inplace_grad: bool | None = False) -> torch.Tensor:
    """gelu_tanh(a) ⊙ b for x = [a | b] [..., 2·hidden] (see gated_activation)."""
    return gated_activation(x, "gelu", inplace_grad)
