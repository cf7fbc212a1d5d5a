"""Stage `bench`: every benchmark suite of triformer.bench, providers side by side, against the ceilings measured in
the same run (a large device copy for GB/s, a large bf16 torch.matmul for TFLOP/s).

Suites (params `bench.suites`) are modules `triformer.bench.<suite>` with `run(**params bench.<suite>, dtype,
device, progress) -> rows`; a row has op, shape, dtype, mode, provider, ms (host launches included), gpu_ms (GPU time
alone, NaN without a GPU: see triformer.bench.timing), rate and gpu_rate, unit ("TFLOP/s" or "GB/s").
Writes results/bench/bench.csv (for `dvc plots`) and results/bench/metrics.json; logs both to MLflow.
A suite that does not exist yet is reported as missing, not silently dropped.
"""

import math
from collections import defaultdict
from pathlib import Path

import torch

from triformer import tracking
from triformer.bench.suites import load_suite, measured_ceilings, with_fractions

from . import common

OUT = Path("results/bench")
COLUMNS = [
    "label",
    "case",
    "op",
    "shape",
    "dtype",
    "mode",
    "provider",
    "ms",
    "gpu_ms",
    "rate",
    "gpu_rate",
    "unit",
    "fraction_of_ceiling",
    "gpu_fraction_of_ceiling",
]
METRIC_OF_UNIT = {"TFLOP/s": "perf/tflops", "GB/s": "perf/gbps", "calls/s": "perf/calls_per_s"}


def summary(rows: list[dict]) -> dict:
    """Per op, mode and provider: the geometric means of rate and fraction of ceiling over the shapes."""
    groups = defaultdict(list)
    for row in rows:
        if math.isfinite(row["rate"]):  # a provider that failed has NaN (and its error in the CSV)
            groups[(row["op"], row["mode"], row["provider"])].append(row)
    result: dict = {}
    for (op, mode, provider), group in sorted(groups.items()):
        result.setdefault(op, {}).setdefault(mode, {})[provider] = {
            "rate_geomean": geomean(r["rate"] for r in group),
            "unit": group[0]["unit"],
            "fraction_geomean": geomean(r["fraction_of_ceiling"] for r in group),
        }
    return result


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(max(v, 1e-30)) for v in values) / len(values))


def main() -> None:
    with common.stage("bench") as (config, info):
        device, dtype = info["device"], getattr(torch, config["dtype"])
        params = {**common.used(config, "suites", "dtype"), **{name: config.get(name, {}) for name in config["suites"]}}
        with common.start_run("bench", params, info):
            ceilings = measured_ceilings(device)
            print(
                f"ceilings: copy {ceilings['GB/s']:.1f} GB/s, matmul {ceilings['TFLOP/s']:.2f} TFLOP/s, "
                f"host {ceilings['calls/s']:.0f} torch.empty_like calls/s"
            )
            rows, missing = [], []
            for name in config["suites"]:
                suite = load_suite(name)
                if suite is None:
                    missing.append(name)
                    continue
                rows += suite.run(**config.get(name, {}), dtype=dtype, device=device, progress=True)
            rows = with_fractions(rows, ceilings)
            common.write_csv(OUT / "bench.csv", rows, COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS)))
            common.write_json(
                OUT / "metrics.json",
                {
                    "ceiling": {
                        "copy_gbps": ceilings["GB/s"],
                        "matmul_tflops": ceilings["TFLOP/s"],
                        "empty_like_calls_per_s": ceilings["calls/s"],
                    },
                    "suites_run": [s for s in config["suites"] if s not in missing],
                    "suites_missing": missing,
                    "rows": len(rows),
                    "summary": summary(rows),
                    "run": common.label(info),
                },
            )
            tracking.log_metrics(
                {
                    "ceiling/gbps": ceilings["GB/s"],
                    "ceiling/tflops": ceilings["TFLOP/s"],
                    "ceiling/calls_per_s": ceilings["calls/s"],
                }
            )
            tracking.log_metrics({key: value for row in rows for key, value in row_metrics(row).items()})
            tracking.set_tags({"suites_missing": ",".join(missing) or "none"})
            tracking.log_artifact(OUT / "bench.csv")
            print(
                f"bench: {len(rows)} rows from {len(config['suites']) - len(missing)} suite(s); "
                f"missing: {missing or 'none'}"
            )


def row_metrics(row: dict) -> dict:
    """`perf/tflops/<op>/<mode>/<provider>/<shape>` (or perf/gbps/...) and its fraction of the ceiling."""
    path = (row["op"], row["mode"], row["provider"], row["shape"])
    metrics = {
        tracking.metric_key(METRIC_OF_UNIT[row["unit"]], *path): row["rate"],
        tracking.metric_key("perf/fraction_of_ceiling", *path): row["fraction_of_ceiling"],
    }
    if math.isfinite(row.get("gpu_rate", float("nan"))):  # GPU time alone: only where a GPU measured it
        metrics[tracking.metric_key(METRIC_OF_UNIT[row["unit"]] + "_gpu", *path)] = row["gpu_rate"]
    return metrics


if __name__ == "__main__":
    main()
