#!/usr/bin/env bash
# One call on the GPU machine checks everything a GPU can check here, within a
# device budget of a few minutes: build with CUDA; then, at the same time, the
# CUDA tests, compute-sanitizer's memcheck, racecheck and synccheck over the
# quick CUDA smoke run (tools/cuda_smoke.py --quick), the full smoke run, and
# the demo (plain and compiled) (the smoke runs include the opt-in fused prefill); then,
# alone on the GPU, the fused prefill's checks and timings (tools/cuda_smoke.py
# --fused-only: vs FLA's chunk_simple_gla, a copy of the same bytes, the ATen path), the benchmark at the
# reference sizes with every peer (cache, write, decode, prefill), and the
# cached_attention cases (attn-*) with fewer samples, each with its own cap.
# Each stage has a time cap so that one slow stage cannot eat the budget.
# Everything lands in $OUT (./gpu_out when run by hand); summary.txt has the gist.
#
# The device machine has torch+Triton, hypothesis and pytest-xdist but not
# flash-linear-attention; carry it as a wheel (pure Python). Here, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl fla-core==0.6.0
# then: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=420).
# STAGES (default "build checks bench") picks stages; BENCH_ARGS and ATTN_BENCH_ARGS replace the
# options of the two bench runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
STAGES="${STAGES:-build checks bench}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
SUMMARY="$OUT/summary.txt"
log() { printf '\n==> %s (%s, %ss in)\n' "$1" "$(date +%T)" "$SECONDS" | tee -a "$SUMMARY"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

export PYTHONPATH="$PWD"  # the in-place build, for pytest-xdist workers and subprocesses too
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$SUMMARY"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$SUMMARY"

if want build; then
  log "build (CUDA, sm_90, in place)"
  begin=$SECONDS
  # The longest file (concatenate_to_cache.cu, 20 write kernels) takes about 70 s on one core of the CPU machine.
  if ! timeout 180 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -30
    tail -30 "$OUT/build.log"
    exit 1
  fi
  echo "build took $((SECONDS - begin)) s" | tee -a "$SUMMARY"
  python3 -m torch_lightning_cache info | tee -a "$SUMMARY"
fi

if want checks; then
  log "an op error raised from each backend survives as a Python exception"
  # The first GPU run (H100, torch 2.11) died with SIGSEGV wherever a CUDA op raised; this
  # says in seconds whether raising works, before the long stages.
  for dev in cpu cuda; do
    timeout 45 python3 - "$dev" <<'PY' 2>&1 | tail -1 | tee -a "$SUMMARY"
import sys
import torch
import torch_lightning_cache as tlc
dev = sys.argv[1]
kv, _ = tlc.init_kv_cache(1, 4, 1, 2, 2, device=dev)
key = torch.zeros(1, 1, 1, 2, device=dev)
try:
    tlc.concatenate_to_cache(kv, torch.tensor([9], device=dev), key, key)
except IndexError as error:
    print(f"{dev}: raising works ({str(error).splitlines()[0][:60]})")
PY
    rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && echo "$dev: the raising process died (exit $rc)" | tee -a "$SUMMARY"
  done

  log "CUDA tests, sanitizers and demo, side by side"
  timeout 150 python3 -m pytest tests -q -p no:cacheprovider -p no:benchmark -n 8 -k cuda -rfE >"$OUT/pytest.log" 2>&1 &
  for tool in memcheck racecheck synccheck; do
    timeout 140 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
      python3 tools/cuda_smoke.py --quick --no-bench >"/tmp/$tool.log" 2>&1 &
  done
  (timeout 120 python3 tools/cuda_smoke.py --no-bench >"$OUT/smoke.log" 2>&1
   echo "smoke exit code $?" >>"$OUT/smoke.log") &
  (timeout 60 python3 -m torch_lightning_cache demo --device cuda --no-progress >"$OUT/demo.log" 2>&1
   echo "demo exit code $?" >>"$OUT/demo.log"
   timeout 100 python3 -m torch_lightning_cache demo --device cuda --compile --ragged --no-progress \
     >>"$OUT/demo.log" 2>&1
   echo "demo --compile exit code $?" >>"$OUT/demo.log") &
  wait
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -30 | tee -a "$SUMMARY"
  for tool in memcheck racecheck synccheck; do
    printf '%s: %s | %s\n' "$tool" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "/tmp/$tool.log" | tail -1)" \
      "$(grep -cE '^ok ' "/tmp/$tool.log") ok, $(grep -cE '^FAIL' "/tmp/$tool.log") FAIL" | tee -a "$SUMMARY"
    { echo "===== $tool"; grep -vE '^ok ' "/tmp/$tool.log" | head -150; } >>"$OUT/sanitize.log"
  done
  grep -hE "^FAIL" /tmp/memcheck.log | head -10 | tee -a "$SUMMARY"
  printf 'full smoke: %s ok, %s FAIL, %s\n' "$(grep -cE '^ok ' "$OUT/smoke.log")" "$(grep -cE '^FAIL' "$OUT/smoke.log")" \
    "$(grep -E 'smoke exit code' "$OUT/smoke.log")" | tee -a "$SUMMARY"
  grep -hE "^FAIL" "$OUT/smoke.log" | head -20 | tee -a "$SUMMARY"
  grep -E "exit code|max|largest|tokens/s|mismatch|Error" "$OUT/demo.log" | tail -8 | tee -a "$SUMMARY"
fi

if want bench; then
  log "benchmark on CUDA (reference sizes, every peer), alone on the GPU"
  # shellcheck disable=SC2086
  timeout 130 python3 -m torch_lightning_cache bench --device cuda --csv "$OUT/bench_cuda.csv" \
    ${BENCH_ARGS:---cases cache,write,decode,prefill --decode-batches 1,64 --repeats 15 --warmup 3} \
    >"$OUT/bench.log" 2>&1
  echo "bench exit code $?" | tee -a "$SUMMARY"
  sed -n '/^case /,$p' "$OUT/bench.log" | tee -a "$SUMMARY"
  log "fused tensor-core prefill (opt-in): checks, then B=1 and B=8, T=4096, H=64, D=128 vs FLA, copy, ATen path"
  timeout 120 python3 tools/cuda_smoke.py --fused-only >"$OUT/fused.log" 2>&1
  echo "fused exit code $?" | tee -a "$SUMMARY"
  grep -E "^FAIL|^prefill|FLA not|failed" "$OUT/fused.log" | head -20 | tee -a "$SUMMARY"
  log "benchmark of cached_attention (attn-bfloat16, attn-int8, attn-fp8) on CUDA"
  # shellcheck disable=SC2086
  timeout 90 python3 -m torch_lightning_cache bench --device cuda --csv "$OUT/bench_attn_cuda.csv" \
    ${ATTN_BENCH_ARGS:---cases attn --dtype bfloat16 --attn-repeats 10 --warmup 3} >"$OUT/bench_attn.log" 2>&1
  echo "attention bench exit code $?" | tee -a "$SUMMARY"
  sed -n '/^case /,$p' "$OUT/bench_attn.log" | tee -a "$SUMMARY"
fi
log "done"
