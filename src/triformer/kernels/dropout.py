"""Dropout with a counter-based mask: nothing is stored, the backward draws the same mask again.

    keep_i = [u(seed, i) ≥ p]      y_i = keep_i · x_i / (1 − p)      dx_i = keep_i · dy_i / (1 − p)

u(seed, i) is a Philox 4x32-10 uniform (tl.rand4x, four draws per call, the generator behind tl.rand) keyed by
the seed and the element's index i in row-major order: element i takes draw (i // BLOCK) mod 4 of the call at
counter (i // 4·BLOCK)·BLOCK + i mod BLOCK, BLOCK fixed below. The mask therefore depends only on (seed, shape),
never on strides or device, and the backward is this same kernel applied to dy. p = 0 keeps everything exactly
(u ≥ 0 always holds, scale 1); p = 1 gives exact zeros (scale 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import cdiv, new_empty


# Part of the mask's definition (see above): changing it changes every mask drawn from a given seed.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _apply_mask(x_ptr, y_ptr, offs, n, u, p, scale):
    """y = x · scale where the uniform u is ≥ p, else 0, for the elements at offs."""
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.where(u >= p, x.to(tl.float32) * scale, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _dropout_kernel(x_ptr, y_ptr, n, p, scale, seed, BLOCK: tl.constexpr):
    """One Philox call yields four 32-bit draws: they cover four consecutive runs of BLOCK elements."""
    base = tl.program_id(0).to(tl.int64) * (4 * BLOCK) + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.rand4x(seed, base)
    _apply_mask(x_ptr, y_ptr, base, n, r0, p, scale)
    _apply_mask(x_ptr, y_ptr, base + BLOCK, n, r1, p, scale)
    _apply_mask(x_ptr, y_ptr, base + 2 * BLOCK, n, r2, p, scale)
    _apply_mask(x_ptr, y_ptr, base + 3 * BLOCK, n, r3, p, scale)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """keep · x / (1 − p) with the mask of (seed, x's shape); contiguous output of x's shape and dtype."""
    x = x.contiguous()
    y = new_empty(x.shape, like=x)
    n = x.numel()
    if n:
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        _dropout_kernel[(cdiv(n, 4 * BLOCK),)](x, y, n, float(p), scale, seed, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y
