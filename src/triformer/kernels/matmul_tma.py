"""The Hopper fast path of matmul.py: the plain product C = act(A·B + bias) with TMA loads and stores, persistent.

    C = act(P),  P = A·B + bias[n]          A [M, K], B [K, N], C [M, N]; P is stored too when STORE_PREACT

Taken by matmul.matmul when every operand suits TMA (CUDA, sm_90+, fp16/bf16, 16-byte aligned base and row
strides, one unit stride). An operand whose columns are contiguous (a transposed view such as Wᵀ or dZᵀ) gets a
descriptor on its transpose, the memory's own row-major layout, and each tile is transposed on chip. Everything
else runs matmul.py's kernel.

A product with few, long tiles (the backward's dW = dZᵀ·X of a 768 → 3072 layer: 72 tiles of 128×256 for 132 SMs)
would leave SMs idle in the last wave: there each tile's K-iterations can be split into SPLIT_K runs, each a work
unit of its own, whose float32 partial products a second kernel adds (in a fixed order: deterministic) before the
epilogue. The tuner times the split and the unsplit product end to end. (A stream-K schedule, equal K-slices per
SM, was built first: correct, but 1.4–1.7× slower per K-iteration under triton 3.6 on an H200; reports/NOTES.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import cdiv, device_properties, interpreter_active
from ._tiles import add_bias, fitting_configs, fixed_config, grouped_tile, launch_tuned
from ._tma import (load_tile, operand_descriptors, output_descriptor, output_descriptors, store_epilogue, store_tile,
                   tile_counts, use_descriptor_memory)
from .activation import apply_activation

# False: every product runs matmul.py's pointer kernel (benchmarks compare the two).
ENABLED = True
# Tests set these to check every tile shape, split or not, without autotuning (FORCED_SPLIT_K None: unsplit).
FORCED_CONFIG: triton.Config | None = None
FORCED_SPLIT_K: int | None = None


@triton.jit
def _matmul_tma_kernel(
    a_ptr, b_ptr, c_ptr, preact_ptr, bias_ptr, partial_ptr, M, N, K, stride_a, stride_b,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    A_TRANS: tl.constexpr, B_TRANS: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """C = act(A·B + bias[n]), persistent: program p computes work units p, p + NUM_SMS, ... in grouped tile order.

    A [M, K] and B [K, N] have row strides stride_a, stride_b (or are transposed views, A_TRANS/B_TRANS); C is
    contiguous. A unit is a tile (SPLIT_K = 1) or one of SPLIT_K equal runs of a tile's K-iterations, whose float32
    partial product goes to plane `split` of partial [SPLIT_K · tiles_m · BLOCK_M, N] for _split_k_sum_kernel.
    The unit loop and its K loop are flattened into one software-pipelined loop, so the next unit's loads are in
    flight during this unit's epilogue. Edges need no masks: TMA zero-fills loads and clips stores.
    """
    a_desc, b_desc = operand_descriptors(a_ptr, b_ptr, M, N, K, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                                         A_TRANS, B_TRANS)
    c_desc, preact_desc = output_descriptors(c_ptr, preact_ptr, M, N, BLOCK_M, BLOCK_N, STORE_PREACT, SPLIT_EPILOGUE)
    tiles_m, tiles_n, k_tiles = tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    tiles = tiles_m * tiles_n
    k_per_unit = tl.cdiv(k_tiles, SPLIT_K)
    if SPLIT_K > 1:
        partial_desc = output_descriptor(partial_ptr, SPLIT_K * tiles_m * BLOCK_M, N, BLOCK_M, BLOCK_N,
                                         SPLIT_EPILOGUE)

    # The epilogue keeps its own unit counter: the pipeliner must not see one value used by both ends.
    unit_c = tl.program_id(0) - NUM_SMS
    for unit in tl.range(tl.program_id(0), tiles * SPLIT_K, NUM_SMS, flatten=True):
        split = unit // tiles
        pid_m, pid_n = grouped_tile(unit - split * tiles, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_per_unit):
            k = (split * k_per_unit + kk) * BLOCK_K  # past K (last run): TMA loads zeros
            a = load_tile(a_desc, pid_m * BLOCK_M, k, A_TRANS)
            b = load_tile(b_desc, k, pid_n * BLOCK_N, B_TRANS)
            acc = tl.dot(a, b, acc)

        unit_c += NUM_SMS
        split_c = unit_c // tiles
        pid_m, pid_n = grouped_tile(unit_c - split_c * tiles, tiles_m, tiles_n, GROUP_M)
        if SPLIT_K == 1:
            store_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, c_desc, preact_desc, bias_ptr,
                           HAS_BIAS, ACT, STORE_PREACT, SPLIT_EPILOGUE)
        else:
            store_tile(partial_desc, (split_c * tiles_m + pid_m) * BLOCK_M, pid_n * BLOCK_N, acc, SPLIT_EPILOGUE)


@triton.jit
def _split_k_sum_kernel(
    partial_ptr, c_ptr, preact_ptr, bias_ptr, M, N, plane_rows,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """P = Σ_s partial[s] + bias[n] over the SPLIT_K planes (in plane order: deterministic), C = act(P), and P
    itself when STORE_PREACT, for one BLOCK_M×BLOCK_N block."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + split * tl.cast(plane_rows, tl.int64) * N + offsets, mask=mask, other=0.0)
    acc = add_bias(acc, bias_ptr, cols, N, HAS_BIAS)
    if STORE_PREACT:
        tl.store(preact_ptr + offsets, acc.to(preact_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + offsets, apply_activation(acc, ACT).to(c_ptr.dtype.element_ty), mask=mask)


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


# Split-K: at most this many runs per tile (each run adds a float32 partial tile to write and read back), and only
# where the wave model below gains more than SPLIT_K_MIN_GAIN over whole tiles.
MAX_SPLIT_K = 4
SPLIT_K_MIN_GAIN = 0.15
# Shared memory a split product's pipeline stages and its float32 staging (two column halves) may take on sm_90.
_SPLIT_K_SMEM_BYTES = 220 * 1024


def split_k_for(M: int, N: int, K: int, meta: dict, num_sms: int) -> int:
    """The split (1 … MAX_SPLIT_K) with the fewest K-iterations on the busiest SM (waves × iterations per unit),
    1 unless it beats whole tiles by more than SPLIT_K_MIN_GAIN."""
    tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
    k_tiles = cdiv(K, meta["BLOCK_K"])

    def busiest(split: int) -> int:
        return cdiv(tiles * split, num_sms) * cdiv(k_tiles, split)

    best = min(range(1, MAX_SPLIT_K + 1), key=busiest)
    return best if busiest(best) < (1 - SPLIT_K_MIN_GAIN) * busiest(1) else 1


def split_meta(meta: dict, split_k: int) -> dict:
    """Launch meta of a product split split_k ways: float32 partial tiles are staged in two column halves, with as
    many pipeline stages as leave them room."""
    if split_k == 1:
        return {**meta, "SPLIT_K": 1}
    split = {**meta, "SPLIT_K": split_k, "SPLIT_EPILOGUE": True}
    stage_bytes = (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * 2
    staging_bytes = meta["BLOCK_M"] * meta["BLOCK_N"] // 2 * 4
    while split["num_stages"] > 2 and split["num_stages"] * stage_bytes + staging_bytes > _SPLIT_K_SMEM_BYTES:
        split["num_stages"] -= 1
    return split


def _candidates(M: int, N: int, K: int, num_sms: int) -> list:
    """Launch metas for the tuner: every fitting tile unsplit, and split where split_k_for says it pays."""
    candidates = []
    for config in fitting_configs(_TMA_CONFIGS, M, N, 2):
        meta = config.all_kwargs()
        candidates.append(split_meta(meta, 1))
        split = split_meta(meta, split_k_for(M, N, K, meta, num_sms))
        if split["SPLIT_K"] > 1 and split not in candidates:
            candidates.append(split)
    return candidates


def launch_on(args: tuple, flags: dict, meta: dict, num_sms: int) -> None:
    """One product with args (a, b, c, preact, bias, M, N, K, stride_a, stride_b), flags and launch meta (a tile
    config and SPLIT_K, see split_meta) on at most num_sms persistent programs (+ the sum of a split's partials)."""
    use_descriptor_memory()
    a, b, c, preact, bias, M, N = args[:7]
    split_k, block_m = meta["SPLIT_K"], meta["BLOCK_M"]
    tiles_m = cdiv(M, block_m)
    units = tiles_m * cdiv(N, meta["BLOCK_N"]) * split_k
    partial = c if split_k == 1 else torch.empty((split_k * tiles_m * block_m, N), device=c.device,
                                                  dtype=torch.float32)
    _matmul_tma_kernel[(min(num_sms, units),)](a, b, c, preact, bias, partial, *args[5:], **flags,
                                               NUM_SMS=num_sms, **meta)
    if split_k > 1:
        _split_k_sum_kernel[(cdiv(M, 32), cdiv(N, 128))](
            partial, c, preact, bias, M, N, tiles_m * block_m, SPLIT_K=split_k, HAS_BIAS=flags["HAS_BIAS"],
            ACT=flags["ACT"], STORE_PREACT=flags["STORE_PREACT"], BLOCK_M=32, BLOCK_N=128, num_warps=4)


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
        run(split_meta(fixed.all_kwargs(), FORCED_SPLIT_K or 1))
    else:
        launch_tuned(("tma", M, N, K, c.dtype, *flags.values()), lambda: _candidates(M, N, K, num_sms), run)
