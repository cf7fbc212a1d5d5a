"""Import path of the original triformer package (dame-cell/Triformer): `from triformer.softmax import TritonSoftmax`
(its `is_causal=` is accepted as `causal=`)."""

from .nn import TritonSoftmax

__all__ = ["TritonSoftmax"]
