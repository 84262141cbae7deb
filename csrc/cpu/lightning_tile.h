// Small float32 matrix tiles for the CPU lightning kernels. No ATen here: the
// AVX2 code is compiled with function-level target attributes and picked at
// load time, so the library still runs on baseline x86-64 (and elsewhere).
#pragma once

#include <cstdint>

namespace lightning_cache::cpu {

// The most rows one gemm_tile call takes (6 x 16 floats of accumulators fill
// 12 of the 16 AVX2 registers).
constexpr int64_t kTileRows = 6;

// For r < rows (<= kTileRows) and 0 <= j < cols:
//   acc      = sum_{p < inner} A[r * lda + p] * B[p * ldb + j]
//   C[r * ldc + j] = (alpha ? alpha[r] : 1) * acc + (accumulate ? beta * C[r * ldc + j] : 0)
// Without `accumulate` C is never read, so stale or non-finite values there
// cannot leak into the result. Reads only the listed elements of A and B.
void gemm_tile(int64_t rows, int64_t cols, int64_t inner, const float* A, int64_t lda, const float* B, int64_t ldb,
               float* C, int64_t ldc, const float* alpha, bool accumulate, float beta);

// One decode token on a float32 head state s [dk, dv] (row-major):
//   s = decay * s + k^T v,  o = q s  (o [dv], read after the update).
// Streams s once, row by row; o accumulates in place (it is zeroed first).
void decode_step(float* s, const float* q, const float* k, const float* v, float* o, int64_t dk, int64_t dv,
                 float decay);

// Which implementation gemm_tile and decode_step use: "avx2" or "generic". The environment
// variable LIGHTNING_CACHE_CPU_ISA=generic forces the portable one (for tests).
const char* gemm_tile_isa();

}  // namespace lightning_cache::cpu
