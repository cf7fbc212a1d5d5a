#!/usr/bin/env bash
# On a GPU host (device tool): the tests of the changed kernels, then the probes named in $PROBES (python scripts
# under scripts/, each with its time limit as name:seconds); every log lands in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -n 16 -p no:benchmark -rfEs $TESTS 2>&1 \
    | tee "$OUT/pytest.log" | grep -v "^[.sFE]*\s*\[" | tail -25
fi
for probe in ${PROBES:-}; do
  name=${probe%%:*}; limit=${probe##*:}
  timeout "$limit" python3 scripts/$name 2>&1 | tee "$OUT/${name%.py}.log"
done
