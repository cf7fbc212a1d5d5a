"""Pointwise activations and their derivatives, plus the elementwise kernels of the unfused linear.

    relu(z) = max(z, 0)                              relu'(z) = [z > 0]   (NaN → NaN; relu'(NaN) = 1, as torch)
    gelu(z) = ½ z (1 + tanh(u)), u = c (z + a z³)    gelu'(z) = ½ (1 + t) + ½ z (1 − t²) c (1 + 3 a z²),  t = tanh(u)
    silu(z) = z σ(z)                                 silu'(z) = σ(z) (1 + z (1 − σ(z)))
with c = √(2/π), a = 0.044715 (GELU's tanh approximation, as torch's approximate="tanh").
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from ._runtime import cdiv, new_empty, next_power_of_2, overridden

ACTIVATIONS = (None, "relu", "gelu", "silu")
_CODES = {None: 0, "relu": 1, "gelu": 2, "silu": 3}

ELEMENTWISE_BLOCK = 1024


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


# ---------------------------------------------------------------------------------------------------------
# Elementwise kernels of the unfused linear (the original three-kernel design, kept for the ablation).
# ---------------------------------------------------------------------------------------------------------


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


@triton.jit
def _column_sum_kernel(x_ptr, gate_ptr, gated_ptr, out_ptr, M, N, ROWS_PER_PROGRAM, GATE_ACT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[p, c, n] = Σ_{m in chunk c} x[p, m, n] over contiguous planes x [P, M, N], accumulated in float32.

    GATE_ACT ≠ 0 (one plane): x is first replaced by x ⊙ act'(gate), which is also stored to `gated` (the linear
    backward's dZ = dY ⊙ act'(Z) and db = Σ_rows dZ in one pass). Program (n-block, c, p) sums ROWS_PER_PROGRAM rows
    of plane p, so tall tensors still spread over every SM.
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)
    x_ptr += plane * M * N
    out_ptr += (plane * tl.num_programs(1) + chunk) * N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(chunk * ROWS_PER_PROGRAM, tl.minimum(M, (chunk + 1) * ROWS_PER_PROGRAM), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        if GATE_ACT != 0:
            g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * activation_derivative(g, GATE_ACT)).to(gated_ptr.dtype.element_ty)
            tl.store(gated_ptr + offsets, x, mask=mask)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)


def _grid(total: int):
    return (cdiv(total, ELEMENTWISE_BLOCK),)


def bias_add(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """z + bias for contiguous z [M, N] and bias [N] of any stride (read at unit stride: copied if it has another)."""
    out = new_empty(z.shape, like=z)
    _bias_add_kernel[_grid(z.numel())](z, bias.contiguous(), out, z.numel(), z.shape[-1], BLOCK=ELEMENTWISE_BLOCK)
    return out


def activation_forward(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """act(z) for contiguous z."""
    out = new_empty(z.shape, like=z)
    _activation_forward_kernel[_grid(z.numel())](
        z, out, z.numel(), ACT=activation_code(activation), BLOCK=ELEMENTWISE_BLOCK
    )
    return out


def activation_backward(dy: torch.Tensor, z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """dy ⊙ act'(z) for contiguous dy and z of one shape."""
    dz = new_empty(z.shape, like=z)
    _activation_backward_kernel[_grid(z.numel())](
        dy, z, dz, z.numel(), ACT=activation_code(activation), BLOCK=ELEMENTWISE_BLOCK
    )
    return dz


def column_sum(x: torch.Tensor, dtype: torch.dtype | None = None, rows_per_program: int = 256) -> torch.Tensor:
    """Σ over the rows of a contiguous [M, N] tensor, or of each plane of a contiguous [P, M, N] one, in `dtype`
    (default x's): float32 partial sums per chunk of rows, then the same kernel again over the partials until one
    row is left; the last pass writes `dtype` directly."""
    return _column_sum(x, dtype or x.dtype, rows_per_program)


# Launch of the gated pass: it streams three [M, N] tensors, so more, shorter programs keep more loads in flight
# than column_sum's default. `tools/gpu_matmul_products.py gated` times the alternatives (gated_launch).
GATED_ROWS_PER_PROGRAM = 128
GATED_BLOCK_M, GATED_BLOCK_N, GATED_WARPS = 64, 64, 4


def gated_launch(block_m: int, block_n: int, warps: int, rows_per_program: int):
    """Within the block the gated pass launches BLOCK_M × BLOCK_N tiles on `warps` warps, `rows_per_program` rows a
    program (rows_per_program a multiple of block_m)."""
    return overridden(sys.modules[__name__], GATED_BLOCK_M=block_m, GATED_BLOCK_N=block_n, GATED_WARPS=warps,
                      GATED_ROWS_PER_PROGRAM=rows_per_program)


def gated_column_sum(dy: torch.Tensor, gate: torch.Tensor, activation: str | None):
    """(dZ, Σ_rows dZ) with dZ = dy ⊙ act'(gate) for contiguous dy, gate [M, N], in one pass over them (then the
    partial sums are summed); both in dy's dtype."""
    dz = new_empty(dy.shape, like=dy)
    return dz, _column_sum(dy, dy.dtype, GATED_ROWS_PER_PROGRAM, gate=gate, gated=dz,
                           gate_act=activation_code(activation),
                           launch=dict(BLOCK_M=GATED_BLOCK_M, BLOCK_N=GATED_BLOCK_N, num_warps=GATED_WARPS))


_COLUMN_SUM_LAUNCH = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4)
# Up to this many rows (the norms' per-program partial sums, a second pass over chunk sums), a program loads its
# columns' rows as one tile of about _WHOLE_COLUMN_TILE elements: one round trip to memory instead of a loop.
_WHOLE_COLUMN_MAX_ROWS = 1024
_WHOLE_COLUMN_TILE = 8192


@functools.lru_cache(maxsize=None)
def _whole_column_launch(rows: int) -> dict:
    """The one-tile launch for `rows` rows (computed once per row count; callers only unpack it)."""
    block_m = next_power_of_2(max(rows, 1))
    block_n = max(16, min(128, _WHOLE_COLUMN_TILE // block_m))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * block_n >= 8192 else 4)


def _column_sum(x, dtype, rows_per_program, gate=None, gated=None, gate_act=0, launch=_COLUMN_SUM_LAUNCH):
    planes = x.reshape(x.shape[:-2].numel(), x.shape[-2], x.shape[-1])
    P, M, N = planes.shape
    if not (P and M and N):  # M = 0 (an empty batch) sums to zeros; an empty tensor may have no storage to pass
        return torch.zeros((*x.shape[:-2], N), device=x.device, dtype=dtype)
    if gate is None and M <= _WHOLE_COLUMN_MAX_ROWS:
        rows_per_program, launch = max(M, 1), _whole_column_launch(M)
    chunks = max(1, cdiv(M, rows_per_program))
    # A program sweeps its rows in whole blocks: blocks must not reach into the next program's rows.
    assert chunks == 1 or rows_per_program % launch["BLOCK_M"] == 0, (rows_per_program, launch["BLOCK_M"])
    out = new_empty((P, chunks, N), like=x, dtype=dtype if chunks == 1 else torch.float32)
    _column_sum_kernel[(cdiv(N, launch["BLOCK_N"]), chunks, P)](
        planes, planes if gate is None else gate, planes if gated is None else gated, out, M, N, rows_per_program,
        GATE_ACT=gate_act, **launch,
    )
    if chunks > 1:
        out = _column_sum(out, dtype, rows_per_program)
    return out.reshape(*x.shape[:-2], N)
