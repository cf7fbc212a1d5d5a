"""triformer.tracking against a temporary sqlite MLflow store: params, tags, metrics, artifacts, FAILED runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import mlflow
import pytest

from triformer import tracking

pytestmark = [pytest.mark.pipeline, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def client(store, monkeypatch):
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    return mlflow.MlflowClient(uri)


def test_the_store_is_the_project_the_stage_runs_in_not_the_install(tmp_path, monkeypatch):
    """A checkout using triformer installed from elsewhere logs into its own mlflow.db: the DVC project of the
    working directory (from a subfolder too), or DVC_ROOT when DVC runs the stage."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    project = tmp_path / "checkout"
    (project / "experiments").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(project / "experiments")
    assert tracking.tracking_uri() == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    with tracking.start_run("bench", {}) as run:
        pass
    client = mlflow.MlflowClient(tracking.tracking_uri())
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert (project / "mlflow.db").is_file() and not (project / "experiments" / "mlflow.db").exists()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "parent"))  # a queued experiment's copy logs to its parent
    assert tracking.project_root() == (tmp_path / "parent").resolve()


def test_run_holds_flat_params_tags_metrics_and_artifacts(client, store, tmp_path):
    table = tmp_path / "rows.csv"
    table.write_text("a,b\n1,2\n")
    with tracking.start_run(
        "bench", {"bench": {"dtype": "float32", "shapes": [[1, 2, 3]]}, "seed": 0}, tags={"profile": "cpu"}
    ) as run:
        tracking.log_metrics({"perf/gbps": 12.5, "perf/tflops": None}, step=0)
        tracking.log_metrics({"perf/gbps": 13.5}, step=1)
        tracking.log_artifact(table)
    stored = client.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert client.get_experiment(stored.info.experiment_id).name == "bench"
    assert stored.data.params == {"bench.dtype": "float32", "bench.shapes": "[[1, 2, 3]]", "seed": "0"}
    tags = stored.data.tags
    assert tags["stage"] == "bench" and tags["profile"] == "cpu" and tags["dvc_exp"] == "exp-test"
    assert tags["gpu"] == tracking.device_name() and tags["torch"] and tags["triton"]
    assert tags["interpreter"] == str(tracking.interpreter_active()).lower()
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "perf/gbps")] == [12.5, 13.5]
    assert "perf/tflops" not in stored.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["rows.csv"]
    assert (store / "mlartifacts" / "bench").is_dir()  # artifacts beside the store, never ./mlruns


def test_exception_ends_the_run_failed_and_propagates(client):
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.start_run("train_mlp", {"lr": 1e-3}, kind="train") as run:
            tracking.log_metrics({"train/loss": 2.0}, step=1)
            raise RuntimeError("boom")
    stored = client.get_run(run.info.run_id)
    assert stored.info.status == "FAILED"
    assert client.get_experiment(stored.info.experiment_id).name == "train"
    assert mlflow.active_run() is None


def test_interrupt_ends_the_run_killed(client):
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run("test", {}) as run:
            raise KeyboardInterrupt
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_a_failed_run_can_be_resumed(client):
    with pytest.raises(ValueError):
        with tracking.start_run("train_mlp", {"epochs": 2}, kind="train") as run:
            tracking.log_metrics({"val/accuracy": 0.5}, step=1)
            raise ValueError
    assert tracking.run_exists(run.info.run_id) and not tracking.run_exists("0" * 32)
    with tracking.start_run("train_mlp", {"epochs": 2}, kind="train", run_id=run.info.run_id):
        tracking.log_metrics({"val/accuracy": 0.75}, step=2)
    stored = client.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [1, 2]


def test_nested_run_inside_an_active_run(client):
    with tracking.start_run("ablation", {}, run_name="outer") as outer:
        with tracking.start_run("ablation", {}, run_name="inner") as inner:
            pass
    assert client.get_run(inner.info.run_id).data.tags["mlflow.parentRunId"] == outer.info.run_id


def test_metric_keys_and_flat_params():
    assert (
        tracking.metric_key("perf/tflops", "linear+relu", "fwd+bwd", "torch eager", "33x65x17")
        == "perf/tflops/linear_relu/fwd_bwd/torch eager/33x65x17"
    )
    assert tracking.flatten({"a": {"b": {"c": 1}}, "d": None}) == {"a.b.c": "1", "d": "None"}


def test_runs_a_dead_process_left_running_end_killed(client):
    """Only runs of the stage, of this host, whose process is gone: a live process's run and another host's stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, experiment = socket.gethostname(), client.create_experiment("dead-runs")
    left = {
        name: client.create_run(experiment, tags={"stage": "train_mlp", **tags}).info.run_id
        for name, tags in {
            "dead": {"host": host, "pid": str(dead.pid)},
            "alive": {"host": host, "pid": str(os.getpid())},
            "elsewhere": {"host": host + "-other", "pid": str(dead.pid)},
        }.items()
    }
    other = client.create_run(experiment, tags={"stage": "ablation", "host": host, "pid": str(dead.pid)}).info.run_id
    assert tracking.close_dead_runs("train_mlp") == [left["dead"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in left.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert client.get_run(other).info.status == "RUNNING"
    for run_id in [*left.values(), other]:
        client.set_terminated(run_id, "KILLED")
