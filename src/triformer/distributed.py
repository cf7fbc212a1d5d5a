"""Data-parallel training over processes started by torchrun: who this process is, the reductions the training loop
needs, and starting a module under torchrun.

A stage that asks for N processes runs itself again under `torchrun --standalone --nproc_per_node N` (launch); each
process joins the group (process_group: NCCL with one GPU per process on CUDA, gloo on the CPU) and
triformer.training splits every global batch among them. Without a group every function here is the one-process
identity, so the same code serves both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist


def launched() -> bool:
    """True in a process that torchrun started as one of several (its environment names a world of size > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


@contextlib.contextmanager
def process_group(device: str) -> Iterator[torch.device]:
    """The device this process trains on, inside the process group when torchrun started it (left on exit):
    cuda:LOCAL_RANK over NCCL, or the CPU over gloo. Outside torchrun: `device` itself, no group."""
    if not launched():
        yield torch.device(device)
        return
    _end_with_launcher()
    if device == "cuda":
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if int(os.environ["LOCAL_WORLD_SIZE"]) > count:
            raise RuntimeError(
                f"{os.environ['LOCAL_WORLD_SIZE']} processes asked for, but this host has {count} "
                "GPU(s): one process per GPU"
            )
        torch.cuda.set_device(local)
        here = torch.device("cuda", local)
    else:
        here = torch.device("cpu")
    dist.init_process_group("nccl" if here.type == "cuda" else "gloo")
    try:
        yield here
    finally:
        dist.destroy_process_group()


def _end_with_launcher() -> None:
    """torchrun starts its processes in sessions of their own, so killing a run (its process group) leaves them
    training beside the next run and writing its checkpoints. A thread of each process kills the process as soon as
    its launcher is gone."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="triformer-launcher-watch", daemon=True).start()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """tensor reduced over the processes ("sum" or "max"), in place; itself with one process."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def gather_objects(obj) -> list:
    """[the obj of process 0, of process 1, ...] on every process ([obj] with one process)."""
    if not active():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Process 0's obj, on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(processes: int, module: str, env: dict[str, str] | None = None) -> int:
    """Runs `python -m <module>` in `processes` processes under torchrun on this host (a local rendezvous on a free
    port) and returns its exit status. Each process finds its rank in the environment (launched() is true there)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        module,
    ]
    print("+", " ".join(command), flush=True)
    return subprocess.call(command, env={**os.environ, **(env or {})})
