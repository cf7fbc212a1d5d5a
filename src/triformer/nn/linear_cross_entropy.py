"""The LM head's loss without full logits: TritonLinearCrossEntropyLoss and its PyTorch twin.

    loss = cross_entropy(x·Wᵀ + b, targets)       x [..., H], W [V, H] (the head's or the tied embedding's weight)

Both modules hold no parameters: the model passes its weight (and bias) to forward, so a GPT with tied embeddings
passes its token embedding's weight.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import functional as F_tri
from ..functional.linear_cross_entropy import ACCUM_DTYPES


class _LinearCrossEntropyLoss(nn.Module):
    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        F_tri.check_loss_options(ignore_index, reduction, label_smoothing)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, float(label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class TritonLinearCrossEntropyLoss(_LinearCrossEntropyLoss):
    """cross_entropy(x·weightᵀ + bias, targets) in chunks of rows on triformer's kernels, the gradients of x, weight
    and bias computed chunk by chunk in the forward (see triformer.functional.linear_cross_entropy for chunk_size
    and accum_dtype). ignore_index, reduction and label_smoothing as nn.CrossEntropyLoss."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        accum_dtype: torch.dtype | None = torch.float32,
    ):
        super().__init__(ignore_index, reduction, label_smoothing)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
        if accum_dtype not in ACCUM_DTYPES:
            raise ValueError(f"accum_dtype must be torch.float32 or None (the weight's dtype), got {accum_dtype!r}")
        self.chunk_size, self.accum_dtype = chunk_size, accum_dtype

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F_tri.linear_cross_entropy(
            x,
            weight,
            targets,
            bias,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            self.chunk_size,
            self.accum_dtype,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, accum_dtype={self.accum_dtype}"


class TorchLinearCrossEntropyLoss(_LinearCrossEntropyLoss):
    """The PyTorch twin: F.cross_entropy(F.linear(x, weight, bias).float(), targets, ...) over the full logits."""

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = F.linear(x, weight, bias).float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
        return loss.view(targets.shape) if self.reduction == "none" else loss
