"""On a GPU host: every kernel benchmark side by side with its ceilings, printed as ratio tables (logs to $OUT).

The suites, their shapes and the dtype are the bench stage's, from params.yaml's `bench` group at its `gpu` profile;
arguments pick some of the suites (`gpu_kernels.py linear norms`). SUITE_OPTIONS (JSON) replaces options of a
suite for this run, e.g. the gpt suite's character model and three providers only:
  SUITE_OPTIONS='{"gpt": {"models": ["char"], "providers": ["torch", "triformer", "triformer (CUDA graph)"]}}'
(a list of names for "models" picks those of the configured models; the norms suite's "ops" picks ops)."""

import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for experiments.common
from experiments.common import load_params, stage_config  # noqa: E402
from triformer.bench.suites import load_suite, measured_ceilings, with_fractions  # noqa: E402

out = os.environ.get("OUT", "/tmp/out")
config = stage_config("bench", load_params(), "gpu")
for suite_name, options in json.loads(os.environ.get("SUITE_OPTIONS", "{}")).items():
    suite_config = config.setdefault(suite_name, {})
    if all(isinstance(m, str) for m in options.get("models", [None])):  # names of configured models
        options["models"] = [m for m in suite_config.get("models", []) if m.get("name") in options["models"]]
    suite_config.update(options)
suites = sys.argv[1:] or config["suites"]
dtype = getattr(torch, config["dtype"])
ceilings = measured_ceilings("cuda")
print(
    f"{torch.cuda.get_device_name()}: copy {ceilings['GB/s']:.0f} GB/s, "
    f"bf16 matmul 8192^3 {ceilings['TFLOP/s']:.0f} TFLOP/s",
    flush=True,
)
rows = []
for name in suites:
    if (suite := load_suite(name)) is None:
        continue
    for row in suite.run(**config.get(name, {}), dtype=dtype, device="cuda", progress=False):
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)  # each row as it comes: a time limit keeps what was measured
frame = pd.DataFrame(with_fractions(rows, ceilings))
frame.to_csv(f"{out}/bench_kernels.csv", index=False)
pd.set_option("display.width", 250)
pd.set_option("display.max_columns", 20)
for (op, unit), part in frame.groupby(["op", "unit"], sort=False):
    for time, fraction, what in (
        ("ms", "fraction_of_ceiling", "host launches included (do_bench)"),
        ("gpu_ms", "gpu_fraction_of_ceiling", "GPU time alone (CUDA graph)"),
    ):
        table = part.pivot_table(index=["shape", "mode"], columns="provider", values=time, sort=False, dropna=False)
        ours = next(c for c in table.columns if c.startswith("triformer"))
        speedup = table.div(table[ours], axis=0).round(2)  # other_ms / ours_ms: > 1 means ours is faster
        rate = part.pivot_table(index=["shape", "mode"], columns="provider", values=fraction, sort=False, dropna=False)
        print(
            f"\n== {op}, {what}: speed of {ours!r} relative to each provider (their {time} / ours) ==\n"
            f"{speedup.to_string()}"
        )
        print(f"-- fraction of the measured ceiling ({unit}) --\n{rate.round(2).to_string()}")
    if "peak_extra_mib" in part:
        extra = part.pivot_table(index=["shape", "mode"], columns="provider", values="peak_extra_mib", sort=False)
        print(f"-- peak extra MiB --\n{extra.round(0).to_string()}")
failed = frame[frame.get("error", pd.Series("", index=frame.index)).fillna("") != ""]
if len(failed):
    print("\nfailed providers:\n" + failed[["op", "shape", "mode", "provider", "error"]].to_string())
