"""The elementwise kernels of the unfused linear (kept for the ablation): the bias add, the activation and its
derivative, each a separate pass over contiguous tensors.

    out = z + bias[n]        out = act(z)        dz = dy ⊙ act'(z)          (act, act' as in activation.py)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._runtime import cdiv, new_empty
from .activation import activation_code, activation_derivative, apply_activation

ELEMENTWISE_BLOCK = 1024


@triton.jit
def _bias_add_kernel(z_ptr, bias_ptr, out_ptr, total, N, BLOCK: tl.constexpr):
    """out[m, n] = z[m, n] + bias[n] over a contiguous [M, N] tensor."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    z = tl.load(z_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(bias_ptr + offs % N, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (z + b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_forward_kernel(z_ptr, out_ptr, total, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """out = act(z), elementwise."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    z = tl.load(z_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, apply_activation(z, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_backward_kernel(dy_ptr, z_ptr, dz_ptr, total, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """dz = dy ⊙ act'(z), elementwise."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask).to(tl.float32)
    tl.store(dz_ptr + offs, (dy * activation_derivative(z, ACT)).to(dz_ptr.dtype.element_ty), mask=mask)


def _grid(total: int):
    return (cdiv(total, ELEMENTWISE_BLOCK),)


def bias_add(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """z + bias for contiguous z [M, N] and bias [N] of any stride (read at unit stride: copied if it has another)."""
    out = new_empty(z.shape, like=z)
    launch(
        _bias_add_kernel, _grid(z.numel()), z, bias.contiguous(), out, z.numel(), z.shape[-1], BLOCK=ELEMENTWISE_BLOCK
    )
    return out


def activation_forward(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """act(z) for contiguous z."""
    out = new_empty(z.shape, like=z)
    launch(
        _activation_forward_kernel,
        _grid(z.numel()),
        z,
        out,
        z.numel(),
        ACT=activation_code(activation),
        BLOCK=ELEMENTWISE_BLOCK,
    )
    return out


def activation_backward(dy: torch.Tensor, z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """dy ⊙ act'(z) for contiguous dy and z of one shape."""
    dz = new_empty(z.shape, like=z)
    launch(
        _activation_backward_kernel,
        _grid(z.numel()),
        dy,
        z,
        dz,
        z.numel(),
        ACT=activation_code(activation),
        BLOCK=ELEMENTWISE_BLOCK,
    )
    return dz
