"""Dropout with a counter-based mask: nothing is stored, the backward draws the same mask again.

    keep_i = [u(seed, i) ≥ t]   with t = round(p · 2¹⁶)      y_i = keep_i · x_i / (1 − p)      dx_i = keep_i · dy_i / (1 − p)

u(seed, i) is a 16-bit uniform integer: one half of a 32-bit draw of Philox 4x32-10 (tl.randint4x, the generator
behind tl.rand) keyed by the seed and the element's index i in row-major order. One Philox call gives four 32-bit
draws, eight 16-bit uniforms: element i takes half (i // BLOCK) mod 8 of the call at counter
(i // 8·BLOCK)·BLOCK + i mod BLOCK, BLOCK fixed below. Halving the draws per element halves the integer work that
bounded this kernel; the price is p rounded to a multiple of 2⁻¹⁶ (keep probability off by at most 2⁻¹⁷).
The mask depends only on (seed, shape), never on strides or device, and the backward is this same kernel applied
to dy. p = 0 keeps everything exactly (t = 0, scale 1); p = 1 gives exact zeros (t = 2¹⁶, scale 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import cdiv, new_empty


# Part of the mask's definition (see above): changing it changes every mask drawn from a given seed.
BLOCK = 512
NUM_WARPS = 4


@triton.jit
def _apply_mask(x_ptr, y_ptr, offs, n, u, threshold, scale):
    """y = x · scale where the 16-bit uniform u is ≥ threshold, else 0, for the elements at offs."""
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.where(u.to(tl.int32) >= threshold, x.to(tl.float32) * scale, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_halves(x_ptr, y_ptr, offs, n, r, threshold, scale, BLOCK: tl.constexpr):
    """The runs at offs and offs + BLOCK take the low and the high 16 bits of the 32-bit draws r."""
    _apply_mask(x_ptr, y_ptr, offs, n, r & 0xFFFF, threshold, scale)
    _apply_mask(x_ptr, y_ptr, offs + BLOCK, n, r >> 16, threshold, scale)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _dropout_kernel(x_ptr, y_ptr, n, threshold, scale, seed, BLOCK: tl.constexpr):
    """One Philox call, four 32-bit draws, eight 16-bit uniforms: eight consecutive runs of BLOCK elements."""
    base = tl.program_id(0).to(tl.int64) * (8 * BLOCK) + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.randint4x(seed, base)
    _apply_halves(x_ptr, y_ptr, base, n, r0, threshold, scale, BLOCK)
    _apply_halves(x_ptr, y_ptr, base + 2 * BLOCK, n, r1, threshold, scale, BLOCK)
    _apply_halves(x_ptr, y_ptr, base + 4 * BLOCK, n, r2, threshold, scale, BLOCK)
    _apply_halves(x_ptr, y_ptr, base + 6 * BLOCK, n, r3, threshold, scale, BLOCK)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """keep · x / (1 − p) with the mask of (seed, x's shape); contiguous output of x's shape and dtype."""
    x = x.contiguous()
    y = new_empty(x.shape, like=x)
    n = x.numel()
    if n:
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        threshold = round(p * 2**16)
        _dropout_kernel[(cdiv(n, 8 * BLOCK),)](x, y, n, threshold, scale, seed, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y
