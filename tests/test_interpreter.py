"""kernels/_interpreter.py: Triton's interpreter patches the language once per launch, and helper calls inside the
launch run under the same replacements as before (right results, builtins restored after the launch, a helper
naming triton.language.core patched and restored too)."""

import importlib.util
import textwrap
import warnings

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from triformer.kernels import _interpreter, _runtime

pytestmark = pytest.mark.skipif(not _runtime.interpreter_active(), reason="Triton's interpreter only (CPU)")


@triton.jit
def _twice(x):
    return x * 2.0


@triton.jit
def _helper_loop_kernel(x_ptr, out_ptr, N: tl.constexpr, CALLS: tl.constexpr):
    """out = x · 2^CALLS, one helper call per doubling."""
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    for _ in range(CALLS):
        x = _twice(x)
    tl.store(out_ptr + offs, x)


@triton.jit
def _failing_kernel(x_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(x_ptr + offs, _twice(tl.load(x_ptr + offs)))
    tl.static_assert(N < 0, "this kernel always fails")


def _count_walks(monkeypatch) -> list:
    """Counts the language walks (_patch_lang's calls of _patch_builtin for triton.language itself)."""
    walks = []
    original = interpreter._patch_builtin

    def counting(pkg, *args, **kwargs):
        if pkg is tl or pkg is tl.core:
            walks.append(pkg)
        return original(pkg, *args, **kwargs)

    monkeypatch.setattr(interpreter, "_patch_builtin", counting)
    return walks


def _builtins_restored():
    return tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.core.store) and tl.core.is_builtin(tl.tensor.__add__)


def test_installed_by_the_kernels_under_the_interpreter():
    assert _interpreter._installed
    assert _interpreter.install()  # a second install changes nothing


@pytest.mark.parametrize("calls", [1, 5])
def test_one_walk_per_launch_and_right_results(monkeypatch, calls):
    walks = _count_walks(monkeypatch)
    x = torch.randn(16)
    out = torch.full_like(x, float("nan"))
    _helper_loop_kernel[(1,)](x, out, N=16, CALLS=calls)
    torch.testing.assert_close(out, x * 2.0**calls, rtol=0, atol=0)
    assert len(walks) == 1, f"{len(walks)} walks of triton.language for one launch with {calls} helper calls"
    assert _builtins_restored()


def test_a_failing_launch_restores_the_builtins_and_the_state():
    with pytest.raises(Exception, match="always fails"):
        _failing_kernel[(1,)](torch.zeros(8), N=8)
    assert _builtins_restored()
    assert _interpreter._frames == []
    out = torch.empty(8)
    _helper_loop_kernel[(1,)](torch.ones(8), out, N=8, CALLS=3)  # the next launch patches again
    assert torch.equal(out, torch.full((8,), 8.0))


def test_launches_inside_a_launch_and_jit_calls_in_a_pre_run_hook(monkeypatch):
    """A launch started by another's grid function or pre-run hook, and a jit function called in a pre-run hook
    (before the launch patches the language): every launch computes, and the state is clean after each."""
    x = torch.ones(8)
    inner = torch.empty(8)

    def grid_launching(meta):
        _helper_loop_kernel[(1,)](x, inner, N=8, CALLS=2)
        return (1,)

    out = torch.empty(8)
    _helper_loop_kernel[grid_launching](x, out, N=8, CALLS=1)
    assert torch.equal(inner, x * 4) and torch.equal(out, x * 2)
    assert _interpreter._frames == [] and _builtins_restored()

    monkeypatch.setattr(_helper_loop_kernel, "pre_run_hooks", [lambda *args, **kwargs: _twice(1.0)])
    _helper_loop_kernel[(1,)](x, out, N=8, CALLS=3)
    assert torch.equal(out, x * 8) and _interpreter._frames == [] and _builtins_restored()
    monkeypatch.setattr(_helper_loop_kernel, "pre_run_hooks", [])
    _helper_loop_kernel[(1,)](x, out, N=8, CALLS=1)
    assert torch.equal(out, x * 2)


@triton.jit
def _log_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.log(tl.load(x_ptr + offs)))


def test_numpy_floating_point_warnings_stay_inside_a_launch():
    """log 0 and log of a negative in a launch: −inf and NaN as on a GPU, no RuntimeWarning (masked lanes compute
    such values in many kernels); outside a launch NumPy warns as before."""
    x = torch.tensor([0.0, -1.0, 1.0, 4.0])
    out = torch.empty(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _log_kernel[(1,)](x, out, N=4)
    assert out[0] == float("-inf") and out[1].isnan() and torch.equal(out[2:], x[2:].log())
    with pytest.warns(RuntimeWarning, match="divide by zero"):
        np.log(np.zeros(1))


def test_a_helper_naming_triton_language_core_is_patched_and_restored(tmp_path, monkeypatch):
    """A helper whose module names only triton.language.core needs that module patched, which the launch of a kernel
    naming triton.language does not do; its patch is undone with the launch's."""
    source = tmp_path / "core_helper.py"
    source.write_text(
        textwrap.dedent(
            """
            import triton
            from triton.language import core


            @triton.jit
            def plus_one(x_ptr, offs):
                return core.load(x_ptr + offs) + 1.0
            """
        )
    )
    spec = importlib.util.spec_from_file_location("core_helper", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plus_one = module.plus_one

    @triton.jit
    def kernel(x_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, plus_one(x_ptr, offs))

    monkeypatch.setitem(kernel.fn.__globals__, "plus_one", plus_one)
    walks = _count_walks(monkeypatch)
    x = torch.randn(8)
    out = torch.empty(8)
    kernel[(1,)](x, out, N=8)
    torch.testing.assert_close(out, x + 1.0, rtol=0, atol=0)
    assert walks == [tl, tl.core]
    assert _builtins_restored() and tl.core.is_builtin(tl.core.load)
