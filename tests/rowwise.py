"""What the row-wise op tests share (norms, softmax, cross-entropy): widths, row counts, the looping-path block
(the `row_path` fixture that uses it is in conftest.py)."""

from __future__ import annotations

import pytest
from harness import ON_GPU

GPU_ONLY_WIDE = "rows of 32768+ elements: GPU only (the interpreter would take minutes)"

# Row widths of the issue; the widest run natively only.
WIDTHS = [1, 3, 33, 1000, 4097] + [
    pytest.param(w, marks=pytest.mark.skipif(not ON_GPU, reason=GPU_ONLY_WIDE)) for w in (32768, 50304)
]

# "looped" covers rows of 1000 and 4097 elements (and 32768+ on a GPU) in blocks of this many, the last block
# partly masked; under the interpreter every extra block is a Python-level step, so not narrower.
LOOPED_BLOCK = 256


def rows_for(width: int) -> int:
    """Rows per test: a handful under the interpreter (it runs programs one by one), more on a GPU."""
    if ON_GPU:
        return 257 if width <= 4097 else 19
    return 7 if width <= 33 else 5 if width <= 1000 else 3
