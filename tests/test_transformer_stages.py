"""The transformer stages (train_gpt, train_vit) and the ablation's GPT part in a temporary project with tiny fake
data and its own MLflow store: what they write, what MLflow holds, and a killed two-process train_gpt resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from fake_datasets import write_fashion_mnist, write_shakespeare_texts
from processes import kill_when

from triformer import training
from triformer.data import fashion_mnist, shakespeare
from triformer.models import GPT

pytestmark = [pytest.mark.pipeline, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]
ROOT = Path(__file__).resolve().parents[1]
TINY_GPT = {
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "block_size": 8,
    "dropout": 0.1,
    "batch_size": 4,
    "iterations": 4,
    "eval_every": 2,
    "eval_batches": 1,
    "eval_batch_size": 4,
    "log_every": 1,
    "sample_tokens": 5,
}
TINY_VIT = {
    "patch_size": 7,
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "mlp_ratio": 2.0,
    "epochs": 2,
    "batch_size": 8,
    "train_subset": 16,
    "val_subset": 8,
    "eval_batch_size": 8,
    "log_every": 1,
}


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from experiments import common

    return common


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The working directory: the project's params.yaml with tiny CPU profiles, fake FashionMNIST and Shakespeare
    prepared, and an MLflow store of its own."""
    monkeypatch.chdir(tmp_path)
    write_fashion_mnist(tmp_path / "debian")
    fashion_mnist.prepare(tmp_path / "data" / "fashion_mnist", offline_dir=tmp_path / "debian", download=False)
    shakespeare.prepare(tmp_path / "data" / "shakespeare", texts_dir=write_shakespeare_texts(tmp_path / "texts"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_params()
    return mlflow.MlflowClient(uri)


def write_params(gpt: dict | None = None, gpt_cpu: dict | None = None) -> None:
    """The project's params.yaml, profile cpu, with tiny train_gpt / train_vit sizes; `gpt` updates the train_gpt
    group, `gpt_cpu` its cpu profile."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["common"]["profile"] = "cpu"
    params["train_gpt"].update(gpt or {})
    params["train_gpt"]["cpu"] = {**TINY_GPT, **(gpt_cpu or {})}
    params["train_vit"]["cpu"] = dict(TINY_VIT)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def runs_of(client, stage: str) -> dict:
    """{role: run} of the stage's runs in the `train` experiment (the latest of each role)."""
    runs = client.search_runs(
        [client.get_experiment_by_name("train").experiment_id],
        f"tags.stage = '{stage}'",
        order_by=["attributes.start_time ASC"],
    )
    return {run.data.tags["role"]: run for run in runs}


def steps(client, run, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def test_train_gpt_trains_the_model_its_params_ask_for_and_the_twin(common, project, monkeypatch):
    from experiments import train_gpt

    write_params({"mlp": "swiglu", "rope": True, "n_kv_head": 1, "fused_head": True})
    built = []
    monkeypatch.setattr(train_gpt, "GPT", lambda config: built.append(config) or GPT(config))
    train_gpt.main()

    assert {(c.backend, c.mlp, c.rope, c.n_kv_head, c.fused_head) for c in built} == {
        ("triton", "swiglu", True, 1, True),
        ("torch", "swiglu", True, 1, True),
    }
    out = Path("results/train_gpt")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["backend"] == "triton" and metrics["baseline"]["backend"] == "torch"
    assert metrics["run"]["interpreter"] is True and metrics["iterations"] == 4
    # same weights and batches; the dropout masks of the two backends differ
    assert abs(metrics["val_loss_gap"]) < 0.02 and metrics["within_0_02"] is True
    rows = (out / "steps.csv").read_text().splitlines()
    assert rows[0].startswith("step,train_interval_loss,val_loss") and "baseline_val_loss" in rows[0]
    assert [row.split(",")[0] for row in rows[1:]] == ["2", "4"]
    samples = (out / "sample.txt").read_text()
    assert samples.startswith("=== model (triton)\n") and "=== baseline (torch)\n" in samples

    runs = runs_of(project, "train_gpt")
    assert set(runs) == {"model", "baseline"}
    for role, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.params["mlp"] == "swiglu"
        assert "iterations" in run.data.params and "epochs" not in run.data.params  # its schedule only
        assert steps(project, run, "train/loss") == [1, 2, 3, 4] and steps(project, run, "val/loss") == [2, 4]
        for key in ("perf/tokens_per_s", "perf/step_ms", "perf/mfu", "ceiling/tflops"):
            assert run.data.metrics[key] > 0, key
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/sample.txt")
        assert len(text) == 5 and f"=== {role} ({run.data.params['backend']})\n{text}\n" in samples
    assert not any(Path("checkpoints/train_gpt").glob("*/*/*.pt"))  # removed after success


def test_train_vit_trains_model_and_twin_on_fashion_mnist(common, project):
    from experiments import train_vit

    train_vit.main()
    metrics = json.loads(Path("results/train_vit/metrics.json").read_text())
    assert 0 <= metrics["model"]["val_accuracy"] <= 1 and "accuracy_gap_points" in metrics
    assert metrics["images_per_s_ratio"] > 0 and metrics["epochs"] == 2
    rows = Path("results/train_vit/epochs.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_epoch_loss,val_loss,val_accuracy") and len(rows) == 3
    runs = runs_of(project, "train_vit")
    assert {role: run.data.params["backend"] for role, run in runs.items()} == {"model": "triton", "baseline": "torch"}
    for run in runs.values():
        assert steps(project, run, "val/accuracy") == [1, 2] and run.data.metrics["perf/images_per_s"] > 0
        assert run.data.params["patch_size"] == "7" and run.data.tags["processes"] == "1"
        assert "epochs" in run.data.params and not {"iterations", "eval_every"} & set(run.data.params)
        assert run.data.params["augment_shift"] == "2" and run.data.params["augment_flip"] == "True"


def test_ablation_gpt_variants_swap_one_part():
    sys.path.insert(0, str(ROOT))
    from experiments import ablation

    gpt = {
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        "block_size": 8,
        "vocab_size": 11,
        "batch_size": 2,
        "steps": 1,
        "warmup": 0,
        "variants": ["triformer", "separate residual", "attention", "torch"],
    }
    rows = ablation.gpt_rows(gpt, torch.float32, "cpu", seed=0)
    assert [(row["variant"], row["torch_parts"], row["fused_residual"]) for row in rows] == [
        ("triformer", "triton", True),
        ("separate residual", "triton", False),
        ("attention", "attention", True),
        ("torch", "torch", False),
    ]
    assert all(row["perf_tokens_per_s"] > 0 for row in rows) and rows[-1]["speedup_vs_torch"] == 1.0
    swapped = GPT(
        ablation.gpt_variant("norm", {k: gpt[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})
    )
    assert type(swapped.ln_f) is torch.nn.LayerNorm and type(swapped.blocks[0].attn).__name__.startswith("Triton")


def test_train_gpt_in_two_processes_killed_then_resumed(project):
    """processes: 2 runs the stage under torchrun (gloo); killed (SIGKILL to every process) after its first
    checkpoint, the next run resumes it in its own MLflow run, which process 0 alone wrote."""
    write_params({"processes": 2, "baseline": False}, {"iterations": 6})
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "experiments.train_gpt"]
    kill_when(command, lambda: any(Path("checkpoints/train_gpt").glob(f"*/model/{training.CHECKPOINT_GLOB}")), env=env)
    (folder,) = Path("checkpoints/train_gpt").glob("*/model")
    killed_run = training.checkpoint_extra(folder)["mlflow_run_id"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "torch.distributed.run" in done.stdout

    runs = project.search_runs([project.get_experiment_by_name("train").experiment_id])
    seen = [(r.data.tags["role"], r.info.run_id, r.info.status, r.data.tags.get("resumed_from_step")) for r in runs]
    run = runs_of(project, "train_gpt")["model"]
    assert run.info.run_id == killed_run and run.info.status == "FINISHED", (killed_run, seen)
    assert int(run.data.tags["resumed_from_step"]) >= 2 and run.data.tags["processes"] == "2"
    evaluated = steps(project, run, "val/loss")  # a step evaluated after the checkpoint it resumed from comes twice
    assert sorted(set(evaluated)) == [2, 4, 6] and evaluated[-1] == 6
    metrics = json.loads(Path("results/train_gpt/metrics.json").read_text())
    assert metrics["processes"] == 2 and "baseline" not in metrics
