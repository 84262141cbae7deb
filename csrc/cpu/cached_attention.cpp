// cached_attention on the CPU: softmax(q K^T * scale) V over the sequence cache,
// reading its float or int8 / float8_e4m3fn codes in place (no dequantized copy).
//
// Work items are (batch row, chunk of query rows, split of the columns). A
// query row is one (query token, query head of a cache head's group): all rows
// of a head share each K/V read, so for decode (q = 1) a head's whole group is
// served by one pass over its columns. Columns are taken in blocks of kBlock;
// a block's visible K|V rows of every head are copied (in memory order, so the
// cache streams) into a head-major buffer, then each head runs an online
// softmax over them (running max m, sum l, accumulator acc per row, in base 2:
// the query is pre-scaled by softmax_scale * log2 e).
// A quantized column's key scale multiplies its dot products and its value
// scale the softmax weight, never the codes. Masked columns are dropped by
// selection before anything reads their values, so a non-finite value in a
// masked column never reaches an output. When there are fewer items than
// threads, the columns are split too and the partial (m, l, acc) combined, as
// flash-decoding does. The vector kernels (AVX2/FMA/F16C) are chosen at load
// time, with a portable fallback (LIGHTNING_CACHE_CPU_ISA=generic forces it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../validation.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LIGHTNING_CACHE_X86_AVX2 1
#include <immintrin.h>
#endif

namespace lightning_cache {
namespace {

constexpr int64_t kBlock = 48;      // cache columns per online-softmax step (a multiple of 3 and 8)
constexpr int64_t kRowChunk = 64;   // query rows per work item
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLowestFloat = std::numeric_limits<float>::lowest();

// How a block of columns looks to one mask row.
enum : uint8_t { kNone = 0, kAll = 1, kSome = 2 };

// ---------------------------------------------------------------- kernels

// scores: s[r * lds + c] = sum_{d < dk} q[r * ldq + d] * K_c[d] for r < rows, c < n.
using ScoresFn = void (*)(const float* q, int64_t ldq, int64_t rows, const void* const* k, int64_t n, int64_t dk,
                          float* s, int64_t lds);
// values: acc[r * lda + d] += sum_{c < n} p[r * ldp + c] * V_c[d] for r < rows, d < dv.
using ValuesFn = void (*)(float* acc, int64_t lda, int64_t rows, const float* p, int64_t ldp, const void* const* v,
                          int64_t n, int64_t dv);
// scale_max: s[c] *= colk[c], then -inf where vis[c] == 0 (vis may be null); returns max_c s[c].
using ScaleMaxFn = float (*)(float* s, const float* colk, const uint8_t* vis, int64_t n);
// exp_sum: p = 2^(s[c] - m) (0 for s = -inf); s[c] = p * colv[c]; returns the sum of p.
using ExpSumFn = float (*)(float* s, float m, const float* colv, int64_t n);

struct TypeKernels {
  ScoresFn scores;
  ValuesFn values;
  float unit;  // what one unit of the kernels' code arithmetic is worth (fp8 on AVX2: 2^8)
};

// Cache element types, in this order in Isa::by_type.
enum KVType { kF32 = 0, kF16, kBF16, kI8, kF8, kNumTypes };

struct Isa {
  TypeKernels by_type[kNumTypes];
  ScaleMaxFn scale_max;
  ExpSumFn exp_sum;
  const char* name;
};

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// Portable kernels.
template <typename T>
void scores_generic(const float* q, int64_t ldq, int64_t rows, const void* const* kv, int64_t n, int64_t dk, float* s,
                    int64_t lds) {
  const T* const* k = reinterpret_cast<const T* const*>(kv);
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * ldq;
      float acc = 0.0f;
      for (int64_t d = 0; d < dk; ++d) acc += qr[d] * to_float(k[c][d]);
      s[r * lds + c] = acc;
    }
  }
}

template <typename T>
void values_generic(float* acc, int64_t lda, int64_t rows, const float* p, int64_t ldp, const void* const* vv,
                    int64_t n, int64_t dv) {
  const T* const* v = reinterpret_cast<const T* const*>(vv);
  for (int64_t r = 0; r < rows; ++r) {
    float* a = acc + r * lda;
    for (int64_t c = 0; c < n; ++c) {
      const float w = p[r * ldp + c];
      for (int64_t d = 0; d < dv; ++d) a[d] += w * to_float(v[c][d]);
    }
  }
}

// What a score adds to the running max: a NaN counts as the lowest finite float, so a block whose only
// visible score is NaN is not taken for an empty one; its weight exp2(NaN - m) then makes the row NaN, as in
// SDPA (std::max and _mm256_max_ps would keep or drop a NaN depending on operand order).
inline float score_for_max(float x) { return x != x ? kLowestFloat : x; }

float scale_max_generic(float* s, const float* colk, const uint8_t* vis, int64_t n) {
  float mx = kNegInf;
  for (int64_t c = 0; c < n; ++c) {
    const float x = (vis && !vis[c]) ? kNegInf : s[c] * colk[c];
    s[c] = x;
    mx = std::max(mx, score_for_max(x));
  }
  return mx;
}

