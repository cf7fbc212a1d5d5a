"""Attention benchmark: triformer's flash kernels against F.scaled_dot_product_attention with its FLASH and cuDNN
backends (torch.nn.attention.sdpa_kernel), and SDPA's eager MATH backend on short sequences; forward and
forward+backward.

Shapes are [B, H, S, D, causal] (q, k and v [B, H, S, D], bf16 in the pipeline). Rates count the forward as
4·B·H·S²·D flops (two products of S×S×D per head), halved when causal, and forward+backward as 3.5× the forward
(the backward's five products of the same size: 2.5×), whatever each provider actually executes. Forward runs under
torch.no_grad(); forward+backward is torch.autograd.grad of the output against q, k and v.
The bench stage (experiments/bench.py) runs it as suite `attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import functional as F_tri
from .norms import failure_row, mode_call, peak_extra_mib
from .timing import timings

# The MATH backend writes the B·H·S² scores (and their softmax) to memory: beyond this length it needs GBs.
MATH_MAX_SEQ = 2048
CUDA_ONLY = "SDPA's FLASH and cuDNN backends run on CUDA only"


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def providers(device: str) -> dict:
    """name → attention(q, k, v, causal), or an exception saying why the provider cannot run here."""
    from torch.nn.attention import SDPBackend

    table: dict = {
        "triformer": lambda q, k, v, causal: F_tri.attention(q, k, v, causal=causal),
        "sdpa flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
        "torch math": _sdpa(SDPBackend.MATH),
    }
    if device != "cuda":
        table["sdpa flash"] = table["sdpa cudnn"] = RuntimeError(CUDA_ONLY)
    return table


def flops(b: int, h: int, s: int, d: int, causal: bool, mode: str) -> float:
    forward = 4 * b * h * s * s * d / (2 if causal else 1)
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def _row(shape, dtype, mode, name, times, tflop, peak=float("nan")) -> dict:
    b, h, s, d, causal = shape
    return dict(
        op="attention",
        shape=f"{b}x{h}x{s}x{d}" + (" causal" if causal else ""),
        dtype=str(dtype).removeprefix("torch."),
        mode=mode,
        provider=name,
        unit="TFLOP/s",
        **times,
        rate=tflop / (times["ms"] * 1e-3),
        gpu_rate=tflop / (times["gpu_ms"] * 1e-3),
        peak_extra_mib=peak,
        error="",
    )


def run(
    shapes, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", progress: bool = True, modes=("fwd", "fwd+bwd")
) -> list[dict]:
    """One row per (shape, mode, provider) for shapes [(B, H, S, D, causal), ...]: ms, TFLOP/s and (CUDA) the peak
    memory one call adds, in MiB. A provider that fails is reported (error), not hidden; the MATH backend only up
    to MATH_MAX_SEQ tokens."""
    rows = []
    table = providers(device)
    work = [
        (tuple(shape), mode, name)
        for shape in shapes
        for mode in modes
        for name in table
        if name != "torch math" or shape[2] <= MATH_MAX_SEQ
    ]
    for shape, mode, name in tqdm(work, desc="attention bench", disable=not progress):
        b, h, s, d, causal = shape
        text = (f"{b}x{h}x{s}x{d}" + (" causal" if causal else ""),)
        try:
            fn = table[name]
            if isinstance(fn, Exception):
                raise fn
            q, k, v = (
                torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=mode != "fwd") for _ in range(3)
            )
            dy = torch.randn(b, h, s, d, device=device, dtype=dtype)
            call = mode_call(lambda q=q, k=k, v=v: fn(q, k, v, bool(causal)), [q, k, v], dy, mode)
            times = timings(call)
            peak = peak_extra_mib(call, device)
        except Exception as exc:  # e.g. a backend that does not take this shape on this GPU: the row says why
            rows.append(failure_row("attention", text, dtype, mode, name, exc) | {"unit": "TFLOP/s"})
            continue
        rows.append(_row(shape, dtype, mode, name, times, flops(b, h, s, d, bool(causal), mode) / 1e12, peak))
    return rows
