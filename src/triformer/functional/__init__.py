"""Autograd functions over the Triton kernels, and the functional API (`triformer.functional.linear`, ...)."""

from __future__ import annotations

import math

import torch

from ..kernels import cross_entropy as ce_kernels
from ..kernels import dropout as dropout_kernels
from ..kernels import linear as linear_kernels
from ..kernels import norms as norm_kernels
from ..kernels import softmax as softmax_kernels
from ..kernels._runtime import check_same_dtype, check_tensor, new_empty
from ..kernels.activation import canonical_activation


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
    canonical_activation(activation)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation, fused):
        out_features, in_features = weight.shape
        x2d = x.reshape(x.shape[:-1].numel(), in_features)  # not (-1, K): ambiguous when K or the batch is 0
        needs_grad = any(ctx.needs_input_grad[:3])
        if fused:
            y, saved = linear_kernels.fused_forward(x2d, weight, bias, activation, save_for_backward=needs_grad)
        else:
            y, saved = linear_kernels.unfused_forward(x2d, weight, bias, activation)
        ctx.activation, ctx.fused, ctx.x_shape = activation, fused, x.shape
        ctx.save_for_backward(x2d, weight, saved)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, saved = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape[0], weight.shape[0])
        backward = linear_kernels.fused_backward if ctx.fused else linear_kernels.unfused_backward
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = backward(dy2d, x2d, weight, saved, ctx.activation, need_dx, need_dw, need_db)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, fused: bool = True) -> torch.Tensor:
    """act(x·weightᵀ + bias) on Triton kernels, forward and backward.

    x [..., K], weight [N, K], bias [N] or None, activation in (None, "relu", "gelu" (tanh), "silu").
    fused=False runs the three-kernel version (matmul, bias add, activation) kept for the ablation.
    """
    x, weight, bias = _cast_for_autocast(x, weight, bias)
    _check_linear_inputs(x, weight, bias, activation)
    return _LinearFunction.apply(x, weight, bias, canonical_activation(activation), fused)


# ------------------------------------------------------------------------------ layer_norm, rms_norm


def _check_eps(eps, allow_none: bool = False) -> None:
    """A norm's eps: a finite number ≥ 0 (None where torch takes it: the input dtype's machine epsilon)."""
    if eps is None and allow_none:
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number ≥ 0{' or None' if allow_none else ''}, got {eps!r}")


def _check_normalized_shape(normalized_shape) -> tuple:
    """normalized_shape as a tuple of positive ints (an int is one dim)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if (not isinstance(shape, (tuple, list, torch.Size)) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
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
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"x of shape {tuple(x.shape)} does not end in normalized_shape {shape}")
    _check_param(weight, "weight", x, shape)
    _check_param(bias, "bias", x, shape)
    return math.prod(shape)


class _NormFunction(torch.autograd.Function):
    """LayerNorm (center=True) or RMSNorm (center=False) over the last dimension of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, center):
        y, x2, mean, rstd = norm_kernels.norm_forward(x, weight, bias, eps, center)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.x_shape, ctx.bias_dtype = x.shape, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        need_dw, need_db = ctx.needs_input_grad[1:3]
        dx, dw, db = norm_kernels.norm_backward(dy, x2, weight, mean, rstd, weight.dtype if need_dw else None,
                                                ctx.bias_dtype if need_db else None)
        return dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None, dw, db, None, None


def _normalize(x, normalized_shape, weight, bias, eps, center):
    n = _normalized_width(x, normalized_shape, weight, bias)
    _check_eps(eps, allow_none=not center)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if x.dim() and x.shape[-1] == n:  # one normalized dim: no reshapes (each would be one more autograd node)
        return _NormFunction.apply(x, _as_vector(weight, n), _as_vector(bias, n), float(eps), center)
    k = len(normalized_shape)
    flat = x.reshape(*x.shape[: x.dim() - k], n)
    return _NormFunction.apply(flat, _as_vector(weight, n), _as_vector(bias, n), float(eps), center).view(x.shape)


