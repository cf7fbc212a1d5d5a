"""LM-head loss forward+backward, cross_entropy(x·Wᵀ, targets) for x [N, H], W [V, H]: triformer's fused linear +
cross-entropy against eager F.linear + F.cross_entropy(logits.float()) (as users write it), its torch.compile, and
Liger-Kernel's LigerFusedLinearCrossEntropyLoss (where installed).

Every provider gets the same bf16 x and W that require grad and int64 targets (no bias, as LM heads), and is timed
as loss then torch.autograd.grad(loss, (x, W)). triformer rows: the defaults (chunks of ≤ 1/8 of the logits, dW
in float32 precision by the vocabulary-slab pass), "dW in weight dtype" (accum_dtype=None: dW summed over the
chunks in itself, Liger's default), "Liger-size chunks" (Liger's chunk, ≈ N·H/V rows, with dW in the weight's
dtype: the same memory as Liger) and "Liger-size chunks, float32 dW" (Liger's chunk with the slab pass).
peak_extra_mib is the peak memory above the inputs during one forward+backward, the returned gradients included;
full_logits_mib is the size of the [N, V] logits in the input dtype beside it. TFLOP/s counts the three products,
6·N·H·V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import functional as F_tri
from ..kernels._runtime import cdiv, next_power_of_2
from .norms import COMPILE_CUDA_ONLY, peak_extra_mib
from .timing import timings

# Providers that cannot run inside a CUDA graph capture (they read values back to the host): GPU time from the
# profiler (kernel_ms).
UNCAPTURABLE = {"liger"}


def _torch_loss(x, w, targets):
    return F.cross_entropy(F.linear(x, w).float(), targets)


def liger_chunk_rows(n: int, h: int, v: int) -> int:
    """The chunk Liger-Kernel's fused linear cross-entropy takes: logits of about as many elements as x."""
    return min(n, next_power_of_2(cdiv(n, cdiv(v, h))))


def providers(device: str) -> dict:
    """name → loss(x, w, targets), or an exception saying why the provider cannot run here."""
    table: dict = {
        "triformer": lambda x, w, t: F_tri.linear_cross_entropy(x, w, t),
        "triformer (dW in weight dtype)": lambda x, w, t: F_tri.linear_cross_entropy(x, w, t, accum_dtype=None),
        "triformer (Liger-size chunks)": lambda x, w, t: F_tri.linear_cross_entropy(
            x, w, t, chunk_size=liger_chunk_rows(x.shape[0], x.shape[1], w.shape[0]), accum_dtype=None
        ),
        "triformer (Liger-size chunks, float32 dW)": lambda x, w, t: F_tri.linear_cross_entropy(
            x, w, t, chunk_size=liger_chunk_rows(x.shape[0], x.shape[1], w.shape[0])
        ),
        "torch": _torch_loss,
        "torch.compile": torch.compile(_torch_loss) if device == "cuda" else RuntimeError(COMPILE_CUDA_ONLY),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return table
    liger = LigerFusedLinearCrossEntropyLoss()
    table["liger"] = lambda x, w, t: liger(w, x, t)
    return table


def _row(shape, dtype, name, times, peak, error=""):
    n, h, v = shape
    tflop = 6 * n * h * v / 1e12
    return dict(
        op="linear_cross_entropy",
        shape="x".join(map(str, shape)),
        dtype=str(dtype).removeprefix("torch."),
        mode="fwd+bwd",
        provider=name,
        **times,
        rate=tflop / (times["ms"] * 1e-3),
        gpu_rate=tflop / (times["gpu_ms"] * 1e-3),
        unit="TFLOP/s",
        peak_extra_mib=peak,
        full_logits_mib=n * v * (torch.finfo(dtype).bits // 8) / 2**20,
        error=error,
    )


def run(shapes, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", progress: bool = True) -> list[dict]:
    """One row per (shape, provider) for shapes [(N, H, V), ...], mode "fwd+bwd": ms, TFLOP/s and peak extra memory
    in MiB. A provider that fails is reported (error), not hidden."""
    rows = []
    table = providers(device)
    work = [(tuple(shape), name) for shape in shapes for name in table]
    for (n, h, v), name in tqdm(work, desc="linear cross-entropy bench", disable=not progress):
        loss_fn = table[name]
        try:
            if isinstance(loss_fn, Exception):
                raise loss_fn
            x = torch.randn(n, h, device=device, dtype=dtype).requires_grad_()
            w = (torch.randn(v, h, device=device, dtype=dtype) * h**-0.5).requires_grad_()
            targets = torch.randint(0, v, (n,), device=device)

            def step():
                return torch.autograd.grad(loss_fn(x, w, targets), (x, w))

            times = timings(step, capture=name not in UNCAPTURABLE)
            peak = peak_extra_mib(step, device)
        except Exception as exc:  # e.g. torch.compile failing on this host: the row says why
            missing = {"ms": float("nan"), "gpu_ms": float("nan")}
            rows.append(_row((n, h, v), dtype, name, missing, float("nan"), f"{type(exc).__name__}: {exc}"[:200]))
            continue
        rows.append(_row((n, h, v), dtype, name, times, peak))
    return rows
