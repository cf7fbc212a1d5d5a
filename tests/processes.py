"""Killing a run as the OOM killer or a lost machine would: SIGKILL to its whole process group, then waiting until
every process it started is gone, those that torchrun put in sessions of their own included."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path


def _tagged(tag: str) -> list[int]:
    """Processes whose environment holds tag (the processes of one run, whatever their session)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and tag.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def kill_when(command: list[str], ready: Callable[[], bool], *, cwd=None, env=None, timeout: float = 300) -> None:
    """Runs command in a process group of its own until ready() is true, then kills the group (SIGKILL) and waits
    until no process of the run is left (torchrun's processes end themselves once their launcher is gone)."""
    tag = f"TRIFORMER_KILL_TEST={uuid.uuid4().hex}"
    name, value = tag.split("=")
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**(env or os.environ), name: value},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"{command} ended before it was to be killed"
            assert time.monotonic() < deadline, f"{command} was not ready to be killed in time"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    while left := _tagged(tag):
        assert time.monotonic() < deadline + 30, f"processes {left} of the killed run are still alive"
        time.sleep(0.05)
