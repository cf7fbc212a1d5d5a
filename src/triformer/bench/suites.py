"""Benchmark suites by name (`triformer.bench.<suite>`, each with run(..., dtype, device, progress) -> rows) and the
fraction of the measured ceiling each row reaches; shared by the pipeline's bench stage and tools/gpu_kernels.py."""

import importlib

from .host import empty_like_calls_per_s
from .timing import copy_bandwidth_gbps, matmul_tflops


def load_suite(name: str):
    """The suite's module, or None (with a message) when triformer.bench.<name> does not exist yet."""
    try:
        return importlib.import_module(f"triformer.bench.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"triformer.bench.{name}":
            raise
        print(f"bench: suite {name!r} is missing (no module triformer.bench.{name}); its rows are absent")
        return None


def measured_ceilings(device: str) -> dict:
    """The ceiling of each unit, measured now: the copy rate (GB/s), the bf16 matmul rate (TFLOP/s) and the host's
    torch.empty_like call rate (calls/s)."""
    return {
        "GB/s": copy_bandwidth_gbps(device),
        "TFLOP/s": matmul_tflops(device),
        "calls/s": empty_like_calls_per_s(device),
    }


def shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) if isinstance(shape, (list, tuple)) else str(shape)


def with_fractions(rows: list[dict], ceilings: dict) -> list[dict]:
    """Each row with `case`, `fraction_of_ceiling` and `gpu_fraction_of_ceiling` (rate, gpu_rate over the ceiling of
    its unit, measured in this run)."""
    out = []
    for row in rows:
        shape = shape_text(row["shape"])
        case = f"{row['op']} {row['mode']} {shape}"
        out.append(
            {
                **row,
                "shape": shape,
                "dtype": str(row["dtype"]).removeprefix("torch."),
                "case": case,
                "label": f"{case} {row['provider']}",
                "fraction_of_ceiling": row["rate"] / ceilings[row["unit"]],
                "gpu_fraction_of_ceiling": row.get("gpu_rate", float("nan")) / ceilings[row["unit"]],
            }
        )
    return out
