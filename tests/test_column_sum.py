"""column_sum (the reduction behind the linear's db and the norms' weight and bias gradients) against float64:
row counts on both sides of the one-tile path (up to 1024 rows in one load) and the chunked path (partial sums
per chunk of rows, then a second pass), stacked planes, widths not a multiple of the column block."""

from __future__ import annotations

import pytest
from harness import DTYPES, assert_close, randn

from triformer.kernels.reductions import column_sum


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planes", [(), (2,)], ids=["2d", "planes"])
@pytest.mark.parametrize("M", [1, 3, 1000, 1024, 1025, 3000])
@pytest.mark.parametrize("N", [1, 17, 300])
def test_column_sum(M, N, planes, dtype, seed):
    x = randn(*planes, M, N, dtype=dtype)
    total = column_sum(x)
    assert total.shape == (*planes, N) and total.dtype == dtype
    # a sum of M unit normals has norm ≈ √M per column: the floor keeps cancelling columns from failing
    assert_close(total, x.double().sum(-2), dtype, "column sum", scale_floor=(M * N) ** 0.5)
