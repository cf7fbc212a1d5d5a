"""The pipeline itself: the test-stage plugin, and a slice of the CPU profile (machine → data → train_mlp →
report) run by DVC in a temporary copy of the project against a temporary MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from fake_datasets import write_fashion_mnist

from triformer import training

pytestmark = [pytest.mark.pipeline, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]
ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def run(command, cwd, env, timeout=600, stderr=True):
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + (done.stderr if stderr else "")


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from experiments import common

    return common


def test_profiles_override_their_group_and_common(common):
    params = {
        "common": {"seed": 0, "cpu": {"dtype": "float32"}, "gpu": {"dtype": "bfloat16"}},
        "train_mlp": {"lr": 1e-3, "epochs": 1, "gpu": {"epochs": 10, "hidden_size": 768}},
    }
    assert common.stage_config("train_mlp", params, "gpu") == {
        "seed": 0,
        "dtype": "bfloat16",
        "lr": 1e-3,
        "epochs": 10,
        "hidden_size": 768,
    }
    assert common.stage_config("train_mlp", params, "cpu") == {"seed": 0, "dtype": "float32", "lr": 1e-3, "epochs": 1}


def test_a_stage_refuses_results_of_another_machine(common, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "common: {seed: 0, device: auto, profile: auto, dtype: float32}\ntest: {paths: [tests], markers: not slow}\n"
    )
    info = common.machine(common.load_params())
    assert info["profile"] == ("cpu" if info["interpreter"] else "gpu")
    common.write_json(common.MACHINE_FILE, {**info, "profile": "gpu" if info["interpreter"] else "cpu"})
    with pytest.raises(RuntimeError, match="delete results/machine.json"):
        common.setup("test")
    common.write_json(common.MACHINE_FILE, info)
    assert common.setup("test") == (
        {"seed": 0, "device": "auto", "profile": "auto", "dtype": "float32", "paths": ["tests"], "markers": "not slow"},
        info,
    )


def test_report_plugin_counts_outcomes_and_worst_errors(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        "import pytest, torch\n"
        "from harness import assert_close\n"
        "@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])\n"
        "def test_scaled(dtype):\n"
        "    ref = torch.ones(100, dtype=torch.float64)\n"
        "    assert_close((ref * (1 + 1e-6)).to(dtype), ref, dtype, 'output', tol=1e-3)\n"
        "    assert_close((ref * (1 + 1e-4)).to(dtype), ref, dtype, 'grad of x', tol=1e-3)\n"
        "def test_fails():\n"
        "    ref = torch.ones(4, dtype=torch.float64)\n"
        "    assert_close(ref * 2, ref, torch.float32, 'output')\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skipped():\n"
        "    pass\n"
    )
    report = tmp_path / "report.json"

    def probe(*options):
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.report_plugin",
            "-p",
            "no:cacheprovider",
            f"--triformer-report={report}",
            *options,
            str(tmp_path / "test_probe.py"),
            f"--rootdir={tmp_path}",
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr
        return json.loads(report.read_text())

    keys = ("passed", "failed", "skipped", "selected", "deselected")
    # under xdist, with every 2nd parametrization: the first of each function stays; errors travel to the controller
    sampled = probe("--triformer-sample=2", "-n", "2")
    assert {k: sampled["counts"][k] for k in keys} == {
        "passed": 1,
        "failed": 1,
        "skipped": 1,
        "selected": 3,
        "deselected": 1,
    }
    assert list(sampled["relerr"]["probe/scaled"]) == ["fp32"] and not list(tmp_path.glob("report.json.gw*"))
    result = probe()
    assert {k: result["counts"][k] for k in keys} == {
        "passed": 2,
        "failed": 1,
        "skipped": 1,
        "selected": 4,
        "deselected": 0,
    }
    assert result["skip_reasons"] == {"not here": 1}
    worst = result["relerr"]["probe/scaled"]["fp32"]
    assert worst["what"] == "grad of x" and worst["worst"] == pytest.approx(1e-4, rel=1e-2)
    assert worst["tolerance"] == 1e-3 and worst["ratio"] == pytest.approx(0.1, rel=1e-2)
    assert result["relerr"]["probe/fails"]["fp32"]["worst"] == pytest.approx(1.0)


EPOCHS = 4


def stage_outputs() -> list[str]:
    """Every output, metric and plot file that dvc.yaml's stages declare, but the data folders."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [
        next(iter(entry)) if isinstance(entry, dict) else entry
        for name, stage in stages.items()
        if name != "data"
        for kind in ("outs", "metrics", "plots")
        for entry in stage.get(kind, [])
    ]