float exp_sum_generic(float* s, float m, const float* colv, int64_t n) {
  float sum = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    const float p = s[c] == kNegInf ? 0.0f : std::exp2(s[c] - m);
    sum += p;
    s[c] = p * colv[c];
  }
  return sum;
}

#ifdef LIGHTNING_CACHE_X86_AVX2
#define LC_AVX2 __attribute__((target("avx2,fma,f16c")))

// Eight cache elements as floats. float8_e4m3fn goes through float16: its sign,
// exponent and mantissa bits placed in a half (exact for normals and
// subnormals) are the value times 2^-8, which the caller folds into the
// column's scales; the NaN code (S.1111.111) becomes a half NaN.
template <typename T>
LC_AVX2 inline __m256 load8(const T* p);
template <>
LC_AVX2 inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
LC_AVX2 inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
LC_AVX2 inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
template <>
LC_AVX2 inline __m256 load8<int8_t>(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
template <>
LC_AVX2 inline __m256 load8<c10::Float8_e4m3fn>(const c10::Float8_e4m3fn* p) {
  const __m128i x = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i magnitude = _mm_and_si128(x, _mm_set1_epi16(0x7F));
  __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(x, _mm_set1_epi16(0x80)), 8), _mm_slli_epi16(magnitude, 7));
  h = _mm_or_si128(h, _mm_cmpeq_epi16(magnitude, _mm_set1_epi16(0x7F)));  // all ones: a half NaN
  return _mm256_cvtph_ps(h);
}

// What one unit of load8's result is worth, and the scalar tails' matching conversion.
template <typename T>
constexpr float kAvxUnit = 1.0f;
template <>
constexpr float kAvxUnit<c10::Float8_e4m3fn> = 256.0f;
template <typename T>
inline float tail_float(T x) {
  return to_float(x) * (1.0f / kAvxUnit<T>);
}

// Sums of four vectors: [sum a, sum b, sum c, sum d].
LC_AVX2 inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

LC_AVX2 inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

LC_AVX2 inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}

// 2^x for x <= 0: exact zero below -125 (and for -inf); NaN stays NaN.
// Degree-7 Taylor polynomial of 2^f on [-0.5, 0.5] (relative error < 1e-8).
LC_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-125.0f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // max(lo, NaN) is NaN
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5252733804059840e-5f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381608e-4f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_andnot_ps(underflow, r);
}

// Four rows x three columns of dot products per tile (12 accumulators); the
// last column group repeats a valid column and drops the extra results.
template <typename T, int R>
LC_AVX2 void scores_rows_avx2(const float* q, int64_t ldq, const T* const* k, int64_t n, int64_t dk, float* s,
                              int64_t lds) {
  const int64_t body = dk & ~int64_t(7);
  for (int64_t c0 = 0; c0 < n; c0 += 3) {
    const int64_t nc = std::min<int64_t>(3, n - c0);
    const T* kc[3] = {k[c0], k[c0 + (nc > 1 ? 1 : 0)], k[c0 + (nc > 2 ? 2 : 0)]};
    __m256 acc[4][3];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = acc[r][2] = _mm256_setzero_ps();
    for (int64_t d = 0; d < body; d += 8) {
      const __m256 k0 = load8(kc[0] + d), k1 = load8(kc[1] + d), k2 = load8(kc[2] + d);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 qv = _mm256_loadu_ps(q + r * ldq + d);
        acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(qv, k2, acc[r][2]);
      }
    }
    float out[3][4];
#pragma GCC unroll 3
    for (int c = 0; c < 3; ++c) _mm_storeu_ps(out[c], hsum4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]));
    for (int64_t d = body; d < dk; ++d) {
      for (int c = 0; c < 3; ++c) {
        const float kv = tail_float(kc[c][d]);
        for (int r = 0; r < R; ++r) out[c][r] += q[r * ldq + d] * kv;
      }
    }
    for (int64_t c = 0; c < nc; ++c) {
      for (int r = 0; r < R; ++r) s[r * lds + c0 + c] = out[c][r];
    }
  }
}

template <typename T>
LC_AVX2 void scores_avx2(const float* q, int64_t ldq, int64_t rows, const void* const* kv, int64_t n, int64_t dk,
                         float* s, int64_t lds) {
  const T* const* k = reinterpret_cast<const T* const*>(kv);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) scores_rows_avx2<T, 4>(q + r * ldq, ldq, k, n, dk, s + r * lds, lds);
  switch (rows - r) {
    case 3: return scores_rows_avx2<T, 3>(q + r * ldq, ldq, k, n, dk, s + r * lds, lds);
    case 2: return scores_rows_avx2<T, 2>(q + r * ldq, ldq, k, n, dk, s + r * lds, lds);
    case 1: return scores_rows_avx2<T, 1>(q + r * ldq, ldq, k, n, dk, s + r * lds, lds);
    default: return;
  }
}

