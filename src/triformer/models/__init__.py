"""Models built only from triformer.nn (each with a backend="torch" reference)."""

from .mlp import TritonMLP

__all__ = ["TritonMLP"]
