"""Fused linear + cross-entropy (the LM head without full logits): `triformer.functional.linear_cross_entropy`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import cross_entropy as ce_kernels
from ..kernels import linear_cross_entropy as lce_kernels
from ..kernels._runtime import check_same_dtype, check_tensor
from . import _cast_for_autocast, _targets, check_loss_options, scale_rows_op
from ._library import Op, or_placeholder, placeholder

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
        raise ValueError(
            f"weight must be 2-D [V, H] (vocabulary, hidden) with V, H ≥ 1, got shape {tuple(weight.shape)}"
        )
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x of shape {tuple(x.shape)} must be [..., H] with H = {weight.shape[1]}, the hidden size "
            f"of weight {tuple(weight.shape)}"
        )
    check_same_dtype(x, "x", weight, "weight")
    if bias is not None:
        check_tensor(bias, "bias")
        check_same_dtype(x, "x", bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},) (one per vocabulary entry of weight), got "
                f"{tuple(bias.shape)}"
            )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets has dtype {targets.dtype}; linear_cross_entropy takes class indices (int64 or int32)")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match x {tuple(x.shape)}: expected "
            f"{tuple(x.shape[:-1])} (one target per row of x)"
        )
    if targets.device != x.device:
        raise ValueError(f"targets are on {targets.device} but x is on {x.device}")
    check_loss_options(ignore_index, reduction, label_smoothing)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    if accum_dtype not in ACCUM_DTYPES:
        raise ValueError(f"accum_dtype must be torch.float32 or None (the weight's dtype), got {accum_dtype!r}")


def _prepare(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor):
    """x as dense rows [N, H], weight dense (rows or columns), bias contiguous, targets [N] contiguous."""
    x2d = _dense(x.reshape(targets.numel(), weight.shape[1]))
    return (
        x2d,
        _dense(weight, transposed_ok=True),
        None if bias is None else bias.contiguous(),
        targets.reshape(-1).contiguous(),
    )


def _lce_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    chunk_rows: int,
    float32_dw: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dx [N, H] unscaled, dW [V, H] with α folded in, db float32 [1, V] unscaled, α) where reduction is
    "mean" (α = 1 / valid targets, float32) or "sum" (α a placeholder); "none": the losses, then placeholders
    (its backward runs the chunks again). Each gradient not needed is a placeholder."""
    _targets.poll()
    prepared = _prepare(x, weight, bias, targets)
    x2d, weight, bias, targets1d = prepared
    v = weight.shape[0]
    counts = ce_kernels.count_targets(targets1d, v, ignore_index)  # (valid, out of range, first out of range)
    _targets.note(counts, v, ignore_index)
    alpha = 1.0 / counts[0].clamp(min=1).float() if reduction == "mean" else None
    need = (need_dx, need_dw, need_db and bias is not None) if reduction != "none" else (False, False, False)
    losses, dx, dw, db = lce_kernels.chunked_forward(
        *prepared, ignore_index, smoothing, chunk_rows, need, alpha, float32_dw, row_losses=reduction == "none"
    )
    if reduction == "none":
        loss = losses.view(targets.shape)
    else:
        loss = losses / counts[0] if reduction == "mean" else losses
    return (
        loss,
        or_placeholder(dx, loss),
        or_placeholder(dw, loss),
        or_placeholder(None if db is None else db.view(1, v), loss),
        or_placeholder(alpha, loss),
    )


def _lce_fake(
    x, weight, bias, targets, ignore_index, reduction, smoothing, chunk_rows, float32_dw, need_dx, need_dw, need_db
):
    (v, h), rows = weight.shape, targets.numel()
    loss = x.new_empty(targets.shape if reduction == "none" else (), dtype=torch.float32)
    if reduction == "none":
        return loss, placeholder(loss), placeholder(loss), placeholder(loss), placeholder(loss)
    return (
        loss,
        x.new_empty((rows, h)) if need_dx else placeholder(loss),
        weight.new_empty((v, h)) if need_dw else placeholder(loss),
        loss.new_empty((1, v)) if need_db and bias is not None else placeholder(loss),
        loss.new_empty(()) if reduction == "mean" else placeholder(loss),
    )