def _as_vector(param: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return param if param is None or param.dim() == 1 else param.reshape(n)


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """(x − μ) / √(σ² + eps) · weight + bias over the trailing normalized_shape dims, as F.layer_norm.

    Float32 math; the output has x's dtype (weight and bias may be of another float dtype, e.g. float32
    parameters under bf16 autocast); gradients for x, weight and bias in Triton.
    """
    return _normalize(x, normalized_shape, weight, bias, eps, center=True)


def rms_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = 1e-6) -> torch.Tensor:
    """x / √(mean(x²) + eps) · weight over the trailing normalized_shape dims, as F.rms_norm; eps=None is x's
    dtype's machine epsilon, as torch takes it."""
    return _normalize(x, normalized_shape, weight, None, eps, center=False)


# ------------------------------------------------------------------------------------------- softmax


class _SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, causal):
        y = softmax_kernels.softmax_forward(x, causal)
        ctx.save_for_backward(y)
        ctx.causal = causal
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return softmax_kernels.softmax_backward(y, dy, ctx.causal), None


def softmax(x: torch.Tensor, dim: int = -1, causal: bool = False) -> torch.Tensor:
    """softmax along dim; causal masks key j > query i over the last two dims ([..., S_q, S_k], dim must be -1).

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
        raise ValueError(f"causal softmax runs over the last dim of [..., S_q, S_k] scores; got dim={dim} "
                         f"for x of shape {tuple(x.shape)}")
    if dim == x.dim() - 1:
        return _SoftmaxFunction.apply(x, bool(causal))
    return _SoftmaxFunction.apply(x.movedim(dim, -1), False).movedim(-1, dim)


# ------------------------------------------------------------------------------------------- dropout


def _check_dropout_args(p, seed) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be a number in [0, 1], got {p!r}")
    if seed is not None:
        if isinstance(seed, torch.Tensor):
            if seed.numel() != 1 or seed.is_floating_point():
                raise TypeError(f"seed must be an int or a one-element integer tensor, got {seed!r}")
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {int(seed)}")


class _DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return dropout_kernels.dropout(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        return dropout_kernels.dropout(dy, ctx.p, ctx.seed), None, None


def dropout(x: torch.Tensor, p: float = 0.5, seed: int | None = None, training: bool = True) -> torch.Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 − p); identity when not training.

    The mask is a function of (seed, x.shape) only (Philox; nothing stored, the backward draws it again): the same
    seed gives the same mask. Each element's draw is a 16-bit uniform, so the drop rate is p rounded to a multiple
    of 2⁻¹⁶ (p = 0 and p = 1 stay exact). seed=None draws one from torch's default CPU generator (so torch.manual_seed
    makes runs repeatable).
    """
    check_tensor(x, "x")
    _check_dropout_args(p, seed)
    if not training:
        return x
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return _DropoutFunction.apply(x, float(p), int(seed))


# ------------------------------------------------------------------------------------- cross_entropy

_REDUCTIONS = ("mean", "sum", "none")


def _check_cross_entropy_options(ignore_index, reduction, label_smoothing, n_chunks, inplace_grad) -> None:
    """The arguments of cross_entropy and TritonCrossEntropyLoss other than the tensors."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
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
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}: "
                         f"expected {tuple(logits.shape[:-1])} (classes along the last dim of logits)")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits are on {logits.device}")
    base = logits._base if logits._base is not None else logits
    if getattr(base, "_triformer_grad_version", None) == base._version:
        raise ValueError("these logits already hold the gradient of an earlier triformer cross_entropy (written "
                         "into their storage by inplace_grad=True); leave inplace_grad=False to keep them")


def _check_in_place(logits2d: torch.Tensor) -> None:
    """inplace_grad=True: the gradient goes into the logits' storage, which must hold each element once."""
    m, v = logits2d.shape
    if not (logits2d.is_contiguous() or (logits2d.stride(1) == 1 and logits2d.stride(0) >= v)):
        raise ValueError(f"inplace_grad=True needs logits whose rows do not overlap; got strides {logits2d.stride()}")


