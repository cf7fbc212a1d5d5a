"""Data-parallel training on the CPU: two processes over gloo (torchrun), the kernels through Triton's interpreter,
train the loss curve of one process at the same global batch; a killed two-process run resumes where it stood."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import kill_when

pytestmark = pytest.mark.pipeline
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def environment() -> dict:
    return {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}


def train(out: Path, *options, processes: int = 2) -> dict:
    command = (TORCHRUN if processes == 2 else [sys.executable]) + [str(WORKER), str(out), *map(str, options)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment())
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_two_processes_train_as_one_and_a_killed_run_resumes(tmp_path):
    """One test, so that its four runs (about a minute through the interpreter) never run twice under xdist."""
    one = train(tmp_path / "one.json", processes=1)
    two = train(tmp_path / "two.json")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert list(two["losses"]) == [str(step) for step in range(1, 7)]
    for step, loss in one["losses"].items():  # the same global batch: the same curve, up to summation order
        assert two["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert two["val"] == pytest.approx(one["val"], rel=1e-5) and len(two["val"]) == 2
    assert two["weights"] == pytest.approx(one["weights"], rel=1e-5)

    checkpoints = tmp_path / "checkpoints"
    killed = tmp_path / "killed.json"  # process 0 stops at step 3, after the checkpoint of step 2: killed there
    kill_when(
        TORCHRUN + [str(WORKER), str(killed), "--checkpoints", str(checkpoints), "--hang-at", "3"],
        killed.with_suffix(".hanging").exists,
        env=environment(),
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002.pt"]  # written by process 0 alone
    resumed = train(tmp_path / "resumed.json", "--checkpoints", checkpoints)
    assert resumed["resumed_from_step"] == 2 and list(resumed["losses"]) == ["3", "4", "5", "6"]
    assert resumed["losses"] == {step: two["losses"][step] for step in resumed["losses"]}  # exactly the same run
    assert resumed["val"] == two["val"] and resumed["weights"] == two["weights"]
