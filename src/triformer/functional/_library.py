"""How triformer's ops are registered with torch.library, and how a call reaches one.

Every op is defined in the `triformer` library (`torch.ops.triformer.<name>`, its schema inferred from the
implementation's annotations) with its implementation as the CPU and CUDA kernel, a fake implementation (the
outputs' shapes, dtypes and strides, for torch.compile, torch.export and FakeTensor tracing) and, when it is
differentiable, an autograd kernel: an autograd.Function made from the op's setup_context (what the backward needs)
and backward (which calls the backward ops). torch.compile takes each op whole: no graph break, the Triton launches
inside it stay opaque to Inductor (the launchers choose their tiles at run time, by a tuner keyed on the problem,
and some build TMA descriptors or launch Gluon kernels, which `triton_op`'s traced implementation cannot hold).

An eager call does not go through the dispatcher: `Op.__call__` runs the implementation, or the same Function.
The dispatcher is taken whenever something may watch or trace the call: torch.compile / export tracing, an active
dispatch mode (FakeTensorMode, FlopCounterMode, the modes of torch.library.opcheck) or a tensor subclass argument.
A dispatcher call in plain eager mode that wants no gradient (a compiled graph's call) runs the implementation
straight from the autograd kernel: one crossing between C++ and Python, where torch.library.custom_op's wrappers
take three more.
`through_dispatcher()` makes every call take the dispatcher (tests and the host-cost profile compare the two paths).
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


def _unusual_tensor(args: Sequence, meta: bool = False) -> bool:
    """Whether an argument is a tensor subclass (or, with meta, a meta tensor)."""
    for a in args:
        kind = type(a)
        if kind is _Tensor or kind is _Parameter:
            if meta and a.is_meta:
                return True
        elif isinstance(a, _Tensor):
            return True
    return False


def plain_eager(args: Sequence) -> bool:
    """Whether a call with these arguments runs in plain eager mode: no torch.compile / export tracing, no dispatch
    mode, no tensor subclass argument."""
    return not (_is_compiling() or _dispatch_modes() or _unusual_tensor(args))


def traced(args: Sequence) -> bool:
    """Whether a call with these arguments must go through the dispatcher (see the module doc)."""
    return _is_compiling() or _state.dispatcher or _dispatch_modes() or _unusual_tensor(args)


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


def _direct(args: Sequence) -> bool:
    """Whether a dispatcher call with these arguments may run the implementation itself: plain eager mode and no
    meta tensor (those go on to the fake implementation)."""
    return not (_is_compiling() or _dispatch_modes() or _unusual_tensor(args, meta=True))


# Each op's library fragment by name, kept through a reload of this module (a reload defines the ops again, in place
# of the fragments before).
_FRAGMENTS: dict[str, torch.library.Library] = globals().get("_FRAGMENTS", {})


def _fragment(name: str) -> torch.library.Library:
    """A new library fragment to define op `name` in, the op's earlier definition (a module reload) removed."""
    old = _FRAGMENTS.pop(name, None)
    if old is not None:
        old._destroy()
    _FRAGMENTS[name] = torch.library.Library("triformer", "FRAGMENT")
    return _FRAGMENTS[name]


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
        library = _fragment(name)
        schema = torch.library.infer_schema(impl, mutates_args=tuple(mutates_args))
        library.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
        for backend in ("CPU", "CUDA"):
            library.impl(name, impl, backend)
        torch.library.register_fake(f"triformer::{name}", fake, lib=library)
        self.overload = overload = getattr(torch.ops.triformer, name).default
        parameters = list(inspect.signature(impl).parameters)
        self._mutated = tuple(parameters.index(arg) for arg in mutates_args)
        if self._mutated:
            library.impl(name, self._inplace_kernel, "ADInplaceOrView", with_keyset=True)
        run = self._run

        def forward(ctx, *args):
            output = run(*args) if _direct(args) else overload(*args)
            if backward is not None:
                setup_context(ctx, args, output)
            return output

        def no_backward(ctx, *grads):
            raise RuntimeError(f"triformer::{name} has no gradient formula: it is a backward op (no double backward)")

        self._function = type(
            f"{name}_autograd",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward or no_backward)},
        )
        library.impl(name, self._autograd_kernel, "Autograd")

    def _bump_versions(self, args) -> None:
        """Bump the versions of the tensors the op mutates, as an in-place torch op does."""
        for i in self._mutated:
            if args[i] is not None:  # an optional tensor left out
                torch.autograd.graph.increment_version(args[i])

    def _run(self, *args):
        """The implementation, the versions of the tensors it mutates bumped."""
        output = self.impl(*args)
        self._bump_versions(args)
        return output

    def _inplace_kernel(self, keyset, *args):
        """The op's ADInplaceOrView kernel (ops that mutate an argument): bump the mutated tensors' versions, then on
        to the backend."""
        self._bump_versions(args)
        return self.overload.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)

    def _autograd_kernel(self, *args):
        """The op's kernel for the dispatcher's autograd key: the op's Function when a gradient is wanted; otherwise
        the implementation itself in plain eager mode (a compiled graph's call), or the op again below autograd."""
        if torch.is_grad_enabled() and _any_requires_grad(args):
            return self._differentiated(args)
        if _direct(args):
            return self._run(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return self.overload(*args)

    def __call__(self, *args):
        if traced(args):
            return self.overload(*args)
        if torch.is_grad_enabled() and _any_requires_grad(args):
            return self._differentiated(args)
        return self._run(*args)

    def _differentiated(self, args):
        """The op through its Function, for a call that wants a gradient; an op that writes into an argument that
        requires a gradient raises (it has no gradient formula to account for the write)."""
        for i in self._mutated:
            if args[i].requires_grad:
                raise RuntimeError(
                    f"triformer::{self.name} writes into its argument {i} in place, which requires a gradient; "
                    "it has no gradient formula (it is a backward op): call it on a tensor that does not require "
                    "a gradient, or under torch.no_grad()"
                )
        return self._function.apply(*args)

    def __repr__(self) -> str:
        return f"triformer op {self.name}"
