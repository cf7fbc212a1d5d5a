"""Shared test helpers: where tests run, per-dtype tolerances, float64 references, gradient comparison."""

from __future__ import annotations

import pytest
import torch

from triformer.kernels._runtime import interpreter_active

INTERPRETER = interpreter_active()  # Triton's choice at import (conftest sets TRITON_INTERPRET without a GPU)
ON_GPU = torch.cuda.is_available() and not INTERPRETER
DEVICE = "cuda" if ON_GPU else "cpu"

BF16_ON_INTERPRETER = "bf16 needs a GPU: Triton's interpreter computes bfloat16 on the raw bits (numpy has no bf16)"

# Relative error ‖out − ref‖ / ‖ref‖ allowed per input dtype (reference: float64 on the same rounded inputs).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TF32_TOLERANCE = 1e-3

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(INTERPRETER, reason=BF16_ON_INTERPRETER)),
]


def tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and ON_GPU and torch.backends.cuda.matmul.allow_tf32:
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def relative_error(out: torch.Tensor, ref: torch.Tensor, scale_floor: float = 0.0) -> float:
    """‖out − ref‖ / max(‖ref‖, scale_floor) in float64 (0 when both are exactly zero); NaN anywhere gives inf.

    scale_floor guards sums that cancel by chance (a 1×1 output of a 129-term dot product can be near zero
    while each term is not): it is the norm a well-conditioned result of the same terms would have.
    """
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return float("inf")
    diff = (out64 - ref64).norm().item()
    scale = max(ref64.norm().item(), scale_floor)
    return diff / scale if scale > 0 else diff


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    tol: float | None = None,
    scale_floor: float = 0.0,
):
    tol = tolerance(dtype) if tol is None else tol
    err = relative_error(out, ref, scale_floor)
    assert err < tol, f"{what}: relative error {err:.3e} ≥ {tol:.0e} ({dtype})"


def randn(*shape, dtype=torch.float32, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    """Fresh normal samples on the test device in `dtype` (drawn in float64, then rounded)."""
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_(requires_grad)


def dropout_scale(p: float) -> float:
    """The scale of the elements triformer's dropout keeps: 1 / (1 − p̂), p̂ = p rounded to a multiple of 2⁻¹⁶ (the
    drop probability its 16-bit draws give), 0 when p̂ = 1."""
    rounded = round(p * 2**16) / 2**16
    return 0.0 if rounded == 1.0 else 1.0 / (1.0 - rounded)


def make_targets(shape, v: int, ignore_index: int = -100, ignored: float = 0.25) -> torch.Tensor:
    """Class indices in [0, v) on the test device, each replaced by ignore_index with probability `ignored`; the
    first is always kept so a mean stays defined (the all-ignored batch has tests of its own)."""
    t = torch.randint(0, v, shape)
    t[torch.rand(shape) < ignored] = ignore_index
    if t.numel() and ignored < 1.0:
        kept = torch.randint(0, v - 1 if 0 <= ignore_index < v else v, ()).item()
        t.view(-1)[0] = kept + (0 <= ignore_index <= kept)
    return t.to(DEVICE)


def reference_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 CPU leaf with the same values, for the reference computation."""
    if t is None:
        return None
    return t.detach().double().cpu().requires_grad_(t.requires_grad)


def assert_grads_close(pairs, dtype: torch.dtype, tol: float | None = None, scale_floors: dict | None = None):
    """pairs: (name, tensor under test, float64 reference leaf); compares every .grad."""
    for name, tested, ref in pairs:
        assert tested.grad is not None, f"no gradient reached {name}"
        floor = (scale_floors or {}).get(name, 0.0)
        assert_close(tested.grad, ref.grad, dtype, f"grad of {name}", tol, floor)


def well_conditioned_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖|a|·|b|‖ / √k for a [.., k] @ b [k, ..]: the norm of a·b when its k terms do not cancel by chance."""
    a64, b64 = a.detach().double().cpu().abs(), b.detach().double().cpu().abs()
    return ((a64 @ b64).norm() / max(a64.shape[-1], 1) ** 0.5).item()
