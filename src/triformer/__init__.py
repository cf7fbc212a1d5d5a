"""triformer: Triton kernels for transformers, forward and backward, as drop-in PyTorch modules."""

from . import functional
from .models import TritonMLP
from .nn import (
    TorchLinear,
    TritonCrossEntropyLoss,
    TritonDropout,
    TritonLayerNorm,
    TritonLinear,
    TritonRMSNorm,
    TritonSoftmax,
)

__version__ = "0.1.0"
__all__ = [
    "functional",
    "TritonLinear",
    "TorchLinear",
    "TritonMLP",
    "TritonLayerNorm",
    "TritonRMSNorm",
    "TritonSoftmax",
    "TritonDropout",
    "TritonCrossEntropyLoss",
]

from .models import GPT, GPTConfig, ViT, ViTConfig  # noqa: E402
from .nn import TorchMultiheadAttention, TritonMultiheadAttention  # noqa: E402

__all__ += ["TritonMultiheadAttention", "TorchMultiheadAttention", "GPT", "GPTConfig", "ViT", "ViTConfig"]
from .nn import TritonGatedMLP, TritonRotaryEmbedding  # noqa: E402

__all__ += ["TritonRotaryEmbedding", "TritonGatedMLP"]
from .nn import TritonLinearCrossEntropyLoss  # noqa: E402

__all__ += ["TritonLinearCrossEntropyLoss"]
