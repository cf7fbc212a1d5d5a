"""Import path of the original triformer package (dame-cell/Triformer):
`from triformer.layernorm import TritonLayerNorm`."""

from .nn import TritonLayerNorm

__all__ = ["TritonLayerNorm"]
