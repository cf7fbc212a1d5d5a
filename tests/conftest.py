"""Choose how kernels run before anything imports triton: natively with CUDA, else through the interpreter."""

import atexit
import contextlib
import os
import shutil
import sys
import tempfile

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    assert "triformer.kernels.matmul" not in sys.modules, "kernels were compiled before the runner was chosen"
# torch.compile's caches on disk key a custom op's compiled backward without the op's autograd formula: a cache left
# by an older checkout can replay a backward that calls an op with its old signature. Each test process compiles
# into a fresh folder, removed at its exit, unless the caller names one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="triformer-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
# Hundreds of shapes would each trigger an autotuning sweep on the GPU: tests use one fixed tile per shape and
# check every tile of the tuning space explicitly (test_linear_gpu.py), and the autotuned path on a few shapes.
os.environ.setdefault("TRIFORMER_AUTOTUNE", "0")
# the tuner's picks are timed here: never read from or left in a user's store of picks
os.environ.pop("TRIFORMER_TUNING_CACHE", None)

import pytest  # noqa: E402

from triformer.kernels import _runtime  # noqa: E402


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every output a kernel launcher allocates starts as NaN, so an element no program writes fails the test."""
    with _runtime.poisoned_outputs():
        yield


@pytest.fixture
def without_interpreter():
    """The kernels answer as if TRITON_INTERPRET were not set (what a CPU tensor is told then)."""
    with _runtime.assume_interpreter(False):
        yield


@pytest.fixture
def seed():
    """A fresh random seed per test (printed on failure through the test id's locals), never a fixed one."""
    import torch

    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


@pytest.fixture(params=["one-block", "looped"])
def row_path(request):
    """Row-wise ops run twice: rows held in one register block, and rows covered by a loop over column blocks."""
    from rowwise import LOOPED_BLOCK

    from triformer.kernels import _rows

    with _rows.row_block_cap(LOOPED_BLOCK) if request.param == "looped" else contextlib.nullcontext():
        yield request.param


@pytest.fixture(params=["usual-tiling", "one-row-tiling"])
def ce_rows(request):
    """Cross-entropy runs twice: with its usual tiling and with one row a program on a wide block (wide rows: a GPT's
    logits, a fused linear + CE chunk), which the interpreter would otherwise never take."""
    from triformer.kernels import cross_entropy
    from triformer.kernels._runtime import overridden

    one_row = request.param == "one-row-tiling"
    with overridden(cross_entropy, FORCED_ONE_ROW=True if one_row else cross_entropy.FORCED_ONE_ROW):
        yield request.param
