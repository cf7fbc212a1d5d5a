"""The functional API (`triformer.functional.linear`, ...) over triformer's torch.library ops (`triformer::linear`,
..., see _library): each function checks its arguments, then calls its op."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

from ..kernels import cross_entropy as ce_kernels
from ..kernels import dropout as dropout_kernels
from ..kernels import linear as linear_kernels
from ..kernels import norms as norm_kernels
from ..kernels import softmax as softmax_kernels
from ..kernels._rows import as_rows
from ..kernels._runtime import check_same_dtype, check_tensor, new_empty
from ..kernels.activation import canonical_activation
from . import _targets
from ._library import Op, or_placeholder, placeholder, plain_eager


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast asks for on this device type, or None when autocast is off (or the device has
    no autocast, e.g. meta: check_tensor then names what is wrong)."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast_for_autocast(*tensors):
    """Under autocast, matmul-like ops run in the autocast dtype (as F.linear does); casts are tracked by autograd."""
    first = tensors[0]
    dtype = _autocast_dtype(first.device.type) if isinstance(first, torch.Tensor) else None
    if dtype is None:
        return tensors
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


# ------------------------------------------------------------------------------------------------ linear


def _check_linear_inputs(x, weight, bias, activation):
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has last dimension {x.shape[-1]} but weight {tuple(weight.shape)} expects in_features={weight.shape[1]}"
        )
    check_same_dtype(x, "x", weight, "weight")
    if bias is not None:
        check_tensor(bias, "bias")
        check_same_dtype(x, "x", bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return canonical_activation(activation)


def _saves_preactivation(activation: str | None, fused: bool) -> bool:
    """Whether the backward needs z = x·Wᵀ + b: act'(z) for gelu and silu, and for every activation of the unfused
    version (the fused relu reads its derivative off y; no activation needs nothing)."""
    return activation is not None and (not fused or activation != "relu")


def _linear_impl(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, fused: bool, save_preactivation: bool
) -> tuple[Tensor, Tensor]:
    """(y [..., N], z: the preactivation [..., N] when save_preactivation and the backward reads it (see
    _saves_preactivation), else a placeholder)."""
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(lead.numel(), in_features)  # not (-1, K): ambiguous when K or the batch is 0
    keep = save_preactivation and _saves_preactivation(activation, fused)
    if fused:
        y, z = linear_kernels.fused_forward(x2d, weight, bias, activation, keep)
    else:
        y, z = linear_kernels.unfused_forward(x2d, weight, bias, activation)
    y = y.view(*lead, out_features)
    return y, z.view(y.shape) if keep else placeholder(x)


def _linear_fake(x, weight, bias, activation, fused, save_preactivation):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    keep = save_preactivation and _saves_preactivation(activation, fused)
    return y, y.new_empty(y.shape) if keep else placeholder(x)


def _linear_setup(ctx, inputs, output):
    x, weight, _, activation, fused, _ = inputs
    y, z = output
    saved = None if activation is None else y if fused and activation == "relu" else z
    ctx.save_for_backward(x, weight, saved)
    ctx.activation, ctx.fused = activation, fused
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, dy, _):
    x, weight, saved = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if dy is None:
        return None, None, None, None, None, None
    grads = _linear_backward_op(dy, x, weight, saved, ctx.activation, ctx.fused, *need)
    return *(g if n else None for g, n in zip(grads, need)), None, None, None


def _linear_backward_impl(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor | None,
    activation: str | None,
    fused: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db) of _linear_impl, a placeholder where not needed; saved: y (fused relu), z, or None."""
    out_features, in_features = weight.shape
    m = x.shape[:-1].numel()
    x2d, dy2d = x.reshape(m, in_features), dy.reshape(m, out_features)
    saved2d = None if saved is None else saved.reshape(m, out_features)
    backward = linear_kernels.fused_backward if fused else linear_kernels.unfused_backward
    dx, dw, db = backward(dy2d, x2d, weight, saved2d, activation, need_dx, need_dw, need_db)
    return or_placeholder(None if dx is None else dx.view(x.shape), x), or_placeholder(dw, x), or_placeholder(db, x)


def _linear_backward_fake(dy, x, weight, saved, activation, fused, need_dx, need_dw, need_db):
    return (
        x.new_empty(x.shape) if need_dx else placeholder(x),
        weight.new_empty(weight.shape) if need_dw else placeholder(x),
        weight.new_empty(weight.shape[:1]) if need_db else placeholder(x),
    )


