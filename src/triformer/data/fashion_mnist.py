"""FashionMNIST through torchvision's own loader.

Offline, the raw idx files come from Debian's `dataset-fashion-mnist` (the same files torchvision downloads):
they are gunzipped into torchvision's raw folder `<root>/FashionMNIST/raw/`, where the real loader reads them.
Online, torchvision downloads them.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch
import torchvision

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NUM_CLASSES = 10
MEAN, STD = (0.2860,), (0.3530,)


def raw_folder(root: str | Path) -> Path:
    return Path(root) / "FashionMNIST" / "raw"


def find_offline(offline_dir) -> Path | None:
    """The first of `offline_dir` (a folder or a list of them) that holds the four .gz files, or None."""
    folders = [offline_dir] if isinstance(offline_dir, (str, Path)) else list(offline_dir or [])
    return next((Path(f) for f in folders if all((Path(f) / f"{n}.gz").exists() for n in FILES)), None)


def prepare(root: str | Path, offline_dir=DEBIAN_DIR, download: bool = True) -> str:
    """Make `root` loadable by torchvision.datasets.FashionMNIST; returns where the files came from.

    offline_dir: a folder, or a list of folders tried in order, holding the four `.gz` files.
    """
    source = find_offline(offline_dir)
    if source is not None:
        raw = raw_folder(root)
        raw.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            with gzip.open(source / f"{name}.gz", "rb") as fin, open(raw / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        origin = f"offline: {source}"
    elif download:
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
        origin = "download: torchvision"
    else:
        raise FileNotFoundError(
            f"FashionMNIST: no {', '.join(f'{n}.gz' for n in FILES)} in {offline_dir} and download is off; "
            "install Debian's dataset-fashion-mnist (`make offline-data`) or allow the download"
        )
    for train in (True, False):
        load(root, train)  # the real loader must accept what was written
    return origin


def load(root: str | Path, train: bool) -> torchvision.datasets.FashionMNIST:
    return torchvision.datasets.FashionMNIST(str(root), train=train, download=False)


def tensors(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 1, 28, 28] and labels as int64 [N]."""
    dataset = load(root, train)
    return dataset.data.unsqueeze(1), torch.as_tensor(dataset.targets, dtype=torch.int64)
