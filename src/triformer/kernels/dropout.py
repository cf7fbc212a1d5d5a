"""Dropout with a counter-based mask: nothing is stored, the backward draws the same mask again.

    keep_i = [u(seed, i) ≥ t]   with t = round(p · 2¹⁶)
    y_i = keep_i · x_i / (1 − p)      dx_i = keep_i · dy_i / (1 − p)

u(seed, i) is a 16-bit uniform integer: one half of a 32-bit draw of Philox 4x32-10 (tl.randint4x, the generator
behind tl.rand) keyed by the seed and the element's index i in row-major order. One Philox call gives four 32-bit
draws, eight 16-bit uniforms: element i takes half (i // BLOCK) mod 8 of the call at counter
(i // 8·BLOCK)·8·BLOCK + i mod BLOCK, BLOCK fixed below (keep_mask draws the same mask at any indices). Halving
the draws per element halves the integer work that bounded this kernel; the price is p rounded to a multiple of
2⁻¹⁶ (keep probability off by at most 2⁻¹⁷). The mask depends only on (seed, shape), never on strides or device,
and the backward is this same kernel applied to dy. p = 0 keeps everything exactly (t = 0, scale 1); p = 1 gives
exact zeros (t = 2¹⁶, scale 0). A dropped element is x · 0, as torch computes it: NaN and ±inf become NaN, not 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._runtime import cdiv, new_empty

# Part of the mask's definition (see above): changing it changes every mask drawn from a given seed.
BLOCK = 512
NUM_WARPS = 4


@triton.jit
def _sixteen_bit_runs(r0, r1, r2, r3):
    """[8, BLOCK]: row j holds half j mod 2 (low, high) of the draws r_(j // 2), each [BLOCK]."""
    low = tl.join(tl.join(r0 & 0xFFFF, r1 & 0xFFFF), tl.join(r2 & 0xFFFF, r3 & 0xFFFF))  # [BLOCK, i1, i2], r_(2·i2+i1)
    high = tl.join(tl.join(r0 >> 16, r1 >> 16), tl.join(r2 >> 16, r3 >> 16))
    # [BLOCK, i1, i2, half] → [i2, i1, half, BLOCK]: row 4·i2 + 2·i1 + half = 2·(2·i2 + i1) + half.
    return tl.reshape(tl.permute(tl.join(low, high), (2, 1, 3, 0)), (8, r0.shape[0]))


@triton.jit
def philox_key(seed, SEED_IN_MEMORY: tl.constexpr):
    """The mask's key: seed itself, or (SEED_IN_MEMORY) the integer it points to (a one-element tensor, e.g. drawn on
    the device)."""
    if SEED_IN_MEMORY:
        return tl.load(seed)
    else:
        return seed


@triton.jit
def keep_mask(seed, offs, threshold, BLOCK: tl.constexpr):
    """keep_i = [u(seed, i) ≥ threshold] at int64 element indices offs of any shape: the mask _dropout_kernel draws
    for them (one Philox call per element here, where the kernel shares each call between eight elements)."""
    r0, r1, r2, r3 = tl.randint4x(seed, (offs // (8 * BLOCK)) * (8 * BLOCK) + offs % BLOCK)
    half = (offs // BLOCK) % 8  # run j takes half j mod 2 (low, high) of draw r_(j // 2)
    r = tl.where(half < 4, tl.where(half < 2, r0, r1), tl.where(half < 6, r2, r3))
    u = tl.where(half % 2 == 0, r & 0xFFFF, r >> 16)
    return u.to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["seed", "threshold"])
def _dropout_kernel(x_ptr, y_ptr, n, threshold, scale, seed, BLOCK: tl.constexpr, SEED_IN_MEMORY: tl.constexpr):
    """Eight consecutive runs of BLOCK elements from one Philox call (four 32-bit draws, eight 16-bit uniforms).
    SEED_IN_MEMORY: seed points to the seed (an integer tensor of one element, e.g. drawn on the device).
    The eight runs' loads are issued before the Philox rounds, so memory and integer work overlap."""
    base = tl.program_id(0).to(tl.int64) * (8 * BLOCK) + tl.arange(0, BLOCK)
    offs = base[None, :] + (tl.arange(0, 8) * BLOCK).to(tl.int64)[:, None]  # row j: run j
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    key = philox_key(seed, SEED_IN_MEMORY)
    r0, r1, r2, r3 = tl.randint4x(key, base)
    keep = _sixteen_bit_runs(r0, r1, r2, r3).to(tl.int32) >= threshold
    y = x.to(tl.float32) * tl.where(keep, scale, 0.0)  # a dropped NaN or inf stays NaN (NaN · 0), as torch
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def threshold_and_scale(p: float) -> tuple[int, float]:
    """The kernels' form of drop probability p: (t = round(p · 2¹⁶), 1 / (1 − p), or 0 for p = 1)."""
    return round(p * 2**16), 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout(x: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """keep · x / (1 − p) with the mask of (seed, x's shape); contiguous output of x's shape and dtype. seed: an int,
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
