#!/usr/bin/env bash
# On a GPU host (device tool): linear kernel tests (bf16 included) and the linear benchmark, logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -n 16 tests/test_linear.py tests/test_linear_gpu.py tests/test_mlp.py \
  -k "${TEST_SELECT:-not nothing}" \
  2>&1 | tee "$OUT/pytest_linear.log" | tail -25
timeout ${BENCH_TIMEOUT:-240} python3 -m triformer.bench.linear --csv "$OUT/bench_linear.csv" 2>&1 \
  | grep -v "linear bench:" | tee "$OUT/bench_linear.log"
