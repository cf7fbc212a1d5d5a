"""The Hopper fast path of matmul.py: the plain product C = act(A·B + bias) with TMA loads and stores, persistent.

    C = act(P),  P = A·B + bias[n]          A [M, K], B [K, N], C [M, N]; P is stored too when STORE_PREACT

Taken by matmul.matmul when every operand suits TMA (CUDA, sm_90+, fp16/bf16, 16-byte aligned base and row
strides, one unit stride). An operand whose columns are contiguous (a transposed view such as Wᵀ or dZᵀ) gets a
descriptor on its transpose, the memory's own row-major layout, and each tile is transposed on chip. Everything
else runs matmul.py's kernel.

A product whose last wave of tiles is thin would leave SMs idle (the backward's dW = dZᵀ·X of a 768 → 3072 layer:
144 tiles of 128×128 for 132 SMs, or 72 of 128×256): there the tiles of the last wave (or all tiles, with less than
a wave) can be cut, each into SPLIT_K runs of its K-iterations, one work unit each, so every SM gets a share; a
small kernel adds each cut tile's float32 partial products (in a fixed order: deterministic) before the epilogue.
The whole tiles and the cut ones are two launches of the same kernel, so no branch enters its pipelined loop. The
tuner times each schedule end to end. (A runtime branch inside the pipelined loop, as between finished and cut
tiles in a stream-K schedule, would stop Triton's software pipelining.)

For nn.Linear's forward layout on an sm_90 GPU (A row-major, B = Wᵀ), the tuner also times matmul_ws.py's
warp-specialized Gluon kernel, whose 128×(128+64) tiles fill two whole waves at N = 768.
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from . import _launch
from ._runtime import cdiv, device_properties, interpreter_active, overridden
from ._tiles import add_bias, fitting_configs, fixed_config, grouped_tile, launch_tuned
from ._tma import (
    lent_descriptor_memory,
    load_tile,
    operand_descriptors,
    output_descriptor,
    output_descriptors,
    store_epilogue,
    store_tile,
    tile_counts,
)
from .activation import apply_activation

# Switches, set only through the context managers at the end of this module (they restore them on exit).
# False: every product runs matmul.py's pointer kernel (benchmarks compare the two): disabled().
ENABLED = True
# False: the tuner never offers matmul_ws.py's warp-specialized kernel: without_warp_specialization().
WARP_SPECIALIZED = True
# Its tiles (BLOCK_N0, BLOCK_N1, STAGES, schedule) for the tuner: 128×(128+64) for N = 768 (ping-pong for inference,
# cooperative when the preactivation is stored), 128×(128+128) for N = 3072, ping-pong 128×(64+64) for N ≥ 3072.
WARP_SPECIALIZED_CONFIGS = [
    (128, 64, 4, "cooperative"),
    (128, 128, 3, "cooperative"),
    (64, 64, 5, "pingpong"),
    (128, 64, 4, "pingpong"),
]
# Tiles not offered when the preactivation is stored: the ping-pong 128×(128+64) tile holds 192 accumulator
# registers a thread, and its epilogue spills kilobytes when it stores two outputs (tests/test_matmul_ws_compile.py).
WARP_SPECIALIZED_INFERENCE_ONLY = [(128, 64, 4, "pingpong")]
# One tile config and schedule for every product instead of the tuner's pick (tests and tools check each): forced().
# FORCED_SCHEDULE = (share of the tiles computed whole, split of the others); None: all tiles whole.
FORCED_CONFIG: triton.Config | None = None
FORCED_SCHEDULE: tuple[float, int] | None = None


@triton.jit
def _matmul_tma_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    preact_ptr,
    bias_ptr,
    partial_ptr,
    M,
    N,
    K,
    stride_a,
    stride_b,
    first_tile,
    tile_count,
    splits,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    A_TRANS: tl.constexpr,
    B_TRANS: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    """C = act(A·B + bias[n]) for the tile_count tiles from first_tile on (in grouped tile order), persistent:
    program p computes work units p, p + NUM_SMS, ...

    A [M, K] and B [K, N] have row strides stride_a, stride_b (or are transposed views, A_TRANS/B_TRANS); C is
    contiguous. Whole tiles (PARTIAL False): a unit is a tile and ends in the epilogue. Cut tiles (PARTIAL): a
    unit is one of `splits` equal runs of a tile's K-iterations, unit u = split · tile_count + tile, and its
    float32 partial product goes to slot u of partial [units · BLOCK_M, BLOCK_N] for _split_k_sum_kernel.
    The unit loop and its K loop are flattened into one software-pipelined loop, so the next unit's loads are in
    flight during this unit's epilogue. Edges need no masks: TMA zero-fills loads and clips stores.
    """
    a_desc, b_desc = operand_descriptors(
        a_ptr, b_ptr, M, N, K, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K, A_TRANS, B_TRANS
    )
    tiles_m, tiles_n, k_tiles = tile_counts(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    if PARTIAL:
        k_per_unit = tl.cdiv(k_tiles, splits)
        partial_desc = output_descriptor(
            partial_ptr, splits * tile_count * BLOCK_M, BLOCK_N, BLOCK_M, BLOCK_N, SPLIT_EPILOGUE
        )
    else:
        k_per_unit = k_tiles
        c_desc, preact_desc = output_descriptors(
            c_ptr, preact_ptr, M, N, BLOCK_M, BLOCK_N, STORE_PREACT, SPLIT_EPILOGUE
        )

    # The epilogue keeps its own unit counter: the pipeliner must not see one value used by both ends.
    unit_c = tl.program_id(0) - NUM_SMS
    for unit in tl.range(tl.program_id(0), tile_count * splits, NUM_SMS, flatten=True):
        split = 0
        if PARTIAL:
            split = unit // tile_count
        pid_m, pid_n = grouped_tile(first_tile + unit - split * tile_count, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_per_unit):
            k = (split * k_per_unit + kk) * BLOCK_K  # past K (a tile's last run): TMA loads zeros
            a = load_tile(a_desc, pid_m * BLOCK_M, k, A_TRANS)
            b = load_tile(b_desc, k, pid_n * BLOCK_N, B_TRANS)
            acc = tl.dot(a, b, acc)

        unit_c += NUM_SMS
        if PARTIAL:
            store_tile(partial_desc, unit_c * BLOCK_M, 0, acc, SPLIT_EPILOGUE)
        else:
            pid_m, pid_n = grouped_tile(first_tile + unit_c, tiles_m, tiles_n, GROUP_M)
            store_epilogue(
                acc,
                pid_m * BLOCK_M,
                pid_n * BLOCK_N,
                N,
                c_desc,
                preact_desc,
                bias_ptr,
                HAS_BIAS,
                ACT,
                STORE_PREACT,
                SPLIT_EPILOGUE,
            )


@triton.jit
def _split_k_sum_kernel(
    partial_ptr,
    c_ptr,
    preact_ptr,
    bias_ptr,
    M,
    N,
    first_tile,
    tile_count,
    splits,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    SUM_M: tl.constexpr,
    SUM_N: tl.constexpr,
):
    """P = Σ_s partial[slot s · tile_count + t] + bias[n] over the splits (in split order: deterministic) of cut
    tile t = program_id(0) (tile first_tile + t in grouped order), C = act(P), and P itself when STORE_PREACT,
    for one SUM_M×SUM_N block of the tile. Four splits' loads are issued before their adds (one latency a step,
    not one a split)."""
    t = tl.program_id(0)
    pid_m, pid_n = grouped_tile(first_tile + t, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    in_m = tl.program_id(1) * SUM_M + tl.arange(0, SUM_M)
    in_n = tl.program_id(2) * SUM_N + tl.arange(0, SUM_N)
    rows, cols = pid_m * BLOCK_M + in_m, pid_n * BLOCK_N + in_n
    tile_offsets = in_m[:, None] * BLOCK_N + in_n[None, :]
    tile_elements = BLOCK_M * BLOCK_N
    acc = tl.zeros((SUM_M, SUM_N), dtype=tl.float32)
    for first in range(0, splits, 4):
        slot = tl.cast(first * tile_count + t, tl.int64)
        p0 = tl.load(partial_ptr + slot * tile_elements + tile_offsets)
        p1 = tl.load(partial_ptr + (slot + tile_count) * tile_elements + tile_offsets, mask=first + 1 < splits)
        p2 = tl.load(partial_ptr + (slot + 2 * tile_count) * tile_elements + tile_offsets, mask=first + 2 < splits)
        p3 = tl.load(partial_ptr + (slot + 3 * tile_count) * tile_elements + tile_offsets, mask=first + 3 < splits)
        acc += p0
        acc = tl.where(first + 1 < splits, acc + p1, acc)
        acc = tl.where(first + 2 < splits, acc + p2, acc)
        acc = tl.where(first + 3 < splits, acc + p3, acc)
    acc = add_bias(acc, bias_ptr, cols, N, HAS_BIAS)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if STORE_PREACT:
        tl.store(preact_ptr + offsets, acc.to(preact_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + offsets, apply_activation(acc, ACT).to(c_ptr.dtype.element_ty), mask=mask)


def _config(bm, bn, bk, stages, warps, split=False):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_EPILOGUE": split},
        num_stages=stages,
        num_warps=warps,
    )


# The tiles the tuner times: 128×256 (two warpgroups) for most products, 128×128 with deep pipelining where 128×256
# tiles leave the last wave half empty (N = 768), 64-row tiles for short products. Largest first: fixed_config
# takes the first that fits up to 128×128. The main loop is Triton's flattened software pipeline, without its
# automatic warp specialization (matmul_ws.py specializes warps by hand).
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
    """TMA's rule for a 2-D tensor: 16-byte aligned base and row stride, contiguous rows that do not overlap (an
    expanded view's row stride 0 is aligned too, but not a layout a descriptor describes)."""
    return (
        t.stride(1) == 1
        and t.stride(0) >= t.shape[1]
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def _tma_view(t: torch.Tensor):
    """(t, False) when t's rows are TMA-addressable, (tᵀ, True) when its columns are; None otherwise."""
    if _rows_addressable(t):
        return t, False
    return (t.t(), True) if _rows_addressable(t.t()) else None


def tma_views(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """How a [M, K] · b [K, N] into the contiguous c runs here: ((a's view, transposed?), (b's view, transposed?)),
    or None when it cannot (then matmul.py's kernel takes it)."""
    if not (
        ENABLED
        and a.is_cuda
        and a.dtype in (torch.float16, torch.bfloat16)
        and b.dtype == a.dtype
        and a.shape[1] > 0
        and not interpreter_active()
        and _device_sms(a.device) > 0
        and _rows_addressable(c)
    ):
        return None
    a_view, b_view = _tma_view(a), _tma_view(b)
    return None if a_view is None or b_view is None else (a_view, b_view)


# Scheduling (all counts in K-iterations on the busiest SM). Whole tiles are dealt out in waves of one per SM; when
# the last wave is thin, its tiles can instead be cut into up to MAX_SPLIT_K runs of K-iterations each, so that
# every SM gets a share ("data-parallel + split-K", the balance stream-K aims at, with no branch in the kernel).
# A cut tile costs a float32 partial tile written and read back, which the model charges as PARTIAL_TILE_COST
# K-iterations of one SM (partials move at the device's bandwidth, shared by all SMs: ≈ 4·(SM rate)/(bandwidth ·
# BLOCK_K) for bf16: 0.135 for an H200's 6.5 TFLOP/s per SM and ~3 TB/s).
# A schedule is offered to the tuner when the model gains more than SCHEDULE_MIN_GAIN over whole tiles.
MAX_SPLIT_K = 16
PARTIAL_TILE_COST = 0.135
SCHEDULE_MIN_GAIN = 0.05
# Shared memory a cut tile's pipeline stages and its float32 staging (two column halves) may take on sm_90.
_SPLIT_K_SMEM_BYTES = 220 * 1024


def count_tiles(M: int, N: int, meta: dict) -> int:
    """How many BLOCK_M×BLOCK_N tiles cover an [M, N] output."""
    return cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])