// R rows x 16 value dims of accumulators in registers while the columns stream
// by; then 8-dim and scalar tails.
template <typename T, int R>
LC_AVX2 void values_rows_avx2(float* acc, int64_t lda, const float* p, int64_t ldp, const T* const* v, int64_t n,
                              int64_t dv) {
  int64_t d = 0;
  for (; d + 16 <= dv; d += 16) {
    __m256 a0[R], a1[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_loadu_ps(acc + r * lda + d);
      a1[r] = _mm256_loadu_ps(acc + r * lda + d + 8);
    }
    for (int64_t c = 0; c < n; ++c) {
      const __m256 v0 = load8(v[c] + d), v1 = load8(v[c] + d + 8);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 w = _mm256_broadcast_ss(p + r * ldp + c);
        a0[r] = _mm256_fmadd_ps(w, v0, a0[r]);
        a1[r] = _mm256_fmadd_ps(w, v1, a1[r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(acc + r * lda + d, a0[r]);
      _mm256_storeu_ps(acc + r * lda + d + 8, a1[r]);
    }
  }
  for (; d + 8 <= dv; d += 8) {
    __m256 a0[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a0[r] = _mm256_loadu_ps(acc + r * lda + d);
    for (int64_t c = 0; c < n; ++c) {
      const __m256 v0 = load8(v[c] + d);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a0[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * ldp + c), v0, a0[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + r * lda + d, a0[r]);
  }
  for (; d < dv; ++d) {
    for (int r = 0; r < R; ++r) {
      float a = acc[r * lda + d];
      for (int64_t c = 0; c < n; ++c) a += p[r * ldp + c] * tail_float(v[c][d]);
      acc[r * lda + d] = a;
    }
  }
}

template <typename T>
LC_AVX2 void values_avx2(float* acc, int64_t lda, int64_t rows, const float* p, int64_t ldp, const void* const* vv,
                         int64_t n, int64_t dv) {
  const T* const* v = reinterpret_cast<const T* const*>(vv);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) values_rows_avx2<T, 4>(acc + r * lda, lda, p + r * ldp, ldp, v, n, dv);
  for (; r < rows; ++r) values_rows_avx2<T, 1>(acc + r * lda, lda, p + r * ldp, ldp, v, n, dv);
}

LC_AVX2 float scale_max_avx2(float* s, const float* colk, const uint8_t* vis, int64_t n) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf), lowest = _mm256_set1_ps(kLowestFloat);
  __m256 mx = neg_inf;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + c), _mm256_loadu_ps(colk + c));
    if (vis) {
      const __m256i flags = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vis + c)));
      const __m256 hidden = _mm256_castsi256_ps(_mm256_cmpeq_epi32(flags, _mm256_setzero_si256()));
      x = _mm256_blendv_ps(x, neg_inf, hidden);
    }
    _mm256_storeu_ps(s + c, x);
    mx = _mm256_max_ps(mx, _mm256_blendv_ps(x, lowest, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));  // score_for_max
  }
  float m = hmax(mx);
  for (; c < n; ++c) {
    const float x = (vis && !vis[c]) ? kNegInf : s[c] * colk[c];
    s[c] = x;
    m = std::max(m, score_for_max(x));
  }
  return m;
}

LC_AVX2 float exp_sum_avx2(float* s, float m, const float* colv, int64_t n) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 p = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv));
    sum = _mm256_add_ps(sum, p);
    _mm256_storeu_ps(s + c, _mm256_mul_ps(p, _mm256_loadu_ps(colv + c)));
  }
  float total = hsum(sum);
  for (; c < n; ++c) {
    const float p = s[c] == kNegInf ? 0.0f : std::exp2(s[c] - m);
    total += p;
    s[c] = p * colv[c];
  }
  return total;
}
#endif  // LIGHTNING_CACHE_X86_AVX2

Isa choose_isa() {
  const char* forced = std::getenv("LIGHTNING_CACHE_CPU_ISA");
  const bool generic_only = forced && std::strcmp(forced, "generic") == 0;
#ifdef LIGHTNING_CACHE_X86_AVX2
  if (!generic_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return {{{&scores_avx2<float>, &values_avx2<float>, 1.0f},
             {&scores_avx2<c10::Half>, &values_avx2<c10::Half>, 1.0f},
             {&scores_avx2<c10::BFloat16>, &values_avx2<c10::BFloat16>, 1.0f},
             {&scores_avx2<int8_t>, &values_avx2<int8_t>, 1.0f},
             {&scores_avx2<c10::Float8_e4m3fn>, &values_avx2<c10::Float8_e4m3fn>, kAvxUnit<c10::Float8_e4m3fn>}},
            &scale_max_avx2,
            &exp_sum_avx2,
            "avx2"};
  }
#endif
  (void)generic_only;
  return {{{&scores_generic<float>, &values_generic<float>, 1.0f},
           {&scores_generic<c10::Half>, &values_generic<c10::Half>, 1.0f},
           {&scores_generic<c10::BFloat16>, &values_generic<c10::BFloat16>, 1.0f},
           {&scores_generic<int8_t>, &values_generic<int8_t>, 1.0f},
           {&scores_generic<c10::Float8_e4m3fn>, &values_generic<c10::Float8_e4m3fn>, 1.0f}},
          &scale_max_generic,
          &exp_sum_generic,
          "generic"};
}

