"""Import path of the original triformer package (dame-cell/Triformer): `from triformer.dropout import TritonDropout`
(`TritonDropout.apply(x, p, seed)` is functional dropout there and here; `dropout_prob=` is accepted as `p=`)."""

from .nn import TritonDropout

__all__ = ["TritonDropout"]
