"""`add_dropout_norm(x, h, ...)`: a pre-norm block's residual add with dropout on the branch, and the next norm of
the sum, as one op each way (op triformer::add_dropout_norm; kernels/residual_norm.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import dropout as dropout_kernels
from ..kernels import norms as norm_kernels
from ..kernels import residual_norm as residual_kernels
from ..kernels._runtime import FLOAT_DTYPES, check_tensor
from . import _check_dropout_args, _check_eps, _check_param, _seed_tensor, _seed_value, dropout, layer_norm, rms_norm
from ._library import Op, placeholder

NORMS = ("layernorm", "rmsnorm")


def _impl(
    x: Tensor,
    h: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool,
    p: float,
    seed: Tensor,
    y_dtype: torch.dtype | None = None,
    branch_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(s, y, the rows' mean(s − s₀) (a placeholder for RMSNorm), their rstd)."""
    s, y, mean, rstd = residual_kernels.forward(
        x, h, weight, bias, eps, center, p, _seed_value(seed), y_dtype, branch_bias
    )
    return s, y, placeholder(rstd) if mean is None else mean, rstd


def _fake(x, h, weight, bias, eps, center, p, seed, y_dtype=None, branch_bias=None):
    dtype = torch.promote_types(x.dtype, residual_kernels.branch_dtype(h.dtype, branch_bias))
    rows = x.shape[:-1].numel()
    rstd = x.new_empty((rows,), dtype=torch.float32)
    stream, normed = x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=y_dtype or dtype)
    return stream, normed, rstd.new_empty((rows,) if center else (0,)), rstd


def _setup(ctx, inputs, output):
    x, h, weight, bias, _, center, ctx.p, seed = inputs[:8]  # y_dtype and branch_bias may be left to their defaults
    branch_bias = inputs[9] if len(inputs) > 9 else None
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean if center else None, rstd, seed)
    ctx.dtypes = x.dtype, h.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype
    ctx.branch = (
        None if branch_bias is None else (residual_kernels.branch_dtype(h.dtype, branch_bias), branch_bias.dtype)
    )
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, ds, dy, _mean, _rstd):
    s, weight, mean, rstd, seed = ctx.saved_tensors
    if ds is None and dy is None:
        return (None,) * ctx.n_inputs
    need_dx, need_dh, need_dw, need_db = ctx.needs_input_grad[:4]
    x_dtype, h_dtype, w_dtype, b_dtype = ctx.dtypes
    t_dtype, c_dtype = ctx.branch or (None, None)
    need_dc = ctx.branch is not None and ctx.needs_input_grad[9]
    dtypes = (
        w_dtype if need_dw and dy is not None else None,
        b_dtype if need_db and dy is not None else None,
        c_dtype if need_dc else None,
    )
    dx, dh, sums = _backward_op(
        dy,
        ds,
        s,
        weight,
        mean,
        rstd,
        ctx.p,
        seed,
        x_dtype,
        h_dtype,
        dtypes[0] is not None,
        dtypes[1] is not None,
        norm_kernels.sums_dtype(*dtypes),
        t_dtype,
        need_dc,
    )
    grads = iter(sums.unbind(0))
    dw, db, dc = (None if dtype is None else next(grads).to(dtype) for dtype in dtypes)
    grads = (dx if need_dx else None, dh if need_dh else None, dw, db, None, None, None, None, None, dc)
    return grads[: ctx.n_inputs]


