// gemm_tile: a portable version and, on x86-64, an AVX2/FMA one chosen at load
// time (the default build targets baseline x86-64, so nothing here may assume
// AVX2 at compile time).
#include "lightning_tile.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LIGHTNING_CACHE_X86_AVX2 1
#include <immintrin.h>
#endif

namespace lightning_cache::cpu {
namespace {

using TileFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                        const float*, bool, float);
using DecodeFn = void (*)(float*, const float*, const float*, const float*, float*, int64_t, int64_t, float);

void decode_step_generic(float* s, const float* q, const float* k, const float* v, float* o, int64_t dk, int64_t dv,
                         float decay) {
  std::fill_n(o, dv, 0.0f);
  for (int64_t i = 0; i < dk; ++i) {
    float* row = s + i * dv;
    const float k_i = k[i], q_i = q[i];
    for (int64_t j = 0; j < dv; ++j) {
      const float u = decay * row[j] + k_i * v[j];
      row[j] = u;
      o[j] += q_i * u;
    }
  }
}

void gemm_tile_generic(int64_t rows, int64_t cols, int64_t inner, const float* A, int64_t lda, const float* B,
                       int64_t ldb, float* C, int64_t ldc, const float* alpha, bool accumulate, float beta) {
  constexpr int64_t kWidth = 64;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j0 = 0; j0 < cols; j0 += kWidth) {
      const int64_t w = std::min(kWidth, cols - j0);
      float acc[kWidth] = {};
      for (int64_t p = 0; p < inner; ++p) {
        const float a = A[r * lda + p];
        const float* b = B + p * ldb + j0;
        for (int64_t j = 0; j < w; ++j) acc[j] += a * b[j];
      }
      const float f = alpha ? alpha[r] : 1.0f;
      float* c = C + r * ldc + j0;
      for (int64_t j = 0; j < w; ++j) c[j] = accumulate ? f * acc[j] + beta * c[j] : f * acc[j];
    }
  }
}

#ifdef LIGHTNING_CACHE_X86_AVX2
#define LC_AVX2 __attribute__((target("avx2,fma")))

LC_AVX2 inline __m256i lane_mask(int64_t width) {  // lanes < width set
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(width)), lanes);
}

LC_AVX2 inline __m256 finish(__m256 acc, const float* c, __m256i mask, bool full, float f, bool accumulate,
                             float beta) {
  acc = _mm256_mul_ps(acc, _mm256_set1_ps(f));
  if (!accumulate) return acc;
  const __m256 old = full ? _mm256_loadu_ps(c) : _mm256_maskload_ps(c, mask);
  return _mm256_fmadd_ps(_mm256_set1_ps(beta), old, acc);
}

LC_AVX2 inline void store(float* c, __m256 v, __m256i mask, bool full) {
  if (full) {
    _mm256_storeu_ps(c, v);
  } else {
    _mm256_maskstore_ps(c, mask, v);
  }
}

// R rows: panels of 16 columns (2 x R accumulators), then 8-column panels, the
// last one masked (masked loads never touch memory past the row's end).
template <int R>
LC_AVX2 void gemm_tile_avx2_rows(int64_t cols, int64_t inner, const float* A, int64_t lda, const float* B, int64_t ldb,
                                 float* C, int64_t ldc, const float* alpha, bool accumulate, float beta) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t j0 = 0;
  for (; j0 + 16 <= cols; j0 += 16) {
    __m256 acc0[R], acc1[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    const float* b = B + j0;
    for (int64_t p = 0; p < inner; ++p, b += ldb) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(A + r * lda + p);
        acc0[r] = _mm256_fmadd_ps(a, b0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(a, b1, acc1[r]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      float* c = C + r * ldc + j0;
      const float f = alpha ? alpha[r] : 1.0f;
      store(c, finish(acc0[r], c, all, true, f, accumulate, beta), all, true);
      store(c + 8, finish(acc1[r], c + 8, all, true, f, accumulate, beta), all, true);
    }
  }
  for (; j0 < cols; j0 += 8) {
    const bool full = j0 + 8 <= cols;
    const __m256i mask = full ? all : lane_mask(cols - j0);
    __m256 acc[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const float* b = B + j0;
    for (int64_t p = 0; p < inner; ++p, b += ldb) {
      const __m256 b0 = full ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, mask);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + r * lda + p), b0, acc[r]);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      float* c = C + r * ldc + j0;
      store(c, finish(acc[r], c, mask, full, alpha ? alpha[r] : 1.0f, accumulate, beta), mask, full);
    }
  }
}

