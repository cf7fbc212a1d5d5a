"""Stage `train_vit`: a Vision Transformer on FashionMNIST (data@fashion_mnist) and, with `baseline: true`, its torch
twin (backend="torch") from the same seed on the same batches.

`epochs` of AdamW on training images shifted by up to `augment_shift` pixels and mirrored (`augment_flip`) at
random (warmup + cosine, gradient clipping, bf16 autocast on the GPU), evaluation on the test split after
each epoch, a checkpoint each epoch under checkpoints/train_vit/<config hash>/<role>/ (a killed run resumes there;
removed after success unless `keep_checkpoints`). `processes: N` trains data-parallel in N processes under torchrun
(one GPU each; gloo on the CPU) at the same global batch.

MLflow (experiment `train`, one run per role): train/loss, val/loss and val/accuracy curves, perf/images_per_s,
perf/step_ms, mem/peak_mib. Writes results/train_vit/metrics.json (accuracy gap in points, throughput and memory
ratios) and epochs.csv (for `dvc plots`).
"""

from dataclasses import fields
from pathlib import Path

import torch

from triformer import training
from triformer.data import black_pixel, image_classification, image_module
from triformer.models import ViT, ViTConfig

from . import common

OUT = Path("results/train_vit")
DATA_KEYS = ("image_size", "channels", "num_classes", "backend")  # ViTConfig's fields set by the dataset and role
MODEL_KEYS = tuple(f.name for f in fields(ViTConfig) if f.name not in DATA_KEYS)
EPOCH_METRICS = ("train/epoch_loss", "val/loss", "val/accuracy", "perf/images_per_s", "perf/step_ms", "mem/peak_mib")
FINAL_METRICS = ("val/accuracy", "val/loss", "train/epoch_loss", "perf/images_per_s", "perf/step_ms", "mem/peak_mib")


def train(config: dict, info: dict, device: torch.device, checkpoints: Path) -> dict:
    """{role: final metrics (with `history` on process 0)} for the model and its baseline."""
    name = config["dataset"]
    root = common.DATA_ROOT / name
    train_set = training.Examples(
        *image_classification(name, root, train=True, subset=config.get("train_subset", 0)).tensors,
        shift=config.get("augment_shift", 0),
        flip=config.get("augment_flip", False),
        fill=black_pixel(name),
    )
    val_set = image_classification(name, root, train=False, subset=config.get("val_subset", 0))
    _, channels, size, _ = train_set.inputs.shape
    model_params = {key: config[key] for key in MODEL_KEYS if key in config}
    results = {}
    for role, backend in common.roles(config).items():
        vit_config = ViTConfig(
            image_size=size,
            channels=channels,
            num_classes=image_module(name).NUM_CLASSES,
            backend=backend,
            **model_params,
        )
        results[role] = common.training_run(
            config,
            info,
            stage="train_vit",
            kind="train",
            role=role,
            build=lambda: ViT(vit_config),
            train=train_set,
            val=val_set,
            device=device,
            checkpoint_dir=checkpoints / role,
            run_params={
                **common.used(
                    config, "dataset", "train_subset", "val_subset", "processes", "augment_shift", "augment_flip"
                ),
                **model_params,
                "backend": backend,
            },
            tags={"backend": backend, "dataset": name},
            loss_fn=training.model_loss,
        )
    return results


def write(results: dict, config: dict, info: dict) -> None:
    common.write_csv(OUT / "epochs.csv", common.history_rows(results, EPOCH_METRICS, "epoch"))
    metrics = common.twin_metrics(results, config, FINAL_METRICS, "perf/images_per_s")
    metrics.update(common.accuracy_gap(results))
    common.write_json(
        OUT / "metrics.json",
        {
            **metrics,
            "dataset": config["dataset"],
            "epochs": config["epochs"],
            "processes": config.get("processes", 1),
            "run": common.label(info),
        },
    )
    print(f"train_vit: {metrics}")


def main() -> None:
    common.training_stage("train_vit", OUT, train, write)


if __name__ == "__main__":
    main()
