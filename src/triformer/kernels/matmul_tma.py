"""The Hopper fast path of matmul.py: the plain product C = act(A·B + bias) with TMA loads and stores, persistent.

    C = act(P),  P = A·B + bias[n]          A [M, K], B [K, N], C [M, N]; P is stored too when STORE_PREACT

Taken by matmul.matmul when the product has no prologue and every operand suits TMA (CUDA, sm_90+, fp16/bf16,
16-byte aligned base and row strides, one unit stride): the forward and the backward's dW = dZᵀ·X. An operand
whose columns are contiguous (a transposed view such as Wᵀ or dZᵀ) gets a descriptor on its transpose, the
memory's own row-major layout, and each tile is transposed on chip. Everything else runs matmul.py's kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import cdiv, device_properties, interpreter_active
from ._tiles import add_bias, fitting_configs, grouped_tile, launch_tuned
from .activation import apply_activation

# False: every product runs matmul.py's pointer kernel (benchmarks compare the two).
ENABLED = True
# Tests set this to one of _TMA_CONFIGS to check every tile shape without autotuning.
FORCED_CONFIG: triton.Config | None = None


@triton.jit
def _operand(ptr, rows, cols, row_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """TMA descriptor of an operand [rows, cols] with unit column stride; TRANSPOSED: ptr holds its transpose
    [cols, rows] row-major (unit row stride), and the descriptor covers that memory as it lies."""
    if TRANSPOSED:
        return tl.make_tensor_descriptor(ptr, [cols, rows], [row_stride, 1], [BLOCK_C, BLOCK_R])
    else:
        return tl.make_tensor_descriptor(ptr, [rows, cols], [row_stride, 1], [BLOCK_R, BLOCK_C])


@triton.jit
def _load_tile(desc, row, col, TRANSPOSED: tl.constexpr):
    """The tile at (row, col) of an operand; a transposed operand's tile is loaded as it lies, then transposed."""
    if TRANSPOSED:
        return desc.load([col, row]).T
    else:
        return desc.load([row, col])


@triton.jit
def _store_tile(desc, row, col, tile, SPLIT: tl.constexpr):
    """A float32 tile stored at (row, col) in desc's dtype; SPLIT: as two column halves (half the staging memory)."""
    if SPLIT:
        HALF: tl.constexpr = tile.shape[1] // 2
        left, right = tl.split(tl.permute(tl.reshape(tile, (tile.shape[0], 2, HALF)), (0, 2, 1)))
        desc.store([row, col], left.to(desc.dtype))
        desc.store([row, col + HALF], right.to(desc.dtype))
    else:
        desc.store([row, col], tile.to(desc.dtype))


@triton.jit
def _matmul_tma_kernel(
    a_ptr, b_ptr, c_ptr, preact_ptr, bias_ptr, M, N, K, stride_a, stride_b,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    A_TRANS: tl.constexpr, B_TRANS: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """C = act(A·B + bias[n]), persistent: program p computes tiles p, p + NUM_SMS, ... in grouped order.

    A [M, K] and B [K, N] have row strides stride_a, stride_b (or are transposed views, A_TRANS/B_TRANS); C is
    contiguous. The tile loop and its K loop are flattened into one software-pipelined loop, so the next tile's
    loads are in flight during this tile's epilogue. Edges need no masks: TMA zero-fills loads and clips stores.
    """
    a_desc = _operand(a_ptr, M, K, stride_a, BLOCK_M, BLOCK_K, A_TRANS)
    b_desc = _operand(b_ptr, K, N, stride_b, BLOCK_K, BLOCK_N, B_TRANS)
    OUT_BLOCK_N: tl.constexpr = BLOCK_N // 2 if SPLIT_EPILOGUE else BLOCK_N
    c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [N, 1], [BLOCK_M, OUT_BLOCK_N])
    if STORE_PREACT:
        preact_desc = tl.make_tensor_descriptor(preact_ptr, [M, N], [N, 1], [BLOCK_M, OUT_BLOCK_N])

    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue keeps its own tile counter: the pipeliner must not see one value used by both ends.
    tile_c = tl.program_id(0) - NUM_SMS
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS,
                         flatten=not WARP_SPECIALIZE, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = _load_tile(a_desc, pid_m * BLOCK_M, ki * BLOCK_K, A_TRANS)
            b = _load_tile(b_desc, ki * BLOCK_K, pid_n * BLOCK_N, B_TRANS)
            acc = tl.dot(a, b, acc)

        tile_c += NUM_SMS
        pid_m, pid_n = grouped_tile(tile_c, tiles_m, tiles_n, GROUP_M)
        acc = add_bias(acc, bias_ptr, pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N, HAS_BIAS)
        if STORE_PREACT:
            _store_tile(preact_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, acc, SPLIT_EPILOGUE)
        _store_tile(c_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, apply_activation(acc, ACT), SPLIT_EPILOGUE)