const Isa& isa() {
  static const Isa chosen = choose_isa();
  return chosen;
}

// ---------------------------------------------------------------- driver

using Segment = AttentionRow;  // plan_attention_rows (validation.h)

struct Problem {
  AttentionDims d;
  std::vector<Segment> segs;
  std::vector<int64_t> chunk_seg, chunk_rc;  // work chunk c: (segment, row chunk); item = c * splits + split
  int64_t q_rows;                            // query.size(1): mask rows, states and outputs per input row
  PageTable table;                           // paged: the block table (host data), else data == null
  const float* query;  // float32, pre-scaling
  int64_t q_sb, q_si, q_sh, q_sd;
  const char* kv;
  int64_t elem_size;
  int64_t kv_sb, kv_sl, kv_sh;  // element strides; the last dimension is contiguous
  const float* scales;          // null for float caches
  int64_t sc_sb, sc_sl, sc_sh, sc_sc;
  const uint8_t* mask;  // bool bytes; the last dimension is contiguous (null: `limits`)
  int64_t m_sb, m_si;
  const int64_t* limits;  // no mask: mask row bi sees columns [0, limits[bi]) (queries placed by cache_seqlens)
  const uint8_t* states;  // [B, q, blocks]: kNone / kAll / kSome
  int64_t blocks;
  int64_t chunk_rows;  // query rows of one head per work item
  int64_t splits;
  float q_scale;  // softmax_scale * log2(e)
  TypeKernels kernels;
};

// A work item's result: the final output rows, or a split's partial (m, l, acc).
struct Sink {
  float* out;       // [B, q, Hq, Dv] float32, or null when splitting
  float* part_acc;  // [items, H, chunk_rows, Dv]
  float* part_ml;   // [items, H, chunk_rows, 2]
};

// Per-thread buffers. Per head: query rows, softmax state and accumulators.
struct Scratch {
  std::vector<float> qf, acc, m, l, s, colk, colv, pc;
  std::vector<const void*> kp, vp, vc;
  std::vector<uint8_t> vis;
  std::vector<int32_t> cols;
  std::vector<char> rows;  // the block's K|V rows, [H][kBlock][Dk + Dv], head-major
  Scratch(const Problem& P)
      : qf(P.d.heads * P.chunk_rows * P.d.key_dim), acc(P.d.heads * P.chunk_rows * P.d.value_dim),
        m(P.d.heads * P.chunk_rows), l(P.d.heads * P.chunk_rows), s(P.chunk_rows * kBlock), colk(kBlock),
        colv(kBlock), pc(kBlock), kp(kBlock), vp(kBlock), vc(kBlock), vis(P.chunk_rows * kBlock), cols(kBlock),
        rows(P.d.heads * kBlock * (P.d.key_dim + P.d.value_dim) * P.elem_size) {}
};

