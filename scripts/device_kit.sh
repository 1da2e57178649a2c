#!/usr/bin/env bash
# `make device-kit`: wheels of what the GPU machine lacks (benchmarks/gpu/kit.txt), for its Python
# (CPython 3.12, manylinux x86-64), at the versions pinned in requirements/constraints.txt, into
# KIT (default .device-kit/, git-ignored). benchmarks/gpu/run.sh installs them there, offline.
set -euo pipefail
KIT=${1:-.device-kit}
PY=${PY:-.venv/bin/python}
LIMIT_MB=${LIMIT_MB:-48}  # everything sent to the device machine: 64 MiB, the code included
mkdir -p "$KIT"
rm -f "$KIT"/*.whl
pin() {
  local spec
  spec=$(grep -i -E "^$1==" requirements/constraints.txt | head -1 || true)
  [ -n "$spec" ] || { echo "error: $1 is not pinned in requirements/constraints.txt" >&2; exit 2; }
  echo "$spec"
}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
grep -v -E '^\s*(#|$)' benchmarks/gpu/kit.txt | while read -r name how; do
  spec=$(pin "$name")
  if [ "${how:-}" = build ]; then
    "$PY" -m pip wheel -q --no-deps -w "$KIT" "$spec"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$KIT" "$spec"
  fi
done
size_kb=$(du -sk "$KIT" | cut -f1)
echo "device kit: $(ls "$KIT"/*.whl | wc -l) wheels, $((size_kb / 1024)) MB in $KIT"
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "error: the kit is over ${LIMIT_MB} MB; it travels with the code (64 MiB in all)" >&2
  exit 2
fi
