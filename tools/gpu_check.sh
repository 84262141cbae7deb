#!/usr/bin/env bash
# One call on the GPU machine does everything a GPU can check here: build with
# CUDA, the whole test suite (CUDA tests included), compute-sanitizer's
# memcheck, racecheck and synccheck on the CUDA op tests, the demo (plain and
# compiled) and the benchmark at the reference sizes with every peer. Each stage
# has its own time cap so one slow stage cannot eat the device budget, and
# everything it measures lands in $OUT (./gpu_out when run by hand).
#
# The device machine has torch+Triton, hypothesis and pytest-xdist but no
# flash-linear-attention; carry it as a wheel (pure Python). Here, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl fla-core==0.6.0
# then run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=480).
# STAGES (default "build tests sanitize demo bench") picks stages; BENCH_ARGS adds bench options.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
STAGES="${STAGES:-build tests sanitize demo bench}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
SUMMARY="$OUT/summary.txt"
log() { printf '\n==> %s (%s, %ss in)\n' "$1" "$(date +%T)" "$SECONDS" | tee -a "$SUMMARY"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$SUMMARY"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$SUMMARY"

if want build; then
  log "build (CUDA, sm_90)"
  begin=$SECONDS
  if ! python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"
    exit 1
  fi
  echo "build took $((SECONDS - begin)) s" | tee -a "$SUMMARY"
  python3 -m torch_lightning_cache info | tee -a "$SUMMARY"
fi

if want tests; then
  log "tests (all, CUDA included; 8 workers)"
  timeout 240 python3 -m pytest tests -q -p no:cacheprovider -n 8 -rfE --durations=15 >"$OUT/pytest.log" 2>&1
  echo "pytest exit code $?" | tee -a "$SUMMARY"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -40 | tee -a "$SUMMARY"
fi

if want sanitize; then
  log "compute-sanitizer memcheck / racecheck / synccheck on the CUDA op tests (in parallel)"
  SAN_TESTS="${SAN_TESTS:-tests/test_concatenate_to_cache.py tests/test_lightning_ops.py}"
  for tool in memcheck racecheck synccheck; do
    timeout 200 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
      python3 -m pytest -q -p no:cacheprovider -x -k "cuda and not compile" $SAN_TESTS >"$OUT/$tool.log" 2>&1 &
  done
  wait
  for tool in memcheck racecheck synccheck; do
    echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1); $(grep -E 'passed|failed' "$OUT/$tool.log" | tail -1)" \
      | tee -a "$SUMMARY"
  done
fi

if want demo; then
  log "demo on CUDA"
  timeout 120 python3 -m torch_lightning_cache demo --device cuda --no-progress 2>&1 | tail -6 | tee -a "$SUMMARY"
  timeout 180 python3 -m torch_lightning_cache demo --device cuda --compile --ragged --no-progress 2>&1 | tail -3 \
    | tee -a "$SUMMARY"
fi

if want bench; then
  log "benchmark on CUDA (reference sizes, every peer)"
  # shellcheck disable=SC2086
  timeout 300 python3 -m torch_lightning_cache bench --device cuda --csv "$OUT/bench_cuda.csv" ${BENCH_ARGS:-} \
    >"$OUT/bench.log" 2>&1
  echo "bench exit code $?" | tee -a "$SUMMARY"
  sed -n '/^case /,$p' "$OUT/bench.log" | tee -a "$SUMMARY"
fi
log "done"
