"""The pipeline itself: the test-stage plugin, and a slice of the CPU profile (machine → data → train_mlp →
report) run by DVC in a temporary copy of the project against a temporary MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from fake_datasets import write_fashion_mnist

pytestmark = [pytest.mark.pipeline, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]
ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def run(command, cwd, env, timeout=600):
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from experiments import common

    return common


def test_profiles_override_their_group_and_common(common):
    params = {"common": {"seed": 0, "cpu": {"dtype": "float32"}, "gpu": {"dtype": "bfloat16"}},
              "train_mlp": {"lr": 1e-3, "epochs": 1, "gpu": {"epochs": 10, "hidden_size": 768}}}
    assert common.stage_config("train_mlp", params, "gpu") == \
        {"seed": 0, "dtype": "bfloat16", "lr": 1e-3, "epochs": 10, "hidden_size": 768}
    assert common.stage_config("train_mlp", params, "cpu") == {"seed": 0, "dtype": "float32", "lr": 1e-3, "epochs": 1}


def test_a_stage_refuses_results_of_another_machine(common, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("common: {device: auto, profile: auto}\ntest: {}\n")
    info = common.machine(common.load_params())
    assert info["profile"] == ("cpu" if info["interpreter"] else "gpu")
    common.write_json(common.MACHINE_FILE, {**info, "profile": "gpu" if info["interpreter"] else "cpu"})
    with pytest.raises(RuntimeError, match="delete results/machine.json"):
        common.setup("test")
    common.write_json(common.MACHINE_FILE, info)
    assert common.setup("test") == ({"device": "auto", "profile": "auto"}, info)


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
        "    pass\n")
    report = tmp_path / "report.json"

    def probe(*options):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.report_plugin", "-p", "no:cacheprovider",
                   f"--triformer-report={report}", *options, str(tmp_path / "test_probe.py"), f"--rootdir={tmp_path}"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr
        return json.loads(report.read_text())

    keys = ("passed", "failed", "skipped", "selected", "deselected")
    # under xdist, with every 2nd parametrization: the first of each function stays; errors travel to the controller
    sampled = probe("--triformer-sample=2", "-n", "2")
    assert {k: sampled["counts"][k] for k in keys} == \
        {"passed": 1, "failed": 1, "skipped": 1, "selected": 3, "deselected": 1}
    assert list(sampled["relerr"]["probe/scaled"]) == ["fp32"] and not list(tmp_path.glob("report.json.gw*"))
    result = probe()
    assert {k: result["counts"][k] for k in keys} == \
        {"passed": 2, "failed": 1, "skipped": 1, "selected": 4, "deselected": 0}
    assert result["skip_reasons"] == {"not here": 1}
    worst = result["relerr"]["probe/scaled"]["fp32"]
    assert worst["what"] == "grad of x" and worst["worst"] == pytest.approx(1e-4, rel=1e-2)
    assert worst["tolerance"] == 1e-3 and worst["ratio"] == pytest.approx(0.1, rel=1e-2)
    assert result["relerr"]["probe/fails"]["fp32"]["worst"] == pytest.approx(1.0)


def make_project(work: Path) -> dict:
    """A copy of the pipeline's files with a tiny CPU profile and fake FashionMNIST; `dvc repro train_mlp` twice,
    then the report stage's entry point."""
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "experiments", "reports", "src/triformer"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "html", "figures"))
        else:
            shutil.copy(source, work / name)
    write_fashion_mnist(work / "debian")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["fashion_mnist"] = {"offline_dir": str(work / "debian"), "download": False}
    params["train_mlp"]["cpu"] = {"hidden_size": 8, "epochs": 2, "batch_size": 16, "train_subset": 32,
                                  "val_subset": 24, "log_every": 1}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "TRITON_INTERPRET": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("DVC_EXP_NAME", None)
    dvc = [sys.executable, "-m", "dvc"]
    run(dvc + ["init", "--no-scm", "-q"], work, env)
    first = run(dvc + ["repro", "train_mlp"], work, env)
    second = run(dvc + ["repro", "train_mlp"], work, env)
    run([sys.executable, "-m", "experiments.report"], work, env)
    return {"dir": work, "first": first, "second": second, "uri": env["MLFLOW_TRACKING_URI"]}


def test_cpu_profile_slice_runs_once_logs_to_mlflow_and_renders_the_report(tmp_path):
    """One test (not a module fixture shared by several), so that pytest-xdist never runs the slice twice."""
    project = make_project(tmp_path)
    check_stages(project)
    check_results(project)
    check_mlflow(project)
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
    assert rows[0].startswith("epoch,") and "baseline_val_accuracy" in rows[0] and len(rows) == 3
    checkpoints = project["dir"] / "checkpoints" / "train_mlp"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # removed after success


def check_mlflow(project):
    client = mlflow.MlflowClient(project["uri"])
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    tags = [run.data.tags for run in runs]
    assert sorted(t["role"] for t in tags) == ["baseline", "model"]
    assert {run.info.status for run in runs} == {"FINISHED"} and {t["interpreter"] for t in tags} == {"true"}
    assert {t["stage"] for t in tags} == {"train_mlp"} and len({t["execution"] for t in tags}) == 1
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4  # 2 steps × 2 epochs
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [1, 2]
        assert client.get_metric_history(run.info.run_id, "perf/images_per_s")
        assert run.data.params["backend"] == {"model": "triton", "baseline": "torch"}[run.data.tags["role"]]


def check_report(project):
    html = (project["dir"] / "reports" / "html" / "pipeline.html").read_text()
    assert "INTERPRETER RUN — timings mean nothing" in html
    assert "Accuracy gap" in html and "No finished <code>bench</code> run" in html
    assert (project["dir"] / "reports" / "figures" / "training_curves.png").stat().st_size > 1000
