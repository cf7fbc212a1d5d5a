"""Cross-entropy forward+backward over a large vocabulary: triformer against F.cross_entropy(logits.float()) (as
users write it), its torch.compile, and Liger-Kernel's LigerCrossEntropyLoss (where installed).

Every provider gets the same bf16 leaf logits [N, V] that require grad and int64 targets, and is timed as
loss then torch.autograd.grad(loss, logits). triformer runs with inplace_grad=True, as Liger always does: both
write the gradient into the logits' storage; the "triformer (grad buffer)" row is triformer's default, which keeps
the logits (inplace_grad=False). peak_extra_mib is the
peak memory above the inputs during one forward+backward, the returned gradient included. GB/s counts the
logits read once, the gradient written once and the targets read once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import functional as F_tri
from .norms import COMPILE_CUDA_ONLY, failure_row, peak_extra_mib, result_row
from .timing import timings

# Providers that cannot run inside a CUDA graph capture (their GPU time is the profiler's sum of their kernels).
UNCAPTURABLE = {"liger"}


def _torch_loss(logits, targets):
    return F.cross_entropy(logits.float(), targets)


def providers(device: str) -> dict:
    """name → loss(logits, targets), or an exception saying why the provider cannot run here."""
    table: dict = {
        "triformer": lambda logits, targets: F_tri.cross_entropy(logits, targets, inplace_grad=True),
        "triformer (grad buffer)": lambda logits, targets: F_tri.cross_entropy(logits, targets, inplace_grad=False),
        "torch": _torch_loss,
        "torch.compile": torch.compile(_torch_loss) if device == "cuda" else RuntimeError(COMPILE_CUDA_ONLY),
    }
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return table
    table["liger"] = LigerCrossEntropyLoss()
    return table


def run(sizes, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", progress: bool = True) -> list[dict]:
    """One row per (size, provider) for sizes [(N, V), ...], mode "fwd+bwd": ms, GB/s and peak extra memory in
    MiB."""
    rows = []
    table = providers(device)
    work = [(tuple(size), name) for size in sizes for name in table]
    for (n, v), name in tqdm(work, desc="cross-entropy bench", disable=not progress):
        loss_fn = table[name]
        try:
            if isinstance(loss_fn, Exception):
                raise loss_fn
            logits = torch.randn(n, v, device=device, dtype=dtype).requires_grad_()
            targets = torch.randint(0, v, (n,), device=device)

            def step():
                grad = torch.autograd.grad(loss_fn(logits, targets), logits)
                # In-place providers leave a gradient in the logits; mark them rewritten (as the next forward of a
                # model would) so triformer's guard against reading a gradient as logits lets the loop reuse them.
                torch.autograd.graph.increment_version(logits)
                return grad

            # Liger-Kernel's cross-entropy reads a value back to the host, which a CUDA graph capture forbids, and
            # a failed capture spoils the process's RNG state for every later row: its GPU time is the profiler's
            # (kernel_ms).
            times = timings(step, capture=name not in UNCAPTURABLE)
            peak = peak_extra_mib(step, device)
        except Exception as exc:  # e.g. torch.compile failing on this host: the row says why
            rows.append(failure_row("cross_entropy", (n, v), dtype, "fwd+bwd", name, exc))
            continue
        nbytes = 2 * n * v * logits.element_size() + targets.numel() * targets.element_size()
        rows.append(result_row("cross_entropy", (n, v), dtype, "fwd+bwd", name, times, nbytes, peak))
    return rows
