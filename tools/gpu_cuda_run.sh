#!/usr/bin/env bash
# One short device session for the CUDA kernels (H100/H200): build in place,
# tools/cuda_smoke.py (CUDA vs CPU/reference, graph capture, launch counts,
# timings), the CUDA op tests, and compute-sanitizer memcheck on the quick
# smoke run. Output under $OUT (or ./gpu_out). Carry .whl (hypothesis wheels,
# see tools/gpu_check.sh) for the tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
start=$SECONDS
python3 setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
grep -iE "warning" "$OUT/build.log" | grep -v "Wno-" | head -5
timeout 170 python3 tools/cuda_smoke.py 2>&1 | tee "$OUT/smoke.log" | grep -vE "^ok " | tail -40
echo "smoke: $(grep -c '^ok ' "$OUT/smoke.log") ok, $(grep -c '^FAIL' "$OUT/smoke.log") FAIL"
timeout 110 python3 -m pytest tests/test_concatenate_to_cache.py tests/test_lightning_ops.py -q -x -k cuda \
  -p no:cacheprovider >"$OUT/pytest.log" 2>&1
tail -15 "$OUT/pytest.log"
if command -v compute-sanitizer >/dev/null; then
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/cuda_smoke.py --quick --no-bench \
    >"$OUT/memcheck.log" 2>&1
  echo "memcheck exit $? ($(grep -c 'Invalid' "$OUT/memcheck.log") 'Invalid' lines)"; grep -m5 -A5 "Invalid" "$OUT/memcheck.log"
  tail -3 "$OUT/memcheck.log"
fi
