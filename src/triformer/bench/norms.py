"""Memory-bound row ops: LayerNorm, RMSNorm, softmax, dropout and a residual add with dropout followed by LayerNorm
(add_dropout_norm: (s, y) = (x + dropout(h), layer_norm(s)), triformer's one op against torch's three), forward and
forward+backward, triformer against torch eager, torch.compile and Liger-Kernel (where installed and where it has
the op).

Rates in GB/s count each input read once and each output written once: forward x and y (plus the parameters),
forward+backward also dy and dx (plus the parameter gradients); add_dropout_norm twice that (h and s, their
gradients). Forward runs under torch.no_grad();
forward+backward is torch.autograd.grad of the output against x and the parameters (no .grad accumulation).
The providers of one case are timed side by side: do_bench once each, the GPU time as the median of `rounds`
rounds that time every provider in turn (ratios between kernels that share one bandwidth ceiling are then not
decided by the drift between two measurements).
The bench stage (experiments/bench.py) runs it as suite `norms`; cross_entropy.py has the loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from .. import functional as F_tri
from .. import nn as tnn
from .timing import interleaved_gpu_ms, median_ms

OPS = ("layer_norm", "rms_norm", "softmax", "dropout", "add_dropout_norm")
TWO_INPUTS = ("add_dropout_norm",)  # module(x, h) → (s, y)
PROVIDERS = ("triformer", "torch", "torch.compile", "liger")
COMPILE_CUDA_ONLY = "torch.compile provider runs on CUDA only (CPU inductor compile time would swamp the run)"


def _liger_modules() -> dict:
    """Liger-Kernel's modules by op, empty when liger-kernel is not installed."""
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    except ImportError:
        return {}
    found = {"layer_norm": lambda n: LigerLayerNorm(n), "rms_norm": lambda n: LigerRMSNorm(n, eps=1e-6)}
    try:
        from liger_kernel.transformers import LigerSoftmax
    except ImportError:
        return found
    found["softmax"] = lambda n: LigerSoftmax()
    return found


class _AddDropoutNorm(nn.Module):
    """(s, y) = (x + dropout(h, 0.1), layer_norm(s)): triformer's add_dropout_norm op with a TritonLayerNorm's
    parameters, or torch's dropout, add and nn.LayerNorm."""

    def __init__(self, n: int, triformer: bool):
        super().__init__()
        self.norm = tnn.TritonLayerNorm(n) if triformer else nn.LayerNorm(n)
        self.triformer = triformer

    def forward(self, x: torch.Tensor, h: torch.Tensor):
        if self.triformer:
            return F_tri.add_dropout_norm(
                x, h, 0.1, self.norm.weight, self.norm.bias, self.norm.eps, "layernorm", self.training
            )
        s = x + nn.functional.dropout(h, 0.1, self.training)
        return s, self.norm(s)


def _torch_module(op: str, n: int) -> nn.Module:
    return {
        "layer_norm": lambda: nn.LayerNorm(n),
        "rms_norm": lambda: nn.RMSNorm(n, eps=1e-6),
        "softmax": lambda: nn.Softmax(dim=-1),
        "dropout": lambda: nn.Dropout(0.1),
        "add_dropout_norm": lambda: _AddDropoutNorm(n, triformer=False),
    }[op]()


def _triformer_module(op: str, n: int) -> nn.Module:
    return {
        "layer_norm": lambda: tnn.TritonLayerNorm(n),
        "rms_norm": lambda: tnn.TritonRMSNorm(n),
        "softmax": lambda: tnn.TritonSoftmax(),
        "dropout": lambda: tnn.TritonDropout(0.1),
        "add_dropout_norm": lambda: _AddDropoutNorm(n, triformer=True),
    }[op]()


def make_module(op: str, provider: str, n: int, device: str, dtype: torch.dtype):
    """The provider's module for op over rows of n (in training mode), or None where the provider lacks the op."""
    if provider == "triformer":
        module = _triformer_module(op, n)
    elif provider == "liger":
        factory = _liger_modules().get(op)
        if factory is None:
            return None
        module = factory(n)
    else:
        module = _torch_module(op, n)
    module = module.to(device=device, dtype=dtype).train()
    if provider == "torch.compile":
        if device != "cuda":
            raise RuntimeError(COMPILE_CUDA_ONLY)
        module = torch.compile(module)
    return module


