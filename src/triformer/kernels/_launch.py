"""Kernel launches: `launch(kernel, grid, *args, **meta)` does what `kernel[grid](*args, **meta)` does, with less
host work when the call repeats an earlier one's specialization.

Triton's JITFunction.run, on every call: reads its knobs, binds the arguments to the kernel's signature and
specializes each one, formats the options into a cache-key string, looks the compiled kernel up, checks the
globals the kernel read, builds launch metadata, then calls the compiled kernel's launcher. Here a call is keyed
by the kernel, the current device, a cheap key per positional argument that separates every pair of values
Triton would specialize differently (see arg_key) and the keyword values; the first call of a key goes through
Triton (compiling when needed) and records the compiled kernel it got back and the full argument list (keyword
and default values, which the key fixes); a repeated key calls that kernel's launcher directly.

Switches (environment, read at import): TRIFORMER_FAST_LAUNCH=1 (the default) turns the fast path on; 0 sends every
call through Triton;
TRIFORMER_FAST_LAUNCH=check sends every call through Triton and asserts that Triton chose the recorded compiled
kernel and bound the recorded arguments (the GPU suite's check of the keys). Whatever else Triton reads per call
sends calls through Triton while it is set: a launch hook (enter or exit, e.g. a profiler's), Triton's debug or
instrumentation knobs, a stages-inspection hook, a pre-run hook of the kernel. Under Triton's interpreter every call
goes through Triton. Not repeated on the fast path: Triton's check that no global constexpr the kernel read has
been rebound since it compiled (the kernels' globals are constants).

Call sites pass runtime arguments positionally and constexprs and launch options by keyword: a call with a
constexpr passed positionally, or a runtime argument by keyword, is never recorded (always through Triton).
"""

from __future__ import annotations

import os
import sys

import torch
from triton import knobs
from triton.knobs import HookChain
from triton.runtime.jit import JITFunction

from ._runtime import interpreter_active, overridden

_MODE = os.environ.get("TRIFORMER_FAST_LAUNCH", "1")
if _MODE not in ("0", "1", "check"):
    raise ValueError(f"TRIFORMER_FAST_LAUNCH must be 0, 1 or check, got {_MODE!r}")
FAST = _MODE != "0"  # check records calls too (it needs a record to check against)
CHECK = _MODE == "check"

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_I32_MIN, _I32_MAX, _I64_MAX = -(2**31), 2**31 - 1, 2**63 - 1

# A positional argument of a kind arg_key does not know: the call is not recorded.
UNKEYED = object()


def arg_key(a):
    """A hashable key of one positional argument such that two values with equal keys get the same Triton
    specialization: a tensor's dtype and 16-byte alignment; an int's being 1, divisibility by 16 and width
    (i32 / i64 / u64); a bool, float or None by its kind; a TMA descriptor's dtype, block, layout and padding.
    UNKEYED for any other kind."""
    kind = type(a)
    if kind is _Tensor or kind is _Parameter:  # before isinstance: Tensor's isinstance is slow for the ints
        return a.dtype, not a.data_ptr() & 15
    if kind is int:
        if a == 1:
            return 1
        return (not a & 15), 32 if _I32_MIN <= a <= _I32_MAX else 64 if a <= _I64_MAX else 65
    if kind is bool or kind is float or a is None:
        return kind
    if isinstance(a, _Tensor):
        return a.dtype, not a.data_ptr() & 15
    if hasattr(a, "block_shape") and isinstance(getattr(a, "base", None), _Tensor):  # host TMA descriptors
        layout = getattr(a, "layout", None)
        try:
            hash(layout)
        except TypeError:
            return UNKEYED
        return (
            kind,
            a.base.dtype,
            tuple(a.block_shape),
            layout,
            getattr(a, "padding", None),
            getattr(a, "round_f32_to_tf32", None),
        )
    return UNKEYED


class _Recorded:
    """What a key's first call recorded: the compiled kernel, its launcher and the arguments after the positional
    ones (keyword and default values, in the kernel's parameter order)."""

    __slots__ = ("kernel", "compiled", "run", "function", "packed_metadata", "tail")

    def __init__(self, kernel, compiled, tail: tuple):
        self.kernel, self.compiled, self.tail = kernel, compiled, tail  # kernel alive: its id stays its own
        self.run, self.function, self.packed_metadata = compiled.run, compiled.function, compiled.packed_metadata


# Recorded calls by key; None for a key whose calls cannot be recorded (see _record). At most MAX_RECORDS keys:
# later new keys go through Triton.
_RECORDED: dict[tuple, _Recorded | None] = {}
MAX_RECORDS = 4096

