#!/usr/bin/env bash
# On a GPU host without internet (device tool): the whole pipeline at full size, results tarred into $OUT.
# Needs the wheelhouse (.whl, from ../shared/device/wheelhouse.sh requirements.lock .whl), installed by each call into
# a fresh folder, and Debian's FashionMNIST files in .gpu-data/fashion-mnist.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheelhouse: carry .whl"; exit 2; }
SITE=$(mktemp -d "${TMPDIR:-/tmp}/site.XXXXXX")   # a fresh folder each call: never what an earlier call installed
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 2
export PYTHONPATH=$SITE:$PWD/src PATH=$SITE/bin:$PATH JUPYTER_PATH=$SITE/share/jupyter  # nbconvert templates
mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu-data/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/ || exit 2
if [ ! -d .git ]; then  # the copied tree has no git repository; DVC wants one
  if command -v git >/dev/null; then
    git init -q && git add -A >/dev/null && git -c user.email=gpu@triformer -c user.name=gpu commit -qm snapshot
  else
    dvc config --local core.no_scm true
  fi
fi
source tools/tuning_store.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout ${REPRO_TIMEOUT:-560} dvc repro --keep-going ${STAGES:-} 2>&1 | grep -v "it/s\]$" | tee "$OUT/dvc_repro.log" | tail -60
tar czf "$OUT/results.tgz" results reports/html reports/figures dvc.lock 2>/dev/null
cp mlflow.db "$OUT/" 2>/dev/null