def mode_call(fn, inputs: list[torch.Tensor], dy: torch.Tensor, mode: str):
    """What one timed call runs: fn() under no_grad (mode "fwd"), or fn() and its gradients against inputs
    ("fwd+bwd"; dy: the output's gradient, or one per output, or one tensor for every output of a tuple)."""
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                return fn()

        return forward

    def forward_backward():
        out = fn()
        if isinstance(out, tuple) and isinstance(dy, torch.Tensor):
            return torch.autograd.grad(out, inputs, (dy,) * len(out))
        return torch.autograd.grad(out, inputs, dy)

    return forward_backward


def peak_extra_mib(fn, device: str) -> float:
    """Peak memory above what was allocated before one call of fn, in MiB (CUDA only, else NaN)."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def result_row(
    op: str,
    shape,
    dtype: torch.dtype,
    mode: str,
    provider: str,
    times: dict,
    nbytes: int,
    peak_mib: float = float("nan"),
    error: str = "",
) -> dict:
    """One benchmark row in the bench stage's format from timings() (rates NaN where a time is missing)."""
    return dict(
        op=op,
        shape="x".join(map(str, shape)),
        dtype=str(dtype).removeprefix("torch."),
        mode=mode,
        provider=provider,
        **times,
        rate=gb_per_s(nbytes, times["ms"]),
        gpu_rate=gb_per_s(nbytes, times["gpu_ms"]),
        unit="GB/s",
        peak_extra_mib=peak_mib,
        error=error,
    )


def gb_per_s(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if math.isfinite(ms) and ms > 0 else float("nan")


def failure_row(op, shape, dtype, mode, provider, exc: Exception) -> dict:
    missing = {"ms": float("nan"), "gpu_ms": float("nan")}
    return result_row(op, shape, dtype, mode, provider, missing, 0, error=f"{type(exc).__name__}: {exc}"[:200])


def _bytes(module: nn.Module, m: int, n: int, dtype: torch.dtype, mode: str, pairs: int = 1) -> int:
    """Bytes read and written once each: `pairs` inputs and as many outputs, and their gradients for fwd+bwd."""
    element = torch.finfo(dtype).bits // 8
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    tensors = (2 if mode == "fwd" else 4) * pairs  # x, y; and dy, dx
    return tensors * m * n * element + params * (1 if mode == "fwd" else 2)


def run(
    sizes,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    progress: bool = True,
    ops=OPS,
    modes=("fwd", "fwd+bwd"),
    rounds: int = 3,
) -> list[dict]:
    """One row per (op, size, mode, provider) for sizes [(rows, N), ...]: ms, GB/s (GPU time: median of `rounds`
    interleaved rounds). A provider that fails is reported (error), not hidden; Liger rows are absent when
    liger-kernel is not installed or lacks the op."""
    rows = []
    cases = [(op, tuple(size), mode) for op in ops for size in sizes for mode in modes]
    for op, (m, n), mode in tqdm(cases, desc="norms bench", disable=not progress):
        calls, ms, nbytes = {}, {}, {}
        for provider in PROVIDERS:
            try:
                module = make_module(op, provider, n, device, dtype)
                if module is None:
                    continue
                pairs = 2 if op in TWO_INPUTS else 1
                xs = [torch.randn(m, n, device=device, dtype=dtype, requires_grad=mode != "fwd") for _ in range(pairs)]
                dy = torch.randn(m, n, device=device, dtype=dtype)
                call = mode_call(lambda module=module, xs=xs: module(*xs), [*xs, *module.parameters()], dy, mode)
                ms[provider] = median_ms(call)  # compiles and warms up too
            except Exception as exc:  # e.g. torch.compile failing on this host: the row says why
                rows.append(failure_row(op, (m, n), dtype, mode, provider, exc))
                continue
            calls[provider], nbytes[provider] = call, _bytes(module, m, n, dtype, mode, pairs)
        gpu = interleaved_gpu_ms(calls, rounds)
        for provider in calls:
            times = {"ms": ms[provider], "gpu_ms": gpu[provider]}
            rows.append(result_row(op, (m, n), dtype, mode, provider, times, nbytes[provider]))
    return rows
