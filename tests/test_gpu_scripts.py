"""The GPU helper scripts install the carried wheelhouse into a fresh folder on every call, never reusing what an
earlier call (or another checkout) left installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.pipeline
ROOT = Path(__file__).resolve().parents[1]
PROBE = "import probe_pkg, sys; print('probe', probe_pkg.VERSION, probe_pkg.__file__)\n"


def write_wheel(folder: Path, version: str) -> None:
    """A minimal pure-Python wheel of `probe_pkg` whose VERSION is `version`."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    info = f"probe_pkg-{version}.dist-info"
    files = {
        "probe_pkg/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: probe-pkg\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"probe_pkg-{version}-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def test_gpu_kernels_sh_installs_each_calls_wheels_into_a_fresh_folder(tmp_path):
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    (work / "tools").mkdir(parents=True)
    tmp.mkdir()
    shutil.copy(ROOT / "tools" / "gpu_kernels.sh", work / "tools")
    (work / "tools" / "probe.py").write_text(PROBE)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'stub GPU, 80 GiB, 0'\n")
    (stubs / "nvidia-smi").chmod(0o755)
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "OUT": str(tmp_path / "out"),
        "TESTS": "none",
        "SUITES": "none",
        "PROBES": "probe.py:60",
        "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    seen = []
    for version in ("1.0", "2.0"):  # the second call carries a newer wheel: it must be the one imported
        write_wheel(work / ".whl", version)
        done = subprocess.run(
            ["bash", "tools/gpu_kernels.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        line = next(line for line in done.stdout.splitlines() if line.startswith("probe "))
        seen.append(line.split()[1:])
    assert [version for version, _ in seen] == ["1.0", "2.0"]
    folders = {Path(path).parents[1] for _, path in seen}
    assert len(folders) == 2 and all(folder.parent == tmp for folder in folders)


@pytest.mark.parametrize("script", ["gpu_kernels.sh", "gpu_pipeline.sh", "gpu_train.sh"])
def test_no_gpu_script_names_a_fixed_site_folder(script):
    text = (ROOT / "tools" / script).read_text()
    assert "/tmp/site" not in text and 'mktemp -d "${TMPDIR:-/tmp}/site.XXXXXX"' in text
