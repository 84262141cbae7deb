#!/usr/bin/env bash
# Compiles every CUDA source (csrc/cuda/*.cu, or the files given as arguments)
# with nvcc, compile only, against the installed torch's headers. No GPU and no
# CUDA build of torch needed: a CPU torch ships the ATen/cuda and c10/cuda headers.
#
#   tools/check_cuda_compiles.sh [file.cu ...]
#
# Environment: NVCC (default: $CUDA_HOME/bin/nvcc, else nvcc on PATH), PYTHON
# (default: python3), CUDA_ARCH (default: 90, i.e. sm_90), CUDA_STD (default: c++20),
# JOBS (default: nproc), NVCC_EXTRA (more nvcc flags, split on spaces, e.g. "-Xptxas -v"),
# OBJ_DIR (keep each file's object as OBJ_DIR/<name>.o and nvcc's output as
# OBJ_DIR/<name>.log; tools/sass_counts.py uses this).
# Exits non-zero, naming each file that failed, if any file does not compile.
# The flags mirror what setup.py's CUDAExtension passes to nvcc.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CUDA_ARCH="${CUDA_ARCH:-90}"
CUDA_STD="${CUDA_STD:-c++20}"  # setup.py passes -std=c++20 to nvcc, as torch 2.13 headers expect
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

if [[ -n "${NVCC:-}" ]]; then :
elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then NVCC="${CUDA_HOME}/bin/nvcc"
elif command -v nvcc >/dev/null; then NVCC="$(command -v nvcc)"
else echo "check_cuda_compiles: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 2
fi

if [[ $# -gt 0 ]]; then
  files=("$@")
else
  shopt -s nullglob
  files=("$ROOT"/csrc/cuda/*.cu "$ROOT"/csrc/cuda/*.cpp)
  shopt -u nullglob
fi
if [[ ${#files[@]} -eq 0 ]]; then
  echo "check_cuda_compiles: no .cu files in csrc/cuda; nothing to check"
  exit 0
fi

# Include dirs and the C++ ABI from the torch that Python imports.
mapfile -t torch_info < <("$PYTHON" - <<'EOF'
import glob
import os
import sysconfig
import torch
from torch.utils import cpp_extension
torch_include = cpp_extension.include_paths()  # torch's own headers (the CUDA runtime's come with nvcc)
for path in torch_include:
    print("-I" + path)
print("-I" + sysconfig.get_paths()["include"])  # Python.h, for sources including torch/extension.h
print("-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
# A CPU torch lacks the CMake-generated c10/cuda/impl/cuda_cmake_macros.h that
# c10/cuda/CUDAMacros.h includes; torch's own switch skips it (on Linux the
# file only defines C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows only).
if not os.path.exists(os.path.join(torch_include[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")):
    print("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
# cuBLAS/cuSPARSE/cuSOLVER headers (ATen/cuda/CUDAContext.h needs them) from
# pip's nvidia-* packages, searched after the toolkit's own.
for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
    for include in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))
                          + glob.glob(os.path.join(site, "nvidia", "*", "*", "include"))):
        print("-idirafter" + include)
EOF
)

flags=(
  -c -std="$CUDA_STD" -O3 -Xcompiler -fPIC
  --expt-relaxed-constexpr
  # torch's COMMON_NVCC_FLAGS: half/bfloat16 arithmetic goes through c10::Half / c10::BFloat16.
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DLIGHTNING_CACHE_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  -gencode "arch=compute_${CUDA_ARCH},code=sm_${CUDA_ARCH}"
  -I"$ROOT/csrc"
  "${torch_info[@]}"
)
if [[ -n "${NVCC_EXTRA:-}" ]]; then
  read -r -a extra <<<"$NVCC_EXTRA"
  flags+=("${extra[@]}")
fi

echo "check_cuda_compiles: $("$NVCC" --version | tail -1), sm_${CUDA_ARCH}, ${#files[@]} file(s), $JOBS at a time"
[[ -n "${OBJ_DIR:-}" ]] && mkdir -p "$OBJ_DIR"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

compile() {  # compile <index> <file>: log to $work/<index>.log, status to $work/<index>.rc
  local start=$SECONDS rc=0
  "$NVCC" "${flags[@]}" "$2" -o "$work/$1.o" >"$work/$1.log" 2>&1 || rc=$?
  echo "$rc" >"$work/$1.rc"
  if [[ -n "${OBJ_DIR:-}" ]]; then
    local name
    name="$(basename "${2%.*}")"
    cp "$work/$1.log" "$OBJ_DIR/$name.log"
    [[ $rc -eq 0 ]] && cp "$work/$1.o" "$OBJ_DIR/$name.o"
  fi
  echo "  $( [[ $rc -eq 0 ]] && echo ok || echo FAILED ) $2 ($((SECONDS - start)) s)"
}

for i in "${!files[@]}"; do
  while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
  compile "$i" "${files[$i]}" &
done
wait

failed=()
for i in "${!files[@]}"; do
  if [[ "$(cat "$work/$i.rc" 2>/dev/null || echo 1)" != 0 ]]; then
    failed+=("${files[$i]}")
    echo "---------------- ${files[$i]}" >&2
    cat "$work/$i.log" >&2
    if grep -qE "(cublas_v2|cublasLt|cusparse|cusolverDn|cusolver_common)\.h: No such file" "$work/$i.log"; then
      echo "hint: this CUDA toolkit has no cuBLAS/cuSPARSE/cuSOLVER headers, which <ATen/cuda/CUDAContext.h>" \
           "includes; include <c10/cuda/CUDAStream.h> (c10::cuda::getCurrentCUDAStream) instead, or" \
           "install the toolkit's math libraries (or pip's nvidia-cublas/nvidia-cusparse/nvidia-cusolver)." >&2
    fi
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "check_cuda_compiles: ${#failed[@]} of ${#files[@]} file(s) failed to compile:" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "check_cuda_compiles: all ${#files[@]} file(s) compile"