def _backward_impl(
    dy: Tensor | None,
    ds: Tensor | None,
    s: Tensor,
    weight: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    p: float,
    seed: Tensor,
    x_dtype: torch.dtype,
    h_dtype: torch.dtype,
    need_dw: bool,
    need_db: bool,
    sum_dtype: torch.dtype,
    t_dtype: torch.dtype | None = None,
    need_dc: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dh, [dw; db; dc]: the wanted ones as the rows of one tensor in sum_dtype) of _impl; t_dtype: the
    branch's dtype when it had a bias (dc: that bias's gradient)."""
    return residual_kernels.backward(
        dy,
        ds,
        s,
        weight,
        mean,
        rstd,
        p,
        _seed_value(seed),
        x_dtype,
        h_dtype,
        need_dw,
        need_db,
        sum_dtype,
        t_dtype,
        need_dc,
    )


def _backward_fake(
    dy, ds, s, weight, mean, rstd, p, seed, x_dtype, h_dtype, need_dw, need_db, sum_dtype, t_dtype=None, need_dc=False
):
    return (
        s.new_empty(s.shape, dtype=x_dtype),
        s.new_empty(s.shape, dtype=h_dtype),
        rstd.new_empty((need_dw + need_db + need_dc, s.shape[-1]), dtype=sum_dtype),
    )


_backward_op = Op("add_dropout_norm_backward", _backward_impl, _backward_fake)
_op = Op("add_dropout_norm", _impl, _fake, setup_context=_setup, backward=_backward)


def _check(x, h, weight, bias, norm, y_dtype) -> None:
    check_tensor(x, "x")
    check_tensor(h, "h")
    if h.shape != x.shape:
        raise ValueError(f"h must have x's shape {tuple(x.shape)}, got {tuple(h.shape)}")
    if h.device != x.device:
        raise ValueError(f"h is on {h.device} but x is on {x.device}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a last dimension of at least one element, got shape {tuple(x.shape)}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if norm == "rmsnorm" and bias is not None:
        raise ValueError("RMSNorm has no bias: pass bias=None with norm='rmsnorm'")
    if y_dtype is not None and y_dtype not in FLOAT_DTYPES:
        raise TypeError(f"y_dtype must be None or one of {FLOAT_DTYPES}, got {y_dtype!r}")


def add_dropout_norm(
    x: torch.Tensor,
    h: torch.Tensor,
    p: float = 0.0,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float | None = 1e-5,
    norm: str = "layernorm",
    training: bool = True,
    seed: int | torch.Tensor | None = None,
    y_dtype: torch.dtype | None = None,
    branch_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) with s = x + dropout(h, p) and y = layer_norm(s) (norm="layernorm", with weight and bias) or
    rms_norm(s) (norm="rmsnorm", weight only) over the last dim: a pre-norm block's residual add and the norm that
    follows it, forward and backward in one kernel each (op triformer::add_dropout_norm).

    x and h [..., N] of one shape (h may have another float dtype, e.g. a bf16 branch on a float32 residual stream:
    s and y take the promoted dtype, as `x + h` does); weight and bias [N] or None. The sum, the mask and the
    gradients are those of `x + dropout(h, p, seed, training)` followed by the norm (triformer's dropout: the same
    seed gives the same mask). Rows wider than kernels/residual_norm.MAX_WIDTH run as those separate ops.

    y_dtype: y's dtype when not s's, e.g. the autocast dtype for a norm whose output only feeds linears (they would
    cast it): y is computed in float32 and rounded once to it, as the cast of a float32 y would round it, and its
    gradient is read in that dtype.

    branch_bias: c [N], the bias of the linear that made h, added here instead of by that linear:
    s = x + dropout(h + c), with h + c in their promoted dtype, as torch adds them. Its gradient (Σ over the rows of
    the branch's gradient) comes out of the pass that writes h's, instead of a pass of its own over it.
    """
    _check(x, h, weight, bias, norm, y_dtype)
    n = x.shape[-1]
    _check_param(weight, "weight", x, (n,))
    _check_param(bias, "bias", x, (n,))
    _check_param(branch_bias, "branch_bias", x, (n,))
    _check_dropout_args(p, seed)
    center = norm == "layernorm"
    _check_eps(eps, allow_none=not center)
    if eps is None:
        eps = torch.finfo(torch.promote_types(x.dtype, residual_kernels.branch_dtype(h.dtype, branch_bias))).eps
    if n > residual_kernels.MAX_WIDTH:
        branch = h if branch_bias is None else h + branch_bias
        s = x + dropout(branch, p, seed, training)  # no seed drawn where nothing drops, as the op below
        y = layer_norm(s, (n,), weight, bias, eps) if center else rms_norm(s, (n,), weight, eps)
        return s, y if y_dtype is None else y.to(y_dtype)
    p = float(p) if training else 0.0
    p = p if dropout_kernels.drops_any(p) else 0.0
    seed = _seed_tensor(seed if p else 0, x)  # nothing dropped: no seed drawn, as dropout() draws none
    return tuple(_op(x, h, weight, bias, float(eps), center, p, seed, y_dtype, branch_bias)[:2])
