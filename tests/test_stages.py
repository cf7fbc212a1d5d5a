"""The stage entry points (experiments/) in a temporary project against a temporary MLflow store: what each run
logs and uses, params validation, and how runs end when a stage fails or its process dies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from fake_datasets import write_fashion_mnist
from harness import ON_GPU
from torch._dynamo.utils import counters

from triformer import training
from triformer.data import fashion_mnist

pytestmark = [pytest.mark.pipeline, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]
ROOT = Path(__file__).resolve().parents[1]
TRAINING = {
    "dataset": "fashion_mnist",
    "hidden_size": 8,
    "activation": "relu",
    "epochs": 1,
    "batch_size": 16,
    "train_subset": 32,
    "val_subset": 16,
    "lr": 0.01,
    "weight_decay": 0.01,
    "warmup_frac": 0.05,
    "amp": "bf16",
    "log_every": 1,
    "seed": 0,
}


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


def write_params(**groups) -> None:
    """params.yaml in the working directory: `common` and the given groups."""
    params = {"common": {"seed": 0, "device": "auto", "profile": "auto", "cpu": {"dtype": "float32"}}, **groups}
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def train_mlp_params(**overrides) -> dict:
    fixed = {k: v for k, v in TRAINING.items() if k != "seed"}
    return {
        "train_mlp": {
            **fixed,
            "backend": "triton",
            "fused": True,
            "baseline": True,
            "min_lr_frac": 0.0,
            "keep_checkpoints": False,
            **overrides,
        }
    }


def runs_of(client, experiment: str):
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_a_training_run_uses_the_activation_it_logs_and_logs_only_what_it_uses(common, project, monkeypatch):
    """ablation.activation: gelu trains a gelu MLP; the run's params are the data, model and training settings it
    used, not the stage's other params (kernel shapes, variants, dtype)."""
    built = []
    real_fit = training.fit
    monkeypatch.setattr(
        training, "fit", lambda model, *args, **kwargs: built.append(model) or real_fit(model, *args, **kwargs)
    )
    config = {
        **TRAINING,
        "activation": "gelu",
        "variants": ["fused"],
        "shapes": [[5, 7, 3]],
        "dtype": "float32",
        "profile": "auto",
        "device": "auto",
    }
    info = common.machine({"common": {}})
    common.train_mlp(config, info, stage="ablation", kind="ablation", role="fused", backend="triton", fused=True)
    (model,) = built
    assert [layer.activation for layer in (model.fc1, model.fc2, model.fc3)] == ["gelu", "gelu", None]
    (run,) = runs_of(project, "ablation")
    params = run.data.params
    assert params["activation"] == "gelu" and params["backend"] == "triton" and params["fused"] == "True"
    settings = set(training.TrainConfig.__dataclass_fields__) - {"progress", "iterations", "eval_every"}  # epochs run
    assert set(params) == {
        "profile",
        "device",
        "dataset",
        "train_subset",
        "val_subset",
        "hidden_size",
        "activation",
        "backend",
        "fused",
        *settings,
    }
    assert params["device"] == info["device"] and params["epochs"] == "1" and params["lr"] == "0.01"


def test_a_stage_that_raises_ends_every_run_it_made_failed(common, project, monkeypatch):
    """train_mlp fails after both training runs finished (writing its results): both runs end FAILED."""
    from experiments import train_mlp

    write_params(**train_mlp_params())

    def broken(results):
        raise KeyError("epochs")

    monkeypatch.setattr(train_mlp, "epoch_rows", broken)
    with pytest.raises(KeyError, match="epochs"):
        train_mlp.main()
    runs = runs_of(project, "train")
    assert sorted(run.data.tags["role"] for run in runs) == ["baseline", "model"]
    assert {run.info.status for run in runs} == {"FAILED"}


def setup_error(common, **groups) -> str:
    write_params(**groups)
    with pytest.raises(common.schema.ParamsError) as error:
        common.setup("train_mlp")
    return str(error.value)


