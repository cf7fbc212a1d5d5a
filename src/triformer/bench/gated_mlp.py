"""The gated activations of a gated MLP (SwiGLU, GeGLU), forward and forward+backward: triformer against torch
eager (act(a) * b on x.chunk(2, -1)), its torch.compile, and Liger-Kernel's LigerSiLUMulFunction /
LigerGELUMulFunction (where installed).

Shapes [M, hidden]: the up-projection's output x [M, 2·hidden] (gate half first). triformer, torch and
torch.compile take that x; Liger takes its two halves as separate contiguous [M, hidden] tensors (LLaMA's separate
gate and up projections, its own layout, so it copies nothing). Liger writes its gradients into its inputs'
storage; so does "triformer" (inplace_grad=True, what TritonGatedMLP does with its up-projection output);
"triformer (grad buffer)" allocates the gradient. GB/s counts a and b read and h written once (forward+backward:
also dh, a and b read and da, db written), the same bytes for every provider; peak_extra_mib is the peak memory
above the inputs during one call, its outputs included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import functional as F_tri
from .norms import COMPILE_CUDA_ONLY, mode_call
from .side_by_side import time_providers

OPS = {"swiglu": "silu", "geglu": "gelu"}
_TORCH_ACT = {"silu": F.silu, "gelu": lambda a: F.gelu(a, approximate="tanh")}


def _torch_gated(x: torch.Tensor, activation: str) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return _TORCH_ACT[activation](a) * b


def _liger_functions() -> dict:
    """Liger-Kernel's gated autograd functions by activation, empty when liger-kernel is not installed."""
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return {}
    return {"silu": LigerSiLUMulFunction, "gelu": LigerGELUMulFunction}


def providers(device: str) -> dict:
    """name → (f(x, activation) on the fused x, or f(a, b, activation) on the halves when the name is "liger");
    an exception where the provider cannot run here."""
    table: dict = {
        "triformer": lambda x, act: F_tri.gated_activation(x, act, inplace_grad=True),
        "triformer (grad buffer)": lambda x, act: F_tri.gated_activation(x, act, inplace_grad=False),
        "torch": _torch_gated,
        "torch.compile": torch.compile(_torch_gated) if device == "cuda" else RuntimeError(COMPILE_CUDA_ONLY),
    }
    liger = _liger_functions()
    if liger:
        table["liger"] = lambda a, b, act: liger[act].apply(a, b)
    return table


def _setup(name, fn, activation, shape, dtype, device, mode):
    def setup():
        if isinstance(fn, Exception):
            raise fn
        m, hidden = shape
        grad = mode != "fwd"
        if name == "liger":
            inputs = [torch.randn(m, hidden, device=device, dtype=dtype).requires_grad_(grad) for _ in range(2)]
            call_fn = lambda: fn(*inputs, activation)  # noqa: E731
        else:
            inputs = [torch.randn(m, 2 * hidden, device=device, dtype=dtype).requires_grad_(grad)]
            call_fn = lambda: fn(inputs[0], activation)  # noqa: E731
        dh = torch.randn(m, hidden, device=device, dtype=dtype)
        element = dh.element_size()
        nbytes = 3 * m * hidden * element + (5 * m * hidden * element if grad else 0)
        return mode_call(call_fn, inputs, dh, mode), nbytes

    return setup


def run(
    shapes,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    progress: bool = True,
    ops=tuple(OPS),
    modes=("fwd", "fwd+bwd"),
    rounds: int = 3,
    names=None,
) -> list[dict]:
    """One row per (op, shape, mode, provider) for shapes [(M, hidden), ...] (x [M, 2·hidden]): ms, GPU ms, GB/s and
    peak extra MiB. A provider that fails is reported (error), not hidden; Liger rows are absent when liger-kernel is
    not installed. names: only these providers."""
    table = {name: fn for name, fn in providers(device).items() if names is None or name in names}
    rows = []
    cases = [(op, tuple(shape), mode) for op in ops for shape in shapes for mode in modes]
    for op, shape, mode in tqdm(cases, desc="gated_mlp bench", disable=not progress):
        setups = {name: _setup(name, fn, OPS[op], shape, dtype, device, mode) for name, fn in table.items()}
        rows += time_providers(op, shape, dtype, mode, setups, device, rounds)
    return rows
