"""Stage `ablation`: fused vs unfused TritonLinear, with nn.Linear (+ the same activation) as the baseline.

Kernel level: each layer variant timed forward and forward+backward across params `ablation.shapes` ([M, K, N]).
Model level: TritonMLP (with the same activation) trained briefly with each variant (images/s, step time,
accuracy), one MLflow run each.
Transformer level (params `ablation.gpt`): a GPT training step (forward, backward, AdamW on synthetic tokens) with
one part at a time on PyTorch inside the triformer model (attention, norm, mlp, head, dropout), all of it on
triformer, and all of it on PyTorch (the twin): tokens/s and peak memory per variant, one MLflow run.
Variants and sizes come from params, so `dvc exp run -S ablation.activation=gelu`,
`-S 'ablation.variants=[fused,unfused]'` or `-S 'ablation.gpu.gpt.variants=[triformer,attention,torch]'` launch an
ablation and `dvc exp show` compares them.
Writes results/ablation/{kernels,models,gpt}.csv and metrics.json.
"""

from pathlib import Path

import torch

from triformer import tracking
from triformer.bench import gpt as gpt_bench
from triformer.bench.timing import median_ms
from triformer.models import GPT, GPTConfig
from triformer.models.blocks import can_fuse
from triformer.models.mlp import make_linear

from . import common

OUT = Path("results/ablation")
VARIANTS = {"fused": ("triton", True), "unfused": ("triton", False), "torch": ("torch", True)}
MODES = ("fwd", "fwd+bwd")
MODEL_METRICS = ("perf/images_per_s", "perf/step_ms", "val/accuracy", "val/loss", "train/epoch_loss", "mem/peak_mib")
GPT_RUN_KEYS = ("batch_size", "steps", "warmup", "variants")  # the rest of params ablation.gpt is GPTConfig's


def time_layer(
    variant: str, shape, mode: str, activation: str, dtype: torch.dtype, device: str, seed: int = 0
) -> float:
    """Median ms of one layer variant on x [M, K] → [M, N]; fwd+bwd computes dx, dW and db."""
    m, k, n = shape
    backend, fused = VARIANTS[variant]
    torch.manual_seed(seed)
    layer = make_linear(k, n, activation, backend, fused).to(device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=mode == "fwd+bwd")
    if mode == "fwd":

        def step():
            with torch.no_grad():
                layer(x)
    else:
        dy = torch.randn(m, n, device=device, dtype=dtype)
        inputs = [x, *layer.parameters()]

        def step():
            torch.autograd.grad(layer(x), inputs, dy)

    return median_ms(step)


def kernel_rows(config: dict, device: str) -> list[dict]:
    dtype, activation = getattr(torch, config["dtype"]), config["activation"]
    rows = []
    for m, k, n in config["shapes"]:
        shape = f"{m}x{k}x{n}"
        for mode in MODES:
            flops = 2 * m * k * n * (1 if mode == "fwd" else 3)
            times = {
                v: time_layer(v, (m, k, n), mode, activation, dtype, device, config["seed"]) for v in config["variants"]
            }
            for variant, ms in times.items():
                rows.append(
                    {
                        "label": f"{mode} {shape} {variant}",
                        "case": f"{mode} {shape}",
                        "op": f"linear_{activation}",
                        "shape": shape,
                        "dtype": config["dtype"],
                        "mode": mode,
                        "provider": variant,
                        "ms": ms,
                        "rate": flops / (ms * 1e-3) / 1e12,
                        "unit": "TFLOP/s",
                        "speedup_vs_torch": times["torch"] / ms if "torch" in times else None,
                    }
                )
                print(f"ablation: {mode} {shape} {variant}: {ms:.3f} ms")
    return rows


SEPARATE_RESIDUAL = "separate residual"  # all on triformer, each residual add, dropout and norm its own op


