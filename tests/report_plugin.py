"""Opt-in pytest plugin for the DVC `test` stage: outcome counts and the worst relative error per op and dtype.

    python -m pytest -p tests.report_plugin --triformer-report report.json [--triformer-sample 4] tests

It wraps harness.assert_close (every tolerance check of the suite goes through it) and harness.relative_error, to
record the error each check measured, whatever other arguments the harness grows; the op is the test's file and
function (`linear/forward` for test_linear.py::test_forward[...]).
Under pytest-xdist the records travel to the controller in each report's user_properties.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
from pathlib import Path

import pytest

DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float64": "fp64"}
_current: dict = {"item": None}
_selection = {"selected": 0, "deselected": 0}  # where collection runs: here, or in each xdist worker


def pytest_addoption(parser):
    parser.addoption(
        "--triformer-report",
        metavar="PATH",
        default=None,
        help="write outcome counts and the worst relative error per op and dtype as JSON",
    )
    parser.addoption(
        "--triformer-sample",
        metavar="N",
        type=int,
        default=1,
        help="keep every N-th parametrization of each test function (the first always); "
        "the rest are deselected and counted as such",
    )


def pytest_collection_modifyitems(config, items):
    every = config.getoption("--triformer-sample")
    if every <= 1:
        return
    seen: dict = {}
    kept, dropped = [], []
    for item in items:  # the same order on every xdist worker, so all keep the same items
        key = (str(item.fspath), item.originalname)
        index = seen[key] = seen.get(key, -1) + 1
        (kept if index % every == 0 else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_configure(config):
    if not config.getoption("--triformer-report"):
        return
    config._triformer_started = time.time()
    sys.path.insert(0, str(Path(__file__).parent))
    import harness

    checked, measure = harness.assert_close, harness.relative_error
    measured: list = []

    def relative_error(*args, **kwargs):
        error = measure(*args, **kwargs)
        measured.append(error)
        return error

    def assert_close(*args, **kwargs):
        call = inspect.signature(checked).bind(*args, **kwargs)
        call.apply_defaults()
        measured.clear()
        try:
            return checked(*args, **kwargs)
        finally:
            if measured and _current["item"] is not None:
                _record(_current["item"], call.arguments, measured[-1], harness.tolerance)

    harness.relative_error = relative_error
    harness.assert_close = assert_close


def _record(item, arguments: dict, error: float, tolerance) -> None:
    """One tolerance check of `item`: the error harness.assert_close measured, with its dtype and tolerance."""
    dtype = arguments["dtype"]
    item.user_properties.append(
        (
            "relerr",
            {
                "op": f"{Path(str(item.fspath)).stem.removeprefix('test_')}/{item.originalname.removeprefix('test_')}",
                "dtype": DTYPE_NAMES.get(str(dtype), str(dtype)),
                "what": arguments["what"],
                "test": item.nodeid,
                "error": error if math.isfinite(error) else "inf",
                "tolerance": tolerance(dtype) if arguments.get("tol") is None else arguments["tol"],
            },
        )
    )


def pytest_deselected(items):  # -m / -k deselections and the sampling alike
    _selection["deselected"] += len(items)


def pytest_collection_finish(session):
    _selection["selected"] = len(session.items)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _current["item"] = item
    yield
    _current["item"] = None


def _worst(reports) -> dict:
    worst: dict = {}
    for report in reports:
        for name, record in getattr(report, "user_properties", []):
            if name != "relerr":
                continue
            error = float(record["error"])
            key = (record["op"], record["dtype"])
            if key not in worst or error / record["tolerance"] > worst[key]["ratio"]:
                worst[key] = {**record, "ratio": error / record["tolerance"]}
    result: dict = {}
    for (op, dtype), record in sorted(worst.items()):
        ratio = record["ratio"]
        result.setdefault(op, {})[dtype] = {
            "worst": record["error"],
            "tolerance": record["tolerance"],
            "what": record["what"],
            "test": record["test"],
            "ratio": ratio if math.isfinite(ratio) else "inf",
        }
    return result


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    path = config.getoption("--triformer-report")
    if not path:
        return
    if hasattr(config, "workerinput"):  # an xdist worker: only its collection counts; the controller reports
        Path(f"{path}.{config.workerinput['workerid']}").write_text(json.dumps(_selection))
        return
    selection = dict(_selection)
    for worker_file in sorted(Path(path).parent.glob(f"{Path(path).name}.gw*")):
        selection = json.loads(worker_file.read_text())  # every worker collects the same items
        worker_file.unlink()
    stats = config.pluginmanager.get_plugin("terminalreporter").stats
    reports = [r for key in ("passed", "failed", "error", "xfailed", "xpassed") for r in stats.get(key, [])]
    counts = {key: len(stats.get(key, [])) for key in ("passed", "failed", "skipped", "error", "xfailed", "xpassed")}
    counts.update(selection)
    skip_reasons: dict = {}
    for report in stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    Path(path).write_text(
        json.dumps(
            {
                "counts": counts,
                "exitstatus": int(exitstatus),
                "args": list(config.invocation_params.args),
                "sample_every": config.getoption("--triformer-sample"),
                "duration_s": time.time() - config._triformer_started,
                "skip_reasons": skip_reasons,
                "relerr": _worst(reports),
            },
            indent=2,
        )
        + "\n"
    )