# warp_specialize: Triton's automatic warp specialization; it compiles for sm_90 with triton 3.6 but was slower
# there than the flattened software pipeline, so no config below uses it (the sweep still tries it).
def _config(bm, bn, bk, stages, warps, split=False, warp_specialize=False):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_EPILOGUE": split,
         "WARP_SPECIALIZE": warp_specialize},
        num_stages=stages, num_warps=warps,
    )


# The winners of a sweep on H200 (scripts/gpu_matmul_dev.py explore): 128×256 tiles (two warpgroups) for most
# products, 128×128 with deep pipelining where 128×256 tiles leave the last wave half empty (N = 768), 64-row
# tiles for short products. Largest first: fixed_config takes the first that fits up to 128×128.
_TMA_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(128, 256, 64, 4, 8, split=True),
    _config(128, 128, 64, 5, 4),
    _config(64, 256, 64, 4, 4),
    _config(64, 128, 64, 5, 4),
]

_tuned_tma_kernel = triton.autotune(
    configs=_TMA_CONFIGS,
    key=["M", "N", "K", "HAS_BIAS", "ACT", "STORE_PREACT", "A_TRANS", "B_TRANS"],
    prune_configs_by={"early_config_prune": lambda configs, nargs, **_: fitting_configs(configs, nargs["M"],
                                                                                       nargs["N"], 2)},
)(_matmul_tma_kernel)


def _descriptor_memory(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the descriptors the kernel builds (Triton asks for it at each launch)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a device with TMA (compute capability 9.0 or newer), else 0."""
    props = device_properties(device)
    return props.multi_processor_count if props.major >= 9 else 0


def _rows_addressable(t: torch.Tensor) -> bool:
    """TMA's rule for a 2-D tensor: 16-byte aligned base and row stride, contiguous rows."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _tma_view(t: torch.Tensor):
    """(t, False) when t's rows are TMA-addressable, (tᵀ, True) when its columns are; None otherwise."""
    if _rows_addressable(t):
        return t, False
    return (t.t(), True) if _rows_addressable(t.t()) else None


def tma_views(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """How a [M, K] · b [K, N] into the contiguous c runs here: ((a's view, transposed?), (b's view, transposed?)),
    or None when it cannot (then matmul.py's kernel takes it)."""
    if not (ENABLED and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype
            and a.shape[1] > 0 and not interpreter_active() and _device_sms(a.device) > 0
            and _rows_addressable(c)):
        return None
    a_view, b_view = _tma_view(a), _tma_view(b)
    return None if a_view is None or b_view is None else (a_view, b_view)


def launch(views, c: torch.Tensor, bias: torch.Tensor | None, preact: torch.Tensor | None, act: int) -> None:
    """c = act(a·b + bias) (preact = a·b + bias when given) for the views tma_views gave."""
    (a_view, a_trans), (b_view, b_trans) = views
    M, N = c.shape
    K = a_view.shape[0] if a_trans else a_view.shape[1]
    num_sms = _device_sms(a_view.device)
    args = (a_view, b_view, c, c if preact is None else preact, c if bias is None else bias,
            M, N, K, a_view.stride(0), b_view.stride(0))
    flags = dict(HAS_BIAS=bias is not None, ACT=act, STORE_PREACT=preact is not None,
                 A_TRANS=a_trans, B_TRANS=b_trans, NUM_SMS=num_sms)

    def grid(meta):
        return (min(num_sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)

    # Set at every launch: the allocator is per thread (a ContextVar), and the backward runs on autograd's.
    triton.set_allocator(_descriptor_memory)
    launch_tuned(_matmul_tma_kernel, _tuned_tma_kernel, _TMA_CONFIGS, FORCED_CONFIG, grid, args, flags,
                 ("tma", M, N, K, c.dtype, *flags.values()), M, N, c.element_size())