_linear_backward_op = Op("linear_backward", _linear_backward_impl, _linear_backward_fake)
_linear_op = Op("linear", _linear_impl, _linear_fake, setup_context=_linear_setup, backward=_linear_backward)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """act(x·weightᵀ + bias) on Triton kernels, forward and backward (op triformer::linear).

    x [..., K], weight [N, K], bias [N] or None, activation in (None, "relu", "gelu" (tanh), "silu").
    fused=False runs the three-kernel version (matmul, bias add, activation) kept for the ablation.
    """
    x, weight, bias = _cast_for_autocast(x, weight, bias)
    activation = _check_linear_inputs(x, weight, bias, activation)
    grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _linear_op(x, weight, bias, activation, bool(fused), grad)[0]


# ------------------------------------------------------------------------------ layer_norm, rms_norm


def _check_eps(eps, allow_none: bool = False) -> None:
    """A norm's eps: a finite number ≥ 0 (None where torch takes it: the input dtype's machine epsilon)."""
    if eps is None and allow_none:
        return
    if not _is_number(eps) or not 0.0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number ≥ 0{' or None' if allow_none else ''}, got {eps!r}")


def _check_normalized_shape(normalized_shape) -> tuple:
    """normalized_shape as a tuple of positive ints (an int is one dim)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if (
        not isinstance(shape, (tuple, list, torch.Size))
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ValueError(f"normalized_shape must be a positive int or a tuple of them, got {normalized_shape!r}")
    return tuple(shape)


def _check_param(param, name: str, x: torch.Tensor, shape: tuple) -> None:
    """A norm's weight or bias: any float dtype (math is float32; grads come back in its dtype), x's device."""
    if param is None:
        return
    check_tensor(param, name)
    if param.device != x.device:
        raise ValueError(f"{name} is on {param.device} but x is on {x.device}")
    if tuple(param.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (normalized_shape), got {tuple(param.shape)}")


def _normalized_width(x: torch.Tensor, normalized_shape, weight, bias) -> int:
    """Validate a norm's inputs; the number of trailing elements normalized together."""
    check_tensor(x, "x")
    shape = _check_normalized_shape(normalized_shape)
    if tuple(x.shape[x.dim() - len(shape) :]) != shape or x.dim() < len(shape):
        raise ValueError(f"x of shape {tuple(x.shape)} does not end in normalized_shape {shape}")
    _check_param(weight, "weight", x, shape)
    _check_param(bias, "bias", x, shape)
    return math.prod(shape)