// Item (work chunk = segment and row chunk, split): rows r0 .. r0 + nr - 1 of every head over the
// split's blocks. A head's row r is query i = r / G, query head h * G + r % G.
// The heads are the inner loop, so the cache is read in its memory order.
void run_item(const Problem& P, int64_t item, Scratch& w, const Sink& sink) {
  const AttentionDims& d = P.d;
  const Isa& k = isa();
  const int64_t split = item % P.splits;
  const int64_t chunk = item / P.splits;
  const Segment& seg = P.segs[P.chunk_seg[chunk]];
  const int64_t rc = P.chunk_rc[chunk];
  const int64_t rows_total = d.group * seg.count;
  const int64_t r0 = rc * P.chunk_rows, nr = std::min(P.chunk_rows, rows_total - r0);
  const int64_t blk_per_split = (P.blocks + P.splits - 1) / P.splits;
  const int64_t blk0 = split * blk_per_split, blk1 = std::min(P.blocks, blk0 + blk_per_split);
  const int64_t H = d.heads, Dk = d.key_dim, Dv = d.value_dim, CR = P.chunk_rows;
  const int64_t first_row = seg.src * P.q_rows + seg.i0;  // the segment's first query in [input rows * q] order
  // Element offset of column j's token in key_value (dense row, or its page's slot); a visible
  // column's page is inside the pool (checked, or hidden by the mask when checks are off).
  auto token_offset = [&](int64_t j, int64_t sb, int64_t sl) {
    if (P.table.data == nullptr) return seg.kv_row * sb + j * sl;
    return page_entry(P.table, seg.kv_row, j) * sb + (j % P.table.page_size) * sl;
  };

  for (int64_t h = 0; h < H; ++h) {
    for (int64_t rr = 0; rr < nr; ++rr) {
      const int64_t r = r0 + rr, i = r / d.group, hq = h * d.group + r % d.group;
      const float* src = P.query + seg.src * P.q_sb + (seg.i0 + i) * P.q_si + hq * P.q_sh;
      float* dst = w.qf.data() + (h * CR + rr) * Dk;
      for (int64_t c = 0; c < Dk; ++c) dst[c] = src[c * P.q_sd] * P.q_scale;
    }
  }
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  const int64_t i0 = r0 / d.group, i1 = (r0 + nr - 1) / d.group, nq = i1 - i0 + 1;
  const uint8_t* states = P.states + first_row * P.blocks;
  const float unit = P.kernels.unit;
  const int64_t row_bytes = (Dk + Dv) * P.elem_size;

  for (int64_t blk = blk0; blk < blk1; ++blk) {
    bool any = false, full = true;
    for (int64_t i = i0; i <= i1; ++i) {
      const uint8_t st = states[i * P.blocks + blk];
      any |= st != kNone;
      full &= st == kAll;
    }
    if (!any) continue;
    const int64_t c_begin = blk * kBlock, width = std::min(kBlock, d.capacity - c_begin);
    const uint8_t* mrow = P.mask != nullptr ? P.mask + seg.src * P.m_sb + seg.i0 * P.m_si + c_begin : nullptr;
    // Whether query i of the segment sees column c_begin + j.
    auto visible = [&](int64_t i, int64_t j) -> bool {
      return mrow != nullptr ? mrow[i * P.m_si + j] != 0 : c_begin + j < P.limits[first_row + i];
    };
    // The block's columns some row of the chunk sees, in order.
    int64_t n = 0;
    if (full) {
      for (int64_t j = 0; j < width; ++j) w.cols[n++] = static_cast<int32_t>(j);
    } else {
      for (int64_t j = 0; j < width; ++j) {
        bool seen = false;
        for (int64_t i = i0; i <= i1 && !seen; ++i) seen = visible(i, j);
        if (seen) w.cols[n++] = static_cast<int32_t>(j);
      }
    }
    if (n == 0) continue;
    // Several queries with different masks in the block: per-row visibility.
    const bool uniform = full || nq == 1;
    if (!uniform) {
      for (int64_t i = i0; i <= i1; ++i) {
        for (int64_t jj = 0; jj < n; ++jj) w.vis[(i - i0) * kBlock + jj] = visible(i, w.cols[jj]);
      }
    }
    // Copy the visible columns' K|V rows, head-major: in the cache one head's
    // rows are H * (Dk + Dv) elements apart, often a power of two, and would
    // share a few L1 sets while the value pass walks them once per dim group.
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t j = c_begin + w.cols[jj];
      const char* src = P.kv + token_offset(j, P.kv_sb, P.kv_sl) * P.elem_size;
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(w.rows.data() + (h * kBlock + jj) * row_bytes, src + h * P.kv_sh * P.elem_size, row_bytes);
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      float* qf = w.qf.data() + h * CR * Dk;
      float* acc = w.acc.data() + h * CR * Dv;
      float* m = w.m.data() + h * CR;
      float* l = w.l.data() + h * CR;
      for (int64_t jj = 0; jj < n; ++jj) {
        const char* row = w.rows.data() + (h * kBlock + jj) * row_bytes;
        w.kp[jj] = row;
        w.vp[jj] = row + Dk * P.elem_size;
        if (P.scales) {
          const float* sc = P.scales + token_offset(c_begin + w.cols[jj], P.sc_sb, P.sc_sl) + h * P.sc_sh;
          w.colk[jj] = sc[0] * unit;
          w.colv[jj] = sc[P.sc_sc] * unit;
        } else {
          w.colk[jj] = w.colv[jj] = unit;
        }
      }
      P.kernels.scores(qf, Dk, nr, w.kp.data(), n, Dk, w.s.data(), kBlock);
      for (int64_t rr = 0; rr < nr; ++rr) {
        float* srow = w.s.data() + rr * kBlock;
        const uint8_t* vis = uniform ? nullptr : w.vis.data() + ((r0 + rr) / d.group - i0) * kBlock;
        const float bm = k.scale_max(srow, w.colk.data(), vis, n);
        if (bm == kNegInf) {  // nothing visible to this row here: its weights are zero
          std::fill_n(srow, n, 0.0f);
          continue;
        }
        const float m_new = std::max(m[rr], bm);
        const float alpha = std::exp2(m[rr] - m_new);  // 0 while m was -inf
        const float sum = k.exp_sum(srow, m_new, w.colv.data(), n);
        l[rr] = l[rr] * alpha + sum;
        m[rr] = m_new;
        if (alpha != 1.0f) {
          float* a = acc + rr * Dv;
          for (int64_t c = 0; c < Dv; ++c) a[c] *= alpha;
        }
      }
      if (uniform) {
        P.kernels.values(acc, Dv, nr, w.s.data(), kBlock, w.vp.data(), n, Dv);
        continue;
      }
      // Row by row over the columns it sees, so a hidden column's value is never read.
      for (int64_t rr = 0; rr < nr; ++rr) {
        const uint8_t* vis = w.vis.data() + ((r0 + rr) / d.group - i0) * kBlock;
        const float* prow = w.s.data() + rr * kBlock;
        int64_t nv = 0;
        for (int64_t jj = 0; jj < n; ++jj) {
          if (!vis[jj]) continue;
          w.pc[nv] = prow[jj];
          w.vc[nv++] = w.vp[jj];
        }
        if (nv > 0) P.kernels.values(acc + rr * Dv, Dv, 1, w.pc.data(), kBlock, w.vc.data(), nv, Dv);
      }
    }
  }

  for (int64_t h = 0; h < H; ++h) {
    const float* acc = w.acc.data() + h * CR * Dv;
    const float* m = w.m.data() + h * CR;
    const float* l = w.l.data() + h * CR;
    if (sink.out) {
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t r = r0 + rr, i = r / d.group, hq = h * d.group + r % d.group;
        float* dst = sink.out + ((first_row + i) * d.query_heads + hq) * Dv;
        if (m[rr] == kNegInf) {  // every column masked: zeros, not 0/0
          std::fill_n(dst, Dv, 0.0f);
        } else {
          const float inv = 1.0f / l[rr];
          for (int64_t c = 0; c < Dv; ++c) dst[c] = acc[rr * Dv + c] * inv;
        }
      }
    } else {
      const int64_t part = (item * H + h) * CR;
      std::copy_n(acc, nr * Dv, sink.part_acc + part * Dv);
      for (int64_t rr = 0; rr < nr; ++rr) {
        sink.part_ml[(part + rr) * 2] = m[rr];
        sink.part_ml[(part + rr) * 2 + 1] = l[rr];
      }
    }
  }
}