def schedule_cost(tiles: int, k_tiles: int, whole: int, split: int, num_sms: int) -> float:
    """Model cost of computing `whole` tiles whole (a multiple of num_sms, or all of them) and cutting the other
    tiles into `split` runs each: K-iterations on the busiest SM plus the partial tiles' traffic."""
    cut = tiles - whole
    if split == 1:
        return cdiv(tiles, num_sms) * k_tiles
    return (
        whole // num_sms * k_tiles + cdiv(cut * split, num_sms) * cdiv(k_tiles, split) + cut * split * PARTIAL_TILE_COST
    )


def schedule_for(M: int, N: int, K: int, meta: dict, num_sms: int) -> tuple[int, int]:
    """(whole tiles, split) for a product at this tile: all tiles whole, split 1, unless cutting the tiles of the
    last wave (or all tiles, when there is less than one wave) beats that by more than SCHEDULE_MIN_GAIN."""
    tiles = count_tiles(M, N, meta)
    k_tiles = cdiv(K, meta["BLOCK_K"])
    options = [
        (whole, split)
        for whole in sorted({0, tiles // num_sms * num_sms})
        if whole < tiles
        for split in range(2, min(MAX_SPLIT_K, k_tiles) + 1)
    ]
    if not options:
        return tiles, 1
    best = min(options, key=lambda o: (schedule_cost(tiles, k_tiles, *o, num_sms), o[1]))
    unsplit = schedule_cost(tiles, k_tiles, tiles, 1, num_sms)
    if schedule_cost(tiles, k_tiles, *best, num_sms) < (1 - SCHEDULE_MIN_GAIN) * unsplit:
        return best
    return tiles, 1


def schedule_meta(meta: dict, whole: int, split: int) -> dict:
    """A tile config's launch meta with its schedule: WHOLE_TILES computed whole, the rest cut SPLIT_K ways."""
    return {**meta, "WHOLE_TILES": whole, "SPLIT_K": split}


def _partial_launch_meta(tile_meta: dict) -> dict:
    """The tile meta of the cut tiles' launch: float32 partial tiles are staged in two column halves, with as many
    pipeline stages as leave them room."""
    cut = {**tile_meta, "SPLIT_EPILOGUE": True}
    stage_bytes = (cut["BLOCK_M"] + cut["BLOCK_N"]) * cut["BLOCK_K"] * 2
    staging_bytes = cut["BLOCK_M"] * cut["BLOCK_N"] // 2 * 4
    while cut["num_stages"] > 2 and cut["num_stages"] * stage_bytes + staging_bytes > _SPLIT_K_SMEM_BYTES:
        cut["num_stages"] -= 1
    return cut


# The warp-specialized Gluon kernel (matmul_ws.py) joins the tuner's candidates for products of at least this many
# output elements (below, its extra compilations cost more than it can gain).
WARP_SPECIALIZED_MIN_OUTPUTS = 1 << 20


def warp_specialized_fits(a_trans: bool, b_trans: bool, device: torch.device, outputs: int) -> bool:
    """Whether matmul_ws.py's kernel may take a product: nn.Linear's forward layout (A row-major, B = Wᵀ with W
    row-major), a Hopper GPU (its warpgroup MMAs are sm_90's), a Triton with Gluon, a large enough output."""
    return (
        WARP_SPECIALIZED
        and not a_trans
        and b_trans
        and outputs >= WARP_SPECIALIZED_MIN_OUTPUTS
        and device.type == "cuda"
        and _gluon_kernel() is not None
        and device_properties(device).major == 9
    )


# The oldest Triton whose Gluon API matmul_ws.py is written for (3.6, the GPU hosts'; 3.8 compiles it too). Gluon
# is experimental and its API moves between releases.
GLUON_MIN_TRITON = (3, 6)


def gluon_triton() -> bool:
    """Whether this Triton is GLUON_MIN_TRITON or newer (read at each call: tests patch triton.__version__)."""
    return tuple(int(part) for part in triton.__version__.split(".")[:2]) >= GLUON_MIN_TRITON


@functools.cache
def _gluon_kernel():
    """matmul_ws, imported on first use (Gluon has no interpreter); None where this Triton is older than
    GLUON_MIN_TRITON or lacks what it uses."""
    if not gluon_triton():
        return None
    try:
        from . import matmul_ws
    except (ImportError, AttributeError):
        return None
    return matmul_ws


def _candidates(
    M: int, N: int, K: int, num_sms: int, warp_specialized: bool = False, store_preact: bool = False
) -> list:
    """Launch metas for the tuner: every fitting tile with whole tiles, and cut where schedule_for says it pays;
    with warp_specialized, matmul_ws.py's tiles too (metas {"WS_CONFIG": its config}), those for inference only
    when no preactivation is stored."""
    candidates = []
    for config in fitting_configs(_TMA_CONFIGS, M, N, 2):
        meta = config.all_kwargs()
        candidates.append(schedule_meta(meta, count_tiles(M, N, meta), 1))
        scheduled = schedule_meta(meta, *schedule_for(M, N, K, meta, num_sms))
        if scheduled["SPLIT_K"] > 1 and scheduled not in candidates:
            candidates.append(scheduled)
    if warp_specialized:
        candidates += [
            {"WS_CONFIG": config}
            for config in WARP_SPECIALIZED_CONFIGS
            if not (store_preact and config in WARP_SPECIALIZED_INFERENCE_ONLY)
        ]
    return candidates


def scratch_memory(scratch: torch.Tensor | None, device: torch.device, partial_rows: int, partial_cols: int) -> tuple:
    """(float32 [partial_rows, partial_cols] for the cut tiles' partial products, bytes (uint8) the descriptors may
    take, or None): the front of scratch's memory for the partials and the rest for the descriptors when scratch is
    a contiguous tensor on `device`, 16-byte aligned (as TMA wants), with room for the partials; else new memory for
    the partials (when there are any) and none lent to the descriptors."""
    nbytes = partial_rows * partial_cols * 4
    if (
        scratch is not None
        and scratch.device == device
        and scratch.is_contiguous()
        and scratch.data_ptr() % 16 == 0
        and scratch.numel() * scratch.element_size() >= nbytes
    ):
        memory = scratch.reshape(-1).view(torch.uint8)
        return memory[:nbytes].view(torch.float32).view(partial_rows, partial_cols), memory[nbytes:]
    partial = torch.empty((partial_rows, partial_cols), device=device, dtype=torch.float32) if nbytes else None
    return partial, None


def sum_blocks(cut: int, block_m: int, block_n: int, num_sms: int) -> tuple[int, int]:
    """(SUM_M, SUM_N) of _split_k_sum_kernel's programs for `cut` cut tiles: 32×128 blocks, narrowed (rows to 8,
    then columns to 64) while the launch would have fewer than two programs a SM (a few cut tiles: the partials
    of a 128-row product cut 16 ways are read by 24 programs at 32×128, 192 at 8×64)."""
    sum_m, sum_n = min(32, block_m), min(128, block_n)
    while cut * (block_m // sum_m) * (block_n // sum_n) < 2 * num_sms:
        if sum_m > 8:
            sum_m //= 2
        elif sum_n > 64:
            sum_n //= 2
        else:
            break
    return sum_m, sum_n


def launch_on(args: tuple, flags: dict, meta: dict, num_sms: int, scratch: torch.Tensor | None = None) -> None:
    """One product with args (a, b, c, preact, bias, M, N, K, stride_a, stride_b), flags and launch meta (a tile
    config with WHOLE_TILES and SPLIT_K, see schedule_meta) on at most num_sms persistent programs: the whole
    tiles, then the cut tiles' runs and the sum of their partials (the partials and the kernels' descriptors in
    scratch's memory when it has room, see scratch_memory). A meta {"WS_CONFIG": tile} runs matmul_ws.py's kernel
    instead (A row-major, B transposed)."""
    a, b, c, preact, bias, M, N = args[:7]
    if "WS_CONFIG" in meta:  # B transposed: b is its memory, W [N, K] (see tma_views)
        _gluon_kernel().launch(
            a,
            b,
            c,
            preact if flags["STORE_PREACT"] else None,
            bias if flags["HAS_BIAS"] else None,
            flags["ACT"],
            meta["WS_CONFIG"],
            num_sms,
        )
        return
    tile_meta = {k: v for k, v in meta.items() if k not in ("WHOLE_TILES", "SPLIT_K")}
    block_m, block_n = meta["BLOCK_M"], meta["BLOCK_N"]
    tiles = count_tiles(M, N, meta)
    split = meta["SPLIT_K"]
    whole = tiles if split == 1 else min(meta["WHOLE_TILES"], tiles)
    cut = tiles - whole
    partial, lent = scratch_memory(scratch, c.device, cut * split * block_m, block_n)
    with lent_descriptor_memory(lent):
        if whole:
            _launch.launch(
                _matmul_tma_kernel,
                (min(num_sms, whole),),
                a,
                b,
                c,
                preact,
                bias,
                c,
                *args[5:],
                0,
                whole,
                1,
                **flags,
                NUM_SMS=num_sms,
                PARTIAL=False,
                **tile_meta,
            )
        if cut:
            _launch.launch(
                _matmul_tma_kernel,
                (min(num_sms, cut * split),),
                a,
                b,
                c,
                preact,
                bias,
                partial,
                *args[5:],
                whole,
                cut,
                split,
                **flags,
                NUM_SMS=num_sms,
                PARTIAL=True,
                **_partial_launch_meta(tile_meta),
            )
            sum_m, sum_n = sum_blocks(cut, block_m, block_n, num_sms)
            _launch.launch(
                _split_k_sum_kernel,
                (cut, block_m // sum_m, block_n // sum_n),
                partial,
                c,
                preact,
                bias,
                M,
                N,
                whole,
                cut,
                split,
                HAS_BIAS=flags["HAS_BIAS"],
                ACT=flags["ACT"],
                STORE_PREACT=flags["STORE_PREACT"],
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                GROUP_M=meta["GROUP_M"],
                SUM_M=sum_m,
                SUM_N=sum_n,
                num_warps=4,
            )


def launch(
    views,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    preact: torch.Tensor | None,
    act: int,
    scratch: torch.Tensor | None = None,
) -> None:
    """c = act(a·b + bias) (preact = a·b + bias when given) for the views tma_views gave; split-K partials in
    scratch's memory where it has room (see launch_on)."""
    (a_view, a_trans), (b_view, b_trans) = views
    M, N = c.shape
    K = a_view.shape[0] if a_trans else a_view.shape[1]
    num_sms = _device_sms(a_view.device)
    args = (
        a_view,
        b_view,
        c,
        c if preact is None else preact,
        c if bias is None else bias,
        M,
        N,
        K,
        a_view.stride(0),
        b_view.stride(0),
    )
    flags = dict(HAS_BIAS=bias is not None, ACT=act, STORE_PREACT=preact is not None, A_TRANS=a_trans, B_TRANS=b_trans)

    def run(meta):
        launch_on(args, flags, meta, num_sms, scratch)

    fixed = fixed_config(_TMA_CONFIGS, FORCED_CONFIG, M, N, c.element_size())
    if fixed is not None:
        meta = fixed.all_kwargs()
        whole_share, split = FORCED_SCHEDULE or (1.0, 1)
        run(schedule_meta(meta, round(count_tiles(M, N, meta) * whole_share), split))
    else:
        props = device_properties(c.device)  # a pick holds for one kind of GPU, with or without the Gluon kernel
        launch_tuned(
            ("tma", M, N, K, c.dtype, *flags.values(), props.major, props.minor, WARP_SPECIALIZED),
            lambda: _candidates(
                M, N, K, num_sms, warp_specialized_fits(a_trans, b_trans, c.device, M * N), flags["STORE_PREACT"]
            ),
            run,
        )


def forced(config: triton.Config | None, schedule: tuple[float, int] | None = None):
    """Within the block every TMA product runs `config` (a tile like _TMA_CONFIGS'; None: the tuner's pick, or the
    default tile while autotuning is off) with `schedule` = (share of the tiles computed whole, split of the
    others; None: all tiles whole), instead of what the tuner would pick."""
    return overridden(sys.modules[__name__], FORCED_CONFIG=config, FORCED_SCHEDULE=schedule)


def disabled():
    """Within the block no product runs here: matmul.py's pointer kernel takes every one."""
    return overridden(sys.modules[__name__], ENABLED=False)


def without_warp_specialization():
    """Within the block the tuner never offers matmul_ws.py's warp-specialized kernel."""
    return overridden(sys.modules[__name__], WARP_SPECIALIZED=False)