@pytest.mark.parametrize(
    "where,key,value,expected",
    [
        ("cpu", "epoch", 2, r"train_mlp\.cpu\.epoch: unknown key \(did you mean 'epochs'\?\)"),
        ("group", "lr", "1e-3", r"train_mlp\.lr: must be a number, got '1e-3' \(str\)"),
        ("cpu", "epochs", -1, r"train_mlp\.cpu\.epochs: must be ≥ 1, got -1"),
        ("cpu", "train_subset", -5, r"train_mlp\.cpu\.train_subset: must be ≥ 0, got -5"),
        ("group", "fused", "yes", r"train_mlp\.fused: must be true or false"),
        ("group", "activation", "tanh", r"train_mlp\.activation: must be one of \['relu', 'gelu', 'silu'\]"),
        ("gpu", "hidden_sise", 768, r"train_mlp\.gpu\.hidden_sise: unknown key \(did you mean 'hidden_size'\?\)"),
        ("group", "compile", "max-autotune", r"train_mlp\.compile: must be one of \['none', 'default', 'reduce-ov"),
        ("gpu", "compile", True, r"train_mlp\.gpu\.compile: must be one of \['none', 'default', 'reduce-overhead'\]"),
    ],
)
def test_a_bad_param_is_one_error_naming_its_key(common, tmp_path, monkeypatch, where, key, value, expected):
    """Checked before any work (the other profile's keys too); before, each was ignored or failed minutes later."""
    monkeypatch.chdir(tmp_path)
    group = train_mlp_params()["train_mlp"]
    group = {**group, key: value} if where == "group" else {**group, where: {key: value}}
    write_params(train_mlp=group)
    text = Path("params.yaml").read_text()
    Path("params.yaml").write_text(text.replace("lr: 1e-3", "lr: '1e-3'"))  # quoted: a string for DVC too
    with pytest.raises(common.schema.ParamsError) as error:
        common.setup("train_mlp")
    message = str(error.value)
    assert len(message.splitlines()) == 2, message  # the heading and this one problem
    assert re.search(expected, message), message


@pytest.mark.skipif(ON_GPU, reason="on CUDA reduce-overhead runs")
@pytest.mark.parametrize("where", ["group", "cpu"])
def test_reduce_overhead_off_cuda_is_one_error_naming_its_key(common, tmp_path, monkeypatch, where):
    """CUDA graphs need CUDA: on the CPU (Triton's interpreter) reduce-overhead would be the default mode under
    another name, so the stage refuses it before any work; the other profile's value is not this machine's."""
    monkeypatch.chdir(tmp_path)
    group = train_mlp_params()["train_mlp"]
    group = (
        {**group, "compile": "reduce-overhead"}
        if where == "group"
        else {**group, where: {"compile": "reduce-overhead"}}
    )
    message = setup_error(common, train_mlp={**group, "gpu": {"compile": "reduce-overhead"}})
    name = "train_mlp" if where == "group" else "train_mlp.cpu"
    assert message.splitlines()[1:] == [
        f"  {name}.compile: reduce-overhead records CUDA graphs, which need CUDA; this run is on cpu, where it would "
        "be the default mode under another name: use compile: default (or none)"
    ]
    write_params(train_mlp={**train_mlp_params()["train_mlp"], "gpu": {"compile": "reduce-overhead"}})
    config, _ = common.setup("train_mlp")
    assert common.train_config(config).compile == "none"  # the gpu profile's mode is not this run's


def test_a_compiled_stage_compiles_model_and_twin_alike_and_says_so(common, project, monkeypatch):
    """train_mlp with compile: default trains the model and its twin with the same compile mode (what each fit
    receives), through torch.compile (Dynamo captures graphs), and MLflow holds the mode as a param, a tag and in
    the run names."""
    from experiments import train_mlp

    received = []
    real_fit = training.fit
    monkeypatch.setattr(
        training,
        "fit",
        lambda model, train, val, config, *a, **k: received.append(config.compile)
        or real_fit(model, train, val, config, *a, **k),
    )
    write_params(**train_mlp_params(compile="default"))
    torch._dynamo.reset()  # no graph cached by an earlier test: each run captures its own
    graphs = counters["stats"]["unique_graphs"]
    train_mlp.main()
    assert received == ["default", "default"]
    assert counters["stats"]["unique_graphs"] >= graphs + 2, "model and twin did not both go through torch.compile"
    runs = {run.data.tags["role"]: run for run in runs_of(project, "train")}
    assert sorted(runs) == ["baseline", "model"]
    for role, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.params["compile"] == "default"
        assert run.data.tags["compile"] == "default" and run.info.run_name == f"train_mlp:{role} compile=default"
        assert run.data.metrics["val/accuracy"] >= 0
    assert {run.data.tags["backend"] for run in runs.values()} == {"triton", "torch"}
    metrics = json.loads(Path("results/train_mlp/metrics.json").read_text())
    assert metrics["model"]["val_accuracy"] is not None and metrics["baseline"]["val_accuracy"] is not None


def test_every_problem_of_the_group_in_one_error_and_missing_keys(common, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    group = {k: v for k, v in train_mlp_params()["train_mlp"].items() if k != "epochs"}
    message = setup_error(common, train_mlp={**group, "lr": "fast", "cpu": {"epoch": 2}})
    assert "train_mlp.lr: must be a number" in message and "train_mlp.cpu.epoch: unknown key" in message
    assert "train_mlp.epochs: missing (set it in train_mlp or train_mlp.cpu)" in message


def test_numbers_read_as_dvc_reads_them(common, tmp_path, monkeypatch):
    """`lr: 1e-3` is a float for DVC (YAML 1.2): the stages read it so too (PyYAML alone reads the string "1e-3")."""
    monkeypatch.chdir(tmp_path)
    write_params(**train_mlp_params())
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("lr: 0.01", "lr: 1e-3"))
    config, _ = common.setup("train_mlp")
    assert config["lr"] == 0.001 and isinstance(config["lr"], float)