// Combines the splits of each (work chunk, head) into the output.
void combine_splits(const Problem& P, const Sink& sink, float* out) {
  const AttentionDims& d = P.d;
  const int64_t Dv = d.value_dim, CR = P.chunk_rows;
  const int64_t chunks = static_cast<int64_t>(P.chunk_seg.size());
  at::parallel_for(0, chunks * d.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t h = unit % d.heads, chunk = unit / d.heads;
      const Segment& seg = P.segs[P.chunk_seg[chunk]];
      const int64_t rc = P.chunk_rc[chunk];
      const int64_t first_item = chunk * P.splits;
      const int64_t rows_total = d.group * seg.count;
      const int64_t r0 = rc * CR, nr = std::min(CR, rows_total - r0);
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t r = r0 + rr, i = r / d.group, hq = h * d.group + r % d.group;
        float* dst = out + ((seg.src * P.q_rows + seg.i0 + i) * d.query_heads + hq) * Dv;
        auto at = [&](int64_t s) { return ((first_item + s) * d.heads + h) * CR + rr; };
        float m = kNegInf;
        for (int64_t s = 0; s < P.splits; ++s) m = std::max(m, sink.part_ml[at(s) * 2]);
        std::fill_n(dst, Dv, 0.0f);
        if (m == kNegInf) continue;
        float l = 0.0f;
        for (int64_t s = 0; s < P.splits; ++s) {
          const float ms = sink.part_ml[at(s) * 2];
          if (ms == kNegInf) continue;  // this split saw nothing: its acc is zero
          const float f = std::exp2(ms - m);
          l += f * sink.part_ml[at(s) * 2 + 1];
          const float* a = sink.part_acc + at(s) * Dv;
          for (int64_t c = 0; c < Dv; ++c) dst[c] += f * a[c];
        }
        const float inv = 1.0f / l;
        for (int64_t c = 0; c < Dv; ++c) dst[c] *= inv;
      }
    }
  });
}

KVType kv_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kChar: return kI8;
    default: return kF8;  // validated: float8_e4m3fn
  }
}

// The visible columns of every query as bytes [input rows * q, L], for calls
// the given mask alone does not describe: queries placed by cache_seqlens
// (causal: column j <= the query's position), rows skipped (bad slot id,
// sequence or count: all hidden), columns whose page is outside the pool
// (hidden; with checks check_visible_pages has raised already).
at::Tensor effective_mask(const AttentionDims& d, const std::vector<Segment>& segs, const std::vector<int64_t>& valid,
                          const at::Tensor& mask, const PageTable& table, int64_t input_rows) {
  const int64_t L = d.capacity;
  at::Tensor out = at::zeros({input_rows * d.queries, L}, at::TensorOptions().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint8_t* given = d.has_mask ? reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()) : nullptr;
  const int64_t m_sb = d.has_mask ? mask.stride(0) : 0, m_si = d.has_mask ? mask.stride(2) : 0;
  const int64_t m_sj = d.has_mask ? mask.stride(3) : 0;
  for (size_t w = 0; w < segs.size(); ++w) {
    const Segment& seg = segs[w];
    if (seg.kv_row < 0) continue;  // skipped row: nothing visible, zeros out
    for (int64_t i = 0; i < seg.count; ++i) {
      uint8_t* row = o + (seg.src * d.queries + seg.i0 + i) * L;
      if (given != nullptr) {
        const uint8_t* src = given + seg.src * m_sb + (seg.i0 + i) * m_si;
        for (int64_t j = 0; j < L; ++j) row[j] = src[j * m_sj] != 0;
      } else {
        // cache_seqlens - count + i: the query's position (valid[w] >= count).
        const int64_t position = valid[w] - seg.count + i;
        std::fill(row, row + position + 1, uint8_t{1});
      }
      if (table.data == nullptr) continue;
      for (int64_t p0 = 0; p0 < L; p0 += table.page_size) {
        if (paged_cell(table, seg.kv_row, p0) >= 0) continue;
        const int64_t p1 = std::min(L, p0 + table.page_size);
        std::fill(row + p0, row + p1, uint8_t{0});
      }
    }
  }
  return out;
}

