"""Import path of the original triformer package (dame-cell/Triformer):
`from triformer.rms_norm import TritonRMSNorm`."""

from .nn import TritonRMSNorm

__all__ = ["TritonRMSNorm"]
