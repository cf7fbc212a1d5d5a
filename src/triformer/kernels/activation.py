"""Pointwise activations and their derivatives as @triton.jit functions (every kernel's epilogue calls them), and the
codes that select them.

    relu(z) = max(z, 0)                              relu'(z) = [z > 0]   (NaN → NaN; relu'(NaN) = 1, as torch)
    gelu(z) = ½ z (1 + tanh(u)), u = c (z + a z³)    gelu'(z) = ½ (1 + t) + ½ z (1 − t²) c (1 + 3 a z²),  t = tanh(u)
    silu(z) = z σ(z)                                 silu'(z) = σ(z) (1 + z (1 − σ(z)))
with c = √(2/π), a = 0.044715 (GELU's tanh approximation, as torch's approximate="tanh").
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = (None, "relu", "gelu", "silu")
_CODES = {None: 0, "relu": 1, "gelu": 2, "silu": 3}


def canonical_activation(activation: str | None) -> str | None:
    """The activation's name as the kernels know it ("none" → None); ValueError for an unknown name."""
    if activation == "none":
        activation = None
    if activation not in _CODES:
        raise ValueError(f"unknown activation {activation!r}; choose one of {list(_CODES)}")
    return activation


def activation_code(activation: str | None) -> int:
    """The constexpr that selects an activation inside a kernel; ValueError for an unknown name."""
    return _CODES[canonical_activation(activation)]


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(u):
    return 2.0 * _sigmoid(2.0 * u) - 1.0


@triton.jit
def apply_activation(z, ACT: tl.constexpr):
    """act(z) for z in float32."""
    if ACT == 1:
        return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * z * (1.0 + t)
    elif ACT == 3:
        return z * _sigmoid(z)
    else:
        return z


@triton.jit
def activation_derivative(g, ACT: tl.constexpr):
    """act'(z) in float32. For relu `g` may be act(z) itself (relu(z) > 0 ⇔ z > 0); otherwise g = z. relu' is 0
    where g ≤ 0 and 1 elsewhere, NaN included: torch's threshold_backward passes dy through at a NaN."""
    if ACT == 1:
        return tl.where(g <= 0.0, 0.0, 1.0)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    elif ACT == 3:
        s = _sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    else:
        return g * 0.0 + 1.0
