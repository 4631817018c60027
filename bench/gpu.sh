#!/usr/bin/env bash
# The one command for a lent GPU machine (the device tool): installs the
# carried wheels, then runs bench/gpu.py (smoke tests, speed, a first
# CIFAR-10 run), everything under $OUT. Prepare the carried folder first:
#
#   python bench/gpu_data.py --src=<cifar10-jpeg-q75.zip> --dest=.gpu/cifar10-gpu.zip
#   mkdir -p .gpu/wheels && pip download --no-deps --python-version 3.12 \
#       --only-binary=:all: -d .gpu/wheels ml_collections grain array_record \
#       dm-tree portpicker
#
# and run, through the device tool with carry [".gpu"]:
#
#   bash bench/gpu.sh            # DRY=1 bash bench/gpu.sh: the CPU check
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
{
  echo "start $(date -u +%FT%TZ)"
  if [ "${DRY:-0}" = 1 ]; then  # this CPU's Python may not be 3.12: check only
    "$PY" -m pip install --dry-run --no-deps --no-index --python-version 3.12 \
      --only-binary=:all: --target "$OUT/wheels_check" .gpu/wheels/*.whl
  elif [ -d .gpu/wheels ]; then
    "$PY" -m pip install --no-deps --no-index --quiet .gpu/wheels/*.whl
  fi
  "$PY" -c "import ml_collections, grain" || echo "WARNING: ml_collections or grain missing"
} > "$OUT/install.log" 2>&1
extra=()
[ "${DRY:-0}" = 1 ] && extra+=(--dry --deadline_s=${DEADLINE:-900})
"$PY" bench/gpu.py --zip=.gpu/cifar10-gpu.zip --out="$OUT" "${extra[@]}" "$@"
rc=$?
echo "bench/gpu.py rc=$rc"
cat "$OUT/summary.json" 2>/dev/null
exit $rc
