"""Import path of the original triformer package (dame-cell/Triformer 2.x): `from triformer.mlp import TritonLinear`
(Linear + ReLU fused, TritonLinear's default); TritonMLP is here too."""

from .models import TritonMLP
from .nn import TritonLinear

__all__ = ["TritonLinear", "TritonMLP"]
