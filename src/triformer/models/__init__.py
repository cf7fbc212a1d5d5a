"""Models built only from triformer.nn (each with a backend="torch" reference)."""

from .gpt import GPT, GPTConfig
from .mlp import TritonMLP
from .vit import ViT, ViTConfig

__all__ = ["TritonMLP", "GPT", "GPTConfig", "ViT", "ViTConfig"]
