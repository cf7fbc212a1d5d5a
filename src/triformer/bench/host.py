"""Host cost per call: the wall time of one call of every public op, forward (no_grad) and forward+backward
(autograd.grad), on a problem small enough that the GPU finishes each call long before the host launches the next,
so that wall time per call is what the host spends (Python, input checks, autograd, launches).

Providers: "triformer (Triton launch)", every kernel launched through Triton's JITFunction.run; "triformer (fast
launch)", a repeated launch through the compiled kernel's launcher (kernels/_launch.py; whichever the
TRIFORMER_FAST_LAUNCH switch says, each provider sets its own); "triformer (dispatcher)", fast launches with every op
called through torch.ops.triformer (the path of a torch.compile'd graph's calls); torch, the PyTorch counterpart. Rows
in the bench stage's format under op "host": shape names the op and its problem, ms is ms per call, rate calls/s, unit
"calls/s", whose ceiling is the call rate of torch.empty_like in the same run (the cheapest call torch makes). Each row
is the median of `rounds` interleaved rounds (every provider timed once per round). A fast-launch row whose calls took
no fast launch on a GPU says so in its `error` (the path was inactive: the row times Triton's launch); an op that fails
gives rows with the error. Under Triton's interpreter the numbers time the interpreter, not a launch: they only show
that the suite runs.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import functional as F_tri
from ..functional._library import through_dispatcher
from ..kernels import _launch
from ..kernels._runtime import overridden
from ..nn.rope import torch_rope

# Every op's problem: rows × width activations, a vocab-wide head, attention of heads × seq × head_dim (batch 2).
GPU_SIZE = dict(rows=256, width=256, vocab=1000, heads=4, seq=128, head_dim=64)
PROVIDERS = ("triformer (Triton launch)", "triformer (fast launch)", "triformer (dispatcher)", "torch")
_FAST_LAUNCH = {"triformer (Triton launch)": False, "triformer (fast launch)": True, "triformer (dispatcher)": True}


def op_cases(device, dtype, size: dict | None = None) -> dict:
    """op → (ours, torch's, the inputs that take a gradient); each fn returns a tensor or a tuple of tensors."""
    s = {**GPU_SIZE, **(size or {})}
    rows, width, vocab, seq, head_dim = s["rows"], s["width"], s["vocab"], s["seq"], s["head_dim"]

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(True)

    x, w_sq, b = randn(rows, width), randn(width, width), randn(width)
    gain, shift = randn(width), randn(width)
    scores = randn(s["heads"], seq, seq)
    causal_mask = torch.ones(seq, seq, device=device, dtype=torch.bool).triu(1)
    logits, labels = randn(rows, vocab), torch.randint(0, vocab, (rows,), device=device)
    q, k, v = (randn(2, s["heads"], seq, head_dim) for _ in range(3))
    cos, sin = F_tri.rope_tables(head_dim, seq, device=device)
    up, head = randn(rows, 2 * width), randn(vocab, width)

    def residual_norm_torch(t, branch, weight, bias):
        summed = t + F.dropout(branch, 0.1)
        return summed, F.layer_norm(summed, (width,), weight, bias)

    def swiglu_torch(t):
        a, g = t.chunk(2, dim=-1)
        return F.silu(a) * g

    activations = {None: lambda z: z, "relu": torch.relu, "gelu": lambda z: F.gelu(z, approximate="tanh")}
    cases = {
        f"linear {act}": (
            lambda a=act: F_tri.linear(x, w_sq, b, a),
            lambda a=act: activations[a](F.linear(x, w_sq, b)),
            (x, w_sq, b),
        )
        for act in activations
    }
    cases.update(
        {
            "layer_norm": (
                lambda: F_tri.layer_norm(x, width, gain, shift),
                lambda: F.layer_norm(x, (width,), gain, shift),
                (x, gain, shift),
            ),
            "rms_norm": (
                lambda: F_tri.rms_norm(x, width, gain),
                lambda: F.rms_norm(x, (width,), gain, 1e-6),
                (x, gain),
            ),
            "softmax": (lambda: F_tri.softmax(x), lambda: torch.softmax(x, -1), (x,)),
            "softmax causal": (
                lambda: F_tri.softmax(scores, causal=True),
                lambda: torch.softmax(scores.masked_fill(causal_mask, float("-inf")), -1),
                (scores,),
            ),
            "dropout": (lambda: F_tri.dropout(x, 0.1), lambda: F.dropout(x, 0.1), (x,)),
            "add_dropout_norm": (
                lambda: F_tri.add_dropout_norm(x, up[:, :width], 0.1, gain, shift),
                lambda: residual_norm_torch(x, up[:, :width], gain, shift),
                (x, up, gain, shift),
            ),
            "cross_entropy": (
                lambda: F_tri.cross_entropy(logits, labels),
                lambda: F.cross_entropy(logits, labels),
                (logits,),
            ),
            "attention causal": (
                lambda: F_tri.attention(q, k, v, causal=True),
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                (q, k, v),
            ),
            "rope": (lambda: F_tri.rope(q, k, cos, sin), lambda: torch_rope(q, k, cos, sin), (q, k)),
            "swiglu": (lambda: F_tri.swiglu(up), lambda: swiglu_torch(up), (up,)),
            "linear_cross_entropy": (
                lambda: F_tri.linear_cross_entropy(x, head, labels),
                lambda: F.cross_entropy(F.linear(x, head).float(), labels),
                (x, head),
            ),
        }
    )
    return cases


def fwd_bwd(fn, inputs):
    """One forward and backward: autograd.grad of fn's outputs with fixed incoming gradients."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.ones_like(o) for o in outs]
    return lambda: torch.autograd.grad(fn(), inputs, grads if len(grads) > 1 else grads[0])


def per_call_ms(fn, calls: int, warmup: int = 20) -> float:
    """Wall time per call of fn over `calls` calls after `warmup`, the GPU drained before and after."""
    for _ in range(warmup):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - start) / calls * 1e3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def empty_like_calls_per_s(device, calls: int = 2000) -> float:
    """The ceiling of unit calls/s: how many torch.empty_like calls the host makes per second."""
    x = torch.empty(16, device=device)
    return 1e3 / per_call_ms(lambda: torch.empty_like(x), calls)


def _row(name: str, mode: str, provider: str, ms: float, dtype, size: dict, error: str = "") -> dict:
    return dict(
        op="host",
        shape=f"{name} ({size['rows']}x{size['width']})",
        dtype=str(dtype).removeprefix("torch."),
        mode=mode,
        provider=provider,
        ms=ms,
        gpu_ms=float("nan"),
        rate=1e3 / ms,
        gpu_rate=float("nan"),
        unit="calls/s",
        peak_extra_mib=float("nan"),
        error=error,
    )


def run(
    calls: int = 200,
    size: dict | None = None,
    warmup: int = 20,
    rounds: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    progress: bool = True,
    ops=None,
) -> list[dict]:
    """One row per (op, mode, provider): host ms per call over `calls` calls after `warmup`, the median of `rounds`
    interleaved rounds (size: GPU_SIZE's keys to override; ops: only these)."""
    size = {**GPU_SIZE, **(size or {})}
    cases = {name: case for name, case in op_cases(device, dtype, size).items() if ops is None or name in ops}
    rows = []
    for name, (ours, theirs, inputs) in tqdm(cases.items(), desc="host bench", disable=not progress):
        for mode in ("fwd", "fwd+bwd"):
            try:
                rows += _case_rows(name, mode, ours, theirs, inputs, calls, warmup, rounds, dtype, size, device)
            except Exception as exc:  # one op that fails must not lose the other rows: the row says why
                error = f"{type(exc).__name__}: {exc}"[:200]
                rows += [_row(name, mode, p, float("nan"), dtype, size, error) for p in PROVIDERS]
    return rows


def _case_rows(name, mode, ours, theirs, inputs, calls, warmup, rounds, dtype, size, device) -> list[dict]:
    times = {provider: [] for provider in PROVIDERS}
    calls_of = {provider: theirs if provider == "torch" else ours for provider in PROVIDERS}
    if mode != "fwd":
        calls_of = {provider: fwd_bwd(call, inputs) for provider, call in calls_of.items()}
    fast_calls = 0
    for _ in range(rounds):
        for provider in PROVIDERS:
            fn = calls_of[provider]
            fast = _FAST_LAUNCH.get(provider)
            before = _launch.fast_launches
            with contextlib.nullcontext() if fast is None else overridden(_launch, FAST=fast, CHECK=False):
                with through_dispatcher() if provider == "triformer (dispatcher)" else contextlib.nullcontext():
                    with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                        times[provider].append(per_call_ms(fn, calls, warmup))
            if fast:
                fast_calls += _launch.fast_launches - before
    inactive = str(device).startswith("cuda") and fast_calls == 0
    return [
        _row(
            name,
            mode,
            provider,
            statistics.median(times[provider]),
            dtype,
            size,
            "fast path inactive: this row timed Triton's launch" if inactive and _FAST_LAUNCH.get(provider) else "",
        )
        for provider in PROVIDERS
    ]
