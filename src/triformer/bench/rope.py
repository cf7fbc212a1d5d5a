"""Rotary position embedding, forward and forward+backward: triformer (out of place, and in place) against torch
eager (Hugging Face's x·cos + rotate_half(x)·sin, triformer.nn.rope.torch_rope), its torch.compile, and
Liger-Kernel's LigerRopeFunction (where installed).

Shapes [B, H, S, D] (q and k with H heads each). Every provider gets q and k as a model has them: transposed views
[B, H, S, D] of [B, S, H, D] projection outputs (non-leaf tensors of a fresh history each call, made without a copy),
which Liger and triformer in place rotate where they are (each call rotates the same storage again) and triformer
out of place reads through their strides into new tensors; the gradients come in the same layout
(torch.randn_like), and the in-place providers rotate those where they are too.
triformer and torch read float32 tables [S, D/2], Liger float32 tables [1, S, D] (its format). GB/s counts q and k
read and q_rot, k_rot written once (forward+backward: also dq_rot, dk_rot read and dq, dk written) plus the two
float32 half tables once per pass, the same bytes for every provider; peak_extra_mib is the peak memory above the
inputs during one call, its outputs included.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .. import functional as F_tri
from ..nn.rope import torch_rope
from .norms import COMPILE_CUDA_ONLY, mode_call
from .side_by_side import time_providers


def _liger_rope():
    """Liger-Kernel's rope autograd function, or None when liger-kernel is not installed."""
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        return None
    return LigerRopeFunction


class _ProjectionOutput(torch.autograd.Function):
    """x's storage as a non-leaf tensor with a history of its own, as a projection's output is (no copy): what an
    in-place rotation may write into, every call anew."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _rope_in_place(q, k, cos, sin):
    """In place, the incoming gradients too (as Liger's: the bench hands each provider gradients of its own)."""
    return F_tri.rope(q, k, cos, sin, inplace=True, inplace_grad=True)


def providers(device: str) -> dict:
    """name → f(q, k, cos, sin) → (q_rot, k_rot), with cos, sin float32 [S, D/2]; an exception where the provider
    cannot run here."""
    table: dict = {
        "triformer": F_tri.rope,
        "triformer (in place)": _rope_in_place,
        "torch": torch_rope,
        "torch.compile": torch.compile(torch_rope) if device == "cuda" else RuntimeError(COMPILE_CUDA_ONLY),
    }
    liger = _liger_rope()
    if liger is not None:

        def liger_rope(q, k, cos, sin):
            full_cos, full_sin = (t.repeat(1, 2)[None] for t in (cos, sin))  # [1, S, D], its table format
            return liger.apply(q, k, full_cos, full_sin)[:2]

        table["liger"] = liger_rope
    return table


def _setup(fn, shape, dtype, device, mode):
    def setup():
        if isinstance(fn, Exception):
            raise fn
        b, h, s, d = shape
        q, k = (torch.randn(b, s, h, d, device=device, dtype=dtype).transpose(1, 2) for _ in range(2))
        cos, sin = F_tri.rope_tables(d, s, device=device)
        inputs = [q.requires_grad_(mode != "fwd"), k.requires_grad_(mode != "fwd")]
        grads = [torch.randn_like(q), torch.randn_like(k)]
        call = mode_call(
            lambda: fn(_ProjectionOutput.apply(q), _ProjectionOutput.apply(k), cos, sin), inputs, grads, mode
        )
        passes = 1 if mode == "fwd" else 2
        nbytes = passes * (4 * q.numel() * q.element_size() + 2 * cos.numel() * cos.element_size())
        return call, nbytes

    return setup


def run(
    shapes,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    progress: bool = True,
    modes=("fwd", "fwd+bwd"),
    rounds: int = 3,
    names=None,
) -> list[dict]:
    """One row per (shape, mode, provider) for shapes [(B, H, S, D), ...]: ms, GPU ms, GB/s and peak extra MiB. A
    provider that fails is reported (error), not hidden; Liger rows are absent when liger-kernel is not installed.
    names: only these providers."""
    table = {name: fn for name, fn in providers(device).items() if names is None or name in names}
    rows = []
    cases = [(tuple(shape), mode) for shape in shapes for mode in modes]
    for shape, mode in tqdm(cases, desc="rope bench", disable=not progress):
        setups = {name: _setup(fn, shape, dtype, device, mode) for name, fn in table.items()}
        rows += time_providers("rope", shape, dtype, mode, setups, device, rounds)
    return rows
