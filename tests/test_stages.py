"""The stage entry points (experiments/) in a temporary project against a temporary MLflow store: what each run
logs and uses, params validation, and how runs end when a stage fails or its process dies."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from fake_datasets import write_fashion_mnist
from triformer import training
from triformer.data import fashion_mnist

pytestmark = [pytest.mark.pipeline, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]
ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"dataset": "fashion_mnist", "hidden_size": 8, "activation": "relu", "epochs": 1, "batch_size": 16,
            "train_subset": 32, "val_subset": 16, "lr": 0.01, "weight_decay": 0.01, "warmup_frac": 0.05,
            "amp": "bf16", "log_every": 1, "seed": 0}


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from experiments import common

    return common


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (the working directory) with fake FashionMNIST prepared and its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    write_fashion_mnist(tmp_path / "debian")
    fashion_mnist.prepare(tmp_path / "data" / "fashion_mnist", offline_dir=tmp_path / "debian", download=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.MlflowClient(uri)


def runs_of(client, experiment: str):
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_a_training_run_uses_the_activation_it_logs_and_logs_only_what_it_uses(common, project, monkeypatch):
    """ablation.activation: gelu trains a gelu MLP; the run's params are the data, model and training settings it
    used, not the stage's other params (kernel shapes, variants, dtype)."""
    built = []
    real_fit = training.fit
    monkeypatch.setattr(training, "fit", lambda model, *args, **kwargs: built.append(model) or real_fit(
        model, *args, **kwargs))
    config = {**TRAINING, "activation": "gelu", "variants": ["fused"], "shapes": [[5, 7, 3]], "dtype": "float32",
              "profile": "auto", "device": "auto"}
    info = common.machine({"common": {}})
    common.train_mlp(config, info, stage="ablation", kind="ablation", role="fused", backend="triton", fused=True)
    (model,) = built
    assert [layer.activation for layer in (model.fc1, model.fc2, model.fc3)] == ["gelu", "gelu", None]
    (run,) = runs_of(project, "ablation")
    params = run.data.params
    assert params["activation"] == "gelu" and params["backend"] == "triton" and params["fused"] == "True"
    settings = set(training.TrainConfig.__dataclass_fields__) - {"progress"}
    assert set(params) == {"profile", "device", "dataset", "train_subset", "val_subset", "hidden_size",
                           "activation", "backend", "fused", *settings}
    assert params["device"] == info["device"] and params["epochs"] == "1" and params["lr"] == "0.01"