def _norm_impl(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, center: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm (center) or RMSNorm over the last dim of x: (y, the rows' shifted means (a placeholder for RMSNorm),
    their 1/σ), float32 statistics."""
    y, _, mean, rstd = norm_kernels.norm_forward(x, weight, bias, eps, center)
    return y, placeholder(rstd) if mean is None else mean, rstd


def _norm_fake(x, weight, bias, eps, center):
    rows = x.shape[:-1].numel()
    rstd = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape), rstd.new_empty((rows,) if center else (0,)), rstd


def _norm_setup(ctx, inputs, output):
    x, weight, bias, _, center = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean if center else None, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _norm_backward(ctx, dy, _mean, _rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dtypes = (weight.dtype if need_dw else None, ctx.bias_dtype if need_db else None)
    dx, sums = _norm_backward_op(dy, x, weight, mean, rstd, need_dw, need_db, norm_kernels.sums_dtype(*dtypes))
    grads = iter(sums.unbind(0))
    dw, db = (None if dtype is None else next(grads).to(dtype) for dtype in dtypes)
    return dx if need_dx else None, dw, db, None, None


def _norm_backward_impl(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    need_dw: bool,
    need_db: bool,
    sum_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(dx, [dw; db]: the wanted ones as the rows of one tensor in sum_dtype) of _norm_impl (mean None: RMSNorm)."""
    dx, sums = norm_kernels.norm_backward_sums(
        dy, as_rows(x, x.shape[-1]), weight, mean, rstd, need_dw, need_db, sum_dtype
    )
    return dx.view(x.shape), sums


def _norm_backward_fake(dy, x, weight, mean, rstd, need_dw, need_db, sum_dtype):
    return x.new_empty(x.shape), rstd.new_empty((need_dw + need_db, x.shape[-1]), dtype=sum_dtype)


_norm_backward_op = Op("norm_backward", _norm_backward_impl, _norm_backward_fake)
_norm_op = Op("norm", _norm_impl, _norm_fake, setup_context=_norm_setup, backward=_norm_backward)


def _normalize(x, normalized_shape, weight, bias, eps, center):
    n = _normalized_width(x, normalized_shape, weight, bias)
    _check_eps(eps, allow_none=not center)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if x.dim() and x.shape[-1] == n:  # one normalized dim: no reshapes (each would be one more autograd node)
        return _norm_op(x, _as_vector(weight, n), _as_vector(bias, n), float(eps), center)[0]
    k = len(normalized_shape)
    flat = x.reshape(*x.shape[: x.dim() - k], n)
    return _norm_op(flat, _as_vector(weight, n), _as_vector(bias, n), float(eps), center)[0].view(x.shape)


def _as_vector(param: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return param if param is None or param.dim() == 1 else param.reshape(n)


def layer_norm(
    x: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """(x − μ) / √(σ² + eps) · weight + bias over the trailing normalized_shape dims, as F.layer_norm.

    Float32 math; the output has x's dtype (weight and bias may be of another float dtype, e.g. float32
    parameters under bf16 autocast); gradients for x, weight and bias in Triton.
    """
    return _normalize(x, normalized_shape, weight, bias, eps, center=True)


def rms_norm(
    x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None, eps: float | None = 1e-6
) -> torch.Tensor:
    """x / √(mean(x²) + eps) · weight over the trailing normalized_shape dims, as F.rms_norm; eps=None is x's
    dtype's machine epsilon, as torch takes it."""
    return _normalize(x, normalized_shape, weight, None, eps, center=False)


# ------------------------------------------------------------------------------------------- softmax


def _softmax_impl(x: Tensor, causal: bool) -> Tensor:
    """softmax over the last dim of x (causal over the last two), contiguous."""
    return softmax_kernels.softmax_forward(x, causal)


def _softmax_fake(x, causal):
    return x.new_empty(x.shape)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.causal = inputs[1]


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_backward_op(y, dy, ctx.causal), None


def _softmax_backward_impl(y: Tensor, dy: Tensor, causal: bool) -> Tensor:
    """dx = y ⊙ (dy − Σ y ⊙ dy) for y = _softmax_impl(x, causal)."""
    return softmax_kernels.softmax_backward(y, dy, causal)


def _softmax_backward_fake(y, dy, causal):
    return y.new_empty(y.shape)


_softmax_backward_op = Op("softmax_backward", _softmax_backward_impl, _softmax_backward_fake)
_softmax_op = Op("softmax", _softmax_impl, _softmax_fake, setup_context=_softmax_setup, backward=_softmax_backward)


def softmax(x: torch.Tensor, dim: int = -1, causal: bool = False) -> torch.Tensor:
    """softmax along dim (op triformer::softmax); causal masks key j > query i over the last two dims
    ([..., S_q, S_k], dim must be -1).

    A row that is −inf everywhere gives NaN, as torch.softmax does. Other dims than the last are moved last
    (a strided view the kernel copies once).
    """
    check_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("softmax needs at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for x of shape {tuple(x.shape)}")
    dim %= x.dim()
    if causal and (x.dim() < 2 or dim != x.dim() - 1):
        raise ValueError(
            f"causal softmax runs over the last dim of [..., S_q, S_k] scores; got dim={dim} "
            f"for x of shape {tuple(x.shape)}"
        )
    if dim == x.dim() - 1:
        return _softmax_op(x, bool(causal))
    return _softmax_op(x.movedim(dim, -1), False).movedim(-1, dim)


# ------------------------------------------------------------------------------------------- dropout


def _is_number(value) -> bool:
    """A real number that is not a bool (Python's, numpy's)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_module_dropout(p, name: str = "dropout") -> None:
    """A module's dropout rate (residual or attention): a number in [0, 1), as the modules and models take it."""
    if not _is_number(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")


def _check_dropout_args(p, seed) -> None:
    if not _is_number(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be a number in [0, 1], got {p!r}")
    if seed is not None:
        if isinstance(seed, torch.Tensor):
            if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
                raise TypeError(f"seed must be an int or a one-element integer tensor, got {seed!r}")
            if seed.device.type != "cpu":  # reading it would wait for the device
                return
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {int(seed)}")


def _seed_tensor(seed, x: torch.Tensor) -> torch.Tensor:
    """The seed as the dropout op takes it, an integer tensor of one element. Under torch.compile and CUDA graph
    capture it lives on x's device (drawn there when seed is None), so that every run of the graph draws a new one
    and nothing is read back; otherwise on the CPU (seed None: drawn from torch's default CPU generator)."""
    if isinstance(seed, torch.Tensor):
        if seed.device.type != "cpu" and seed.device != x.device:
            raise ValueError(f"seed is on {seed.device} but x is on {x.device}")
        return seed
    on_device = x.is_cuda and (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing())
    device = x.device if on_device else None
    if seed is None:
        return torch.randint(0, 2**31 - 1, (), device=device)
    return torch.full((), seed, dtype=torch.int64, device=device)


def _seed_value(seed: Tensor) -> int | Tensor:
    """The seed as the kernels take it: an int for one on the CPU (passed by value), the tensor for one on the device
    (read by the kernel)."""
    return int(seed) if seed.device.type == "cpu" else seed


def _dropout_impl(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """keep · x / (1 − p̂) with the mask of (seed, x.shape); contiguous."""
    return dropout_kernels.dropout(x, p, _seed_value(seed))


def _dropout_fake(x, p, seed):
    return x.new_empty(x.shape)


def _dropout_setup(ctx, inputs, output):
    _, ctx.p, seed = inputs
    ctx.save_for_backward(seed)


def _dropout_backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return _dropout_op(dy, ctx.p, seed), None, None


_dropout_op = Op("dropout", _dropout_impl, _dropout_fake, setup_context=_dropout_setup, backward=_dropout_backward)


def dropout(
    x: torch.Tensor, p: float = 0.5, seed: int | torch.Tensor | None = None, training: bool = True
) -> torch.Tensor:
    """Zero each element with probability p̂ and scale the rest by 1 / (1 − p̂), where p̂ is p rounded to a multiple of
    2⁻¹⁶ (each element's draw is a 16-bit uniform): E[output] = x exactly; identity when not training
    (op triformer::dropout).

    The mask is a function of (seed, x.shape) only (Philox; nothing stored, the backward draws it again): the same
    seed gives the same mask. p = 0 and p = 1 stay exact; p below 2⁻¹⁷ rounds to 0 (x itself is returned and no
    seed is drawn, as torch at p = 0) and p within 2⁻¹⁷ of 1 to 1 (all zeros). seed: an int, a one-element integer
    tensor (on the CPU or x's device), or None: drawn from torch's default generator (so torch.manual_seed makes
    runs repeatable), the CPU's in eager mode, x's device's under torch.compile and CUDA graph capture (each replay
    draws anew).
    """
    check_tensor(x, "x")
    _check_dropout_args(p, seed)
    p = float(p)  # a numpy number included (Dynamo makes it a tensor, which round() does not take)
    if not training or not dropout_kernels.drops_any(p):  # as torch at p = 0: x itself, no seed drawn
        return x
    return _dropout_op(x, p, _seed_tensor(seed, x))


# ------------------------------------------------------------------------------------- cross_entropy

_REDUCTIONS = ("mean", "sum", "none")


def check_loss_options(ignore_index, reduction, label_smoothing) -> None:
    """The options cross_entropy and linear_cross_entropy share with F.cross_entropy."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not _is_number(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")


def _check_cross_entropy_options(ignore_index, reduction, label_smoothing, n_chunks, inplace_grad) -> None:
    """The arguments of cross_entropy and TritonCrossEntropyLoss other than the tensors."""
    check_loss_options(ignore_index, reduction, label_smoothing)
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks must be a positive int, got {n_chunks!r}")
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad must be True or False, got {inplace_grad!r}")


def _check_cross_entropy_inputs(logits, targets):
    check_tensor(logits, "logits")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets has dtype {targets.dtype}; cross_entropy takes class indices (int64 or int32)")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V ≥ 1 classes, got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}: "
            f"expected {tuple(logits.shape[:-1])} (classes along the last dim of logits)"
        )
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits are on {logits.device}")
    if torch.compiler.is_compiling():  # the in-place gradient is eager-only (see cross_entropy)
        return
    base = logits._base if logits._base is not None else logits
    if getattr(base, "_triformer_grad_version", None) == base._version:
        raise ValueError(
            "these logits already hold the gradient of an earlier triformer cross_entropy (written "
            "into their storage by inplace_grad=True); leave inplace_grad=False to keep them"
        )


def _check_in_place(logits2d: torch.Tensor) -> None:
    """inplace_grad=True: the gradient goes into the logits' storage, which must hold each element once."""
    m, v = logits2d.shape
    if not (logits2d.is_contiguous() or (logits2d.stride(1) == 1 and logits2d.stride(0) >= v)):
        raise ValueError(
            f"inplace_grad=True needs logits with unit stride along the classes (the last dim) and rows that do "
            f"not overlap; got strides {logits2d.stride()} for rows of {v}"
        )


def _cross_entropy_loss(
    logits2d: Tensor,
    targets1d: Tensor,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    n_chunks: int,
    grad: Tensor | None,
    targets_shape,
) -> Tensor:
    """The loss (float32: a scalar, or targets_shape for reduction="none") of logits2d [M, V] against targets1d [M],
    the gradient into grad when it is not None: of the loss, or of the losses' sum where the mean's 1 / valid
    targets waits for the backward (see _mean_scaled_in_backward)."""
    v = logits2d.shape[1]
    counts = ce_kernels.count_targets(targets1d, v, ignore_index)  # (valid, out of range, first out of range)
    _targets.note(counts, v, ignore_index)
    n_valid = counts[0]
    mean_now = reduction == "mean" and grad is not None and not _mean_scaled_in_backward(reduction, logits2d.dtype)
    losses = ce_kernels.cross_entropy_forward(
        logits2d, targets1d, ignore_index, smoothing, grad, n_chunks, n_valid if mean_now else None
    )
    if reduction == "none":
        return losses.view(targets_shape)
    total = losses.sum()
    return total / n_valid if reduction == "mean" else total


def _mean_scaled_in_backward(reduction: str, dtype: torch.dtype) -> bool:
    """Whether the forward stores the gradient of the losses' sum and the backward applies the mean's 1 / valid
    targets: for float16 logits, whose range would round the forward's p / N to subnormals or 0 before the backward
    scales it up (a GradScaler's loss scale); bfloat16 and float32 take p / N in the forward, and a mean's backward
    with an incoming gradient of 1 then skips the scaling pass."""
    return reduction == "mean" and dtype == torch.float16


def _cross_entropy_impl(
    logits: Tensor, targets: Tensor, ignore_index: int, reduction: str, smoothing: float, n_chunks: int, with_grad: bool
) -> tuple[Tensor, Tensor]:
    """(loss, the gradient of the loss's sum over logits [M, V] when with_grad, else a placeholder)."""
    _targets.poll()
    v = logits.shape[-1]
    logits2d = logits.reshape(targets.numel(), v)
    grad = new_empty(logits2d.shape, like=logits2d) if with_grad else None
    loss = _cross_entropy_loss(
        logits2d, targets.reshape(-1), ignore_index, reduction, smoothing, n_chunks, grad, targets.shape
    )
    return loss, placeholder(logits) if grad is None else grad


def _cross_entropy_fake(logits, targets, ignore_index, reduction, smoothing, n_chunks, with_grad):
    loss = logits.new_empty(targets.shape if reduction == "none" else (), dtype=torch.float32)
    rows = logits.shape[:-1].numel()
    return loss, logits.new_empty((rows, logits.shape[-1])) if with_grad else placeholder(logits)


def _cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[1])
    ctx.reduction, ctx.logits_shape, ctx.backward_done = inputs[3], inputs[0].shape, False
    ctx.ignore_index = inputs[2]
    ctx.mean_in_backward = _mean_scaled_in_backward(inputs[3], inputs[0].dtype)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _cross_entropy_backward(ctx, dloss, *_):
    """The gradient computed in the forward, scaled in place by dloss (a pass skipped where dloss is 1)."""
    if dloss is None:
        return None, None, None, None, None, None, None
    if ctx.backward_done:
        raise RuntimeError(
            "triformer cross_entropy keeps its gradient in one buffer and scales it in place: "
            "its backward can run only once"
        )
    ctx.backward_done = True
    grad, targets = ctx.saved_tensors
    scale = (dloss.reshape(-1) if ctx.reduction == "none" else dloss.reshape(())).float()
    if ctx.mean_in_backward:
        scale = scale / (targets.reshape(-1) != ctx.ignore_index).sum()
    scale_rows_op(grad, scale, targets.reshape(-1), ctx.ignore_index)
    return grad.view(ctx.logits_shape), None, None, None, None, None, None


def _scale_rows_impl(g: Tensor, scale: Tensor, targets: Tensor | None, ignore_index: int) -> None:
    """g [M, V] *= scale (0-d, or one per row) in place, rows whose target (targets [M] or None) is ignore_index
    left at 0; first the target checks of the losses that have landed."""
    _targets.poll()
    ce_kernels.scale_rows_(g, scale, None if targets is None else targets.contiguous(), ignore_index)


def _scale_rows_fake(g, scale, targets, ignore_index):
    return None


scale_rows_op = Op("scale_rows_", _scale_rows_impl, _scale_rows_fake, mutates_args=("g",))
_cross_entropy_op = Op(
    "cross_entropy",
    _cross_entropy_impl,
    _cross_entropy_fake,
    setup_context=_cross_entropy_setup,
    backward=_cross_entropy_backward,
)


class _CrossEntropyInPlace(torch.autograd.Function):
    """inplace_grad=True in eager mode: the op's forward with the gradient written into the logits' storage (a
    custom op cannot write into an input and have an autograd formula), the op's backward."""

    @staticmethod
    def forward(ctx, logits2d, targets, ignore_index, reduction, smoothing, n_chunks, with_grad):
        _targets.poll()
        loss = _cross_entropy_loss(
            logits2d, targets.reshape(-1), ignore_index, reduction, smoothing, n_chunks, logits2d, targets.shape
        )
        torch.autograd.graph.increment_version(logits2d)
        base = logits2d._base if logits2d._base is not None else logits2d
        base._triformer_grad_version = base._version
        ctx.save_for_backward(logits2d, targets)
        ctx.reduction, ctx.logits_shape, ctx.backward_done = reduction, logits2d.shape, False
        ctx.ignore_index = ignore_index
        ctx.mean_in_backward = _mean_scaled_in_backward(reduction, logits2d.dtype)
        ctx.set_materialize_grads(False)
        return loss

    backward = staticmethod(_cross_entropy_backward)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    n_chunks: int = 1,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """Cross-entropy of logits [..., V] (classes along the LAST dim) against integer targets [...], as
    F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ...) computes it; the loss is float32
    (op triformer::cross_entropy).

    One kernel computes the loss and, when logits need a gradient, the gradient too (online softmax, two passes
    over each row); the backward only scales it by the incoming gradient (float16 logits: by the incoming gradient
    over the valid targets of a mean, so that a loss scale reaches small probabilities before float16 rounds them).
    Where that gradient is written:
      inplace_grad=False (default): a buffer of its own; the logits keep their values, as with F.cross_entropy.
      inplace_grad=True: into the logits' own storage (leaves included) — the memory saving (no [N, V] gradient
        buffer) that Liger-Kernel's cross-entropy always takes. After the call the logits hold the gradient:
        read anything else off them (accuracy, argmax) before the loss, and use them in nothing else. Their
        version is bumped, so an op that saved them for its backward raises there ("modified by an inplace
        operation"), and a second triformer cross_entropy on them raises at once. (For an LM head,
        linear_cross_entropy saves the memory without touching any logits.) Eager mode only: under torch.compile
        the gradient takes a buffer of its own (a custom op cannot both write into its input and be
        differentiable), whose memory Inductor plans.
    n_chunks: rows are processed in that many launches (dame-cell/Triformer's knob; the gradient is computed in
    the forward, so it does not change peak memory here).
    A target outside [0, V) (other than ignore_index) gives its row a NaN loss and gradient, and a ValueError naming
    it: at once on the CPU; on a GPU, without waiting for the device, from a later cross_entropy or
    linear_cross_entropy call or backward, or from triformer.functional.check_targets() (see functional._targets).
    The backward can run once. All targets ignored: "mean" gives NaN (0/0), "sum" 0, as torch.
    """
    _check_cross_entropy_options(ignore_index, reduction, label_smoothing, n_chunks, inplace_grad)
    _check_cross_entropy_inputs(logits, targets)
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_grad:
        v = logits.shape[-1]
        logits2d = logits.reshape(-1, v)
        _check_in_place(logits2d)
        if with_grad and plain_eager((logits, targets)):
            return _CrossEntropyInPlace.apply(
                logits2d, targets, int(ignore_index), reduction, float(label_smoothing), n_chunks, True
            )
    return _cross_entropy_op(
        logits, targets, int(ignore_index), reduction, float(label_smoothing), n_chunks, with_grad
    )[0]


check_targets = _targets.check_targets


from .attention import attention  # noqa: E402,F401  (its own module; imported last: it uses _cast_for_autocast)
from .gated import gated_activation, geglu, swiglu  # noqa: E402,F401  (its own module)
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402,F401  (fused linear + cross-entropy)
from .residual import add_dropout_norm  # noqa: E402,F401  (its own module)
from .rope import rope, rope_tables  # noqa: E402,F401  (its own module)