# Calls that took the fast path (tests and the host bench read it to know the path was active).
fast_launches = 0


def recorded_calls() -> dict:
    """The recorded calls by key (tests and tools read it)."""
    return _RECORDED


def fresh_records():
    """Within the block no call is recorded yet (each key's first call goes through Triton again); the earlier
    records come back on exit."""
    return overridden(sys.modules[__name__], _RECORDED={})


def _hook_set(hook) -> bool:
    """Triton's default hook is an empty HookChain; a profiler adds to it or replaces it."""
    return hook is not None and (type(hook) is not HookChain or bool(hook.calls))


def launch_hooked() -> bool:
    """Whether a launch hook (enter or exit) is set."""
    runtime = knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def through_triton(kernel) -> bool:
    """Whether this call must go through Triton: the interpreter, or state Triton reads per call that the key does
    not hold (launch hooks, debug and instrumentation knobs, a stages-inspection hook, the kernel's pre-run hooks)."""
    runtime = knobs.runtime
    return (
        not isinstance(kernel, JITFunction)  # Triton's interpreter runs InterpretedFunctions
        or interpreter_active()
        or launch_hooked()
        or bool(runtime.debug)
        or bool(knobs.compilation.instrumentation_mode)
        or getattr(runtime, "add_stages_inspection_hook", None) is not None
        or bool(kernel.pre_run_hooks)
    )


def launch(kernel: JITFunction, grid: tuple, *args, **meta):
    """kernel[grid](*args, **meta) (grid a tuple of 1 to 3 ints): a repeated specialization goes straight to the
    compiled kernel's launcher (see the module doc)."""
    global fast_launches
    if not FAST or through_triton(kernel):
        return kernel[grid](*args, **meta)
    device = torch.cuda.current_device()
    key = [id(kernel), device]  # JITFunction.__hash__ takes a lock and a property per call; the record holds kernel
    for a in args:
        k = arg_key(a)
        if k is UNKEYED:
            return kernel[grid](*args, **meta)
        key.append(k)
    key.extend(meta.items())
    key.append(tuple(map(type, meta.values())))  # True, 1 and 1.0 are equal keys but different Triton kernels
    key = tuple(key)
    record = _RECORDED.get(key, UNKEYED)
    if record is None:
        return kernel[grid](*args, **meta)
    if record is UNKEYED:
        compiled = kernel[grid](*args, **meta)
        if len(_RECORDED) < MAX_RECORDS:
            _RECORDED[key] = _record(kernel, compiled, len(args), meta)
        return compiled
    if CHECK:
        return _checked(kernel, grid, args, meta, record)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    record.run(grid[0], g1, g2, stream, record.function, record.packed_metadata, None, None, None, *args, *record.tail)
    fast_launches += 1
    return record.compiled


def _record(kernel: JITFunction, compiled, n_positional: int, meta: dict) -> _Recorded | None:
    """The record of a call with n_positional positional arguments and keyword arguments meta; None when a
    positional argument is a constexpr (the key holds only its kind; Triton specializes on its value) or a keyword
    argument a runtime parameter (its value would be fixed in the record)."""
    if compiled is None or any(param.is_constexpr for param in kernel.params[:n_positional]):
        return None
    tail = []
    for param in kernel.params[n_positional:]:
        if param.name in meta:
            if not param.is_constexpr:
                return None
            tail.append(meta[param.name])
        elif param.has_default:
            tail.append(param.default)
        else:
            return None
    return _Recorded(kernel, compiled, tuple(tail))


def _checked(kernel: JITFunction, grid: tuple, args: tuple, meta: dict, record: _Recorded):
    """The call through Triton, asserting that Triton picked the recorded kernel and bound the recorded arguments."""
    compiled = kernel[grid](*args, **meta)
    if compiled is not record.compiled:
        raise AssertionError(f"fast launch of {kernel.fn.__name__}: Triton chose another compiled kernel")
    bound = list(_bound(kernel, args, meta))
    recorded = [*args, *record.tail]
    if len(bound) != len(recorded) or not all(map(_same, bound, recorded)):
        raise AssertionError(f"fast launch of {kernel.fn.__name__}: arguments {recorded} but Triton bound {bound}")
    return compiled


def _same(a, b) -> bool:
    return a is b or not (isinstance(a, _Tensor) or isinstance(b, _Tensor)) and type(a) is type(b) and a == b


def _bound(kernel: JITFunction, args: tuple, meta: dict):
    """The argument values Triton's binder gives the launcher for this call."""
    params = kernel.signature.bind(*args, **{k: v for k, v in meta.items() if k in kernel.signature.parameters})
    params.apply_defaults()
    return params.arguments.values()
