"""A generic training loop for classifiers: AdamW, linear warmup then cosine decay, bf16 autocast on the GPU,
evaluation every epoch, tqdm progress, a checkpoint each epoch and resume from the latest one after a crash.

Resuming reaches the state an uninterrupted run would have: the checkpoint holds model, optimizer, scheduler, the
epoch history and every RNG state, and the shuffling of epoch e depends only on (seed, e).
"""

from __future__ import annotations

import math
import os
import pickle
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

CHECKPOINT_GLOB = "epoch_*.pt"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05  # of all optimizer steps
    min_lr_frac: float = 0.0  # the cosine ends at lr * min_lr_frac
    amp: str = "bf16"  # "bf16" or "none"; autocast is used on CUDA only
    seed: int = 0
    log_every: int = 50  # steps between train/loss points
    eval_batch_size: int = 1024
    max_checkpoints: int = 2  # newest checkpoints kept on disk
    progress: bool = True


def warmup_cosine(step: int, warmup: int, total: int, min_frac: float = 0.0) -> float:
    """LR multiplier: linear from 1/warmup to 1 over `warmup` steps, then cosine from 1 down to `min_frac`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(device: torch.device, amp: str):
    if device.type == "cuda" and amp == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if amp not in ("bf16", "none"):
        raise ValueError(f"amp must be 'bf16' or 'none', got {amp!r}")
    return torch.autocast(device.type, enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, config: TrainConfig, device: torch.device) -> dict:
    """Mean cross-entropy and accuracy over the whole dataset."""
    model.eval()
    images, labels = dataset.tensors
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), config.eval_batch_size):
        x = images[start:start + config.eval_batch_size].to(device, non_blocking=True)
        y = labels[start:start + config.eval_batch_size].to(device, non_blocking=True)
        with _autocast(device, config.amp):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return {"val/loss": loss_sum / len(labels), "val/accuracy": correct / len(labels)}


# ------------------------------------------------------------------------------------------------ checkpoints


def _rng_state() -> dict:
    """Every RNG the loop may draw from, as tensors and plain numbers: checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint this loop wrote. Loaded with weights_only=True: a file holding anything but tensors and plain
    data (a pickle that would run code, say) is refused, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} is not a checkpoint of triformer.training: it holds objects other than tensors and "
                         f"plain data, and was not loaded ({str(error).splitlines()[0]})") from error


def latest_checkpoint(directory: str | Path | None) -> Path | None:
    if directory is None:
        return None
    found = sorted(Path(directory).glob(CHECKPOINT_GLOB))
    return found[-1] if found else None


def checkpoint_extra(directory: str | Path | None) -> dict:
    """The `extra` dictionary stored with the latest checkpoint (e.g. the MLflow run to continue), or {}."""
    path = latest_checkpoint(directory)
    return load_checkpoint(path)["extra"] if path else {}


def _save_checkpoint(directory: Path, epoch: int, state: dict, keep: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch_{epoch:04d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing never leaves a truncated "latest" checkpoint
    for old in sorted(directory.glob(CHECKPOINT_GLOB))[:-max(1, keep)]:
        old.unlink()


# ------------------------------------------------------------------------------------------------ the loop


def fit(model: nn.Module, train_set: TensorDataset, val_set: TensorDataset, config: TrainConfig,
        device: str | torch.device = "cpu", checkpoint_dir: str | Path | None = None,
        log: Callable[[dict, int], None] | None = None, extra: dict | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train `model` (already seeded and built) on (images, labels) TensorDatasets; returns the final metrics.

    The result holds the last epoch's `val/accuracy`, `val/loss`, `train/loss`, `perf/images_per_s`,
    `perf/step_ms` (and `mem/peak_mib` on CUDA), plus `history` (one dict per epoch) and `resumed_from_epoch`.
    `log(metrics, step)` receives `train/loss` and `train/lr` every `log_every` optimizer steps (step = global
    step) and the epoch metrics after each epoch (step = epoch number, from 1). With `checkpoint_dir`, a checkpoint
    is written after every epoch (with `extra` inside) and training resumes from the latest one found there.
    """
    device = torch.device(device)
    model.to(device)
    images, labels = (t.to(device) for t in train_set.tensors)
    n = len(labels)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    warmup = max(1, int(config.warmup_frac * total_steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps, config.min_lr_frac))
    history: list[dict] = []
    start_epoch = 0
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None:
        state = load_checkpoint(resume)
        changed = {k for k, v in asdict(config).items() if k != "progress" and state["config"].get(k) != v}
        if changed:
            raise ValueError(f"{resume} was written with other settings ({sorted(changed)}): resuming it would not "
                             "give the run these settings ask for; remove it or use another checkpoint_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"] + 1
    log = log or (lambda metrics, step: None)
    shuffle = torch.Generator()

    for epoch in range(start_epoch, config.epochs):
        if device.type == "cuda":  # mem/peak_mib is per epoch: the first also holds Triton autotuning's 256 MiB L2 flush
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        shuffle.manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=shuffle).to(device)
        loss_sum = torch.zeros((), device=device)
        _sync(device)
        started = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, mininterval=1.0,
                   disable=None if config.progress else True)  # None: shown on a terminal only
        for i in bar:
            index = order[i * config.batch_size:(i + 1) * config.batch_size]
            x, y = images[index], labels[index]
            with _autocast(device, config.amp):
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(y)
            step = epoch * steps_per_epoch + i + 1
            if step % config.log_every == 0 or i == steps_per_epoch - 1:
                value = loss.item()
                bar.set_postfix(loss=f"{value:.4f}")
                log({"train/loss": value, "train/lr": scheduler.get_last_lr()[0]}, step)
        _sync(device)
        seconds = time.perf_counter() - started
        metrics = {"train/epoch_loss": loss_sum.item() / n, **evaluate(model, val_set, config, device),
                   "perf/images_per_s": n / seconds, "perf/step_ms": 1e3 * seconds / steps_per_epoch}
        if device.type == "cuda":
            metrics["mem/peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        history.append({"epoch": epoch + 1, **metrics})
        log(metrics, epoch + 1)
        if config.progress:
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if checkpoint_dir is not None:
            _save_checkpoint(Path(checkpoint_dir), epoch, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history, "rng": _rng_state(),
                "config": asdict(config), "extra": extra or {}}, config.max_checkpoints)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    final = dict(history[-1]) if history else {}
    final.pop("epoch", None)
    final["train/loss"] = final.pop("train/epoch_loss", float("nan"))
    return {**final, "history": history, "resumed_from_epoch": start_epoch}
