#!/usr/bin/env bash
# One device lease's checks and measurements: install the device kit (make device-kit) offline,
# run the CUDA tests, then inference (eager fp32 vs optimised) and a training step; writes
# OUT/results.json and OUT/log.txt. Must end within ~8 minutes on one H200 (a rerun fits 15).
#   bash benchmarks/gpu/run.sh OUT                      # on the GPU machine (from the repo root)
#   bash benchmarks/gpu/run.sh OUT --device cpu --tiny  # the rehearsal here (tests/test_device_kit.py)
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu/run.sh OUT [--device cuda|cpu] [--tiny]}
shift
mkdir -p "$OUT"
PY=${PY:-python3}
KIT=${KIT:-.device-kit}
if [ "${SKIP_KIT:-0}" != 1 ] && ls "$KIT"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/odise-site "$KIT"/*.whl >"$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 3; }
  export PYTHONPATH=/tmp/odise-site${PYTHONPATH:+:$PYTHONPATH}
fi
# The code runs from this checkout (conf/ is found beside src/), not from an installed copy.
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout "${BUDGET_S:-480}" "$PY" benchmarks/gpu/checks.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
