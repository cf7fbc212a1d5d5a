"""The persistent TMA product, launched directly with small tiles against float64: on the CPU through the
interpreter (it emulates TMA descriptors), on a Hopper GPU natively (bf16 too). Transposed operands (descriptors
on the memory as it lies), edges in every dimension, and program counts from one program for every tile to one
program per tile; every tile whole, every tile cut into 2 or 3 runs of its K-iterations, and half the tiles whole
with the others cut (float32 partials summed by a third kernel)."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, DTYPES, ON_GPU, assert_close, randn, well_conditioned_norm
from test_linear import REFERENCE_ACTIVATION
from triton.runtime import _allocation

from triformer.kernels import _tma, matmul_tma
from triformer.kernels.activation import activation_code

pytestmark = pytest.mark.skipif(
    ON_GPU and torch.cuda.get_device_capability()[0] < 9, reason="TMA needs compute capability 9.0 (Hopper)"
)

DTYPES_16 = [d for d in DTYPES if d.values[0] != torch.float32]  # TMA products take 16-bit operands only
TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_EPILOGUE": False, "num_stages": 3}

# (M, N, K, A transposed, B transposed): edges in every dimension; rows 16-byte aligned as TMA requires
# (a transposed operand's memory is its transpose, so its other dimension is the aligned one).
PRODUCTS = [
    (70, 40, 104, False, False),
    (72, 40, 104, True, False),
    (33, 72, 24, False, True),
    (64, 64, 64, True, True),
    (100, 24, 296, False, False),
]


def _operand(rows, cols, transposed, dtype):
    """A [rows, cols] operand; transposed: its memory holds the transpose (a column-contiguous view)."""
    if transposed:
        return randn(cols, rows, dtype=dtype).t()
    return randn(rows, cols, dtype=dtype)


# (share of the tiles computed whole, split of the others)
SCHEDULES = {"whole": (1.0, 1), "cut2": (0.0, 2), "cut3": (0.0, 3), "half-cut3": (0.5, 3), "cut6": (0.0, 6)}


def _poisoned(shape, dtype, like):
    return torch.full(shape, float("nan"), dtype=dtype, device=like.device)


@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("programs", [1, 3, 7, 10_000])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("M,N,K,a_trans,b_trans", PRODUCTS)
def test_tma_product(M, N, K, a_trans, b_trans, schedule, programs, activation, dtype, seed):
    a, b = _operand(M, K, a_trans, dtype), _operand(K, N, b_trans, dtype)
    bias = randn(N, dtype=dtype)
    c, preact = _poisoned((M, N), dtype, a), _poisoned((M, N), dtype, a)
    a_view, b_view = (a.t() if a_trans else a), (b.t() if b_trans else b)
    args = (a_view, b_view, c, preact, bias, M, N, K, a_view.stride(0), b_view.stride(0))
    flags = dict(HAS_BIAS=True, ACT=activation_code(activation), STORE_PREACT=True, A_TRANS=a_trans, B_TRANS=b_trans)
    whole_share, split = SCHEDULES[schedule]
    whole = round(matmul_tma.count_tiles(M, N, TILE) * whole_share)
    matmul_tma.launch_on(args, flags, matmul_tma.schedule_meta(TILE, whole, split), programs)

    a64, b64 = a.double().cpu(), b.double().cpu()
    ref = a64 @ b64 + bias.double().cpu()
    floor = well_conditioned_norm(a64, b64)
    assert_close(preact, ref, dtype, "preactivation", scale_floor=floor)
    assert_close(c, REFERENCE_ACTIVATION[activation](ref), dtype, "output", scale_floor=floor)


@pytest.mark.parametrize("splits", [1, 4, 6, 9])
@pytest.mark.parametrize("sum_m,sum_n", [(8, 16), (16, 32)])
def test_split_k_sum_adds_the_partials_in_split_order(splits, sum_m, sum_n, seed):
    """The cut tiles' partials summed one split after another, as float32 adds in split order give bit for bit
    (however many splits a loop step loads), each into its tile of C (tiles in grouped order)."""
    block_m, block_n, group_m = 16, 32, 2
    M, N = 3 * block_m - 5, 3 * block_n - 7  # edge tiles: only their in-range part is written
    tiles_m, tiles_n = 3, 3
    tile_count = tiles_m * tiles_n
    partial = randn(splits * tile_count * block_m, block_n, dtype=torch.float32) * 1e3
    c = _poisoned((M, N), torch.float32, partial)
    matmul_tma._split_k_sum_kernel[(tile_count, block_m // sum_m, block_n // sum_n)](
        partial, c, c, c, M, N, 0, tile_count, splits, HAS_BIAS=False, ACT=0, STORE_PREACT=False,
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m, SUM_M=sum_m, SUM_N=sum_n,
    )  # fmt: skip
    tiles = partial.view(splits, tile_count, block_m, block_n)
    expected = torch.empty(tiles_m * block_m, tiles_n * block_n, dtype=torch.float32, device=partial.device)
    for t in range(tile_count):
        group, in_group = divmod(t, group_m * tiles_n)
        rows_in_group = min(tiles_m - group * group_m, group_m)
        pid_m, pid_n = group * group_m + in_group % rows_in_group, in_group // rows_in_group
        acc = torch.zeros(block_m, block_n, dtype=torch.float32, device=partial.device)
        for split in range(splits):
            acc += tiles[split, t]
        expected[pid_m * block_m : (pid_m + 1) * block_m, pid_n * block_n : (pid_n + 1) * block_n] = acc
    assert torch.equal(c, expected[:M, :N])


@pytest.mark.parametrize(
    "cut,block_m,block_n,expected",
    [
        (6, 128, 128, (8, 64)),  # a 128-row product cut 16 ways: 192 programs instead of 24
        (12, 128, 256, (8, 128)),  # 12 · 16 · 2 = 384 programs
        (100, 128, 128, (32, 128)),  # enough tiles: the widest blocks
        (1, 32, 32, (8, 32)),  # narrower than the widest blocks: never below 8 rows, columns as they are
    ],
)
def test_split_k_sum_blocks_fill_the_gpu(cut, block_m, block_n, expected):
    assert matmul_tma.sum_blocks(cut, block_m, block_n, num_sms=132) == expected


def test_cut_tiles_stage_their_partials_in_scratch_with_room(seed):
    """Given scratch memory with room for them, the cut tiles' float32 partials are staged at its front (which is
    overwritten; nothing past it, 14 bytes too few for the kernels' descriptors; with 8 KiB more, only the end that
    the descriptors take) and the product is the same bit for bit; a scratch without room, or not 16-byte aligned,
    is left alone."""
    M, N, K = 70, 40, 104
    a, b = randn(M, K, dtype=torch.float16), randn(K, N, dtype=torch.float16)

    def product(scratch):
        c = _poisoned((M, N), torch.float16, a)
        args = (a, b, c, c, c, M, N, K, a.stride(0), b.stride(0))
        flags = dict(HAS_BIAS=False, ACT=0, STORE_PREACT=False, A_TRANS=False, B_TRANS=False)
        matmul_tma.launch_on(args, flags, matmul_tma.schedule_meta(TILE, 0, 3), 7, scratch)
        return c

    expected = product(None)
    halves = 2 * matmul_tma.count_tiles(M, N, TILE) * 3 * TILE["BLOCK_M"] * TILE["BLOCK_N"]  # 16-bit elements
    roomy, small = _poisoned((halves + 7,), torch.float16, a), _poisoned((halves - 1,), torch.float16, a)
    assert torch.equal(product(roomy), expected)
    assert not torch.isnan(roomy[:halves]).all() and torch.isnan(roomy[halves:]).all()
    assert torch.equal(product(small), expected)
    assert torch.isnan(small).all()
    spacious = _poisoned((halves + 4096,), torch.float16, a)  # 8 KiB past the partials: the descriptors fit
    assert torch.equal(product(spacious), expected)
    assert torch.isnan(spacious[halves : halves + 2048]).all()  # on a GPU they take its end (7 · 3 · 128 bytes)
    misaligned = _poisoned((halves + 16,), torch.float16, a)[1:]  # 2 bytes past a 16-byte boundary
    assert torch.equal(product(misaligned), expected)
    assert torch.isnan(misaligned).all()


def test_scratch_lends_its_front_to_the_partials_and_the_rest_to_the_descriptors():
    scratch = torch.empty(1000, dtype=torch.float16, device=DEVICE)
    partial, lent = matmul_tma.scratch_memory(scratch, scratch.device, 8, 16)  # 512 bytes of partials
    assert partial.shape == (8, 16) and partial.dtype == torch.float32 and partial.data_ptr() == scratch.data_ptr()
    assert lent.dtype == torch.uint8 and lent.data_ptr() == scratch.data_ptr() + 512 and lent.numel() == 2000 - 512
    assert matmul_tma.scratch_memory(scratch, scratch.device, 0, 16)[1].numel() == 2000  # no cut tiles: all lent
    partial, lent = matmul_tma.scratch_memory(scratch, scratch.device, 64, 16)  # no room: new memory, nothing lent
    assert partial.shape == (64, 16) and partial.data_ptr() != scratch.data_ptr() and lent is None
    assert matmul_tma.scratch_memory(None, scratch.device, 0, 16) == (None, None)


def test_lent_descriptor_memory_is_taken_back():
    """Within the block Triton's allocator hands out the lent memory; after it (an exception too) new memory again."""
    lent = torch.empty(4096, dtype=torch.uint8, device=DEVICE)
    with _tma.lent_descriptor_memory(lent):
        memory = _allocation._allocator.get()(256, 128, None)
        assert lent.data_ptr() <= memory.data_ptr() < lent.data_ptr() + lent.numel()
    assert _allocation._allocator.get() is _tma._descriptor_memory
    with pytest.raises(RuntimeError), _tma.lent_descriptor_memory(lent):
        raise RuntimeError
    assert _allocation._allocator.get() is _tma._descriptor_memory


