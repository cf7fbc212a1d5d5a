"""Stage `train_gpt`: a character-level GPT on Shakespeare (data@shakespeare) and, with `baseline: true`, its torch twin
(backend="torch") from the same seed on the same batches.

`iterations` AdamW steps (warmup + cosine, gradient clipping, bf16 autocast on the GPU), the validation loss on
`eval_batches` fixed batches every `eval_every` steps, a checkpoint at each evaluation under
checkpoints/train_gpt/<config hash>/<role>/ (a killed run resumes there; removed after success unless
`keep_checkpoints`). The model's options (norm, mlp, rope, fused_head, n_kv_head, torch_parts, ...) are params:
`dvc exp run -S train_gpt.mlp=swiglu` trains that variant. `processes: N` trains data-parallel in N processes under
torchrun (one GPU each; gloo on the CPU) at the same global batch.

MLflow (experiment `train`, one run per role): train/loss and val/loss curves, perf/tokens_per_s, perf/step_ms,
mem/peak_mib, perf/mfu (model FLOPs per token × tokens/s ÷ the bf16 matmul rate measured at the start of the stage,
logged as ceiling/tflops) and sample.txt, text the trained model generates after a newline. Writes
results/train_gpt/metrics.json, steps.csv (one row per evaluation) and sample.txt.
"""

import contextlib
import os
from dataclasses import fields
from pathlib import Path

import torch

from triformer import distributed, tracking, training
from triformer.bench.timing import matmul_tflops
from triformer.data import shakespeare
from triformer.models import GPT, GPTConfig

from . import common

OUT = Path("results/train_gpt")
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name not in ("vocab_size", "backend"))
STEP_METRICS = ("train/interval_loss", "val/loss", "perf/tokens_per_s", "perf/step_ms", "mem/peak_mib", "perf/mfu")
FINAL_METRICS = ("val/loss", "train/interval_loss", "perf/tokens_per_s", "perf/step_ms", "mem/peak_mib", "perf/mfu")


@contextlib.contextmanager
def fixed_tiles():
    """One fixed tile per product shape inside (TRIFORMER_AUTOTUNE=0): generation meets every context length once,
    and a tuning sweep for each length's products would take longer than the generation."""
    previous = os.environ.get("TRIFORMER_AUTOTUNE")
    os.environ["TRIFORMER_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRIFORMER_AUTOTUNE"]
        else:
            os.environ["TRIFORMER_AUTOTUNE"] = previous


def sample(model: GPT, vocab: str, config: dict, device) -> str:
    """What the model writes after a newline: `sample_tokens` characters at `temperature` from the `top_k` most
    likely, seeded (the same weights write the same text)."""
    prompt = torch.tensor([[vocab.index("\n") if "\n" in vocab else 0]], device=device)
    torch.manual_seed(config["seed"])
    with fixed_tiles():
        out = model.generate(
            prompt, config["sample_tokens"], temperature=config["temperature"], top_k=config.get("top_k")
        )
    return shakespeare.decode(out[0, 1:].cpu(), vocab)


def train(config: dict, info: dict, device: torch.device, checkpoints: Path) -> dict:
    """{role: final metrics (with `history` and `sample` on process 0)} for the model and its baseline."""
    root = common.DATA_ROOT / config["dataset"]
    (train_tokens, meta), (val_tokens, _) = shakespeare.load(root, "train"), shakespeare.load(root, "val")
    block_size = config["block_size"]
    train_data, val_data = training.TokenStream(train_tokens, block_size), training.TokenStream(val_tokens, block_size)
    model_params = {key: config[key] for key in MODEL_KEYS if key in config}
    ceiling = distributed.broadcast_object(matmul_tflops(device.type) if distributed.rank() == 0 else None)

    def after(model, result):
        text = sample(model, meta["vocab"], config, device)
        tracking.log_text(text, "sample.txt")
        tracking.log_metrics({"ceiling/tflops": ceiling})
        return {"sample": text}

    results = {}
    for role, backend in common.roles(config).items():
        gpt_config = GPTConfig(vocab_size=meta["vocab_size"], backend=backend, **model_params)
        results[role] = common.training_run(
            config,
            info,
            stage="train_gpt",
            kind="train",
            role=role,
            build=lambda: GPT(gpt_config),
            train=train_data,
            val=val_data,
            device=device,
            checkpoint_dir=checkpoints / role,
            after=after,
            run_params={
                **common.used(config, "dataset", "processes"),
                **model_params,
                "vocab_size": meta["vocab_size"],
                "backend": backend,
            },
            tags={"backend": backend, "dataset": config["dataset"]},
            loss_fn=training.model_loss,
            flops_per_item=GPT(gpt_config).flops_per_token(),
            peak_tflops=ceiling,
        )
    return results


def write(results: dict, config: dict, info: dict) -> None:
    backends = common.roles(config)
    common.write_csv(OUT / "steps.csv", common.history_rows(results, STEP_METRICS, "step"))
    (OUT / "sample.txt").write_text(
        "".join(f"=== {role} ({backends[role]})\n{result['sample']}\n\n" for role, result in results.items()),
        encoding="utf-8",
    )
    metrics = common.twin_metrics(results, config, FINAL_METRICS, "perf/tokens_per_s")
    if "baseline" in results:
        gap = results["model"]["val/loss"] - results["baseline"]["val/loss"]
        metrics.update(val_loss_gap=gap, within_0_02=abs(gap) <= 0.02)
    common.write_json(
        OUT / "metrics.json",
        {
            **metrics,
            "iterations": config["iterations"],
            "processes": config.get("processes", 1),
            "run": common.label(info),
        },
    )
    print(f"train_gpt: {metrics}")


def main() -> None:
    common.training_stage("train_gpt", OUT, train, write)


if __name__ == "__main__":
    main()
