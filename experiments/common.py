"""What the stages share: params.yaml and its profiles, the machine description, result files, a training run with
its MLflow run and checkpoints (the MLP's for `train_mlp` and `ablation`, the transformers' for `train_gpt` and
`train_vit`), and starting a stage in several data-parallel processes.

Profiles: a params group may hold `cpu:` and `gpu:` sub-groups; the profile (`common.profile`, `auto` → `gpu` when
the kernels run on CUDA, else `cpu`) picks one, whose keys override the group's own. `setup(group)` merges `common`
and the group that way, so `dvc exp run -S train_mlp.gpu.epochs=20` or `-S train_mlp.fused=false` both work.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml

from triformer import distributed, tracking, training
from triformer.data import image_classification, image_module
from triformer.models import TritonMLP

from . import schema

PARAMS_FILE = Path("params.yaml")
MACHINE_FILE = Path("results/machine.json")
DATA_ROOT = Path("data")
CHECKPOINT_ROOT = Path("checkpoints")
PROFILES = ("cpu", "gpu")
# One per stage process (and its data-parallel processes, which inherit it): tags every MLflow run it makes, for the
# report to group and for a failed stage to end them all FAILED.
EXECUTION = os.environ.get("TRIFORMER_EXECUTION") or uuid.uuid4().hex[:12]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as DVC (YAML 1.2) does: `lr: 1e-3` is the float 0.001, not the string
    "1e-3" of YAML 1.1."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


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
        raise RuntimeError(
            "common.device is cuda but the kernels run through Triton's interpreter (no CUDA device, "
            "or TRITON_INTERPRET=1 set)"
        )
    profile = common.get("profile", "auto")
    if profile == "auto":
        profile = "gpu" if device == "cuda" else "cpu"
    if profile not in PROFILES:
        raise ValueError(f"common.profile must be auto, cpu or gpu, got {profile!r}")
    return {
        "profile": profile,
        "device": device,
        "gpu": tracking.device_name(),
        "interpreter": interpreter,
        **tracking.versions(),
    }


def checked_machine(params: dict) -> dict:
    """machine(), after checking it is the one results/machine.json (the DVC dependency) describes."""
    live = machine(params)
    if MACHINE_FILE.exists():
        recorded = read_json(MACHINE_FILE)
        if recorded != live:
            raise RuntimeError(
                f"{MACHINE_FILE} describes {recorded} but this run sees {live}; results from another "
                f"machine would be mixed: delete {MACHINE_FILE} and run `dvc repro` again"
            )
    return live


def stage_config(group: str, params: dict, profile: str) -> dict:
    """common + params[group], each with its `profile` sub-group's keys overriding its own."""
    merged: dict = {}
    for part in (params.get("common", {}), params.get(group, {})):
        merged.update({k: v for k, v in part.items() if k not in PROFILES})
        merged.update(part.get(profile) or {})
    return merged


def setup(group: str) -> tuple[dict, dict]:
    """(config, machine) for a stage: the merged params of `group`, checked against its schema and the machine
    (schema.ParamsError naming every bad key), and the checked machine description."""
    params = load_params()
    info = checked_machine(params)
    schema.validate(params, group, info["profile"], info["device"])
    return stage_config(group, params, info["profile"]), info


@contextlib.contextmanager
def stage(group: str) -> Iterator[tuple[dict, dict]]:
    """One stage process: (config, machine) from setup(group), the body run inside tracking.stage_execution (the
    stage's runs that a dead process left RUNNING end KILLED first, by the stage's process rather than each of the
    data-parallel processes it starts; when the body raises, every run it made ends FAILED). Params that do not fit
    their schema stop the process with the schema's message, before any work."""
    with schema.exit_on_error():
        config, info = setup(group)
    with tracking.stage_execution(group, EXECUTION, close_dead=not distributed.launched()):
        yield config, info


def label(info: dict) -> dict:
    """What every result file says about where its numbers come from."""
    return {
        "profile": info["profile"],
        "gpu": info["gpu"],
        "interpreter": info["interpreter"],
        "timings": tracking.INTERPRETER_WARNING if info["interpreter"] else "measured",
    }


