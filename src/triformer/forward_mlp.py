"""Import path of the original triformer package (dame-cell/Triformer 1.x): `from triformer.forward_mlp import
TritonLinear` (its `use_relu=` is accepted as `activation="relu"` / `None`)."""

from .nn import TritonLinear

__all__ = ["TritonLinear"]