// Without a mask, queries see the columns below their row's cache_seqlens: whether every page those
// columns live in is inside the pool (if not, with checks off, its columns must be hidden: a built mask).
bool visible_pages_in_pool(const std::vector<Segment>& segs, const std::vector<int64_t>& valid,
                           const PageTable& table) {
  if (table.data == nullptr) return true;
  for (size_t w = 0; w < segs.size(); ++w) {
    const Segment& seg = segs[w];
    if (seg.kv_row < 0 || seg.count == 0) continue;
    for (int64_t p0 = 0; p0 < valid[w]; p0 += table.page_size) {
      if (paged_cell(table, seg.kv_row, p0) < 0) return false;
    }
  }
  return true;
}

at::Tensor cached_attention_cpu(const at::Tensor& query, const at::Tensor& key_value,
                                const std::optional<at::Tensor>& mask, int64_t key_dim,
                                const std::optional<at::Tensor>& scales, std::optional<double> softmax_scale,
                                const std::optional<at::Tensor>& block_tables,
                                const std::optional<at::Tensor>& cu_seqlens,
                                const std::optional<at::Tensor>& cache_seqlens,
                                const std::optional<at::Tensor>& slot_ids, bool check_bounds) {
  const AttentionDims d = check_cached_attention_args(query, key_value, mask, key_dim, scales, softmax_scale,
                                                      block_tables, cu_seqlens, cache_seqlens, slot_ids);
  const auto out_options = query.options();
  if (is_empty_call(d)) return at::empty({d.batch, d.queries, d.query_heads, d.value_dim}, out_options);
  if (d.capacity == 0) return at::zeros({d.batch, d.queries, d.query_heads, d.value_dim}, out_options);

  // The rows (segments): batch rows, or packed sequences; kv_row -1 = skipped.
  AttentionRows plan = plan_attention_rows(d, cu_seqlens, cache_seqlens, slot_ids, check_bounds);
  const std::vector<Segment>& segs = plan.rows;
  const std::vector<int64_t>& valid = plan.valid;
  const bool any_skipped = plan.any_skipped;

  at::Tensor table_cpu;
  PageTable table;
  if (d.paged) {
    table_cpu = block_tables->contiguous();
    table = check_block_tables("cached_attention", table_cpu, d.rows, key_value);
    if (check_bounds) check_visible_pages(d, *block_tables, mask, plan);  // the one rule, every backend
  }

  // Unusual layouts are copied once (the kernels want contiguous cache rows and mask rows).
  const at::Tensor kv = key_value.stride(3) == 1 ? key_value : key_value.contiguous();
  const at::Tensor qf = query.to(at::kFloat);
  // The given mask is used as is for plain calls; queries placed by cache_seqlens see a prefix of columns
  // each (their limits, no mask built) unless a page they see is outside the pool without checks (hidden
  // columns: a built mask); anything else reads a built mask.
  // Paged with a mask: the kernel reads only the columns the mask shows, through the table, so the mask is
  // used as given when those columns' pages are in the pool: checked (check_visible_pages), or every entry
  // in range. Otherwise a built mask hides the columns of pages outside the pool.
  const bool pages_safe = !d.paged || check_bounds ||
                          table_cpu.ge(0).logical_and_(table_cpu.lt(d.pool_rows)).all().item<bool>();
  const bool plain = d.has_mask && !any_skipped && pages_safe;
  const int64_t mask_rows = (d.packed ? 1 : d.batch) * d.queries;
  std::vector<int64_t> limits;
  // (With checks, check_visible_pages has already refused any such page.)
  const bool by_limits = !d.has_mask && (check_bounds || visible_pages_in_pool(segs, valid, table));
  at::Tensor mk;
  if (plain) {
    mk = mask->stride(3) == 1 ? *mask : mask->contiguous();
  } else if (by_limits) {
    limits.assign(mask_rows, 0);
    for (size_t w = 0; w < segs.size(); ++w) {
      const Segment& seg = segs[w];
      if (seg.kv_row < 0) continue;  // skipped row: nothing visible, zeros out
      for (int64_t i = 0; i < seg.count; ++i) limits[seg.src * d.queries + seg.i0 + i] = valid[w] - seg.count + i + 1;
    }
  } else {
    const at::Tensor given = d.has_mask ? *mask : at::Tensor();
    mk = effective_mask(d, segs, valid, given, table, d.packed ? 1 : d.batch);
  }

  Problem P{};
  P.d = d;
  P.table = table;
  P.q_rows = d.queries;
  P.query = qf.const_data_ptr<float>();
  P.q_sb = qf.stride(0), P.q_si = qf.stride(1), P.q_sh = qf.stride(2), P.q_sd = qf.stride(3);
  P.kv = static_cast<const char*>(kv.const_data_ptr());
  P.elem_size = kv.element_size();
  P.kv_sb = kv.stride(0), P.kv_sl = kv.stride(1), P.kv_sh = kv.stride(2);
  if (scales.has_value()) {
    P.scales = scales->const_data_ptr<float>();
    P.sc_sb = scales->stride(0), P.sc_sl = scales->stride(1), P.sc_sh = scales->stride(2);
    P.sc_sc = scales->stride(3);
  }
  if (plain) {
    P.mask = reinterpret_cast<const uint8_t*>(mk.const_data_ptr<bool>());
    P.m_sb = mk.stride(0), P.m_si = mk.stride(2);
  } else if (by_limits) {
    P.limits = limits.data();
  } else {
    P.mask = mk.const_data_ptr<uint8_t>();
    P.m_sb = d.queries * d.capacity, P.m_si = d.capacity;
  }
  P.blocks = (d.capacity + kBlock - 1) / kBlock;
  int64_t longest = 0;
  for (const Segment& seg : segs) {
    if (seg.kv_row >= 0) longest = std::max(longest, seg.count);
  }
  P.chunk_rows = std::max<int64_t>(1, std::min(kRowChunk, d.group * longest));
  P.q_scale = d.softmax_scale * kLog2e;
  P.kernels = isa().by_type[kv_type(kv.scalar_type())];
  P.segs = segs;
  for (size_t w = 0; w < segs.size(); ++w) {
    if (segs[w].kv_row < 0 || segs[w].count == 0) continue;  // skipped: its outputs stay zero
    const int64_t chunks = (d.group * segs[w].count + P.chunk_rows - 1) / P.chunk_rows;
    for (int64_t rc = 0; rc < chunks; ++rc) {
      P.chunk_seg.push_back(static_cast<int64_t>(w));
      P.chunk_rc.push_back(rc);
    }
  }

  // How each block of columns looks to each mask row: a decode row's mask is a
  // prefix, so most blocks are all visible or all hidden and skip the per-column rule.
  std::vector<uint8_t> states(mask_rows * P.blocks);
  at::parallel_for(0, mask_rows, std::max<int64_t>(1, 65536 / d.capacity), [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      if (P.limits != nullptr) {  // a prefix: blocks below the limit are all seen, above it none
        for (int64_t blk = 0; blk < P.blocks; ++blk) {
          const int64_t c0 = blk * kBlock, width = std::min(kBlock, d.capacity - c0);
          const int64_t seen = std::clamp<int64_t>(P.limits[bi] - c0, 0, width);
          states[bi * P.blocks + blk] = seen == 0 ? kNone : seen == width ? kAll : kSome;
        }
        continue;
      }
      const uint8_t* row = P.mask + (bi / d.queries) * P.m_sb + (bi % d.queries) * P.m_si;
      for (int64_t blk = 0; blk < P.blocks; ++blk) {
        const int64_t c0 = blk * kBlock, width = std::min(kBlock, d.capacity - c0);
        int64_t seen = 0;
        for (int64_t j = 0; j < width; ++j) seen += row[c0 + j] != 0;
        states[bi * P.blocks + blk] = seen == 0 ? kNone : seen == width ? kAll : kSome;
      }
    }
  });
  P.states = states.data();

  // Split the columns only when there are too few items to keep the threads busy.
  const int64_t base_items = static_cast<int64_t>(P.chunk_seg.size());
  const int64_t threads = at::get_num_threads();
  P.splits = base_items == 0 || base_items >= 4 * threads
                 ? 1
                 : std::min(P.blocks, (4 * threads + base_items - 1) / base_items);
  const int64_t items = base_items * P.splits;

  // Zeros where no item writes (skipped rows, tokens of no sequence).
  at::Tensor out = at::zeros({d.batch, d.queries, d.query_heads, d.value_dim}, query.options().dtype(at::kFloat));
  at::Tensor part;
  Sink sink{};
  if (P.splits == 1) {
    sink.out = out.data_ptr<float>();
  } else {
    const int64_t part_rows = items * d.heads * P.chunk_rows;
    part = at::empty({part_rows * (d.value_dim + 2)}, out.options());
    sink.part_acc = part.data_ptr<float>();
    sink.part_ml = sink.part_acc + part_rows * d.value_dim;
  }
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(P);
    for (int64_t item = begin; item < end; ++item) run_item(P, item, scratch, sink);
  });
  if (P.splits > 1) combine_splits(P, sink, out.data_ptr<float>());
  return query.scalar_type() == at::kFloat ? out : out.to(query.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_cache, CPU, m) { m.impl("cached_attention", &cached_attention_cpu); }

}  // namespace lightning_cache
