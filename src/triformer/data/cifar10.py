"""CIFAR-10 through torchvision's own loader and download (python-pickle batches under `<root>/cifar-10-batches-py`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

NUM_CLASSES = 10
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def prepare(root: str | Path, download: bool = True) -> str:
    """Download (when missing) and check both splits with the real loader; returns where the files came from."""
    for train in (True, False):
        torchvision.datasets.CIFAR10(str(root), train=train, download=download)
    return f"download: {torchvision.datasets.CIFAR10.url}" if download else f"local: {root}"


def load(root: str | Path, train: bool) -> torchvision.datasets.CIFAR10:
    return torchvision.datasets.CIFAR10(str(root), train=train, download=False)


def tensors(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 3, 32, 32] and labels as int64 [N]."""
    dataset = load(root, train)
    return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(dataset.targets)
