"""Stage `test`: the kernel correctness suite → results/test/metrics.json, results/test/errors.csv and MLflow.

Runs pytest on params `test.paths` with the marker expression of the profile (the CPU profile leaves out `slow`
and `gpu` and keeps every `sample_every`-th parametrization of each test function, to stay in minutes under the
interpreter; both leave out `pipeline`, the tests of this pipeline itself, which CI runs) and records what it ran:
the selection, passed/failed/skipped/deselected counts, skip reasons, and the worst relative error per op and dtype
(tests/report_plugin.py).
The stage fails when a test fails, after writing its numbers.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from triformer import tracking

from . import common

OUT = Path("results/test")
ERROR_COLUMNS = ["op", "dtype", "worst", "tolerance", "ratio", "what", "test"]


def pytest_command(config: dict, report: Path, junit: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "pytest",
        *config["paths"],
        "-q",
        "-m",
        config["markers"],
        "-p",
        "tests.report_plugin",
        f"--triformer-report={report}",
        f"--junitxml={junit}",
    ]
    if config.get("sample_every", 1) > 1:
        command.append(f"--triformer-sample={config['sample_every']}")
    if config.get("workers", 1) > 1:
        command += ["-n", str(config["workers"])]
    return command + list(config.get("extra_args", []))


def relerr_rows(relerr: dict) -> list[dict]:
    return [
        {"op": op, "dtype": dtype, **record} for op, by_dtype in relerr.items() for dtype, record in by_dtype.items()
    ]


def run_pytest(config: dict, report: Path, junit: Path) -> int:
    command = pytest_command(config, report, junit)
    print("+", " ".join(command), flush=True)
    returncode = subprocess.call(command)
    if not report.exists():
        raise RuntimeError(f"pytest exited with {returncode} and wrote no report (collection or usage error)")
    return returncode


def stage_metrics(report: dict, config: dict, info: dict, returncode: int) -> dict:
    """results/test/metrics.json: what ran, how it ended, and the worst error per op and dtype (numbers only: the
    test and check behind each are in errors.csv)."""
    return {
        "tests": {**report["counts"], "duration_s": round(report["duration_s"], 1)},
        "selection": {
            "paths": config["paths"],
            "markers": config["markers"],
            "exitstatus": returncode,
            "sample_every": report["sample_every"],
        },
        "relerr": {
            op: {dtype: {k: r[k] for k in ("worst", "tolerance", "ratio")} for dtype, r in by_dtype.items()}
            for op, by_dtype in report["relerr"].items()
        },
        "skip_reasons": report["skip_reasons"],
        "run": common.label(info),
    }


def main() -> None:
    with common.stage("test") as (config, info):
        params = common.used(config, "paths", "markers", "sample_every", "workers", "extra_args")
        with tempfile.TemporaryDirectory() as tmp, common.start_run("test", params, info):
            report_path, junit = Path(tmp) / "report.json", Path(tmp) / "junit.xml"
            returncode = run_pytest(config, report_path, junit)
            report = common.read_json(report_path)
            counts, rows = report["counts"], relerr_rows(report["relerr"])
            common.write_json(OUT / "metrics.json", stage_metrics(report, config, info, returncode))
            common.write_csv(OUT / "errors.csv", rows, ERROR_COLUMNS)
            tracking.log_metrics(
                {
                    **{f"tests/{key}": value for key, value in counts.items()},
                    "tests/duration_s": report["duration_s"],
                    **{f"relerr/{row['op']}/{row['dtype']}": float(row["worst"]) for row in rows},
                }
            )
            tracking.set_tags(
                {
                    "pytest.markers": config["markers"],
                    "pytest.exitstatus": returncode,
                    "pytest.sample_every": report["sample_every"],
                }
            )
            for path in (report_path, junit, OUT / "errors.csv"):
                if path.exists():
                    tracking.log_artifact(path)
            print(f"tests: {counts} ({report['duration_s']:.0f} s); exit status {returncode}")
            if counts["failed"] or counts["error"] or returncode not in (0, 5):  # 5: nothing collected
                raise SystemExit(
                    f"the correctness suite failed (pytest exit status {returncode}); see {OUT}/metrics.json"
                )


if __name__ == "__main__":
    main()
