"""Stage `report`: execute the report notebooks (reports/<name>.py, jupytext percent format) into
reports/html/<name>.html; the notebooks read MLflow and save their figures as reports/figures/*.png.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from triformer import tracking

from . import common, schema

SOURCES = Path("reports")
HTML = SOURCES / "html"
FIGURES = SOURCES / "figures"


def render(name: str, timeout_s: int = 900) -> Path:
    """jupytext → .ipynb (in a temporary folder), then nbconvert --execute → reports/html/<name>.html."""
    env = {**os.environ, "TRIFORMER_ROOT": str(Path.cwd().resolve()), "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    with tempfile.TemporaryDirectory() as tmp:
        notebook = Path(tmp) / f"{name}.ipynb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "jupytext",
                "--quiet",
                "--to",
                "ipynb",
                "--output",
                str(notebook),
                str(SOURCES / f"{name}.py"),
            ],
            check=True,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "nbconvert",
                "--execute",
                "--to",
                "html",
                "--no-input",
                f"--ExecutePreprocessor.timeout={timeout_s}",
                "--output-dir",
                str(HTML.resolve()),
                "--output",
                name,
                str(notebook),
            ],
            check=True,
            env=env,
        )
    return HTML / f"{name}.html"


def main() -> None:
    params = common.load_params()
    with schema.exit_on_error():
        schema.validate(params, "report")
    config = params.get("report") or {}
    for folder in (HTML, FIGURES):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for name in config.get("notebooks", ["pipeline"]):
        print(f"report: {render(name)}")


if __name__ == "__main__":
    main()
