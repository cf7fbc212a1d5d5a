"""What the stages share: params.yaml and its profiles, the machine description, result files, and the MLP training
run that both `train_mlp` and `ablation` make.

Profiles: a params group may hold `cpu:` and `gpu:` sub-groups; the profile (`common.profile`, `auto` → `gpu` when
the kernels run on CUDA, else `cpu`) picks one, whose keys override the group's own. `setup(group)` merges `common`
and the group that way, so `dvc exp run -S train_mlp.gpu.epochs=20` or `-S train_mlp.fused=false` both work.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import re
import uuid
from dataclasses import asdict, fields
from pathlib import Path
from typing import Iterator

import torch
import yaml

from triformer import tracking, training
from triformer.data import image_classification, image_module
from triformer.models import TritonMLP

from . import schema

PARAMS_FILE = Path("params.yaml")
MACHINE_FILE = Path("results/machine.json")
DATA_ROOT = Path("data")
CHECKPOINT_ROOT = Path("checkpoints")
PROFILES = ("cpu", "gpu")
EXECUTION = uuid.uuid4().hex[:12]  # one per stage process: tags every MLflow run it makes, for the report to group


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as DVC (YAML 1.2) does: `lr: 1e-3` is the float 0.001, not the string
    "1e-3" of YAML 1.1."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def load_params(path: Path = PARAMS_FILE) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader) or {}


def machine(params: dict | None = None) -> dict:
    """Profile, device, card and versions of this run: what results/machine.json records for DVC."""
    common = (params if params is not None else load_params()).get("common", {})
    requested = common.get("device", "auto")
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"common.device must be auto, cuda or cpu, got {requested!r}")
    interpreter = tracking.interpreter_active()
    device = "cpu" if interpreter else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device and TRITON_INTERPRET is not set: import the `experiments` package first")
    if requested == "cuda" and device != "cuda":
        raise RuntimeError("common.device is cuda but the kernels run through Triton's interpreter (no CUDA device, "
                           "or TRITON_INTERPRET=1 set)")
    profile = common.get("profile", "auto")
    if profile == "auto":
        profile = "gpu" if device == "cuda" else "cpu"
    if profile not in PROFILES:
        raise ValueError(f"common.profile must be auto, cpu or gpu, got {profile!r}")
    return {"profile": profile, "device": device, "gpu": tracking.device_name(), "interpreter": interpreter,
            **tracking.versions()}


def checked_machine(params: dict) -> dict:
    """machine(), after checking it is the one results/machine.json (the DVC dependency) describes."""
    live = machine(params)
    if MACHINE_FILE.exists():
        recorded = read_json(MACHINE_FILE)
        if recorded != live:
            raise RuntimeError(f"{MACHINE_FILE} describes {recorded} but this run sees {live}; results from another "
                               f"machine would be mixed: delete {MACHINE_FILE} and run `dvc repro` again")
    return live


def stage_config(group: str, params: dict, profile: str) -> dict:
    """common + params[group], each with its `profile` sub-group's keys overriding its own."""
    merged: dict = {}
    for part in (params.get("common", {}), params.get(group, {})):
        merged.update({k: v for k, v in part.items() if k not in PROFILES})
        merged.update(part.get(profile) or {})
    return merged


def setup(group: str) -> tuple[dict, dict]:
    """(config, machine) for a stage: the merged params of `group`, checked against its schema (schema.ParamsError
    naming every bad key), and the checked machine description."""
    params = load_params()
    info = checked_machine(params)
    schema.validate(params, group, info["profile"])
    return stage_config(group, params, info["profile"]), info


@contextlib.contextmanager
def stage(group: str) -> Iterator[tuple[dict, dict]]:
    """One stage process: (config, machine) from setup(group), the body run inside tracking.stage_execution (the
    stage's runs that a dead process left RUNNING end KILLED first; when the body raises, every run it made ends
    FAILED). Params that do not fit their schema stop the process with the schema's message, before any work."""
    with schema.exit_on_error():
        config, info = setup(group)
    with tracking.stage_execution(group, EXECUTION):
        yield config, info


def label(info: dict) -> dict:
    """What every result file says about where its numbers come from."""
    return {"profile": info["profile"], "gpu": info["gpu"], "interpreter": info["interpreter"],
            "timings": tracking.INTERPRETER_WARNING if info["interpreter"] else "measured"}


def start_run(stage: str, params: dict, info: dict, *, kind: str | None = None, role: str = "main",
              run_id: str | None = None):
    """tracking.start_run logging `params` (only what the run uses) with the profile and device it ran on, and the
    stage's profile, role and execution (this process) as tags."""
    return tracking.start_run(stage, {"profile": info["profile"], "device": info["device"], **params}, kind=kind,
                              run_name=f"{stage}:{role}", run_id=run_id,
                              tags={"profile": info["profile"], "role": role, "execution": EXECUTION})


def used(config: dict, *keys: str) -> dict:
    """The params of `config` a run uses (what it logs): keys it lacks are left out."""
    return {key: config[key] for key in keys if key in config}


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """rows as CSV; columns default to every key in order of appearance (give them when rows may be empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def flat_metrics(result: dict, keys) -> dict:
    """{"val/accuracy": x} → {"val_accuracy": x} for CSV columns and DVC metrics (None where absent)."""
    return {key.replace("/", "_"): result.get(key) for key in keys}


def config_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ MLP training


def train_config(config: dict) -> training.TrainConfig:
    names = {f.name for f in fields(training.TrainConfig)}
    return training.TrainConfig(**{k: v for k, v in config.items() if k in names})


def train_mlp(config: dict, info: dict, *, stage: str, kind: str, role: str, backend: str, fused: bool,
              checkpoint_dir: Path | None = None) -> dict:
    """One TritonMLP training run (its own MLflow run, tagged `role`); returns fit()'s final metrics.

    The run logs what it used: the data (dataset, subsets), the model (hidden_size, activation, backend, fused) and
    every training setting. With checkpoint_dir, a crashed run resumes from its latest checkpoint and continues its
    own MLflow run.
    """
    name = config["dataset"]
    root = DATA_ROOT / name
    train_set = image_classification(name, root, train=True, subset=config.get("train_subset", 0))
    val_set = image_classification(name, root, train=False, subset=config.get("val_subset", 0))
    settings = train_config(config)
    run_id = training.checkpoint_extra(checkpoint_dir).get("mlflow_run_id")
    if run_id is not None and not tracking.run_exists(run_id):
        run_id = None
    model_params = {"hidden_size": config["hidden_size"], "activation": config["activation"], "backend": backend,
                    "fused": fused}
    settings_params = {k: v for k, v in asdict(settings).items() if k != "progress"}
    run_params = {**used(config, "dataset", "train_subset", "val_subset"), **model_params, **settings_params}
    with start_run(stage, run_params, info, kind=kind, role=role, run_id=run_id) as run:
        torch.manual_seed(settings.seed)
        model = TritonMLP(train_set.tensors[0][0].numel(), image_module(name).NUM_CLASSES, **model_params)
        tracking.set_tags({"backend": backend, "fused": fused, "dataset": name,
                           "parameters": sum(p.numel() for p in model.parameters())})
        result = training.fit(model, train_set, val_set, settings, info["device"], checkpoint_dir,
                              log=tracking.log_metrics, extra={"mlflow_run_id": run.info.run_id})
        if result["resumed_from_epoch"]:
            tracking.set_tags({"resumed_from_epoch": result["resumed_from_epoch"]})
        return {**result, "mlflow_run_id": run.info.run_id}