def test_the_project_params_fit_their_schema_in_both_profiles(common):
    params = common.load_params(ROOT / "params.yaml")
    for group in ("test", "bench", "ablation", "train_mlp", "train_gpt", "train_vit"):
        for profile in common.PROFILES:
            common.schema.validate(params, group, profile)
    for group in ("report", *(f"data.{name}" for name in params["data"])):
        common.schema.validate(params, group)
    with pytest.raises(common.schema.ParamsError, match=r"train_gpt\.mlp: must be one of \['gelu', 'swiglu'"):
        common.schema.validate({**params, "train_gpt": {**params["train_gpt"], "mlp": "relu"}}, "train_gpt", "gpu")
    for group in ("train_mlp", "train_gpt", "train_vit"):  # compile: none on both profiles; the three modes known
        assert params[group]["compile"] == "none" and "compile" not in params[group]["cpu"]
        for mode in ("default", "reduce-overhead"):
            common.schema.validate({**params, group: {**params[group], "compile": mode}}, group, "gpu", "cuda")
        with pytest.raises(common.schema.ParamsError, match=rf"{group}\.gpu\.compile: must be one of \['none'"):
            common.schema.validate({**params, group: {**params[group], "gpu": {"compile": "on"}}}, group, "gpu")
    bad_variant = {**params["ablation"]["cpu"]["gpt"], "variants": ["triformer", "attn"]}
    with pytest.raises(common.schema.ParamsError, match=r"ablation\.cpu\.gpt: variants: item 1: must be one of"):
        common.schema.validate(
            {**params, "ablation": {**params["ablation"], "cpu": {**params["ablation"]["cpu"], "gpt": bad_variant}}},
            "ablation",
            "cpu",
        )
    with pytest.raises(common.schema.ParamsError, match=r"bench\.cpu\.linear: unknown arguments \['shape'\]"):
        common.schema.validate(
            {**params, "bench": {"suites": ["linear"], "cpu": {"linear": {"shape": []}}}}, "bench", "cpu"
        )


def test_a_stage_with_bad_params_stops_before_any_work(common, project, monkeypatch):
    """No data loaded, no MLflow run: the process ends with the schema's message alone."""
    from experiments import train_mlp

    write_params(**train_mlp_params(epoch=2))
    monkeypatch.setattr(common, "image_classification", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit, match=r"train_mlp\.epoch: unknown key \(did you mean 'epochs'\?\)"):
        train_mlp.main()
    assert project.search_experiments(filter_string="name != 'Default'") == []


def test_bench_suites_take_their_run_arguments_and_a_listed_missing_suite_anything(common):
    group = {
        "suites": ["linear", "not_written_yet"],
        "cpu": {"linear": {"shapes": [[3, 5, 7]]}, "not_written_yet": {"sizes": [1]}, "lineer": {}},
    }
    with pytest.raises(common.schema.ParamsError) as error:
        common.schema.validate({"common": {"seed": 0, "dtype": "float32"}, "bench": group}, "bench", "cpu")
    assert str(error.value).splitlines()[1:] == ["  bench.cpu.lineer: unknown key (known keys: ['suites'])"]


def test_an_accuracy_gap_of_exactly_half_a_point_is_within(common):
    """0.9038 − 0.8988 is 0.0050000000000000044 in floating point: 50 images in 10000, within the 0.5-point target."""
    run = {"model": {"val/accuracy": 0.9038}, "baseline": {"val/accuracy": 0.8988}}
    assert common.accuracy_gap(run) == {"accuracy_gap_points": 0.5, "within_half_point": True}
    run["model"]["val/accuracy"] = 0.9039
    assert common.accuracy_gap(run)["within_half_point"] is False
    assert common.accuracy_gap({"model": run["model"]}) == {}


def test_metrics_files_are_strict_json(common, tmp_path):
    """A number not measured (NaN, inf) is written null: metrics.json stays JSON that any parser and `dvc metrics
    diff` read (NaN is not JSON, and NaN ≠ NaN made every such value a change)."""
    path = tmp_path / "metrics.json"
    common.write_json(path, {"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": 2, "e": "x"})
    assert json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} written")) == {
        "a": None,
        "b": [1.5, None, {"c": None}],
        "d": 2,
        "e": "x",
    }
