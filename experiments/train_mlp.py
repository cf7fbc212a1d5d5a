"""Stage `train_mlp`: TritonMLP on FashionMNIST (CIFAR-10 with `train_mlp.dataset: cifar10`).

AdamW with warmup + cosine, bf16 autocast on the GPU, evaluation every epoch, a checkpoint each epoch under
checkpoints/train_mlp/<config hash>/ (a crashed run resumes there; removed after success unless
`keep_checkpoints`). With `baseline: true` the same model on nn.Linear (backend="torch") trains with the same seed
and settings, for the accuracy gap. Writes results/train_mlp/metrics.json (final metrics, DVC metric) and
results/train_mlp/epochs.csv (per epoch, for `dvc plots`); MLflow holds the per-step and per-epoch curves.
"""

import shutil
from pathlib import Path

from . import common

OUT = Path("results/train_mlp")
EPOCH_METRICS = ("train/epoch_loss", "val/loss", "val/accuracy", "perf/images_per_s", "perf/step_ms", "mem/peak_mib")
FINAL_METRICS = ("val/accuracy", "val/loss", "train/epoch_loss", "perf/images_per_s", "perf/step_ms", "mem/peak_mib")


def epoch_rows(results: dict) -> list[dict]:
    """One row per epoch: the model's metrics, then the baseline's prefixed with `baseline_`."""
    return common.history_rows(results, EPOCH_METRICS, "epoch")


def main() -> None:
    with common.stage("train_mlp") as (config, info):
        shutil.rmtree(OUT, ignore_errors=True)  # a killed run leaves no results: the next `dvc repro` runs it again
        roles = {"model": (config["backend"], config["fused"])}
        if config.get("baseline") and config["backend"] != "torch":
            roles["baseline"] = ("torch", True)
        checkpoints = common.CHECKPOINT_ROOT / "train_mlp" / common.config_hash(config, info)
        results = {
            role: common.train_mlp(
                config,
                info,
                stage="train_mlp",
                kind="train",
                role=role,
                backend=backend,
                fused=fused,
                checkpoint_dir=checkpoints / role,
            )
            for role, (backend, fused) in roles.items()
        }
        common.write_csv(OUT / "epochs.csv", epoch_rows(results))
        metrics = {
            role: {
                "backend": roles[role][0],
                "fused": roles[role][1] if roles[role][0] == "triton" else None,  # nn.Linear has no fused variant
                **common.flat_metrics(result, FINAL_METRICS),
            }
            for role, result in results.items()
        }
        metrics.update(common.accuracy_gap(results))
        common.write_json(
            OUT / "metrics.json",
            {**metrics, "dataset": config["dataset"], "epochs": config["epochs"], "run": common.label(info)},
        )
        if not config.get("keep_checkpoints"):
            shutil.rmtree(checkpoints, ignore_errors=True)
        print(f"train_mlp: {metrics}")


if __name__ == "__main__":
    main()
