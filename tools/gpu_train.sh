#!/usr/bin/env bash
# The training stages at their GPU profile on a GPU host without dvc or internet (device tool), in one call: each
# stage's own entry point (python3 -m experiments.<stage>) after what DVC would have run before it (the machine stage,
# data@<dataset>), each under its own time limit; logs, results/, the MLflow store and a list of checkpoints to $OUT.
#
# Here, once (needs the full wheelhouse: ../shared/device/wheelhouse.sh requirements.lock .whl):
#   tools/gpu_train.sh --prepare      # .whl-train (tools/slim_wheels.sh, ~24 MB) + .gpu-data/fashion-mnist (30 MB)
# Then the call (device tool), with the tree (2.5 MB) 55 MiB of the 64 MiB a call may carry:
#   run(command="STAGES='train_gpt train_vit' bash tools/gpu_train.sh", carry=[".whl-train", ".gpu-data"],
#       timeout_s=600)
# (only train_gpt: carry=[".whl-train"] alone; the FashionMNIST files are for train_vit / train_mlp.)
#
# Environment:
#   STAGES        stages to run in order (default "train_gpt train_vit"; also train_mlp)
#   BUDGET        seconds for the whole script (default 570, inside the call's 600); packing gets the last 25
#   LIMIT_<stage> seconds for one stage (defaults: train_gpt 330, train_vit 220, others 150; the last stage all that
#                 is left), cut to what is left; H100 step times (reports/gpu/h100-2026-12-06b) put train_gpt's two
#                 5000-step runs near 4 minutes;
#                 a stage past it gets SIGINT: its MLflow runs end KILLED, its checkpoints stay (listed in the tarball)
#   SET           params overrides "group.key=value ..." (YAML values, e.g. train_gpt.gpu.iterations=2000), written
#                 into params.yaml for the run (the tarball keeps it) and undone at exit
#   WHEELS        folder of wheels to install into a fresh folder (default .whl-train); SKIP_WHEELS=1: none (a local
#                 try with the venv, under `tools/slim_wheels.sh --simulate -- ...` to refuse what the host lacks)
# $OUT gets (8 files at most come back): setup.log, <stage>.log each, summary.txt, mlflow.db and results.tgz
# (results/, mlflow.db, mlartifacts/, params.yaml as run, checkpoints.txt, the logs).
# The profile is the machine stage's (common.profile auto: gpu on CUDA, cpu through Triton's interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --prepare ]; then
  tools/slim_wheels.sh "${2:-.whl}" .whl-train || exit
  mkdir -p .gpu-data/fashion-mnist && cp "${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"/*.gz .gpu-data/fashion-mnist/ || exit
  du -sh .whl-train .gpu-data
  du -cb $(git ls-files) .whl-train .gpu-data | tail -1 | awk '{printf "carried with the tree: %.1f MiB (limit 64)\n", $1/1048576}'
  exit 0
fi

START=$SECONDS
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source tools/tuning_store.sh
STAGES=${STAGES:-train_gpt train_vit}
BUDGET=${BUDGET:-570}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}   # tqdm's bars: a line per 10 s in the logs
SETUP=$OUT/setup.log
log() { echo "[$((SECONDS - START))s] $*" | tee -a "$SETUP"; }

WHEELS=${WHEELS:-.whl-train}
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { log "no wheels in $WHEELS: carry .whl-train (tools/gpu_train.sh --prepare)"; exit 2; }
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/site.XXXXXX")   # fresh each call: never what an earlier call installed
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl >>"$SETUP" 2>&1 \
    || { log "pip install of $WHEELS failed"; exit 2; }
  export PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .gpu-data/fashion-mnist ] && [ ! -e offline/fashion-mnist ]; then   # params data.fashion_mnist.offline_dir
  mkdir -p offline && ln -s ../.gpu-data/fashion-mnist offline/fashion-mnist
fi
if [ -n "${SET:-}" ]; then
  cp params.yaml "$OUT/params.orig.yaml" && trap 'cp "$OUT/params.orig.yaml" params.yaml && rm "$OUT/params.orig.yaml"' EXIT
  python3 - $SET <<'EOF' 2>&1 | tee -a "$SETUP" || exit 2
import sys, yaml
from experiments.common import load_params
params = load_params()
for item in sys.argv[1:]:
    path, value = item.split("=", 1)
    *groups, key = path.split(".")
    node = params
    for group in groups:
        node = node.setdefault(group, {})
    node[key] = yaml.safe_load(value)
    print(f"params: {path} = {node[key]!r}")
open("params.yaml", "w").write(yaml.safe_dump(params, sort_keys=False))
EOF
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$SETUP"

summary=(); failed=0
step() {  # step NAME LIMIT COMMAND...: run with SIGINT at LIMIT (then SIGKILL 30 s on), output to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - 25 - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then summary+=("$name: skipped (no time left)"); log "$name: skipped"; return 1; fi
  log "$name: $* (limit ${limit}s)"
  local t0=$SECONDS
  timeout -s INT -k 30 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local how="exit $rc"; ((rc == 124 || rc == 137)) && how="stopped at its ${limit}s limit (exit $rc)"
  summary+=("$name: $how after $((SECONDS - t0))s")
  log "$name: $how after $((SECONDS - t0))s"
  return $rc
}
setup_step() {  # a preparing step: its output appended to setup.log
  step "$@"; local rc=$?
  cat "$OUT/$1.log" >>"$SETUP"; rm -f "$OUT/$1.log"
  return $rc
}

setup_step machine 120 python3 -m experiments.machine || { log "machine stage failed"; }
datasets=$(python3 -c '
import sys
from experiments.common import load_params
p = load_params()
print(" ".join(dict.fromkeys(p[s]["dataset"] for s in sys.argv[1:] if "dataset" in p.get(s, {}))))' $STAGES)
for name in $datasets; do
  setup_step "data_$name" 120 python3 -m experiments.data "$name"
done
for stage in $STAGES; do
  limit_var=LIMIT_$stage
  case $stage in train_gpt) default=330 ;; train_vit) default=220 ;; *) default=150 ;; esac
  [ "$stage" = "${STAGES##* }" ] && default=$BUDGET   # the last stage: whatever is left
  step "$stage" "${!limit_var:-$default}" python3 -m "experiments.$stage" || failed=1
  tr '\r' '\n' <"$OUT/$stage.log" | grep -v -E 'it/s\]$|s/it\]$' | tail -5 | sed "s/^/  $stage | /" | tee -a "$SETUP"
done

# What comes back: checkpoints a stopped stage left (their latest `extra`), the results and the MLflow store.
python3 - >checkpoints.txt 2>&1 <<'EOF'
from pathlib import Path
from triformer import training
for folder in sorted({p.parent for p in Path("checkpoints").rglob("step_*.pt")}):
    files = sorted(folder.glob("step_*.pt"))
    print(folder, [f"{f.name} {f.stat().st_size / 2**20:.1f} MiB" for f in files], training.checkpoint_extra(folder))
EOF
{
  echo "stages: $STAGES (${SECONDS}s in all, budget ${BUDGET}s)"
  printf '%s\n' "${summary[@]}"
  echo "checkpoints left:"; cat checkpoints.txt
  for f in results/*/metrics.json; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done
  python3 - <<'EOF'
import sqlite3
db = sqlite3.connect("mlflow.db")
print("== MLflow runs (name, status, metrics logged)")
for row in db.execute("select r.name, r.status, count(m.key) from runs r left join metrics m on m.run_uuid = r.run_uuid "
                      "group by r.run_uuid order by r.start_time"):
    print(*row)
EOF
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
mkdir -p results && cp "$OUT"/*.log results/
tar czf "$OUT/results.tgz" results mlflow.db mlartifacts params.yaml checkpoints.txt 2>/dev/null
cp mlflow.db "$OUT/" 2>/dev/null
ls -la "$OUT"
exit $failed
