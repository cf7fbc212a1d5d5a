"""One training loop for classification and language modelling: batches and a loss in, metrics out.

data      a batch source: `Examples` (inputs and class labels; each epoch visits them in an order drawn from
          (seed, epoch)) or `TokenStream` (windows of a token stream; the batch of step s is drawn from
          (seed, s)). Throughput is counted in the source's unit: images/s or tokens/s.
loss      loss_fn(model, x, y) → (loss, logits or None): `cross_entropy_loss` (the model gives logits) or
          `model_loss` (the model computes its own loss from inputs and targets: GPT, ViT).
schedule  `epochs` (evaluation after each) or `iterations` (evaluation every `eval_every` steps); AdamW with weight
          decay on matrices only, linear warmup then cosine, gradient clipping, bf16 autocast on CUDA, tqdm.
resume    a checkpoint after each evaluation (or every `checkpoint_every` steps); a run finds its latest one and
          continues where an uninterrupted run would be: model, optimizer, scheduler, history, the interval's
          sums and every RNG state of every process are in it, and the batches depend only on (seed, step).
compile   `compile` runs the forward of every training step through torch.compile ("default" or "reduce-overhead", its
          CUDA graphs; "none": eager); the module itself stays uncompiled, so checkpoints, evaluation and generation
          see the same parameter names either way.
DDP       inside a torch.distributed group (torchrun; see triformer.distributed) the model trains data-parallel:
          batch_size stays the global batch, each process takes its slice, losses and metrics are reduced over
          the processes, rank 0 writes the checkpoints and logs, and every process resumes from them.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from . import distributed

CHECKPOINT_GLOB = "step_*.pt"


@dataclass
class TrainConfig:
    epochs: int = 10
    iterations: int = 0  # > 0: a step-based run of this many optimizer steps (epochs unused)
    batch_size: int = 128  # the global batch: data-parallel processes split it
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's, on matrices and embeddings only (not on biases and norm gains)
    beta2: float = 0.999  # AdamW's second-moment decay (beta1 is 0.9)
    warmup_frac: float = 0.05  # of all optimizer steps
    min_lr_frac: float = 0.0  # the cosine ends at lr * min_lr_frac
    grad_clip: float = 0.0  # largest global gradient norm (0: no clipping)
    amp: str = "bf16"  # "bf16" or "none"; autocast is used on CUDA only
    seed: int = 0
    log_every: int = 50  # steps between train/loss points
    eval_every: int = 0  # step-based runs: steps between evaluations (0: at the end only); epochs: each epoch
    eval_batches: int = 0  # batches per evaluation, the same every time (0: the whole validation set)
    eval_batch_size: int = 1024
    checkpoint_every: int = 0  # steps between checkpoints (0: after every evaluation)
    max_checkpoints: int = 2  # newest checkpoints kept on disk
    compile: str = "none"  # "none" (eager), "default" or "reduce-overhead": torch.compile's mode for the training steps
    progress: bool = True


COMPILE_MODES = ("none", "default", "reduce-overhead")
# Settings that change how a run goes, not what it computes: a checkpoint written under other values resumes.
RESUMABLE_ACROSS = ("progress", "compile")


def compile_problem(mode: str, device_type: str) -> str | None:
    """What is wrong with training in compile `mode` on `device_type` (None when nothing is): reduce-overhead is
    torch.compile with CUDA graphs, which Inductor records on CUDA only; elsewhere it would be the default mode
    under another name."""
    if mode not in COMPILE_MODES:
        return f"must be one of {list(COMPILE_MODES)}, got {mode!r}"
    if mode == "reduce-overhead" and device_type != "cuda":
        return (
            f"reduce-overhead records CUDA graphs, which need CUDA; this run is on {device_type}, where it would "
            "be the default mode under another name: use compile: default (or none)"
        )
    return None


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


# ------------------------------------------------------------------------------------------------ batches and losses


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (a batch's indices or draws) on `device` without a host wait: through pinned memory and a
    non-blocking copy on CUDA (a copy from pageable memory synchronizes the stream every step)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Examples:
    """Inputs [N, ...] and class labels [N]: epoch e visits them in a random order drawn from (seed, e); evaluation
    visits them in order. A batch counts its labels as `unit` (images).

    Images [N, C, H, W] can be augmented in training batches (never in evaluation), on the inputs' device, with
    draws from (seed, step) so that a resumed run sees the same batches: `shift` > 0 moves each image by a whole
    number of pixels in [-shift, shift] along each axis (the pixels uncovered take `fill`: the background's value,
    one for all channels or one per channel), `flip` mirrors each image left to right with probability 1/2."""

    unit = "images"
    accuracy = True

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        shift: int = 0,
        flip: bool = False,
        fill: float | Sequence[float] = 0.0,
    ):
        if len(inputs) != len(labels) or len(labels) == 0:
            raise ValueError(
                f"Examples needs as many inputs as labels, at least one: got {len(inputs)} inputs and "
                f"{len(labels)} labels"
            )
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"shift must be a whole number of pixels ≥ 0, got {shift!r}")
        if (shift or flip) and inputs.dim() != 4:
            raise ValueError(f"shift and flip augment images [N, C, H, W]; got inputs of shape {tuple(inputs.shape)}")
        fills = tuple(torch.as_tensor(fill, dtype=torch.float64).reshape(-1).tolist())
        if shift and len(fills) not in (1, inputs.shape[1]):
            raise ValueError(f"fill needs one value or one per channel ({inputs.shape[1]}), got {len(fills)}")
        self.inputs, self.labels = inputs, labels
        self.shift, self.flip, self.fill = shift, bool(flip), fill
        self._fills = fills * inputs.shape[1] if len(fills) == 1 and inputs.dim() == 4 else fills  # one a channel
        self._order: tuple[int, torch.Tensor] | None = None

    def to(self, device) -> Examples:
        return Examples(
            self.inputs.to(device), self.labels.to(device), shift=self.shift, flip=self.flip, fill=self.fill
        )

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.labels) / batch_size)

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch(batch_size))
        if self._order is None or self._order[0] != epoch:
            shuffle = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(len(self.labels), generator=shuffle)
            self._order = epoch, to_device_async(order, self.labels.device)
        index = self._order[1][i * batch_size : (i + 1) * batch_size]
        inputs = self.inputs[index]
        if self.shift or self.flip:
            inputs = self._augmented(inputs, torch.Generator().manual_seed(seed * 1_000_033 + step))
        return inputs, self.labels[index]

    def _augmented(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each image shifted by (dy, dx) and, where drawn, mirrored: out[b, c, i, j] = image[b, c, i − dy, j' − dx]
        with j' = j, or W − 1 − j when mirrored (fill outside the image)."""
        b, _, h, w = images.shape
        s = self.shift
        dy, dx = (torch.randint(-s, s + 1, (b, 1), generator=generator) for _ in range(2))
        mirrored = torch.rand(b, 1, generator=generator) < 0.5 if self.flip else torch.zeros(b, 1, dtype=torch.bool)
        cols = torch.arange(w)
        rows = torch.arange(h)[None, :] - dy  # [B, H]: source row of each output row
        cols = torch.where(mirrored, w - 1 - cols, cols) - dx  # [B, W]: source column of each output column
        device = images.device
        padded = images.new_empty((b, images.shape[1], h + 2 * s, w + 2 * s))  # sources in [-s, H + s)
        for channel, value in enumerate(self._fills):
            padded[:, channel].fill_(value)
        padded[:, :, s : s + h, s : s + w] = images
        rows, cols = to_device_async(torch.cat((rows, cols), dim=1) + s, device).split((h, w), dim=1)
        batch = torch.arange(b, device=device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

    def eval_batches(self, batch_size: int, count: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first `count` batches in order (count 0: all of them)."""
        n = len(self.labels) if count == 0 else min(len(self.labels), count * batch_size)
        for start in range(0, n, batch_size):
            yield self.inputs[start : start + batch_size], self.labels[start : start + batch_size]


class TokenStream:
    """A stream of token ids [N] read as windows: x = tokens[o : o + T], y = tokens[o + 1 : o + T + 1] (T =
    block_size). Training batches take offsets drawn from (seed, step); evaluation takes `count` batches of offsets
    drawn from the seed alone (the same batches at every evaluation), or with count 0 every consecutive window."""

    unit = "tokens"
    accuracy = False

    def __init__(self, tokens: torch.Tensor, block_size: int):
        if tokens.dim() != 1 or len(tokens) < block_size + 1:
            raise ValueError(
                f"TokenStream needs a 1-D stream of at least block_size + 1 = {block_size + 1} tokens, "
                f"got shape {tuple(tokens.shape)}"
            )
        self.tokens, self.block_size = tokens, block_size
        self._positions = torch.arange(block_size, device=tokens.device)

    def to(self, device) -> TokenStream:
        return TokenStream(self.tokens.to(device), self.block_size)

    def steps_per_epoch(self, batch_size: int) -> None:
        return None  # endless: step-based runs only

    def _windows(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = to_device_async(offsets, self.tokens.device)[:, None] + self._positions  # (B, T)
        return self.tokens[index], self.tokens[index + 1]

    def _random_offsets(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        return torch.randint(0, len(self.tokens) - self.block_size, (batch_size,), generator=generator)

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self._random_offsets(torch.Generator().manual_seed(seed * 1_000_003 + step), batch_size))

    def eval_batches(self, batch_size: int, count: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if count == 0:
            starts = torch.arange(0, len(self.tokens) - self.block_size, self.block_size)
            for i in range(0, len(starts), batch_size):
                yield self._windows(starts[i : i + batch_size])
            return
        generator = torch.Generator().manual_seed(seed)
        for _ in range(count):
            yield self._windows(self._random_offsets(generator, batch_size))


def as_batches(data):
    """A TensorDataset of (inputs, labels) as Examples; a batch source as itself."""
    return Examples(*data.tensors) if isinstance(data, TensorDataset) else data


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(mean cross-entropy in float32, logits) of a model that gives logits."""
    logits = model(x)
    return nn.functional.cross_entropy(logits.float(), y), logits


def model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(loss, logits) of a model that computes its own loss: model(x, y) → (logits or None, mean loss)."""
    logits, loss = model(x, y)
    return loss, logits


def _shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This process's rows of a global batch and how many targets they hold. A process left without rows (a last
    batch smaller than the number of processes) takes the first row, to be weighted 0."""
    rank, world = distributed.rank(), distributed.world_size()
    if world == 1:
        return x, y, y.numel()
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    return (xs, ys, ys.numel()) if len(ys) else (x[:1], y[:1], 0)


@torch.no_grad()
def evaluate(
    model: nn.Module, data, config: TrainConfig, device: torch.device, loss_fn: Callable = cross_entropy_loss
) -> dict:
    """val/loss (mean over targets) and, for classification, val/accuracy over the evaluation batches; data-parallel
    processes take every world_size-th batch and reduce their sums."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss · targets, correct, targets
    rank, world = distributed.rank(), distributed.world_size()
    for i, (x, y) in enumerate(data.eval_batches(config.eval_batch_size, config.eval_batches, config.seed)):
        if i % world != rank:
            continue
        with _autocast(device, config.amp):
            loss, logits = loss_fn(model, x, y)
        sums[0] += loss.double() * y.numel()
        sums[2] += y.numel()
        if data.accuracy and logits is not None:
            sums[1] += (logits.argmax(-1) == y).sum()
    model.train(was_training)
    loss_sum, correct, count = distributed.all_reduce(sums).tolist()
    return {"val/loss": loss_sum / count, **({"val/accuracy": correct / count} if data.accuracy else {})}


# ------------------------------------------------------------------------------------------------ checkpoints


def _rng_state() -> dict:
    """Every RNG the loop may draw from, as tensors and plain numbers: checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint this loop wrote. Loaded with weights_only=True: a file holding anything but tensors and plain
    data (a pickle that would run code, say) is refused, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not a checkpoint of triformer.training: it holds objects other than tensors and "
            f"plain data, and was not loaded ({str(error).splitlines()[0]})"
        ) from error


def latest_checkpoint(directory: str | Path | None) -> Path | None:
    if directory is None:
        return None
    found = sorted(Path(directory).glob(CHECKPOINT_GLOB))
    return found[-1] if found else None


def checkpoint_extra(directory: str | Path | None) -> dict:
    """The `extra` dictionary stored with the latest checkpoint (e.g. the MLflow run to continue), or {}."""
    path = latest_checkpoint(directory)
    return load_checkpoint(path)["extra"] if path else {}


def _save_checkpoint(directory: Path, step: int, state: dict, keep: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing never leaves a truncated "latest" checkpoint
    for old in sorted(directory.glob(CHECKPOINT_GLOB))[: -max(1, keep)]:
        old.unlink()


def _resume_state(checkpoint_dir, config: TrainConfig) -> dict | None:
    """The latest checkpoint (process 0 picks it, every process loads it), checked against this run's settings."""
    path = distributed.broadcast_object(latest_checkpoint(checkpoint_dir) if distributed.rank() == 0 else None)
    if path is None:
        return None
    state = load_checkpoint(path)
    changed = {k for k, v in asdict(config).items() if k not in RESUMABLE_ACROSS and state["config"].get(k) != v}
    if changed:
        raise ValueError(
            f"{path} was written with other settings ({sorted(changed)}): resuming it would not give "
            "the run these settings ask for; remove it or use another checkpoint_dir"
        )
    if len(state["rng"]) != distributed.world_size():
        raise ValueError(
            f"{path} was written by {len(state['rng'])} data-parallel process(es): resume it with as "
            f"many (this run has {distributed.world_size()})"
        )
    return state


# ------------------------------------------------------------------------------------------------ the loop


def _forward(net: nn.Module, mode: str, distributed_net: bool) -> Callable:
    """What a training step calls for the forward: `net` itself, or torch.compile(net, mode=mode). Whole-graph
    (fullgraph=True: a graph break raises rather than leaving part of the model eager) unless `net` is a
    DistributedDataParallel, whose forward Dynamo splits at its own bookkeeping and gradient buckets."""
    if mode == "none":
        return net
    return torch.compile(net, mode=mode, fullgraph=not distributed_net)


def _optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices and embeddings (dim ≥ 2), none on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=(0.9, config.beta2), fused=device.type == "cuda"
    )


def fit(
    model: nn.Module,
    train,
    val,
    config: TrainConfig,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | Path | None = None,
    log: Callable[[dict, int], None] | None = None,
    extra: dict | None = None,
    after_eval: Callable[[int, dict], None] | None = None,
    loss_fn: Callable = cross_entropy_loss,
    flops_per_item: float | None = None,
    peak_tflops: float | None = None,
) -> dict:
    """Train `model` (already seeded and built) on `train`, evaluating on `val`; returns the final metrics.

    train, val: batch sources (Examples, TokenStream) or (inputs, labels) TensorDatasets. The schedule runs
    config.iterations steps, or config.epochs epochs of the training set. Every interval (an epoch, or eval_every
    steps) ends with an evaluation and a record: `step` (and `epoch`), `train/epoch_loss` (`train/interval_loss` for
    step-based runs: the mean training loss of the interval), `val/loss` (and `val/accuracy`), `perf/<unit>_per_s`
    and `perf/step_ms` (training steps only), `mem/peak_mib` on CUDA, and `perf/mfu` = flops_per_item × items/s ÷
    (peak_tflops × processes) when both are given (model FLOPs per token against the measured matmul rate).

    config.compile other than "none" compiles the forward that the training steps call (evaluation runs the module
    eagerly); the first interval's throughput then includes the compilation. reduce-overhead needs CUDA (ValueError
    before any work elsewhere).

    log(metrics, step) (rank 0 only) receives `train/loss` and `train/lr` every `log_every` steps (step = global
    step) and each record (step = the epoch number for epochs, the global step otherwise). after_eval(index,
    metrics) runs after each record (and its checkpoint). The result is the last record (its interval's mean loss
    under the record's name, as logged, not `train/loss`, which is one step's), plus `history` (every record),
    `resumed_from_step` (and `resumed_from_epoch`).
    """
    device = torch.device(device)
    if problem := compile_problem(config.compile, device.type):
        raise ValueError(f"compile {problem}")
    train, val = as_batches(train).to(device), as_batches(val).to(device)
    rank, world = distributed.rank(), distributed.world_size()
    model.to(device)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    steps_per_epoch = train.steps_per_epoch(config.batch_size)
    if config.iterations > 0:
        total, interval, name = config.iterations, config.eval_every or config.iterations, "interval"
    elif steps_per_epoch is None:
        raise ValueError(f"a {type(train).__name__} has no epochs: give the run a number of iterations")
    elif config.eval_every:
        raise ValueError("eval_every is for step-based runs (iterations > 0); an epoch-based run evaluates each epoch")
    else:
        total, interval, name = config.epochs * steps_per_epoch, steps_per_epoch, "epoch"
    warmup = max(1, int(config.warmup_frac * total))
    optimizer = _optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total, config.min_lr_frac)
    )
    autocast = _autocast(device, config.amp)

    history: list[dict] = []
    start, carried = 0, (0.0, 0)  # the interval's (loss sum, targets) a checkpoint carried over
    state = _resume_state(checkpoint_dir, config)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][rank])
        history, start = state["history"], state["step"]
        if rank == 0:
            carried = state["interval_sums"]
    else:
        torch.manual_seed(config.seed + rank)  # dropout masks: each process its own stream
    forward = _forward(net, config.compile, world > 1)
    cuda_graphs = config.compile == "reduce-overhead"
    log = log if rank == 0 and log is not None else (lambda metrics, step: None)
    loss_sum = torch.full((), carried[0], dtype=torch.float64, device=device)
    targets = torch.full((), carried[1], dtype=torch.float64, device=device)

    def save(step: int) -> None:
        sums = distributed.all_reduce(torch.stack([loss_sum, targets])).tolist()
        rngs = distributed.gather_objects(_rng_state())
        if rank == 0 and checkpoint_dir is not None:
            _save_checkpoint(
                Path(checkpoint_dir),
                step,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "history": history,
                    "rng": rngs,
                    "interval_sums": sums,
                    "config": asdict(config),
                    "extra": extra or {},
                },
                config.max_checkpoints,
            )

    def restart_clock() -> tuple[float, int, int]:
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return time.perf_counter(), 0, 0  # started, steps timed, targets timed (all processes)

    model.train()
    started, timed_steps, timed_items = restart_clock()
    bar = tqdm(
        total=total,
        initial=start,
        desc=name + "s" if name == "epoch" else "steps",
        leave=False,
        mininterval=1.0,
        disable=True if rank != 0 or not config.progress else None,
    )  # None: on a terminal
    for step in range(start, total):
        x, y = train.batch(step, config.batch_size, config.seed)
        batch_items = y.numel()
        x, y, items = _shard(x, y)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # this step may overwrite the last step's graph outputs
        with autocast:
            loss, _ = loss_fn(forward, x, y)
        optimizer.zero_grad(set_to_none=True)
        weight = items * world / batch_items  # DDP averages gradients: this makes them the global batch's mean
        (loss if weight == 1 else loss * weight).backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().double() * items
        targets += items
        timed_steps, timed_items, done = timed_steps + 1, timed_items + batch_items, step + 1
        bar.update(1)
        ends_interval = done % interval == 0 or done == total
        if done % config.log_every == 0 or ends_interval:
            value = distributed.all_reduce(loss.detach().double() * items).item() / batch_items
            bar.set_postfix(loss=f"{value:.4f}")
            log({"train/loss": value, "train/lr": scheduler.get_last_lr()[0]}, done)
        if ends_interval:
            _sync(device)
            seconds = time.perf_counter() - started
            sums = distributed.all_reduce(torch.stack([loss_sum, targets])).tolist()
            metrics = {
                f"train/{name}_loss": sums[0] / sums[1],
                **evaluate(model, val, config, device, loss_fn),
                f"perf/{train.unit}_per_s": timed_items / seconds,
                "perf/step_ms": 1e3 * seconds / timed_steps,
            }
            if device.type == "cuda":
                peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
                metrics["mem/peak_mib"] = distributed.all_reduce(peak, "max").item() / 2**20
            if flops_per_item and peak_tflops:
                metrics["perf/mfu"] = (
                    flops_per_item * metrics[f"perf/{train.unit}_per_s"] / (peak_tflops * 1e12 * world)
                )
            record = {"step": done, **({"epoch": done // steps_per_epoch} if name == "epoch" else {}), **metrics}
            history.append(record)
            log(metrics, record.get("epoch", done))
            if rank == 0 and config.progress:
                tqdm.write(
                    f"{name} {record.get('epoch', done)}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                )
            loss_sum.zero_()
            targets.zero_()
            if config.checkpoint_every == 0:
                save(done)
            if after_eval is not None:
                after_eval(len(history) - 1, metrics)
        if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == total):
            save(done)
        if ends_interval:
            started, timed_steps, timed_items = restart_clock()
    bar.close()

    final = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("step", "epoch")}
    resumed = {"resumed_from_step": start}
    if name == "epoch":
        resumed["resumed_from_epoch"] = start // steps_per_epoch
    return {**final, "history": history, **resumed}
