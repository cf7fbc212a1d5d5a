"""The row kernels' launch meta on a GPU (warps per tile), checked on any machine: the interpreter's own tiling
is switched off, so these are the launches a GPU run gets."""

from __future__ import annotations

import pytest

from triformer.kernels import _rows, norms, softmax


@pytest.fixture
def gpu_tiling(without_interpreter):
    """The launches a GPU run gets, computed here (_tiling's cache is keyed by the tile size)."""


def launch(n_cols, options):
    meta = _rows.launch_meta(4096, n_cols, **options)
    return meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"]


@pytest.mark.parametrize(
    "n_cols,expected",
    [
        (768, (2, 1024, 4)),
        (2048, (1, 2048, 4)),
        (4096, (1, 4096, 4)),
        (8192, (1, 8192, 8)),
        (16384, (1, 16384, 16)),
    ],
)
def test_softmax_backward_holds_32_elements_a_thread_in_one_row_tiles(gpu_tiling, n_cols, expected):
    assert launch(n_cols, softmax.BACKWARD_LAUNCH) == expected


@pytest.mark.parametrize(
    "n_cols,expected",
    [
        (768, (2, 1024, 4)),
        (4096, (1, 4096, 8)),
        (8192, (1, 8192, 16)),
        (16384, (1, 16384, 16)),
    ],
)
def test_softmax_forward_gives_wide_rows_16_warps(gpu_tiling, n_cols, expected):
    assert launch(n_cols, softmax.FORWARD_LAUNCH) == expected


@pytest.mark.parametrize(
    "n_cols,expected",
    [
        (768, (4, 1024, 4)),
        (1024, (4, 1024, 4)),
        (4096, (1, 4096, 8)),
        (8192, (1, 8192, 16)),
    ],
)
def test_norm_forward_launches(gpu_tiling, n_cols, expected):
    assert launch(n_cols, norms.forward_launch_options(n_cols)) == expected


def test_layer_norm_loads_parameters_after_reducing_only_rows_of_8192_and_more():
    assert norms.forward_flags(4096, center=True) == {"PARAMS_FIRST": True}
    assert norms.forward_flags(8192, center=True) == {"PARAMS_FIRST": False}
    assert norms.forward_flags(8192, center=False) == {"PARAMS_FIRST": True}
