"""Autograd functions over the Triton kernels, and the functional API (`triformer.functional.linear`, ...)."""

from __future__ import annotations

import torch

from .kernels import linear as linear_kernels
from .kernels._runtime import check_same_dtype, check_tensor
from .kernels.activation import activation_code


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast asks for on this device type, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast_for_autocast(*tensors):
    """Under autocast, matmul-like ops run in the autocast dtype (as F.linear does); casts are tracked by autograd."""
    first = tensors[0]
    dtype = _autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


# ------------------------------------------------------------------------------------------------ linear


def _check_linear_inputs(x, weight, bias, activation):
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has last dimension {x.shape[-1]} but weight {tuple(weight.shape)} expects in_features={weight.shape[1]}"
        )
    check_same_dtype(x, "x", weight, "weight")
    if bias is not None:
        check_tensor(bias, "bias")
        check_same_dtype(x, "x", bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    activation_code(activation)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation, fused):
        out_features, in_features = weight.shape
        x2d = x.reshape(-1, in_features)
        needs_grad = any(ctx.needs_input_grad[:3])
        if fused:
            y, saved = linear_kernels.fused_forward(x2d, weight, bias, activation, save_for_backward=needs_grad)
        else:
            y, saved = linear_kernels.unfused_forward(x2d, weight, bias, activation)
        ctx.activation, ctx.fused, ctx.x_shape = activation, fused, x.shape
        ctx.save_for_backward(x2d, weight, saved)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, saved = ctx.saved_tensors
        dy2d = dy.reshape(-1, weight.shape[0])
        backward = linear_kernels.fused_backward if ctx.fused else linear_kernels.unfused_backward
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = backward(dy2d, x2d, weight, saved, ctx.activation, need_dx, need_dw, need_db)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, fused: bool = True) -> torch.Tensor:
    """act(x·weightᵀ + bias) on Triton kernels, forward and backward.

    x [..., K], weight [N, K], bias [N] or None, activation in (None, "relu", "gelu" (tanh), "silu").
    fused=False runs the three-kernel version (matmul, bias add, activation) kept for the ablation.
    """
    _check_linear_inputs(x, weight, bias, activation)
    x, weight, bias = _cast_for_autocast(x, weight, bias)
    return _LinearFunction.apply(x, weight, bias, None if activation == "none" else activation, fused)