def start_run(
    stage: str, params: dict, info: dict, *, kind: str | None = None, role: str = "main", run_id: str | None = None
):
    """tracking.start_run logging `params` (only what the run uses) with the profile and device it ran on, and the
    stage's profile, role and execution (this process) as tags. The run's name is `stage:role`, followed by
    ` compile=<mode>` for a compiled training run (params `compile` other than none)."""
    mode = params.get("compile", "none")
    return tracking.start_run(
        stage,
        {"profile": info["profile"], "device": info["device"], **params},
        kind=kind,
        run_name=f"{stage}:{role}" + (f" compile={mode}" if mode != "none" else ""),
        run_id=run_id,
        tags={"profile": info["profile"], "role": role, "execution": EXECUTION},
    )


def used(config: dict, *keys: str) -> dict:
    """The params of `config` a run uses (what it logs): keys it lacks are left out."""
    return {key: config[key] for key in keys if key in config}


def write_json(path: str | Path, obj) -> None:
    """obj as strict JSON (a NaN or infinite number, e.g. a memory not measured on the CPU, is written null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, ensure_ascii=False, allow_nan=False)
    path.write_text(text + "\n")


def _finite(obj):
    """obj with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


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


# ------------------------------------------------------------------------------------------------ training runs


def train_config(config: dict) -> training.TrainConfig:
    names = {f.name for f in fields(training.TrainConfig)}
    return training.TrainConfig(**{k: v for k, v in config.items() if k in names})


def training_run(
    config: dict,
    info: dict,
    *,
    stage: str,
    kind: str,
    role: str,
    build: Callable[[], torch.nn.Module],
    train,
    val,
    run_params: dict,
    tags: dict,
    checkpoint_dir: Path | None = None,
    device: torch.device | str | None = None,
    after: Callable | None = None,
    **fit_kwargs,
) -> dict:
    """One training run of the model build() makes (right after seeding with the config's seed), in its own MLflow
    run tagged `role` that logs run_params and every training setting; returns fit()'s final metrics, updated with
    what after(model, result) returns (called inside the run, e.g. to log a generated sample). The config's `compile`
    (training.TrainConfig.compile) applies to every role alike and is logged as a param and a tag.

    Under torchrun every process trains and process 0 alone talks to MLflow (and calls `after`). With
    checkpoint_dir, a crashed run resumes from its latest checkpoint and continues its own MLflow run.
    """
    settings = train_config(config)
    lead = distributed.rank() == 0
    run_id = training.checkpoint_extra(checkpoint_dir).get("mlflow_run_id") if lead else None
    if run_id is not None and not tracking.run_exists(run_id):
        run_id = None
    unused = {"progress", *(("epochs",) if settings.iterations else ("iterations", "eval_every"))}  # the other schedule
    params = {**run_params, **{k: v for k, v in asdict(settings).items() if k not in unused}}
    run_context = (
        start_run(stage, params, info, kind=kind, role=role, run_id=run_id) if lead else contextlib.nullcontext()
    )
    with run_context as run:
        torch.manual_seed(settings.seed)
        model = build()
        if lead:
            tracking.set_tags(
                {
                    **tags,
                    "compile": settings.compile,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "processes": distributed.world_size(),
                }
            )
        result = training.fit(
            model,
            train,
            val,
            settings,
            device or info["device"],
            checkpoint_dir,
            log=tracking.log_metrics,
            extra={"mlflow_run_id": run.info.run_id} if lead else None,
            **fit_kwargs,
        )
        if not lead:
            return result
        if result["resumed_from_step"]:
            tracking.set_tags({k: result[k] for k in ("resumed_from_step", "resumed_from_epoch") if k in result})
        if after is not None:
            result.update(after(model, result))
        return {**result, "mlflow_run_id": run.info.run_id}


def train_mlp(
    config: dict,
    info: dict,
    *,
    stage: str,
    kind: str,
    role: str,
    backend: str,
    fused: bool,
    checkpoint_dir: Path | None = None,
) -> dict:
    """One TritonMLP training run (training_run): the data (dataset, subsets), the model (hidden_size, activation,
    backend, fused) and every training setting logged."""
    name = config["dataset"]
    root = DATA_ROOT / name
    train_set = image_classification(name, root, train=True, subset=config.get("train_subset", 0))
    val_set = image_classification(name, root, train=False, subset=config.get("val_subset", 0))
    model_params = {
        "hidden_size": config["hidden_size"],
        "activation": config["activation"],
        "backend": backend,
        "fused": fused,
    }
    return training_run(
        config,
        info,
        stage=stage,
        kind=kind,
        role=role,
        checkpoint_dir=checkpoint_dir,
        train=train_set,
        val=val_set,
        build=lambda: TritonMLP(train_set.tensors[0][0].numel(), image_module(name).NUM_CLASSES, **model_params),
        run_params={**used(config, "dataset", "train_subset", "val_subset"), **model_params},
        tags={"backend": backend, "fused": fused, "dataset": name},
    )


