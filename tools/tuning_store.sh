# Sourced by the GPU scripts (OUT set): the tuner's picks for what they run start from the committed ones
# (reports/gpu/tuning.json) and come back with this call's additions as $OUT/tuning.json (commit it there). The test
# suite never uses a store (tests/conftest.py): its picks are forced or timed on a GPU shared by its workers.
if [ -z "${TRIFORMER_TUNING_CACHE:-}" ]; then
  export TRIFORMER_TUNING_CACHE=$OUT/tuning.json
  if [ -f reports/gpu/tuning.json ]; then cp reports/gpu/tuning.json "$TRIFORMER_TUNING_CACHE"; fi
fi
