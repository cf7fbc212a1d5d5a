"""Fused linear + cross-entropy (the LM head without full logits): `triformer.functional.linear_cross_entropy`."""

from __future__ import annotations

import torch

from ..kernels import linear_cross_entropy as lce_kernels
from ..kernels._runtime import check_same_dtype, check_tensor
from ..kernels.cross_entropy import scale_rows_
from . import _REDUCTIONS, _cast_for_autocast, _raise_for_bad_targets

ACCUM_DTYPES = (torch.float32, None)


def _dense(t: torch.Tensor, transposed_ok: bool = False) -> torch.Tensor:
    """A 2-D t itself when its rows are unit-stride and do not overlap (slices, row-strided views) — or, with
    transposed_ok, its columns (a transposed view) — else a contiguous copy (stride-0 broadcasts, steps > 1)."""
    if t.stride(1) == 1 and t.stride(0) >= t.shape[1]:
        return t
    if transposed_ok and t.stride(0) == 1 and t.stride(1) >= t.shape[0]:
        return t
    return t.contiguous()


def _check_inputs(x, weight, targets, bias, ignore_index, reduction, label_smoothing, chunk_size, accum_dtype):
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be 2-D [V, H] (vocabulary, hidden) with V, H ≥ 1, got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} must be [..., H] with H = {weight.shape[1]}, the hidden size "
                         f"of weight {tuple(weight.shape)}")
    check_same_dtype(x, "x", weight, "weight")
    if bias is not None:
        check_tensor(bias, "bias")
        check_same_dtype(x, "x", bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (one per vocabulary entry of weight), got "
                             f"{tuple(bias.shape)}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets has dtype {targets.dtype}; linear_cross_entropy takes class indices (int64 or "
                        "int32)")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match x {tuple(x.shape)}: expected "
                         f"{tuple(x.shape[:-1])} (one target per row of x)")
    if targets.device != x.device:
        raise ValueError(f"targets are on {targets.device} but x is on {x.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    if accum_dtype not in ACCUM_DTYPES:
        raise ValueError(f"accum_dtype must be torch.float32 or None (the weight's dtype), got {accum_dtype!r}")


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Mean and sum: the gradients are computed in the forward and stored; the backward scales them by the incoming
    gradient (no work where that is 1 and α is 1). None: the forward computes the losses only and the backward
    runs the chunk loop again with each row's incoming gradient (no [N, V] logits are stored either way)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, targets1d, ignore_index, reduction, smoothing, chunk_rows, float32_dw):
        need = tuple(ctx.needs_input_grad[:2]) + (bias is not None and ctx.needs_input_grad[2],)
        # Under CUDA graph capture the host cannot read the target check back: out-of-range rows stay NaN.
        checked = not (x2d.is_cuda and torch.cuda.is_current_stream_capturing())
        n_valid = (targets1d != ignore_index).sum()
        alpha = 1.0 / n_valid.clamp(min=1).float() if reduction == "mean" else None
        args = (x2d, weight, bias, targets1d, ignore_index, smoothing, chunk_rows)
        if reduction == "none":
            losses, _, _, _, n_bad = lce_kernels.chunked_forward(*args, (False,) * 3, None, float32_dw,
                                                                 checked=checked)
            ctx.save_for_backward(x2d, weight, bias, targets1d)
        else:
            losses, dx, dw, db, n_bad = lce_kernels.chunked_forward(*args, need, alpha, float32_dw, checked=checked)
            ctx.save_for_backward(dx, dw, db, alpha)
        if checked:
            _raise_for_bad_targets(n_bad, targets1d, weight.shape[0], ignore_index)
        ctx.args, ctx.need, ctx.float32_dw = args[4:], need, float32_dw
        ctx.reduction, ctx.backward_done = reduction, False
        ctx.bias_dtype = None if bias is None else bias.dtype
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, dloss):
        if ctx.reduction == "none":
            x2d, weight, bias, targets1d = ctx.saved_tensors
            _, dx, dw, db, _ = lce_kernels.chunked_forward(x2d, weight, bias, targets1d, *ctx.args, ctx.need, None,
                                                           ctx.float32_dw, row_scale=dloss.float().contiguous(),
                                                           checked=False)
        else:
            if ctx.backward_done:
                raise RuntimeError("triformer linear_cross_entropy keeps its gradients from the forward and scales "
                                   "them in place: its backward can run only once")
            ctx.backward_done = True
            dx, dw, db, alpha = ctx.saved_tensors
            g = dloss.reshape(()).float()
            g_alpha = g if alpha is None else g * alpha  # dx and db were left unscaled by α
            dx = None if dx is None else scale_rows_(dx, g_alpha)
            dw = None if dw is None else scale_rows_(dw, g)
            db = None if db is None else scale_rows_(db.view(1, -1), g_alpha).view(-1)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, chunk_size: int | None = None,
                         accum_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """F.cross_entropy(x @ weightᵀ + bias, targets, ...) without the [N, V] logits ever in memory: rows of x are
    processed chunk_size at a time (the logits of one chunk at once), and the gradients of x, weight and bias are
    computed chunk by chunk in the forward (as Liger-Kernel's fused linear cross-entropy does); the loss is float32.

    x [..., H], weight [V, H] (an LM head, or a tied embedding), targets [...] of class indices, bias [V] or None.
    ignore_index, reduction ("mean" over non-ignored targets, "sum", "none") and label_smoothing as
    F.cross_entropy; all targets ignored: "mean" gives NaN (0/0) with zero gradients, as torch.
    chunk_size: rows per chunk; None picks one whose logits are ≤ 1/8 of the full logits and ≤ 256 MiB
    (kernels.linear_cross_entropy.default_chunk_rows).
    accum_dtype: torch.float32 (default) accumulates weight's gradient across chunks in a float32 buffer (V·H·4
    bytes more at the peak for 16-bit weights), rounded once; None accumulates it in the gradient itself (weight's
    dtype, rounded once per chunk: Liger's default, no extra memory).
    reduction="none" recomputes the chunks in the backward (each row's incoming gradient must scale its logit
    gradient before the products sum over rows); "mean" and "sum" keep only the gradients, and their backward can
    run once. Under autocast x, weight and bias are cast to the autocast dtype, as F.linear.
    """
    x, weight, bias = _cast_for_autocast(x, weight, bias)
    _check_inputs(x, weight, targets, bias, ignore_index, reduction, label_smoothing, chunk_size, accum_dtype)
    v, h = weight.shape
    x2d = _dense(x.reshape(-1, h))
    weight = _dense(weight, transposed_ok=True)
    bias = None if bias is None else bias.contiguous()
    targets1d = targets.reshape(-1).contiguous()
    chunk_rows = chunk_size or lce_kernels.default_chunk_rows(x2d.shape[0], v, x2d.element_size())
    loss = _LinearCrossEntropyFunction.apply(x2d, weight, bias, targets1d, int(ignore_index), reduction,
                                             float(label_smoothing), chunk_rows, accum_dtype is not None)
    return loss.view(targets.shape) if reduction == "none" else loss
