"""Import path of the original triformer package (dame-cell/Triformer):
`from triformer.cross_entropy import TritonCrossEntropyLoss` (its `pad_token_id=` is accepted as `ignore_index=`)."""

from .nn import TritonCrossEntropyLoss

__all__ = ["TritonCrossEntropyLoss"]
