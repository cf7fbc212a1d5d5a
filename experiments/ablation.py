"""Stage `ablation`: fused vs unfused TritonLinear, with nn.Linear (+ the same activation) as the baseline.

Kernel level: each layer variant timed forward and forward+backward across params `ablation.shapes` ([M, K, N]).
Model level: TritonMLP (with the same activation) trained briefly with each variant (images/s, step time,
accuracy), one MLflow run each.
Variants and sizes come from params, so `dvc exp run -S ablation.activation=gelu` or
`-S 'ablation.variants=[fused,unfused]'` launch an ablation and `dvc exp show` compares them.
Writes results/ablation/{kernels,models}.csv and metrics.json.
"""

from pathlib import Path

import torch

from triformer import tracking
from triformer.bench.timing import median_ms
from triformer.models.mlp import make_linear

from . import common

OUT = Path("results/ablation")
VARIANTS = {"fused": ("triton", True), "unfused": ("triton", False), "torch": ("torch", True)}
MODES = ("fwd", "fwd+bwd")
MODEL_METRICS = ("perf/images_per_s", "perf/step_ms", "val/accuracy", "val/loss", "train/loss", "mem/peak_mib")


def time_layer(variant: str, shape, mode: str, activation: str, dtype: torch.dtype, device: str,
               seed: int = 0) -> float:
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
            times = {v: time_layer(v, (m, k, n), mode, activation, dtype, device, config["seed"])
                     for v in config["variants"]}
            for variant, ms in times.items():
                rows.append({"label": f"{mode} {shape} {variant}", "case": f"{mode} {shape}",
                             "op": f"linear_{activation}", "shape": shape, "dtype": config["dtype"], "mode": mode,
                             "provider": variant, "ms": ms, "rate": flops / (ms * 1e-3) / 1e12, "unit": "TFLOP/s",
                             "speedup_vs_torch": times["torch"] / ms if "torch" in times else None})
                print(f"ablation: {mode} {shape} {variant}: {ms:.3f} ms")
    return rows


def main() -> None:
    with common.stage("ablation") as (config, info):
        kernel_params = common.used(config, "variants", "activation", "shapes", "dtype", "seed")
        with common.start_run("ablation", kernel_params, info, role="kernels"):
            kernels = kernel_rows(config, info["device"])
            common.write_csv(OUT / "kernels.csv", kernels)
            tracking.log_metrics({tracking.metric_key("perf/tflops", r["op"], r["mode"], r["provider"], r["shape"]):
                                  r["rate"] for r in kernels})
            tracking.log_artifact(OUT / "kernels.csv")
        models = []
        for variant in config["variants"]:
            backend, fused = VARIANTS[variant]
            result = common.train_mlp(config, info, stage="ablation", kind="ablation", role=variant, backend=backend,
                                      fused=fused)
            models.append({"variant": variant, **common.flat_metrics(result, MODEL_METRICS)})
        common.write_csv(OUT / "models.csv", models)
        common.write_json(OUT / "metrics.json", {
            "kernels": {f"{r['mode']}/{r['shape']}/{r['provider']}": {"ms": r["ms"], "tflops": r["rate"]}
                        for r in kernels},
            "models": {row["variant"]: {k: v for k, v in row.items() if k != "variant"} for row in models},
            "run": common.label(info)})


if __name__ == "__main__":
    main()