def test_descriptors_take_the_aligned_end_of_lent_memory():
    """(The interpreter never asks for descriptor memory: the allocator itself is checked here.)"""
    lent = torch.empty(1000, dtype=torch.uint8, device=DEVICE)[3:]
    memory = _tma._descriptor_memory_in(lent, 256, 128, None)
    assert memory.numel() == 256 and memory.data_ptr() % 128 == 0
    assert lent.data_ptr() <= memory.data_ptr() and memory.data_ptr() + 256 <= lent.data_ptr() + lent.numel()
    assert memory.data_ptr() + 256 + 128 > lent.data_ptr() + lent.numel()  # the last aligned place
    new = _tma._descriptor_memory_in(lent[:200], 256, 128, None)  # no room
    assert new.numel() == 256 and not lent.data_ptr() <= new.data_ptr() < lent.data_ptr() + lent.numel()


@pytest.mark.parametrize(
    "M,N,K,tile,expected",
    [
        # dW of a 768→3072 layer: 144 tiles of 128×128 for 132 SMs: one wave whole, the last 12 tiles cut 8 ways
        (3072, 768, 8192, 2, (132, 8)),
        # the same with 128×256 tiles: 72 tiles, less than a wave: all cut 3 ways (two waves of runs)
        (3072, 768, 8192, 0, (0, 3)),
        (8192, 3072, 768, 0, (768, 1)),  # 768 tiles: 5.8 waves, cutting gains less than the partials cost
        (4096, 4096, 4096, 0, (512, 1)),
    ],
)
def test_schedule_cuts_the_thin_last_wave(M, N, K, tile, expected):
    meta = matmul_tma._TMA_CONFIGS[tile].all_kwargs()
    assert matmul_tma.schedule_for(M, N, K, meta, num_sms=132) == expected
    candidates = matmul_tma._candidates(M, N, K, num_sms=132)
    assert any(c["SPLIT_K"] == 1 for c in candidates)  # whole tiles are always timed too
    assert any(c["SPLIT_K"] > 1 for c in candidates) == (expected[1] > 1)


def test_schedule_model_counts_the_busiest_sm():
    # 144 tiles of 128 K-iterations on 132 SMs: whole, two waves; cut: one wave, then 12 tiles × 8 runs of 16
    # iterations on 96 SMs, plus 96 partial tiles
    assert matmul_tma.schedule_cost(144, 128, 144, 1, 132) == 256
    assert matmul_tma.schedule_cost(144, 128, 132, 8, 132) == 128 + 16 + 96 * matmul_tma.PARTIAL_TILE_COST


def test_cut_tiles_get_a_shallower_pipeline_that_fits():
    meta = matmul_tma._TMA_CONFIGS[1].all_kwargs()  # 128×256×64, 4 stages
    cut = matmul_tma._partial_launch_meta(meta)
    assert cut["SPLIT_EPILOGUE"] and cut["num_stages"] < meta["num_stages"]
    stage_bytes = (128 + 256) * 64 * 2
    assert cut["num_stages"] * stage_bytes + 128 * 256 // 2 * 4 <= matmul_tma._SPLIT_K_SMEM_BYTES
