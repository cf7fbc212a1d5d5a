"""Linear layers Y = act(X·Wᵀ + b) forward and backward, fused and unfused, on the kernels of matmul.py.

Backward (Z = X·Wᵀ + b):   dZ = dY ⊙ act'(Z),   dX = dZ·W,   dW = dZᵀ·X,   db = Σ_rows dZ.

Fused: the forward is one kernel (bias and activation in the epilogue). The backward forms dZ inside the db
kernel (one pass reads dY and what act' needs, writes dZ and column partial sums), then dX and dW are plain
products over dZ (on Hopper, the TMA kernel), whose operands go from memory to the tensor cores untouched.
Nothing but Z (for gelu/silu) is saved; relu's derivative is read off Y.
Unfused (kept for the ablation): matmul, bias add and activation as three separate kernels, forward and backward
(elementwise.py).
"""

from __future__ import annotations

import torch

from .activation import activation_code
from .elementwise import activation_backward, activation_forward, bias_add
from .matmul import matmul
from .reductions import column_sum, gated_column_sum

_RELU = activation_code("relu")


def fused_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None, save_for_backward: bool
):
    """Y = act(x·weightᵀ + bias) for x [M, K], weight [N, K]; returns (Y, what act' needs or None)."""
    code = activation_code(activation)
    store_z = save_for_backward and code not in (0, _RELU)
    y, z = matmul(x, weight.t(), bias=bias, activation=activation, store_preactivation=store_z)
    if not save_for_backward or code == 0:
        return y, None
    return y, (y if code == _RELU else z)


def fused_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    saved: torch.Tensor | None,
    activation: str | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
):
    """(dX, dW, db) with dZ = dY ⊙ act'(saved) formed in the db pass (elementwise when db is not needed);
    None where not needed."""
    dz, db = dy, None
    if activation_code(activation) != 0:
        if need_db:
            dz, db = gated_column_sum(dy.contiguous(), saved, activation)
        elif need_dx or need_dw:
            dz = activation_backward(dy.contiguous(), saved, activation)
    elif need_db:
        db = column_sum(dz.contiguous())
    dx = matmul(dz, weight)[0] if need_dx else None
    dw = matmul(dz.t(), x)[0] if need_dw else None
    return dx, dw, db


def unfused_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
    """Three kernels: Z = x·weightᵀ, Z += bias, Y = act(Z). Returns (Y, Z)."""
    z = matmul(x, weight.t())[0]
    if bias is not None:
        z = bias_add(z, bias)
    y = activation_forward(z, activation) if activation_code(activation) else z
    return y, z


def unfused_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor,
    activation: str | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
):
    """dZ = dY ⊙ act'(Z) as its own kernel, then dX, dW as plain products and db as a column sum."""
    dy = dy.contiguous()
    dz = activation_backward(dy, z, activation) if activation_code(activation) else dy
    dx = matmul(dz, weight)[0] if need_dx else None
    dw = matmul(dz.t(), x)[0] if need_dw else None
    db = column_sum(dz) if need_db else None
    return dx, dw, db
