#!/usr/bin/env bash
# On a GPU host (device tool), each step optional, logs in $OUT:
#   the test suite natively (bf16 included): TESTS (files; default tests/, none: skip), -k TEST_SELECT;
#   every kernel benchmark as ratio tables: SUITES (default all, none: skip);
#   tools: PROBES="name.py:seconds ..." runs tools/name.py under that time limit ("name.py+a+b:seconds": with
#   the arguments a b).
# Matmul and attention tuner picks: tools/tuning_store.sh.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # the wheelhouse (dvc, mlflow-skinny, liger-kernel, ...), this call's only
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/site.XXXXXX")   # a fresh folder each call: never what an earlier call installed
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 2
  export PYTHONPATH=$PYTHONPATH:$SITE
fi
source tools/tuning_store.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${TESTS:-}" != none ]; then
  # one line per test in the log (a limit that cuts the run still names every failure so far); SIGINT first, so
  # pytest prints its summary before it is killed
  timeout -s INT -k 30 ${TEST_TIMEOUT:-300} python3 -m pytest -v -n 16 -m "not pipeline" ${TESTS:-tests} \
    -k "${TEST_SELECT:-not nothing}" -p no:benchmark -rfE --durations=25 2>&1 | tee "$OUT/pytest_kernels.log" \
    | grep -v -E "(PASSED|SKIPPED|XFAIL)" | tail -80
fi
[ "${SUITES:-}" = none ] || timeout ${BENCH_TIMEOUT:-300} python3 tools/gpu_kernels.py ${SUITES:-} 2>&1 | tee "$OUT/bench_kernels.log"
for probe in ${PROBES:-}; do
  spec=${probe%%:*}; limit=${probe##*:}
  name=${spec%%+*}; args=""
  [ "$spec" != "$name" ] && args=${spec#*+} && args=${args//+/ }
  timeout "$limit" python3 tools/$name $args 2>&1 | tee "$OUT/${name%.py}.log"
done