def roles(config: dict) -> dict[str, str]:
    """{role: backend}: the model on params `backend`, and with `baseline: true` the torch twin as `baseline`."""
    backends = {"model": config.get("backend", "triton")}
    if config.get("baseline") and backends["model"] != "torch":
        backends["baseline"] = "torch"
    return backends


def history_rows(results: dict, keys, index: str) -> list[dict]:
    """One row per record of the model's history: its `index` ("epoch" or "step") and `keys` (CSV names), then the
    baseline's record of the same index, prefixed with `baseline_`."""
    rows = []
    for i, record in enumerate(results["model"]["history"]):
        row = {index: record[index], **flat_metrics(record, keys)}
        if "baseline" in results:
            row.update({f"baseline_{k}": v for k, v in flat_metrics(results["baseline"]["history"][i], keys).items()})
        rows.append(row)
    return rows


def ratio(results: dict, key: str) -> float | None:
    """model / baseline of a final metric (None without a baseline or the metric)."""
    values = [results.get(role, {}).get(key) for role in ("model", "baseline")]
    return values[0] / values[1] if None not in values and values[1] else None


def twin_metrics(results: dict, config: dict, keys, throughput: str) -> dict:
    """A stage's metrics.json body: per role its backend and final `keys` (CSV names); with a baseline, the
    model/baseline ratios of `throughput` (`<name>_ratio`) and of the peak memory."""
    backends = roles(config)
    metrics = {role: {"backend": backends[role], **flat_metrics(result, keys)} for role, result in results.items()}
    if "baseline" in results:
        metrics[f"{throughput.split('/')[-1]}_ratio"] = ratio(results, throughput)
        metrics["peak_memory_ratio"] = ratio(results, "mem/peak_mib")
    return metrics


def accuracy_gap(results: dict) -> dict:
    """With a baseline: the model's validation accuracy minus the twin's in percentage points, and whether it is
    within 0.5 of it. Accuracies are counts over at most a million images, so the gap is rounded to 1e-6 points: a
    gap of exactly 50 images in 10000 is within, not 0.5000000000000004 points off."""
    if "baseline" not in results:
        return {}
    gap = round(100 * (results["model"]["val/accuracy"] - results["baseline"]["val/accuracy"]), 6)
    return {"accuracy_gap_points": gap, "within_half_point": abs(gap) <= 0.5}


# ------------------------------------------------------------------------------------------------ data parallel


def data_parallel(config: dict, module: str) -> bool:
    """Params `processes` > 1 in a process that torchrun did not start: runs `python -m module` in that many
    processes (they share this EXECUTION) and returns True once they succeeded (SystemExit when they failed).
    Otherwise returns False: this process trains (alone, or as one of torchrun's)."""
    processes = config.get("processes", 1)
    if processes <= 1 or distributed.launched():
        return False
    status = distributed.launch(processes, module, {"TRIFORMER_EXECUTION": EXECUTION})
    if status != 0:
        raise SystemExit(f"{module} failed in {processes} data-parallel processes (torchrun exit status {status})")
    return True


def training_stage(group: str, out: Path, train: Callable, write: Callable) -> None:
    """A training stage with a model and its baseline, on one process or, with params `processes` > 1, on that many
    under torchrun: its results removed first (a killed run leaves none, so the next `dvc repro` runs it again),
    train(config, info, device, checkpoints) → {role: result} in every process, then write(results, config, info)
    and the checkpoints removed (unless `keep_checkpoints`) by process 0."""
    with stage(group) as (config, info):
        if not distributed.launched():
            shutil.rmtree(out, ignore_errors=True)
            if data_parallel(config, f"experiments.{group}"):
                return
        checkpoints = CHECKPOINT_ROOT / group / config_hash(config, info)
        with distributed.process_group(info["device"]) as device:
            results = train(config, info, device, checkpoints)
            if distributed.rank() == 0:
                write(results, config, info)
                if not config.get("keep_checkpoints"):
                    shutil.rmtree(checkpoints, ignore_errors=True)
