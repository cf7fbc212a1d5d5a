"""The one place that talks to MLflow.

Store: `sqlite:///<project>/mlflow.db` (MLflow 3's store) of the project the stage runs in (project_root()),
artifacts beside it in `mlartifacts/`; the environment variable MLFLOW_TRACKING_URI overrides it (tests point it at a
temporary store). One experiment per stage kind (`test`, `bench`, `ablation`, `train`, ...). Every run carries params
flat (`group.key`) and the tags that say where its numbers come from: git commit, DVC experiment, GPU name (or "cpu"),
torch/triton versions, whether Triton ran through its interpreter (then timings mean nothing), and the host and
process that made it. A run whose body raises ends FAILED (KILLED on Ctrl-C) and the exception propagates, so the DVC
stage fails too; `stage_execution`, around a whole stage process, ends every run of a failed stage FAILED and closes
the runs that a dead process of the stage left RUNNING as KILLED.

Metric names are shared by all runs: `train/loss`, `val/loss`, `val/accuracy`, `perf/images_per_s`,
`perf/tokens_per_s`, `perf/step_ms`, `perf/tflops`, `perf/gbps`, `mem/peak_mib`, ...
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .kernels._runtime import interpreter_active

INTERPRETER_WARNING = "INTERPRETER RUN — timings mean nothing"


def project_root() -> Path:
    """The project the stage runs in, wherever triformer is installed from: DVC_ROOT (set by DVC for every stage,
    the parent project's root for a queued or temporary experiment), else the nearest folder from the working
    directory up that holds dvc.yaml, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    return next((folder for folder in (cwd, *cwd.parents) if (folder / "dvc.yaml").is_file()), cwd)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _artifact_location(uri: str, kind: str) -> str | None:
    """`<store folder>/mlartifacts/<kind>` for a sqlite store; None (the server's choice) otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts" / kind).as_uri()
    return None


def device_name() -> str:
    """The GPU the kernels run on, or "cpu" (no CUDA, or kernels forced through the interpreter)."""
    if torch.cuda.is_available() and not interpreter_active():
        return torch.cuda.get_device_name()
    return "cpu"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=Path.cwd(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "triton": _version("triton"), "python": platform.python_version()}


def environment_tags() -> dict[str, str]:
    """Where a number comes from: code version, DVC experiment, card, library versions, interpreter or not."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    interpreter = interpreter_active()
    return {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
        "gpu": device_name(),
        **versions(),
        "interpreter": str(interpreter).lower(),
        "timings": "meaningless (Triton interpreter)" if interpreter else "measured",
    }


def flatten(params: Mapping, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"}; lists and other values as their text (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _experiment_id(client, kind: str) -> str:
    experiment = client.get_experiment_by_name(kind)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(kind, artifact_location=_artifact_location(tracking_uri(), kind))


@contextlib.contextmanager
def start_run(
    stage: str,
    params: Mapping,
    *,
    kind: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator:
    """An MLflow run in the experiment `kind` (default: the stage's name) holding `params` flat and the tags above.

    run_id reopens an existing run (training resumed from a checkpoint continues its own run). On an exception the
    run ends FAILED (KILLED for KeyboardInterrupt) and the exception propagates.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment_id(mlflow.MlflowClient(), kind or stage)
    all_tags = {
        "stage": stage,
        **environment_tags(),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        **(tags or {}),
    }
    run = mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=None if run_id else run_name or stage,
        nested=mlflow.active_run() is not None,
    )
    try:
        mlflow.set_tags(all_tags)
        mlflow.log_params(flatten(params))
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _runs(client, filter_string: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string, max_results=50_000) if experiments else []


def close_dead_runs(stage: str) -> list[str]:
    """End KILLED the runs of `stage` left RUNNING by a process of this host that no longer exists (killed, out of
    memory, machine restarted); returns their ids. Runs of live processes and of other hosts are left alone."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    host, closed = socket.gethostname(), []
    for run in _runs(client, f"tags.stage = '{stage}' and attributes.status = 'RUNNING'"):
        pid = run.data.tags.get("pid", "")
        if run.data.tags.get("host") == host and pid.isdigit() and not _process_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def stage_execution(stage: str, execution: str, close_dead: bool = True) -> Iterator[None]:
    """Around one stage process whose runs carry the tag `execution`: first (unless close_dead is false: a process
    that the stage's own process started, which did it already) the stage's runs that a dead process left RUNNING
    end KILLED; when the body raises, every run of this execution ends FAILED (KILLED for Ctrl-C), those that had
    finished too, since a failed stage has no results; the exception propagates."""
    import mlflow

    if close_dead:
        close_dead_runs(stage)
    try:
        yield
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        client = mlflow.MlflowClient(tracking_uri())
        for run in _runs(client, f"tags.execution = '{execution}'"):
            if run.info.status not in ("FAILED", "KILLED"):
                client.set_terminated(run.info.run_id, status)
        raise


def metric_key(*parts) -> str:
    """Parts joined by "/", with characters MLflow refuses in metric names ("+", "*", ...) replaced by "_"."""
    return re.sub(r"[^\w\-. :/]", "_", "/".join(str(p) for p in parts))


def run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Numbers into the active run (None skipped)."""
    import mlflow

    values = {key: float(value) for key, value in metrics.items() if value is not None}
    if values:
        mlflow.log_metrics(values, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


def set_tags(tags: Mapping[str, str]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_text(text: str, artifact_file: str) -> None:
    """A text (e.g. a generated sample) as the active run's artifact `artifact_file`."""
    import mlflow

    mlflow.log_text(text, artifact_file)