def tracked_files() -> list[str]:
    done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    return [name for name in done.stdout.split("\0") if name]


def test_what_a_run_makes_is_not_committed():
    """dvc.lock, results/ and the rendered report belong to the checkout that ran them: committed, they made a fresh
    clone's `make repro` skip every stage, and a rerun left re-rendered files that differ only in bytes."""
    outputs = stage_outputs()
    assert "results/train_mlp/metrics.json" in outputs and "reports/html" in outputs
    tracked = tracked_files()
    assert [
        name
        for name in tracked
        if name == "dvc.lock" or any(name == out or name.startswith(out + "/") for out in outputs)
    ] == []
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *outputs], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert sorted(ignored) == sorted(outputs)


def test_a_fresh_clone_runs_every_stage(tmp_path):
    """The committed files alone (a fresh clone): after the machine stage, DVC finds every other stage to run, so
    `make repro` fills the clone's MLflow store."""
    for name in tracked_files():
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for name in ("DVC_EXP_NAME", "DVC_ROOT", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    run(["git", "init", "-q"], tmp_path, env)
    dvc = [sys.executable, "-m", "dvc"]
    run(dvc + ["repro", "--single-item", "machine"], tmp_path, env)
    status = json.loads(run(dvc + ["status", "--json"], tmp_path, env, stderr=False) or "{}")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    expected = {name for name in stages if name not in ("machine", "data")}
    assert expected <= set(status), f"stages DVC would skip on a fresh clone: {sorted(expected - set(status))}"


def make_project(work: Path) -> dict:
    """A copy of the pipeline's files with a tiny CPU profile and fake FashionMNIST; `dvc repro train_mlp` twice, then
    once more forced and killed after its first checkpoint, then again (it resumes), then the report's entry point."""
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "experiments", "reports", "src/triformer"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "html", "figures"))
        else:
            shutil.copy(source, work / name)
    write_fashion_mnist(work / "debian")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["fashion_mnist"] = {"offline_dir": str(work / "debian"), "download": False}
    params["train_mlp"]["cpu"] = {
        "hidden_size": 8,
        "epochs": EPOCHS,
        "batch_size": 16,
        "train_subset": 32,
        "val_subset": 24,
        "log_every": 1,
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for name in ("DVC_EXP_NAME", "DVC_ROOT", "MLFLOW_TRACKING_URI"):  # the stages find the project's own store
        env.pop(name, None)
    dvc = [sys.executable, "-m", "dvc"]
    run(dvc + ["init", "--no-scm", "-q"], work, env)
    first = run(dvc + ["repro", "train_mlp"], work, env)
    second = run(dvc + ["repro", "train_mlp"], work, env)
    killed = kill_after_first_checkpoint(dvc + ["repro", "--force", "--single-item", "train_mlp"], work, env)
    resumed = run(dvc + ["repro", "train_mlp"], work, env)
    run([sys.executable, "-m", "experiments.report"], work, env)
    return {
        "dir": work,
        "first": first,
        "second": second,
        "killed": killed,
        "resumed": resumed,
        "uri": f"sqlite:///{work / 'mlflow.db'}",
    }


def kill_after_first_checkpoint(command, cwd: Path, env, timeout=300) -> dict:
    """Runs `command` in its own process group and kills the group (SIGKILL, as the OOM killer would) as soon as a
    training checkpoint exists; returns {role: the MLflow run id stored in its latest checkpoint}."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while not list(cwd.glob(f"checkpoints/train_mlp/*/*/{training.CHECKPOINT_GLOB}")):
            assert process.poll() is None, "the stage ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    roles = {
        folder.name: folder for folder in cwd.glob("checkpoints/train_mlp/*/*") if training.latest_checkpoint(folder)
    }
    assert roles, "the stage finished before it was killed"
    return {role: training.checkpoint_extra(folder)["mlflow_run_id"] for role, folder in roles.items()}


def test_cpu_profile_slice_runs_once_logs_to_mlflow_and_renders_the_report(tmp_path):
    """One test (not a module fixture shared by several), so that pytest-xdist never runs the slice twice."""
    project = make_project(tmp_path)
    check_stages(project)
    check_results(project)
    check_mlflow(project)
    check_resumed(project)
    check_report(project)


def check_stages(project):
    for stage in ("machine", "data@fashion_mnist", "train_mlp"):
        assert f"Running stage '{stage}'" in project["first"]
    assert "data@shakespeare" not in project["first"]  # only what train_mlp needs
    assert "Data and pipelines are up to date" in project["second"], project["second"]
    machine = json.loads((project["dir"] / "results" / "machine.json").read_text())
    assert machine["profile"] == "cpu" and machine["interpreter"] is True


def check_results(project):
    results = project["dir"] / "results" / "train_mlp"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["run"]["interpreter"] is True and "mean nothing" in metrics["run"]["timings"]
    assert metrics["model"]["backend"] == "triton" and metrics["baseline"]["backend"] == "torch"
    assert 0 <= metrics["model"]["val_accuracy"] <= 1 and "accuracy_gap_points" in metrics
    rows = (results / "epochs.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and "baseline_val_accuracy" in rows[0] and len(rows) == 1 + EPOCHS
    checkpoints = project["dir"] / "checkpoints" / "train_mlp"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # removed after success


def check_mlflow(project):
    """The first execution (the first `dvc repro`): one run per role, its curves complete."""
    client = mlflow.MlflowClient(project["uri"])
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id], order_by=["start_time ASC"])
    first = [run for run in runs if run.data.tags["execution"] == runs[0].data.tags["execution"]]
    tags = [run.data.tags for run in first]
    assert sorted(t["role"] for t in tags) == ["baseline", "model"]
    assert {run.info.status for run in first} == {"FINISHED"} and {t["interpreter"] for t in tags} == {"true"}
    assert {t["stage"] for t in tags} == {"train_mlp"}
    for run in first:
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2 * EPOCHS  # 2 steps an epoch
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == list(
            range(1, EPOCHS + 1)
        )
        assert client.get_metric_history(run.info.run_id, "perf/images_per_s")
        assert run.data.params["backend"] == {"model": "triton", "baseline": "torch"}[run.data.tags["role"]]


def check_resumed(project):
    """The killed run: DVC ran the stage again (no results restored from its run cache), the killed roles resumed
    from their checkpoints in their own MLflow runs, and no run is left RUNNING."""
    assert "Running stage 'train_mlp'" in project["resumed"], project["resumed"]
    client = mlflow.MlflowClient(project["uri"])
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"}
    for role, run_id in project["killed"].items():
        run = client.get_run(run_id)
        assert run.data.tags["role"] == role and int(run.data.tags["resumed_from_epoch"]) >= 1
        assert [m.step for m in client.get_metric_history(run_id, "val/accuracy")][-1] == EPOCHS
    assert not list(project["dir"].glob(f"checkpoints/train_mlp/*/*/{training.CHECKPOINT_GLOB}"))


def check_report(project):
    html = (project["dir"] / "reports" / "html" / "pipeline.html").read_text()
    assert "INTERPRETER RUN — timings mean nothing" in html
    assert "Accuracy gap" in html and "No finished <code>bench</code> run" in html
    assert (project["dir"] / "reports" / "figures" / "training_curves.png").stat().st_size > 1000
