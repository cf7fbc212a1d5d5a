"""Where does a GPT training step's time go? On a GPU host: one step (forward, backward, AdamW) of the bench's GPT
models, per provider, under torch.profiler: GPU kernel time by kind of work, kernel launches per step, wall time
per step against GPU busy time (the host-bound share), and the heaviest kernels and host-side calls.

The models and providers are the bench stage's (params.yaml `bench.gpu.gpt`, providers of triformer.bench.gpt).
Logs to $OUT/step_profile.txt and $OUT/step_profile.csv (one row per model, provider and kind of work).

Run: python tools/gpu_step_profile.py [--models char] [--providers triformer torch] [--steps 5] [--python]
"""

import argparse
import cProfile
import io
import os
import pstats
import re
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for experiments.common
from experiments.common import load_params, stage_config  # noqa: E402
from triformer.bench.gpt import PROVIDERS, provider_step, shape_name  # noqa: E402
from triformer.models import GPTConfig  # noqa: E402

# Kernel name patterns → kind of work; the first match wins, in this order.
KINDS = [
    ("attention", r"^_forward_kernel$|_dkdv|_dq_kernel|_delta_kernel|attn|attention|flash|fmha|sdpa"),
    ("matmul", r"gemm|matmul|_linear_ws|cutlass|xmma|nvjet|wgmma|_accumulate|split_k"),
    ("cross-entropy", r"cross_entropy|_count_targets|_scale_rows|nll|log_softmax"),
    ("norm / column sums", r"norm|column_sum"),
    ("softmax", r"softmax"),
    ("rope", r"rope|rotary"),
    ("gated / activation", r"_gated_|_activation_|_bias_add"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("dropout", r"dropout|philox|bernoulli"),
    ("copy / fill", r"copy|memcpy|memset|fill|cat_|index|gather|scatter|embedding"),
    ("elementwise (torch / inductor)", r"elementwise|vectorized|unrolled|triton_|reduce_kernel|gelu|silu|relu"),
]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def profile_steps(step, steps: int):
    """(profile of `steps` steps, wall ms per step measured outside the profiler)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof, wall_ms


def python_profile(step, steps: int) -> str:
    """The heaviest Python functions of `steps` steps under cProfile (by own time and by cumulative time): where the
    host's time goes in a host-bound step."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return text.getvalue()


def kernel_table(prof, steps: int) -> pd.DataFrame:
    """One row per GPU kernel name: launches and µs per step."""
    rows = [
        (event.name, event.time_range.elapsed_us()) for event in prof.events() if event.device_type == DeviceType.CUDA
    ]
    frame = pd.DataFrame(rows, columns=["kernel", "us"])
    table = frame.groupby("kernel").agg(launches=("us", "size"), us=("us", "sum")) / steps
    table["kind"] = [kind_of(name) for name in table.index]
    return table.sort_values("us", ascending=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model names of params.yaml bench.gpu.gpt (default: all)")
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--python", action="store_true", help="also the steps' Python functions under cProfile")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    models = stage_config("bench", load_params(), "gpu")["gpt"]["models"]
    models = [m for m in models if not args.models or m.get("name") in args.models]
    lines, summary = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}"], []
    for entry in models:
        fields = {k: v for k, v in entry.items() if k not in ("name", "batch_size")}
        config = GPTConfig(**fields)
        for provider in args.providers:
            model, step = provider_step(provider, config, "cuda", torch.bfloat16, entry["batch_size"], seed=0)
            prof, wall_ms = profile_steps(step, args.steps)
            table = kernel_table(prof, args.steps)
            gpu_ms = table["us"].sum() / 1e3
            by_kind = table.groupby("kind").agg(launches=("launches", "sum"), us=("us", "sum"))
            title = f"{shape_name(entry)} — {provider}"
            lines += [
                f"\n== {title}: wall {wall_ms:.2f} ms per step, GPU busy {gpu_ms:.2f} ms "
                f"({gpu_ms / wall_ms:.0%}), {int(table['launches'].sum())} kernel launches per step ==",
                (by_kind.sort_values("us", ascending=False).assign(ms=lambda t: t.us / 1e3).drop(columns="us"))
                .round(3)
                .to_string(),
                "-- heaviest kernels (µs per step) --",
                table.head(12).round(1).to_string(),
                "-- host: heaviest calls by self CPU time (all steps) --",
                prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12),
            ]
            if args.python:
                lines += ["-- host: Python functions under cProfile (all steps) --", python_profile(step, args.steps)]
            summary += [
                dict(model=shape_name(entry), provider=provider, kind=kind, wall_ms=wall_ms, **values)
                for kind, values in by_kind.to_dict("index").items()
            ]
            print("\n".join(lines[-9:-4] if args.python else lines[-7:-2]), flush=True)
            del model, step, prof
            torch.cuda.empty_cache()
    (out / "step_profile.txt").write_text("\n".join(lines) + "\n")
    pd.DataFrame(summary).to_csv(out / "step_profile.csv", index=False)


if __name__ == "__main__":
    main()
