"""How triformer's ops are registered with torch.library, and how a call reaches one.

Every op is a `torch.library.custom_op` named `triformer::<name>` with a fake implementation (the outputs' shapes,
dtypes and strides, for torch.compile, torch.export and FakeTensor tracing) and, when it is differentiable, its
autograd formula (`register_autograd`: a setup_context that saves what the backward needs, and a backward that
calls the backward ops). torch.compile takes each op whole: no graph break, the Triton launches inside it stay
opaque to Inductor (the launchers choose their tiles at run time, by a tuner keyed on the problem, and some
build TMA descriptors or launch Gluon kernels, which `triton_op`'s traced implementation cannot hold).

An eager call does not go through the dispatcher: `Op.__call__` runs the same implementation, setup_context and
backward through an autograd.Function made here from them (the dispatcher's own autograd wrapper is the same
Function, reached through three more crossings between Python and C++ per call).
The dispatcher is taken whenever something may watch or trace the call: torch.compile / export tracing, an active
dispatch mode (FakeTensorMode, FlopCounterMode, the modes of torch.library.opcheck) or a tensor subclass argument.
`through_dispatcher()` makes every call take it (tests and the host-cost profile compare the two paths).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Sequence

import torch

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


class _State(threading.local):
    dispatcher = False  # through_dispatcher() is active


_state = _State()

# Every registered op by name (torch.ops.triformer.<name>).
OPS: dict[str, Op] = {}


@contextlib.contextmanager
def through_dispatcher():
    """Within the block, every triformer op is called through torch.ops.triformer (the dispatcher) in eager mode
    too."""
    previous = _state.dispatcher
    _state.dispatcher = True
    try:
        yield
    finally:
        _state.dispatcher = previous


def _subclass(args: Sequence) -> bool:
    for a in args:
        kind = type(a)
        if kind is not _Tensor and kind is not _Parameter and isinstance(a, _Tensor):
            return True
    return False


def plain_eager(args: Sequence) -> bool:
    """Whether a call with these arguments runs in plain eager mode: no torch.compile / export tracing, no dispatch
    mode, no tensor subclass argument."""
    return not (_is_compiling() or _dispatch_modes() or _subclass(args))


def traced(args: Sequence) -> bool:
    """Whether a call with these arguments must go through the dispatcher (see the module doc)."""
    return _is_compiling() or _state.dispatcher or _dispatch_modes() or _subclass(args)


def _any_requires_grad(args: Sequence) -> bool:
    for a in args:
        if isinstance(a, _Tensor) and a.requires_grad:
            return True
    return False


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor in an output slot the op leaves unused (an op returns a fixed number of tensors, none of them
    the same as another)."""
    return like.new_empty((0,))


def or_placeholder(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """t, or a placeholder where it is None."""
    return placeholder(like) if t is None else t


class Op:
    """A registered triformer op (see the module doc); call it like its implementation, every argument
    positional."""

    def __init__(
        self,
        name: str,
        impl: Callable,
        fake: Callable,
        *,
        mutates_args: Sequence[str] = (),
        setup_context: Callable | None = None,
        backward: Callable | None = None,
    ):
        self.name, self.impl = name, impl
        OPS[name] = self
        custom = torch.library.custom_op(f"triformer::{name}", impl, mutates_args=tuple(mutates_args))
        custom.register_fake(fake)
        if backward is not None:
            custom.register_autograd(backward, setup_context=setup_context)
        self.custom = custom
        self.overload = getattr(torch.ops.triformer, name).default
        parameters = list(inspect.signature(impl).parameters)
        self._mutated = tuple(parameters.index(arg) for arg in mutates_args)
        self._function = None
        if backward is not None:

            def forward(ctx, *args):
                output = impl(*args)
                setup_context(ctx, args, output)
                return output

            self._function = type(
                f"{name}_eager",
                (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)},
            )

    def __call__(self, *args):
        if traced(args):
            return self.overload(*args)
        if self._function is not None and torch.is_grad_enabled() and _any_requires_grad(args):
            return self._function.apply(*args)
        output = self.impl(*args)
        for i in self._mutated:
            torch.autograd.graph.increment_version(args[i])
        return output

    def __repr__(self) -> str:
        return f"triformer op {self.name}"