def _raise_for_bad_targets(n_bad: torch.Tensor, targets1d: torch.Tensor, v: int, ignore_index: int):
    """The clear error for targets out of range. Read back after the kernel is queued, so the GPU is busy while
    the host waits (the kernel itself did nothing)."""
    if n_bad.item():
        bad = (targets1d != ignore_index) & ((targets1d < 0) | (targets1d >= v))
        raise ValueError(f"targets must lie in [0, {v}) or equal ignore_index={ignore_index}; "
                         f"found {int(targets1d[bad][0])}")


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, targets1d, ignore_index, reduction, label_smoothing, n_chunks, inplace):
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits2d if inplace else new_empty(logits2d.shape, like=logits2d)
        # Under CUDA graph capture the host cannot read the check back: the kernel's own guard stands alone (an
        # out-of-range target gives its row a NaN loss and NaN gradients, never a stray read).
        checked = not (logits2d.is_cuda and torch.cuda.is_current_stream_capturing())
        losses, n_valid, n_bad = ce_kernels.cross_entropy_forward(
            logits2d, targets1d, ignore_index, reduction == "mean", label_smoothing, grad, n_chunks, checked)
        if checked:
            _raise_for_bad_targets(n_bad, targets1d, logits2d.shape[1], ignore_index)
        if grad is logits2d:
            torch.autograd.graph.increment_version(logits2d)
            base = logits2d._base if logits2d._base is not None else logits2d
            base._triformer_grad_version = base._version
        ctx.save_for_backward(grad)
        ctx.reduction, ctx.backward_done = reduction, False
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        if ctx.backward_done:
            raise RuntimeError("triformer cross_entropy keeps its gradient in one buffer and scales it in place: "
                               "its backward can run only once")
        ctx.backward_done = True
        scale = dloss.reshape(-1) if ctx.reduction == "none" else dloss.reshape(())
        return ce_kernels.scale_rows_(grad, scale.float()), None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, n_chunks: int = 1, inplace_grad: bool = False) -> torch.Tensor:
    """Cross-entropy of logits [..., V] (classes along the LAST dim) against integer targets [...], as
    F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ...) computes it; the loss is float32.

    One kernel computes the loss and, when logits need a gradient, the gradient too (online softmax, two passes
    over each row); the backward only scales it by the incoming gradient. Where that gradient is written:
      inplace_grad=False (default): a buffer of its own; the logits keep their values, as with F.cross_entropy.
      inplace_grad=True: into the logits' own storage (leaves included) — the memory saving (no [N, V] gradient
        buffer) that Liger-Kernel's cross-entropy always takes. After the call the logits hold the gradient:
        read anything else off them (accuracy, argmax) before the loss, and use them in nothing else. Their
        version is bumped, so an op that saved them for its backward raises there ("modified by an inplace
        operation"), and a second triformer cross_entropy on them raises at once. (For an LM head,
        linear_cross_entropy saves the memory without touching any logits.)
    n_chunks: rows are processed in that many launches (dame-cell/Triformer's knob; the gradient is computed in
    the forward, so it does not change peak memory here).
    The backward can run once. All targets ignored: "mean" gives NaN (0/0), "sum" 0, as torch.
    """
    _check_cross_entropy_options(ignore_index, reduction, label_smoothing, n_chunks, inplace_grad)
    _check_cross_entropy_inputs(logits, targets)
    v = logits.shape[-1]
    logits2d = logits.reshape(-1, v)
    if inplace_grad:
        _check_in_place(logits2d)
    loss = _CrossEntropyFunction.apply(logits2d, targets.reshape(-1), int(ignore_index), reduction,
                                       float(label_smoothing), n_chunks, inplace_grad)
    return loss.view(targets.shape) if reduction == "none" else loss
from .attention import attention  # noqa: E402,F401  (its own module; imported last: it uses _cast_for_autocast)
from .rope import rope, rope_tables  # noqa: E402,F401  (its own module)
from .gated import gated_activation, geglu, swiglu  # noqa: E402,F401  (its own module)
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402,F401  (fused linear + cross-entropy)