constexpr int64_t kAheadFloats = 1024;

LC_AVX2 void decode_step_avx2(float* s, const float* q, const float* k, const float* v, float* o, int64_t dk,
                              int64_t dv, float decay) {
  std::fill_n(o, dv, 0.0f);
  const __m256 dec = _mm256_set1_ps(decay);
  const int64_t body = dv & ~int64_t(7);
  const __m256i tail = lane_mask(dv - body);
  for (int64_t i = 0; i < dk; ++i) {
    float* row = s + i * dv;
    // Rows ~4 KiB ahead (past the head's end too: a prefetch never faults),
    // since the hardware prefetcher stops at each page boundary.
    const char* ahead = reinterpret_cast<const char*>(row + kAheadFloats);
    for (int64_t line = 0; line < dv * 4; line += 64) __builtin_prefetch(ahead + line, 1, 3);
    const __m256 k_i = _mm256_set1_ps(k[i]), q_i = _mm256_set1_ps(q[i]);
    int64_t j = 0;
    for (; j < body; j += 8) {
      const __m256 u = _mm256_fmadd_ps(k_i, _mm256_loadu_ps(v + j), _mm256_mul_ps(dec, _mm256_loadu_ps(row + j)));
      _mm256_storeu_ps(row + j, u);
      _mm256_storeu_ps(o + j, _mm256_fmadd_ps(q_i, u, _mm256_loadu_ps(o + j)));
    }
    if (j < dv) {
      const __m256 u = _mm256_fmadd_ps(k_i, _mm256_maskload_ps(v + j, tail),
                                       _mm256_mul_ps(dec, _mm256_maskload_ps(row + j, tail)));
      _mm256_maskstore_ps(row + j, tail, u);
      _mm256_maskstore_ps(o + j, tail, _mm256_fmadd_ps(q_i, u, _mm256_maskload_ps(o + j, tail)));
    }
  }
}

LC_AVX2 void gemm_tile_avx2(int64_t rows, int64_t cols, int64_t inner, const float* A, int64_t lda, const float* B,
                            int64_t ldb, float* C, int64_t ldc, const float* alpha, bool accumulate, float beta) {
  switch (rows) {
    case 1: return gemm_tile_avx2_rows<1>(cols, inner, A, lda, B, ldb, C, ldc, alpha, accumulate, beta);
    case 2: return gemm_tile_avx2_rows<2>(cols, inner, A, lda, B, ldb, C, ldc, alpha, accumulate, beta);
    case 3: return gemm_tile_avx2_rows<3>(cols, inner, A, lda, B, ldb, C, ldc, alpha, accumulate, beta);
    case 4: return gemm_tile_avx2_rows<4>(cols, inner, A, lda, B, ldb, C, ldc, alpha, accumulate, beta);
    case 5: return gemm_tile_avx2_rows<5>(cols, inner, A, lda, B, ldb, C, ldc, alpha, accumulate, beta);
    case 6: return gemm_tile_avx2_rows<6>(cols, inner, A, lda, B, ldb, C, ldc, alpha, accumulate, beta);
    default: return;
  }
}
#endif

struct Choice {
  TileFn tile;
  DecodeFn decode;
  const char* isa;
};

Choice choose() {
  const char* forced = std::getenv("LIGHTNING_CACHE_CPU_ISA");
  const bool generic_only = forced && std::strcmp(forced, "generic") == 0;
#ifdef LIGHTNING_CACHE_X86_AVX2
  if (!generic_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {&gemm_tile_avx2, &decode_step_avx2, "avx2"};
  }
#endif
  (void)generic_only;
  return {&gemm_tile_generic, &decode_step_generic, "generic"};
}

const Choice& chosen() {
  static const Choice choice = choose();
  return choice;
}

}  // namespace

void gemm_tile(int64_t rows, int64_t cols, int64_t inner, const float* A, int64_t lda, const float* B, int64_t ldb,
               float* C, int64_t ldc, const float* alpha, bool accumulate, float beta) {
  chosen().tile(rows, cols, inner, A, lda, B, ldb, C, ldc, alpha, accumulate, beta);
}

void decode_step(float* s, const float* q, const float* k, const float* v, float* o, int64_t dk, int64_t dv,
                 float decay) {
  chosen().decode(s, q, k, v, o, dk, dv, decay);
}

const char* gemm_tile_isa() { return chosen().isa; }

}  // namespace lightning_cache::cpu
