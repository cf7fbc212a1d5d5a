"""The Hopper fast path of matmul.py: the plain product C = act(A·B + bias) with TMA loads and stores, persistent.

    C = act(P),  P = A·B + bias[n]          A [M, K], B [K, N], C [M, N]; P is stored too when STORE_PREACT

Taken by matmul.matmul when every operand suits TMA (CUDA, sm_90+, fp16/bf16, 16-byte aligned base and row
strides, one unit stride). An operand whose columns are contiguous (a transposed view such as Wᵀ or dZᵀ) gets a
descriptor on its transpose, the memory's own row-major layout, and each tile is transposed on chip. Everything
else runs matmul.py's kernel.

Known limit: a product with few, long tiles (the backward's dW = dZᵀ·X of a 768 → 3072 layer: 72 tiles of 128×256
for 132 SMs) leaves SMs idle in the last wave and runs at ~0.65× cuBLAS. A stream-K schedule (equal K-slices per SM,
partial sums added by a second kernel) was built, passed its tests, and ran 1.4–1.7× slower per K-iteration than
this kernel under triton 3.6 on an H200, so it was removed (reports/NOTES.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import cdiv, device_properties, interpreter_active
from ._tiles import fitting_configs, fixed_config, grouped_tile, launch_tuned
from ._tma import (load_tile, operand_descriptors, output_descriptors, store_epilogue, tile_counts,
                   use_descriptor_memory)

# False: every product runs matmul.py's pointer kernel (benchmarks compare the two).
ENABLED = True
# Tests set this to one of _TMA_CONFIGS to check every tile shape without autotuning.
FORCED_CONFIG: triton.Config | None = None


@triton.jit
def _matmul_tma_kernel(
    a_ptr, b_ptr, c_ptr, preact_ptr, bias_ptr, M, N, K, stride_a, stride_b,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    A_TRANS: tl.constexpr, B_TRANS: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
):
    """C = act(A·B + bias[n]), persistent: program p computes tiles p, p + NUM_SMS, ... in grouped order.

    A [M, K] and B [K, N] have row strides stride_a, stride_b (or are transposed views, A_TRANS/B_TRANS); C is
    contiguous. The tile loop and its K loop are flattened into one software-pipelined loop, so the next tile's
    loads are in flight during this tile's epilogue. Edges need no masks: TMA zero-fills loads and clips stores.
    """
    a_desc, b_desc = operand_descriptors(a_ptr, b_ptr, M, N, K, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                                         A_TRANS, B_TRANS)
    c_desc, preact_desc = output_descriptors(c_ptr, preact_ptr, M, N, BLOCK_M, BLOCK_N, STORE_PREACT, SPLIT_EPILOGUE)

    tiles_m, tiles_n, k_tiles = tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    # The epilogue keeps its own tile counter: the pipeliner must not see one value used by both ends.
    tile_c = tl.program_id(0) - NUM_SMS
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = load_tile(a_desc, pid_m * BLOCK_M, ki * BLOCK_K, A_TRANS)
            b = load_tile(b_desc, ki * BLOCK_K, pid_n * BLOCK_N, B_TRANS)
            acc = tl.dot(a, b, acc)

        tile_c += NUM_SMS
        pid_m, pid_n = grouped_tile(tile_c, tiles_m, tiles_n, GROUP_M)
        store_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, c_desc, preact_desc, bias_ptr,
                       HAS_BIAS, ACT, STORE_PREACT, SPLIT_EPILOGUE)


def _config(bm, bn, bk, stages, warps, split=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_EPILOGUE": split},
                         num_stages=stages, num_warps=warps)


# The winners of a sweep on H200: 128×256 tiles (two warpgroups) for most products, 128×128 with deep pipelining
# where 128×256 tiles leave the last wave half empty (N = 768), 64-row tiles for short products. Largest first:
# fixed_config takes the first that fits up to 128×128. (Triton's automatic warp specialization compiled for
# sm_90 with triton 3.6 but was slower than the flattened software pipeline.)
_TMA_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(128, 256, 64, 4, 8, split=True),
    _config(128, 128, 64, 5, 4),
    _config(64, 256, 64, 4, 4),
    _config(64, 128, 64, 5, 4),
]

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


def launch_on(args: tuple, flags: dict, meta: dict, num_sms: int) -> None:
    """One product with args (a, b, c, preact, bias, M, N, K, stride_a, stride_b), flags and tile meta on at most
    num_sms persistent programs."""
    use_descriptor_memory()
    M, N = args[5], args[6]
    tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
    _matmul_tma_kernel[(min(num_sms, tiles),)](*args, **flags, NUM_SMS=num_sms, **meta)


def launch(views, c: torch.Tensor, bias: torch.Tensor | None, preact: torch.Tensor | None, act: int) -> None:
    """c = act(a·b + bias) (preact = a·b + bias when given) for the views tma_views gave."""
    (a_view, a_trans), (b_view, b_trans) = views
    M, N = c.shape
    K = a_view.shape[0] if a_trans else a_view.shape[1]
    num_sms = _device_sms(a_view.device)
    args = (a_view, b_view, c, c if preact is None else preact, c if bias is None else bias,
            M, N, K, a_view.stride(0), b_view.stride(0))
    flags = dict(HAS_BIAS=bias is not None, ACT=act, STORE_PREACT=preact is not None,
                 A_TRANS=a_trans, B_TRANS=b_trans)

    def run(meta):
        launch_on(args, flags, meta, num_sms)

    fixed = fixed_config(_TMA_CONFIGS, FORCED_CONFIG, M, N, c.element_size())
    if fixed is not None:
        run(fixed.all_kwargs())
    else:
        launch_tuned(("tma", M, N, K, c.dtype, *flags.values()),
                     lambda: [c.all_kwargs() for c in fitting_configs(_TMA_CONFIGS, M, N, 2)], run)
