"""One tiled matrix product with a fused epilogue; every linear kernel is this one.

    C = epilogue(A · B)                    A [M, K], B [K, N], C [M, N], any strides
    epilogue(P) = act(P + bias[n])         (HAS_BIAS, ACT; P is stored too when STORE_PREACT)

Float32 accumulation; tiles visited in grouped order (GROUP_M rows of tiles share B tiles in L2).
On Hopper and newer, products whose 16-bit operands suit TMA run the persistent TMA kernel of matmul_tma.py
instead (same epilogue); this kernel takes everything else.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from . import matmul_tma
from ._launch import launch
from ._runtime import cdiv, interpreter_active, new_empty, overridden
from ._tiles import add_bias, fitting_configs, fixed_config, grouped_tile, launch_tuned
from .activation import activation_code, apply_activation


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, ROWS_EVEN: tl.constexpr, COLS_EVEN: tl.constexpr):
    """A 2-D tile, masked (zero-filled) only along the dimensions whose tiles can hang over an edge."""
    if ROWS_EVEN and COLS_EVEN:
        return tl.load(ptrs)
    elif ROWS_EVEN:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    elif COLS_EVEN:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    preact_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """One BLOCK_M×BLOCK_N tile of C = epilogue(A·B), K swept in BLOCK_K steps, float32 accumulator."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Out-of-range rows and columns are masked, never clamped: a clamped index would hide the contiguity of
    # offs_m/offs_n from the compiler and turn the loads of transposed operands into scalar loads.
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = _load_tile(a_ptrs, mask_m, k_ok, EVEN_M, EVEN_K)
        b = _load_tile(b_ptrs, k_ok, mask_n, EVEN_K, EVEN_N)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_mask = mask_m[:, None] & mask_n[None, :]
    acc = add_bias(acc, bias_ptr, offs_n, N, HAS_BIAS)
    c_offsets = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    if STORE_PREACT:
        tl.store(preact_ptr + c_offsets, acc.to(preact_ptr.dtype.element_ty), mask=out_mask)
    tl.store(c_ptr + c_offsets, apply_activation(acc, ACT).to(c_ptr.dtype.element_ty), mask=out_mask)


# Hopper (H100/H200) tiles: wide tiles with 8 warps for big products, smaller ones so that skinny products
# still spread over 132 SMs. fitting_configs prunes them per shape, so a first call times only a handful.
_HOPPER_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 256, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 5, 4),
    ]
]


def _even_flags(meta: dict, M: int, N: int, K: int) -> dict:
    """Which dimensions the tile divides exactly (their loads need no masks)."""
    return {"EVEN_M": M % meta["BLOCK_M"] == 0, "EVEN_N": N % meta["BLOCK_N"] == 0, "EVEN_K": K % meta["BLOCK_K"] == 0}


# Under the interpreter every program runs in numpy one after another: one small fixed tile, no tuning.
_INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}

# One of _HOPPER_CONFIGS for every product instead of the tuner's pick (tests check each tile on the GPU): forced().
FORCED_CONFIG: triton.Config | None = None


def _launch(args, flags, M: int, N: int, K: int) -> None:
    def run(meta):
        grid = (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        launch(_matmul_kernel, grid, *args, **flags, **_even_flags(meta, M, N, K), **meta)

    if interpreter_active():
        run(_INTERPRETER_META)
        return
    element_size = args[0].element_size()
    fixed = fixed_config(_HOPPER_CONFIGS, FORCED_CONFIG, M, N, element_size)
    if fixed is not None:
        run(fixed.all_kwargs())
    else:
        launch_tuned(
            ("pointer", M, N, K, args[0].dtype, *flags.values()),
            lambda: [c.all_kwargs() for c in fitting_configs(_HOPPER_CONFIGS, M, N, element_size)],
            run,
        )


def _input_precision(dtype: torch.dtype) -> str:
    """Float32 products run in true fp32 unless the user allowed TF32 in torch."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _shares_storage(t: torch.Tensor, others) -> bool:
    storage = t.untyped_storage().data_ptr()
    return any(o is not None and o.untyped_storage().data_ptr() == storage for o in others)


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    store_preactivation: bool = False,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
):
    """C = act(a @ b + bias) for 2-D a [M, K], b [K, N] of any strides (views are not copied) and bias [N] (every
    kernel reads it at unit stride: a strided or expanded bias is copied here, N elements).

    Returns (c, the preactivation a @ b + bias or None), contiguous, in a's dtype; c is `out` when given (a
    contiguous [M, N] tensor of a's dtype on a's device, e.g. a block of rows of a larger output). scratch: a tensor
    whose memory a split-K product may overwrite with its float32 partials instead of allocating them (memory the
    caller holds but does not need until the product is done).
    """
    M, K = a.shape
    K2, N = b.shape
    assert K == K2, (a.shape, b.shape)
    if bias is not None:
        bias = bias.contiguous()
    if out is None:
        c = new_empty((M, N), like=a)
    else:
        assert out.shape == (M, N) and out.dtype == a.dtype and out.device == a.device, (out.shape, out.dtype)
        assert out.stride() == (N, 1), f"out must be dense rows of N = {N}, got strides {out.stride()}"
        c = out
    if out is not None or scratch is not None:
        inputs = (a, b, bias)
        for name, t in (("out", out), ("scratch", scratch)):
            assert t is None or not _shares_storage(t, inputs), f"{name} aliases an input"
        assert scratch is None or out is None or not _shares_storage(scratch, (out,)), "scratch aliases out"
    preact = new_empty((M, N), like=a) if store_preactivation else None
    act = activation_code(activation)
    if M > 0 and N > 0:
        views = matmul_tma.tma_views(a, b, c)  # None for K = 0
        if views is not None:
            matmul_tma.launch(views, c, bias, preact, act, scratch)
        else:
            if not K:  # C = act(bias): nothing is read from a and b, which may have no storage; c stands in
                a = b = c
            args = (
                a,
                b,
                c,
                c if bias is None else bias,
                c if preact is None else preact,
                M,
                N,
                K,
                a.stride(0),
                a.stride(1),
                b.stride(0),
                b.stride(1),
                c.stride(0),
                c.stride(1),
            )
            flags = dict(
                HAS_BIAS=bias is not None,
                ACT=act,
                STORE_PREACT=preact is not None,
                INPUT_PRECISION=_input_precision(a.dtype),
            )
            _launch(args, flags, M, N, K)
    return c, preact


def forced(config: triton.Config | None):
    """Within the block every product this kernel takes runs the tile `config` instead of the tuner's pick."""
    return overridden(sys.modules[__name__], FORCED_CONFIG=config)
