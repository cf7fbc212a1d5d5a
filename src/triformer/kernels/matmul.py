"""One tiled matrix product with an optional fused prologue and epilogue; every linear kernel is this one.

    C = epilogue(prologue(A) · B)          A [M, K], B [K, N], C [M, N], any strides
    prologue(A) = A ⊙ act'(G)              (GATE_ACT ≠ 0; G laid out like A: the backward's dZ = dY ⊙ act'(Z);
                                            STORE_GATED also writes prologue(A), so the dW product can reuse dZ)
    epilogue(P) = act(P + bias[n])         (HAS_BIAS, ACT; P is stored too when STORE_PREACT)

Float32 accumulation; tiles visited in grouped order (GROUP_M rows of tiles share B tiles in L2).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._runtime import interpreter_active, new_empty
from .activation import activation_code, activation_derivative, apply_activation


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
    a_ptr, b_ptr, c_ptr, bias_ptr, preact_ptr, gate_ptr, gated_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_gm, stride_gk,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    GATE_ACT: tl.constexpr, STORE_GATED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One BLOCK_M×BLOCK_N tile of C = epilogue(prologue(A)·B), K swept in BLOCK_K steps, float32 accumulator."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Out-of-range rows and columns are masked, never clamped: a clamped index would hide the contiguity of
    # offs_m/offs_n from the compiler and turn the loads of transposed operands into scalar loads.
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    if GATE_ACT != 0:
        g_ptrs = gate_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_k[None, :] * stride_gk
    if STORE_GATED:  # a contiguous [M, K] copy of prologue(A), written once by the first column of tiles
        gated_ptrs = gated_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        first_column = pid_n == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = _load_tile(a_ptrs, mask_m, k_ok, EVEN_M, EVEN_K)
        b = _load_tile(b_ptrs, k_ok, mask_n, EVEN_K, EVEN_N)
        if GATE_ACT != 0:
            g = _load_tile(g_ptrs, mask_m, k_ok, EVEN_M, EVEN_K)
            a = (a.to(tl.float32) * activation_derivative(g.to(tl.float32), GATE_ACT)).to(b.dtype)
            g_ptrs += BLOCK_K * stride_gk
        if STORE_GATED:  # a masked store, not a branch: a branch would stop the loop's software pipelining
            tl.store(gated_ptrs, a, mask=(mask_m[:, None] & (offs_k[None, :] < K - k0)) & first_column)
            gated_ptrs += BLOCK_K
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_offsets = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    if STORE_PREACT:
        tl.store(preact_ptr + c_offsets, acc.to(preact_ptr.dtype.element_ty), mask=out_mask)
    tl.store(c_ptr + c_offsets, apply_activation(acc, ACT).to(c_ptr.dtype.element_ty), mask=out_mask)


# Hopper (H100/H200) tiles: wide tiles with 8 warps for big products, smaller ones so that skinny products
# still spread over 132 SMs. Pruned per shape below so a first call tries only a handful.
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


def _prune_configs(configs, named_args, **_):
    """Keep the tiles that fit the product (no tile more than twice the size it covers); 4-byte inputs get
    half-deep K tiles so the pipelined shared-memory buffers still fit Hopper's 228 KB."""
    M, N = named_args["M"], named_args["N"]
    fits = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(64, 2 * M) and c.kwargs["BLOCK_N"] <= max(64, 2 * N)
    ] or configs[-1:]
    if named_args["a_ptr"].element_size() == 4:
        fits = [
            triton.Config({**c.kwargs, "BLOCK_K": 32}, num_warps=c.num_warps, num_stages=min(c.num_stages, 3))
            for c in fits
        ]
    return fits


_matmul_kernel = triton.heuristics({
    "EVEN_M": lambda args: args["M"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0,
    "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
})(_matmul_kernel)

_tuned_matmul_kernel = triton.autotune(
    configs=_HOPPER_CONFIGS,
    key=["M", "N", "K", "HAS_BIAS", "ACT", "STORE_PREACT", "GATE_ACT", "STORE_GATED", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_matmul_kernel)

# Under the interpreter every program runs in numpy one after another: one small fixed tile, no tuning.
_INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}

# Tests set this to one of _HOPPER_CONFIGS to check every tile shape on the GPU without autotuning.
FORCED_CONFIG: triton.Config | None = None


def autotune_enabled() -> bool:
    """TRIFORMER_AUTOTUNE=0 replaces autotuning by one fixed tile per shape (the GPU test suite uses it)."""
    return os.environ.get("TRIFORMER_AUTOTUNE", "1") != "0"


def _fixed_config(a: torch.Tensor, M: int, N: int) -> triton.Config:
    """Without autotuning: the forced config, else the largest fitting tile up to 128×128."""
    fits = _prune_configs([FORCED_CONFIG] if FORCED_CONFIG else _HOPPER_CONFIGS, {"M": M, "N": N, "a_ptr": a})
    return next((c for c in fits if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128), fits[-1])


def _launch(args, flags, M: int, N: int) -> None:
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if interpreter_active():
        _matmul_kernel[grid(_INTERPRETER_META)](*args, **flags, **_INTERPRETER_META)
    elif FORCED_CONFIG is not None or not autotune_enabled():
        config = _fixed_config(args[0], M, N)
        _matmul_kernel[grid(config.kwargs)](
            *args, **flags, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    else:
        _tuned_matmul_kernel[grid](*args, **flags)


def _input_precision(dtype: torch.dtype) -> str:
    """Float32 products run in true fp32 unless the user allowed TF32 in torch."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    store_preactivation: bool = False,
    gate: torch.Tensor | None = None,
    gate_activation: str | None = None,
    store_gated: bool = False,
):
    """C = act(prologue(a) @ b + bias) for 2-D a [M, K], b [K, N] of any strides (views are not copied).

    gate: a tensor laid out like `a`; the prologue multiplies a by gate_activation'(gate).
    Returns (c, preactivation or None, prologued a or None), the last when store_gated; all contiguous, in a's dtype.
    """
    M, K = a.shape
    K2, N = b.shape
    assert K == K2, (a.shape, b.shape)
    c = new_empty((M, N), like=a)
    preact = new_empty((M, N), like=a) if store_preactivation else c
    gated = new_empty((M, K), like=a) if store_gated else c
    gate_t = gate if gate is not None else a
    args = (
        a, b, c, bias if bias is not None else c, preact, gate_t, gated,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        gate_t.stride(0), gate_t.stride(1),
    )
    flags = dict(
        HAS_BIAS=bias is not None,
        ACT=activation_code(activation),
        STORE_PREACT=store_preactivation,
        GATE_ACT=activation_code(gate_activation) if gate is not None else 0,
        STORE_GATED=store_gated,
        INPUT_PRECISION=_input_precision(a.dtype),
    )
    if M > 0 and N > 0:
        _launch(args, flags, M, N)
    return c, (preact if store_preactivation else None), (gated if store_gated else None)
