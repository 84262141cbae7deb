#!/usr/bin/env bash
# One-shot GPU session script for the device machine (H100/H200, torch 2.11+cu130,
# no network): build with CUDA, run the whole test suite, the CUDA tests under
# compute-sanitizer, the demo and the benchmark. Results land in $OUT (or ./gpu_out).
#
# The device machine lacks hypothesis (needed by tests/test_concatenate_to_cache.py);
# carry it as wheels. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       hypothesis sortedcontainers attrs
# then: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
log() { printf '\n==> %s (%s)\n' "$1" "$(date +%T)" | tee -a "$OUT/summary.txt"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/summary.txt"

log "build (CUDA)"
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -m torch_lightning_cache info | tee -a "$OUT/summary.txt"

log "tests (all, CUDA included)"
python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15
tail -1 "$OUT/pytest.log" >> "$OUT/summary.txt"

log "compute-sanitizer memcheck on the CUDA op tests"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
    tests/test_concatenate_to_cache.py tests/test_lightning_ops.py -k cuda >"$OUT/memcheck.log" 2>&1
  echo "memcheck exit code: $? ($(grep -c 'Invalid' "$OUT/memcheck.log") 'Invalid' lines)" | tee -a "$OUT/summary.txt"
else
  echo "compute-sanitizer not found" | tee -a "$OUT/summary.txt"
fi

log "demo on CUDA"
python3 -m torch_lightning_cache demo --device cuda --no-progress 2>&1 | tee -a "$OUT/summary.txt"
python3 -m torch_lightning_cache demo --device cuda --compile --ragged --no-progress 2>&1 | tail -2 | tee -a "$OUT/summary.txt"

log "benchmark on CUDA (reference sizes)"
python3 -m torch_lightning_cache bench --device cuda --csv "$OUT/bench_cuda.csv" 2>&1 | tee "$OUT/bench.log" | tail -45
