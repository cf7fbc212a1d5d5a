"""Dropout with a counter-based mask: nothing is stored, the backward draws the same mask again.

    keep_i = [u(seed, i) ≥ t]   with t = round(p · 2¹⁶), so elements drop with probability p̂ = t / 2¹⁶
    y_i = keep_i · x_i / (1 − p̂)      dx_i = keep_i · dy_i / (1 − p̂)

u(seed, i) is a 16-bit uniform integer: one half of a 32-bit draw of Philox 4x32-10 (tl.randint4x, the generator
behind tl.rand) keyed by the seed and the element's index i in row-major order. One Philox call gives four 32-bit
draws r₀…r₃, eight 16-bit uniforms: element i takes, of the call at counter i // 8, half h = i mod 8, which is the
low (h even) or high (h odd) 16 bits of draw r_(h // 2). Eight neighbours share a call, so a row kernel whose rows
are a multiple of 8 long draws one call for eight of its elements too (keep_mask draws the same mask at any
indices, one call per element). Sharing each call halves the integer work that bounded this kernel with one call
per element; the price is p rounded to p̂, a multiple of 2⁻¹⁶ (off by at most 2⁻¹⁷), and the kept elements scaled by
1 / (1 − p̂) so that E[y] = x exactly (p below 2⁻¹⁷ is the identity, p within 2⁻¹⁷ of 1 drops all). The mask depends
only on (seed, shape), never on strides, device or launch tiling, and the backward is this same kernel applied to
dy. p = 0 keeps everything exactly (t = 0, scale 1); p = 1 gives exact zeros (t = 2¹⁶, scale 0). A dropped element
is x · 0, as torch computes it: NaN and ±inf become NaN, not 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._runtime import cdiv, new_empty

# Philox calls a program makes (8 · BLOCK elements); not part of the mask's definition.
BLOCK = 512
NUM_WARPS = 4


@triton.jit
def sixteen_bit_draws(r0, r1, r2, r3):
    """The eight 16-bit uniforms of each call (draws r₀…r₃ of one shape S) as [S, 2, 2, 2], whose last three dims
    flattened give h = 2·j + k for half k (0 low, 1 high) of draw r_j: a reshape to [..., 8·S_last] puts the call at
    counter c's eight halves at elements 8·c … 8·c + 7."""
    draws = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [S, a, b] = r_(2a + b)
    return tl.join(draws & 0xFFFF, draws >> 16)  # [S, a, b, k]: low (k = 0) or high 16 bits of r_(2a + b)


@triton.jit
def philox_key(seed, SEED_IN_MEMORY: tl.constexpr):
    """The mask's key: seed itself, or (SEED_IN_MEMORY) the integer it points to (a one-element tensor, e.g. drawn on
    the device)."""
    if SEED_IN_MEMORY:
        return tl.load(seed)
    else:
        return seed


@triton.jit
def keep_mask(seed, offs, threshold):
    """keep_i = [u(seed, i) ≥ threshold] at int64 element indices offs of any shape: the mask _dropout_kernel draws
    for them (one Philox call per element here, where the kernel shares each call between eight elements)."""
    r0, r1, r2, r3 = tl.randint4x(seed, offs // 8)
    half = offs % 8  # low (even) or high (odd) 16 bits of draw r_(half // 2)
    r = tl.where(half < 4, tl.where(half < 2, r0, r1), tl.where(half < 6, r2, r3))
    u = tl.where(half % 2 == 0, r & 0xFFFF, r >> 16)
    return u.to(tl.int32) >= threshold


@triton.jit
def row_keep_mask(seed, rows, N, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep for the tile [BLOCK_M, BLOCK_N] of whole rows `rows` (int64) from column 0 of an [M, N] shape with N a
    multiple of 8: keep_mask at rows × columns, one Philox call for eight neighbours (columns ≥ N: draws to mask)."""
    calls = rows[:, None] * (N // 8) + tl.arange(0, BLOCK_N // 8)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, calls)
    return tl.reshape(sixteen_bit_draws(r0, r1, r2, r3), (BLOCK_M, BLOCK_N)).to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["seed", "threshold"])
def _dropout_kernel(x_ptr, y_ptr, n, threshold, scale, seed, BLOCK: tl.constexpr, SEED_IN_MEMORY: tl.constexpr):
    """Elements [pid · 8·BLOCK, …): BLOCK Philox calls, each for eight neighbours (four 32-bit draws, eight 16-bit
    uniforms). SEED_IN_MEMORY: seed points to the seed (an integer tensor of one element, e.g. drawn on the device).
    The loads are issued before the Philox rounds, so memory and integer work overlap."""
    calls = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs = calls[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BLOCK, 8]: row j, the eight elements of call j
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    keep = row_keep_mask(philox_key(seed, SEED_IN_MEMORY), calls, 8, threshold, BLOCK, 8)  # rows of 8: one call each
    y = x.to(tl.float32) * tl.where(keep, scale, 0.0)  # a dropped NaN or inf stays NaN (NaN · 0), as torch
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def drops_any(p: float) -> bool:
    """Whether rate p drops anything (p̂ > 0): at p below 2⁻¹⁷ dropout is the identity and no seed is needed."""
    return threshold_and_scale(p)[0] > 0


def threshold_and_scale(p: float) -> tuple[int, float]:
    """The kernels' form of drop probability p: (t = round(p · 2¹⁶), the kept elements' scale 1 / (1 − t / 2¹⁶), or 0
    when t = 2¹⁶: everything dropped). t = 0 keeps everything at scale 1."""
    threshold = round(p * 2**16)
    return threshold, 0.0 if threshold >= 2**16 else 2**16 / (2**16 - threshold)


def dropout(x: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """keep · x / (1 − p̂) with the mask of (seed, x's shape); contiguous output of x's shape and dtype. seed: an int,
    or an integer tensor of one element on x's device (read by the kernel: nothing waits for it)."""
    x = x.contiguous()
    y = new_empty(x.shape, like=x)
    n = x.numel()
    if n:
        threshold, scale = threshold_and_scale(p)
        launch(
            _dropout_kernel,
            (cdiv(n, 8 * BLOCK),),
            x,
            y,
            n,
            threshold,
            scale,
            seed,
            BLOCK=BLOCK,
            SEED_IN_MEMORY=isinstance(seed, torch.Tensor),
            num_warps=NUM_WARPS,
        )
    return y
