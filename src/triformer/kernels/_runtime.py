"""What every launcher needs: interpreter detection, input validation and output allocation."""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# True: every freshly allocated output is filled with NaN, so that unwritten elements show. Set by poisoned_outputs().
POISON_OUTPUTS = False


@contextlib.contextmanager
def overridden(module, **values):
    """Within the block, the named attributes of `module` (its switches) hold `values`; on exit, exceptions included,
    each gets back the value it had. Every switch of the kernel modules is set through this, never assigned."""
    saved = {name: getattr(module, name) for name in values}  # AttributeError for a name the module lacks
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def poisoned_outputs():
    """Within the block every output new_empty allocates starts as NaN (tests: an unwritten element fails)."""
    return overridden(sys.modules[__name__], POISON_OUTPUTS=True)


def assume_interpreter(active: bool):
    """Within the block interpreter_active() answers `active` (tests: what a CPU tensor is told without the
    interpreter, or the GPU's launch shapes computed on the CPU)."""
    return overridden(sys.modules[__name__], _INTERPRETER=bool(active))


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host-side grid arithmetic. (triton.cdiv is a constexpr function whose host call unwraps its
    arguments, several times per launch.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1), host side, for the same reason as cdiv."""
    return 1 << max(n - 1, 0).bit_length()


# Triton decides when a kernel is defined (at import) whether it runs through the interpreter, so this is read
# once; tests that need the other answer use assume_interpreter().
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if _INTERPRETER:
    from . import _interpreter

    _interpreter.install()


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETER


@functools.cache
def device_properties(device: torch.device):
    """torch.cuda.get_device_properties, asked once per device (SM count, compute capability)."""
    return torch.cuda.get_device_properties(device)


BF16_NEEDS_GPU = (
    "bf16 needs a GPU: Triton's interpreter computes bfloat16 on the raw bits (numpy has no bf16) and "
    'returns garbage; on the CPU use float32 or float16 (torch.autocast("cpu", dtype=torch.bfloat16) '
    "makes bf16 too)"
)


def check_tensor(t: torch.Tensor, name: str) -> None:
    """Raise a clear error for a tensor no kernel of ours can take (every functional op checks its tensors here)."""
    if not _INTERPRETER and isinstance(t, torch.Tensor) and t.is_cuda and t.dtype in FLOAT_DTYPES:
        return  # the common case, in the fewest attribute reads
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; triformer kernels take float32, float16 or bfloat16")
    if t.dtype == torch.bfloat16 and interpreter_active():
        raise TypeError(f"{name} is bfloat16 under Triton's interpreter (TRITON_INTERPRET=1): {BF16_NEEDS_GPU}")
    if t.is_meta:
        raise ValueError(
            f"{name} is a meta tensor (shape and dtype, no data): triformer kernels compute on real "
            "tensors, on a CUDA GPU or on the CPU through Triton's interpreter"
        )
    if not t.is_cuda and not interpreter_active():
        raise ValueError(
            f"{name} is on {t.device}: triformer kernels run on a CUDA GPU, or on the CPU through "
            "Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
        )


def check_same_dtype(reference: torch.Tensor, ref_name: str, other: torch.Tensor, other_name: str) -> None:
    if other.dtype != reference.dtype:
        raise TypeError(f"{other_name} has dtype {other.dtype} but {ref_name} has {reference.dtype}; they must match")
    if other.device != reference.device:
        raise ValueError(f"{other_name} is on {other.device} but {ref_name} is on {reference.device}")


def new_empty(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.empty for kernel outputs; NaN-filled while tests poison outputs."""
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out
