"""Device-side pieces of the Hopper product (matmul_tma.py): TMA descriptors of the operands and outputs, tile
counts and loads, and the epilogue that stores C = act(P) (and P when asked), P = acc + bias[n].

Descriptors are built on the device; Triton asks the allocator set by `use_descriptor_memory` for their memory (new
memory, or memory the caller lends).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ._runtime import interpreter_active
from ._tiles import add_bias
from .activation import apply_activation


def _descriptor_memory(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the descriptors a kernel builds (Triton asks for it at each launch)."""
    return torch.empty(size, device="cpu" if interpreter_active() else "cuda", dtype=torch.int8)


def _descriptor_memory_in(lent: torch.Tensor, size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """The descriptors' memory at the aligned end of `lent` (bytes, uint8) when it has room, else new memory."""
    start = (lent.data_ptr() + lent.numel() - size) // alignment * alignment - lent.data_ptr()
    if start < 0:
        return _descriptor_memory(size, alignment, stream)
    return lent[start : start + size]


def use_descriptor_memory(lent: torch.Tensor | None = None) -> None:
    """Call before each launch: the allocator is per thread (a ContextVar), and the backward runs on autograd's.
    lent: memory (uint8, contiguous, on the launch's device) free while the launch runs, where the descriptors go
    when they fit, instead of new memory (lend it through lent_descriptor_memory, which takes it back)."""
    triton.set_allocator(_descriptor_memory if lent is None else functools.partial(_descriptor_memory_in, lent))


@contextlib.contextmanager
def lent_descriptor_memory(lent: torch.Tensor | None):
    """Within the block launches' descriptors take `lent` memory where they fit (see use_descriptor_memory); on
    exit, exceptions included, new memory again: no later launch (a compiled kernel's own launcher sets no
    allocator) writes into memory its lender has taken back."""
    use_descriptor_memory(lent)
    try:
        yield
    finally:
        use_descriptor_memory()


@triton.jit
def operand_descriptor(
    ptr, rows, cols, row_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TRANSPOSED: tl.constexpr
):
    """TMA descriptor of an operand [rows, cols] with unit column stride; TRANSPOSED: ptr holds its transpose
    [cols, rows] row-major (unit row stride), and the descriptor covers that memory as it lies."""
    if TRANSPOSED:
        return tl.make_tensor_descriptor(ptr, [cols, rows], [row_stride, 1], [BLOCK_C, BLOCK_R])
    else:
        return tl.make_tensor_descriptor(ptr, [rows, cols], [row_stride, 1], [BLOCK_R, BLOCK_C])


@triton.jit
def operand_descriptors(
    a_ptr,
    b_ptr,
    M,
    N,
    K,
    stride_a,
    stride_b,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_TRANS: tl.constexpr,
    B_TRANS: tl.constexpr,
):
    """(A's, B's) descriptors for A [M, K] · B [K, N] (see operand_descriptor)."""
    return (
        operand_descriptor(a_ptr, M, K, stride_a, BLOCK_M, BLOCK_K, A_TRANS),
        operand_descriptor(b_ptr, K, N, stride_b, BLOCK_K, BLOCK_N, B_TRANS),
    )


@triton.jit
def output_descriptor(ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr):
    """TMA descriptor of a contiguous output [M, N] (half-width blocks when the epilogue stores two halves)."""
    OUT_BLOCK_N: tl.constexpr = BLOCK_N // 2 if SPLIT_EPILOGUE else BLOCK_N
    return tl.make_tensor_descriptor(ptr, [M, N], [N, 1], [BLOCK_M, OUT_BLOCK_N])


@triton.jit
def output_descriptors(
    c_ptr,
    preact_ptr,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
):
    """(C's, the preactivation's) descriptors; C's twice when the preactivation is not stored."""
    c_desc = output_descriptor(c_ptr, M, N, BLOCK_M, BLOCK_N, SPLIT_EPILOGUE)
    if STORE_PREACT:
        preact_desc = output_descriptor(preact_ptr, M, N, BLOCK_M, BLOCK_N, SPLIT_EPILOGUE)
    else:
        preact_desc = c_desc
    return c_desc, preact_desc


@triton.jit
def tile_counts(M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(tiles along M, tiles along N, K-iterations per tile)."""
    return tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)


@triton.jit
def load_tile(desc, row, col, TRANSPOSED: tl.constexpr):
    """The tile at (row, col) of an operand; a transposed operand's tile is loaded as it lies, then transposed."""
    if TRANSPOSED:
        return desc.load([col, row]).T
    else:
        return desc.load([row, col])


@triton.jit
def store_tile(desc, row, col, tile, SPLIT: tl.constexpr):
    """A float32 tile stored at (row, col) in desc's dtype; SPLIT: as two column halves (half the staging memory)."""
    if SPLIT:
        HALF: tl.constexpr = tile.shape[1] // 2
        left, right = tl.split(tl.permute(tl.reshape(tile, (tile.shape[0], 2, HALF)), (0, 2, 1)))
        desc.store([row, col], left.to(desc.dtype))
        desc.store([row, col + HALF], right.to(desc.dtype))
    else:
        desc.store([row, col], tile.to(desc.dtype))


@triton.jit
def store_epilogue(
    acc,
    row,
    col,
    N,
    c_desc,
    preact_desc,
    bias_ptr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
):
    """C[row:, col:] = act(P) and, with STORE_PREACT, preact[row:, col:] = P, for P = acc + bias (one tile; TMA
    clips what hangs over an edge)."""
    acc = add_bias(acc, bias_ptr, col + tl.arange(0, acc.shape[1]), N, HAS_BIAS)
    if STORE_PREACT:
        store_tile(preact_desc, row, col, acc, SPLIT_EPILOGUE)
    store_tile(c_desc, row, col, apply_activation(acc, ACT), SPLIT_EPILOGUE)