def gpt_variant(variant: str, fields: dict) -> GPTConfig:
    """ "triformer": every part on triformer; "torch": the twin; a part's name: that part on torch;
    SEPARATE_RESIDUAL: every part on triformer without GPTConfig.fused_residual."""
    if variant in ("triformer", "torch"):
        return GPTConfig(**fields, backend="triton" if variant == "triformer" else "torch")
    if variant == SEPARATE_RESIDUAL:
        return GPTConfig(**fields, fused_residual=False)
    return GPTConfig(**fields, torch_parts=(variant,))


def gpt_rows(gpt: dict, dtype: torch.dtype, device: str, seed: int) -> list[dict]:
    """One row per variant: ms per training step, tokens/s, peak memory (MiB, NaN on the CPU), speed-up over torch."""
    fields = {k: v for k, v in gpt.items() if k not in GPT_RUN_KEYS}
    rows = []
    for variant in gpt["variants"]:
        torch.manual_seed(seed)
        model = GPT(gpt_variant(variant, fields)).to(device)
        step = gpt_bench.train_step(model, model, device, dtype, gpt["batch_size"])
        ms, peak = gpt_bench.step_ms(step, device, gpt.get("steps", 20), gpt.get("warmup", 5))
        rows.append(
            {
                "variant": variant,
                "torch_parts": "+".join(model.config.torch_parts) or model.config.backend,
                "fused_residual": model.config.fused_residual and can_fuse(model.blocks, model.ln_f),
                "ms": ms,
                "perf_tokens_per_s": gpt["batch_size"] * model.config.block_size / (ms * 1e-3),
                "mem_peak_mib": peak,
            }
        )
        print(f"ablation: gpt {variant}: {ms:.2f} ms a step")
        del model, step
    torch_ms = next((row["ms"] for row in rows if row["variant"] == "torch"), None)
    for row in rows:
        row["speedup_vs_torch"] = torch_ms / row["ms"] if torch_ms else None
    return rows


def main() -> None:
    with common.stage("ablation") as (config, info):
        kernel_params = common.used(config, "variants", "activation", "shapes", "dtype", "seed")
        with common.start_run("ablation", kernel_params, info, role="kernels"):
            kernels = kernel_rows(config, info["device"])
            common.write_csv(OUT / "kernels.csv", kernels)
            tracking.log_metrics(
                {
                    tracking.metric_key("perf/tflops", r["op"], r["mode"], r["provider"], r["shape"]): r["rate"]
                    for r in kernels
                }
            )
            tracking.log_artifact(OUT / "kernels.csv")
        models = []
        for variant in config["variants"]:
            backend, fused = VARIANTS[variant]
            result = common.train_mlp(
                config, info, stage="ablation", kind="ablation", role=variant, backend=backend, fused=fused
            )
            models.append({"variant": variant, **common.flat_metrics(result, MODEL_METRICS)})
        common.write_csv(OUT / "models.csv", models)
        gpt = []
        if config.get("gpt"):
            with common.start_run("ablation", {"gpt": config["gpt"], "dtype": config["dtype"]}, info, role="gpt"):
                gpt = gpt_rows(config["gpt"], getattr(torch, config["dtype"]), info["device"], config["seed"])
                common.write_csv(OUT / "gpt.csv", gpt)
                tracking.log_metrics(
                    {
                        tracking.metric_key(key, row["variant"]): row[key.replace("/", "_")]
                        for row in gpt
                        for key in ("perf/tokens_per_s", "mem/peak_mib")
                    }
                )
                tracking.log_artifact(OUT / "gpt.csv")
        else:
            common.write_csv(
                OUT / "gpt.csv",
                [],
                ["variant", "torch_parts", "ms", "perf_tokens_per_s", "mem_peak_mib", "speedup_vs_torch"],
            )
        common.write_json(
            OUT / "metrics.json",
            {
                "kernels": {
                    f"{r['mode']}/{r['shape']}/{r['provider']}": {"ms": r["ms"], "tflops": r["rate"]} for r in kernels
                },
                "models": {row["variant"]: {k: v for k, v in row.items() if k != "variant"} for row in models},
                "gpt": {row["variant"]: {k: v for k, v in row.items() if k != "variant"} for row in gpt},
                "run": common.label(info),
            },
        )


if __name__ == "__main__":
    main()