def _lce_setup(ctx, inputs, output):
    x, weight, bias, targets, ignore_index, reduction, smoothing, chunk_rows, float32_dw = inputs[:9]
    if reduction == "none":
        ctx.save_for_backward(x, weight, bias, targets)
    else:
        ctx.save_for_backward(*output[1:], targets)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.args, ctx.computed = (ignore_index, smoothing, chunk_rows, float32_dw), inputs[9:12]
    ctx.reduction, ctx.backward_done, ctx.x_shape = reduction, False, x.shape
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lce_backward(ctx, dloss, *_):
    """Mean and sum: the gradients of the forward, scaled in place by dloss (and α); none: the chunks again."""
    nothing = (None,) * 12
    if dloss is None:
        return nothing
    need = tuple(ctx.needs_input_grad[:3])
    if ctx.reduction != "none":  # the gradients the forward computed
        need = tuple(computed and needed for computed, needed in zip(ctx.computed, need))
    if ctx.reduction == "none":
        x, weight, bias, targets = ctx.saved_tensors
        dx, dw, db = _lce_backward_op(dloss, x, weight, bias, targets, *ctx.args, *need)
    else:
        if ctx.backward_done:
            raise RuntimeError(
                "triformer linear_cross_entropy keeps its gradients from the forward and scales "
                "them in place: its backward can run only once"
            )
        ctx.backward_done = True
        dx, dw, db, alpha, targets = ctx.saved_tensors
        g = dloss.reshape(()).float()
        g_alpha = g * alpha if ctx.reduction == "mean" else g  # dx and db were left unscaled by α
        ignore_index = ctx.args[0]
        if need[0]:  # rows of ignored targets stay 0, as torch's
            scale_rows_op(dx, g_alpha, targets.reshape(-1), ignore_index)
        if need[1]:
            scale_rows_op(dw, g, None, ignore_index)
        if need[2]:
            scale_rows_op(db, g_alpha, None, ignore_index)
    grads = (
        dx.view(ctx.x_shape) if need[0] else None,
        dw if need[1] else None,
        db.view(-1).to(ctx.bias_dtype) if need[2] else None,
    )
    return *grads, *nothing[3:]


def _lce_backward_impl(
    dloss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    smoothing: float,
    chunk_rows: int,
    float32_dw: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none": (dx [N, H], dW, db float32 [1, V]) for the incoming per-row gradient dloss, the chunks run
    again with each row's logit gradient scaled by it; placeholders where not needed."""
    _targets.poll()
    prepared = _prepare(x, weight, bias, targets)
    x2d, weight, bias, _ = prepared
    need = (need_dx, need_dw, need_db and bias is not None)
    row_scale = dloss.float().reshape(-1).contiguous()
    _, dx, dw, db = lce_kernels.chunked_forward(
        *prepared, ignore_index, smoothing, chunk_rows, need, None, float32_dw, row_scale=row_scale, row_losses=False
    )
    return (
        or_placeholder(dx, x2d),
        or_placeholder(dw, x2d),
        or_placeholder(None if db is None else db.view(1, weight.shape[0]), x2d),
    )


def _lce_backward_fake(
    dloss, x, weight, bias, targets, ignore_index, smoothing, chunk_rows, float32_dw, need_dx, need_dw, need_db
):
    v, h = weight.shape
    return (
        x.new_empty((targets.numel(), h)) if need_dx else placeholder(x),
        weight.new_empty((v, h)) if need_dw else placeholder(x),
        x.new_empty((1, v), dtype=torch.float32) if need_db and bias is not None else placeholder(x),
    )


_lce_backward_op = Op("linear_cross_entropy_backward", _lce_backward_impl, _lce_backward_fake)
_lce_op = Op("linear_cross_entropy", _lce_impl, _lce_fake, setup_context=_lce_setup, backward=_lce_backward)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """F.cross_entropy(x @ weightᵀ + bias, targets, ...) without the [N, V] logits ever in memory: rows of x are
    processed chunk_size at a time (the logits of one chunk at once), and the gradients of x, weight and bias are
    computed chunk by chunk in the forward (as Liger-Kernel's fused linear cross-entropy does); the loss is float32.

    x [..., H], weight [V, H] (an LM head, or a tied embedding), targets [...] of class indices, bias [V] or None.
    ignore_index, reduction ("mean" over non-ignored targets, "sum", "none") and label_smoothing as
    F.cross_entropy; all targets ignored: "mean" gives NaN (0/0) with zero gradients, as torch.
    chunk_size: rows per chunk; None picks one whose logits are ≤ 1/8 of the full logits and ≤ 256 MiB
    (kernels.linear_cross_entropy.default_chunk_rows).
    accum_dtype: torch.float32 (default) gives a 16-bit weight's gradient float32 precision (one float32 sum over
    every row, rounded once): with several chunks, a second pass over slabs of the vocabulary recomputes their
    logits and gradients from each row's stored softmax statistics (one more product, no float32 [V, H] buffer;
    see kernels.linear_cross_entropy). A float32 weight's gradient sums the chunks in itself. None accumulates it
    in the gradient itself across the row chunks (weight's dtype, rounded once per chunk: Liger's default; three
    products).
    reduction="none" recomputes the chunks in the backward (each row's incoming gradient must scale its logit
    gradient before the products sum over rows); "mean" and "sum" keep only the gradients, and their backward can
    run once. Under autocast x, weight and bias are cast to the autocast dtype, as F.linear.
    """
    x, weight, bias = _cast_for_autocast(x, weight, bias)
    _check_inputs(x, weight, targets, bias, ignore_index, reduction, label_smoothing, chunk_size, accum_dtype)
    v, h = weight.shape
    chunk_rows = chunk_size or lce_kernels.default_chunk_rows(targets.numel(), v, x.element_size())
    grad = torch.is_grad_enabled()
    return _lce_op(
        x,
        weight,
        bias,
        targets,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        chunk_rows,
        accum_dtype is not None,
        grad and x.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )[0]
