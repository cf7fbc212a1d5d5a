"""Linear(+bias+relu) benchmark: triformer fused and unfused against PyTorch's paths, forward and forward+backward.

Rates count 2·M·N·K flops for the forward and 3× that for forward+backward (dX and dW are products of the
same size). On a GPU: the pipeline's bench stage, or `python3 tools/gpu_kernels.py linear` for the tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import functional as F_tri
from .timing import timings


def _eager(x, w, b):
    return torch.relu(F.linear(x, w, b))


def _three_ops(x, w, b):
    return torch.relu(x @ w.t() + b)


def _addmm_activation(x, w, b):
    return torch._addmm_activation(b, x, w.t())


def providers(device: str) -> dict:
    """name → f(x, w, b) computing relu(x·wᵀ + b)."""
    table = {
        "triformer fused": lambda x, w, b: F_tri.linear(x, w, b, activation="relu", fused=True),
        "triformer unfused": lambda x, w, b: F_tri.linear(x, w, b, activation="relu", fused=False),
        "torch eager": _eager,
        "torch 3 ops": _three_ops,
    }
    if device == "cuda":
        table["torch addmm_activation"] = _addmm_activation
        table["torch.compile"] = torch.compile(_eager)
    return table


def _timed(fn, x, w, b, mode: str) -> dict:
    if mode == "fwd":
        with torch.no_grad():
            return timings(lambda: fn(x, w, b))
    dy = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    return timings(lambda: torch.autograd.grad(fn(*inputs), inputs, dy))


def run(
    shapes, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", progress: bool = True, modes=("fwd", "fwd+bwd")
) -> list[dict]:
    """One row per (shape, mode, provider) for shapes [(M, K, N), ...]: ms and TFLOP/s. A provider that fails is
    reported, not hidden."""
    rows = []
    table = providers(device)
    work = [(s, m, p) for s in shapes for m in modes for p in table]
    for (M, K, N), mode, name in tqdm(work, desc="linear bench", disable=not progress):
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = torch.randn(N, K, device=device, dtype=dtype) * K**-0.5
        b = torch.randn(N, device=device, dtype=dtype)
        row = dict(
            op="linear+relu",
            shape=f"{M}x{K}x{N}",
            dtype=str(dtype).removeprefix("torch."),
            mode=mode,
            provider=name,
            unit="TFLOP/s",
        )
        try:
            times = _timed(table[name], x, w, b, mode)
        except Exception as exc:  # e.g. no autograd formula for _addmm_activation
            rows.append(
                {
                    **row,
                    "ms": float("nan"),
                    "gpu_ms": float("nan"),
                    "rate": float("nan"),
                    "gpu_rate": float("nan"),
                    "error": f"{type(exc).__name__}: {exc}"[:200],
                }
            )
            continue
        tflop = 2 * M * N * K * (3 if mode == "fwd+bwd" else 1) / 1e12
        rows.append(
            {
                **row,
                **times,
                "rate": tflop / (times["ms"] * 1e-3),
                "gpu_rate": tflop / (times["gpu_ms"] * 1e-3),
                "error": "",
            }
        )
    return rows
