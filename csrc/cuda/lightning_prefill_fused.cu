// Fused lightning prefill on tensor cores (opt-in: LIGHTNING_CACHE_FUSED_PREFILL=1, see
// ops_cuda.cpp for which calls it takes; every other call runs the ATen path).
//
// One CTA per (value tile of 64 columns, head, sequence). A sequence is a triple
// (first token row, length, state row): batch row b of a [B, T] call, or packed
// sequence s of a [1, T] call (cu_seqlens: its first token and length, sequence_of).
// The CTA walks its chunks of 64 tokens in order with its [128 x 64] float32 state
// tile in registers, loading chunk c + 1 with cp.async while it computes chunk c.
// Per chunk, with c_i the unmasked tokens among chunk tokens 0..i and n = c_63:
//   o_i = scale * (lam^(c_i) q_i S + sum_{j<=i} (q_i . k_j) lam^(c_i - c_j) v_j)
//   S  <- S + (lam^n - 1) S + sum_j (lam^(n - c_j) k_j)^T v_j
// (lam^n - 1 from expm1: for flat heads lam^n rounds next to 1 with an error as large
// as its distance from 1, every chunk). The increment is a fresh accumulator folded in
// with float32 FMA. The decay of the intra product is formed per (i, j) from the
// non-negative distance c_i - c_j, never factored as lam^(c_i) lam^(-c_j).
//
// Products: mma.sync m16n8k16 bfloat16 x bfloat16 -> float32. q, k, v are bfloat16
// inputs (exact); the float32 operands (P, the state S, the decayed keys) are split
// into kSplitTerms* bfloat16 pieces, one mma per piece. The counts were measured by
// tests/test_fused_prefill_scheme.py (an emulation of this scheme against float64
// over 64k tokens): 3 pieces each keep the error within 2x the float32 ATen path's.
//
// Masks: masked tokens' q, k, v are zero-filled by cp.async (never read), counts are
// ballot/popc prefix counts. Non-finite v: the intra and update products use v with
// non-finite entries replaced by 0 (selection), and column d of token i's output, and
// of the state, is set to NaN when an unmasked token j <= i of the chunk had a
// non-finite v[d] (a zero upper triangle would otherwise meet a later token's Inf).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "launch_utils.cuh"
#include "launchers.h"

namespace lightning_cache {
namespace {

constexpr int kSplitTermsP = 3;  // P = (q k^T) * decay, intra product
constexpr int kSplitTermsS = 3;  // the state, in q S
constexpr int kSplitTermsK = 3;  // the decayed keys of the update
constexpr int kChunk = 64;
constexpr int kKeyDim = 128;
constexpr int kTile = 64;     // value columns per CTA
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kQKStride = kKeyDim + 8;  // bf16 elements per shared row (padding spreads banks; rows stay 16-byte aligned)
constexpr int kVStride = kTile + 8;
constexpr int kStageElems = 2 * kChunk * kQKStride + kChunk * kVStride;  // q, k, v of one chunk
constexpr int kStateTermElems = kTile * kQKStride;                       // S^T piece [64 cols][128 rows]
constexpr size_t kSharedBytes =
    (2 * size_t(kStageElems) + size_t(kSplitTermsS) * kStateTermElems) * sizeof(__nv_bfloat16);

struct FusedParams {
  void* state;  // [slots, H, 128, 128], contiguous, float32 or bfloat16
  __nv_bfloat16* out;  // [B, T, H, 128], contiguous
  const __nv_bfloat16* query;
  const __nv_bfloat16* key;
  const __nv_bfloat16* value;
  const float* slopes;        // [H]
  const int64_t* slots;       // [B] sanitized (-1 skip) or null
  const uint8_t* keep;        // [B, T] 1 = unmasked, or null
  void* checkpoints;          // [B, C, H, 128, 128] state dtype, or null
  const int64_t* seq_bounds;  // packed: [S, 2] (first token, length; length < 0 = skipped), else null
  int64_t batch, tokens, heads, num_slots;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // b, t, h (elements; the dim stride is 1)
  int64_t checkpoint_count, checkpoints_written, checkpoint_every;
  float scale;
};

// The CTA's sequence: its input row and first token there, its length and its state row (-1 = skipped);
// its index (checkpoints' first dimension) is blockIdx.z. 32-bit (fused_prefill_supported: T, slots and
// batch fit) to keep the kernel's registers within 255 without spills.
struct Sequence {
  int32_t batch_row, first_token, length, state_row;
};

__device__ __forceinline__ Sequence sequence_of(const FusedParams& p, int64_t b) {
  const int64_t slot = p.slots == nullptr ? b : p.slots[b];
  const int32_t row = slot >= 0 && slot < p.num_slots ? static_cast<int32_t>(slot) : -1;
  if (p.seq_bounds == nullptr) return {static_cast<int32_t>(b), 0, static_cast<int32_t>(p.tokens), row};
  const int64_t first = p.seq_bounds[2 * b], length = p.seq_bounds[2 * b + 1];
  return {0, length < 0 ? 0 : static_cast<int32_t>(first), length < 0 ? 0 : static_cast<int32_t>(length),
          length < 0 ? -1 : row};
}

// State element conversions (torch builds with the implicit bfloat16 conversions off).
__device__ __forceinline__ float load_float(float x) { return x; }
__device__ __forceinline__ float load_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename state_t>
__device__ __forceinline__ state_t store_as(float x) {
  if constexpr (std::is_same_v<state_t, float>) {
    return x;
  } else {
    return __float2bfloat16_rn(x);  // rounded once per call (and per checkpoint)
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_raw(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
}

// Piece `term` of the split x = piece0 + piece1 + piece2 (+ rounding), each bfloat16.
// A non-finite x is its own first piece (Inf - Inf would make every piece NaN, turning an Inf that
// sequential decode keeps into NaN).
__device__ __forceinline__ float split_piece(float x, int term) {
  if (!isfinite(x)) return term == 0 ? x : 0.0f;
  float rest = x;
  float piece = __bfloat162float(__float2bfloat16_rn(rest));
  for (int t = 0; t < term; ++t) {
    rest -= piece;  // exact in float32
    piece = __bfloat162float(__float2bfloat16_rn(rest));
  }
  return piece;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// 16 bytes global -> shared; src_bytes = 0 fills zeros without reading (masked tokens).
__device__ __forceinline__ void copy16_async(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ bool token_kept(const FusedParams& p, const Sequence& s, int64_t t) {
  return t < s.length && (p.keep == nullptr || p.keep[s.batch_row * p.tokens + s.first_token + t] != 0);
}

// Issues the copies of chunk `chunk` (q, k: 128 dims; v: this CTA's 64 columns) into `stage`.
__device__ __forceinline__ void load_chunk(const FusedParams& p, const Sequence& s, int64_t h, int64_t col0,
                                           int64_t chunk, __nv_bfloat16* stage) {
  __nv_bfloat16* qs = stage;
  __nv_bfloat16* ks = stage + kChunk * kQKStride;
  __nv_bfloat16* vs = stage + 2 * kChunk * kQKStride;
  const int tid = threadIdx.x;
  // q and k: 64 tokens x 16 pieces of 8 elements.
  for (int e = tid; e < kChunk * (kKeyDim / 8); e += kThreads) {
    const int row = e / (kKeyDim / 8), piece = e % (kKeyDim / 8);
    const int64_t t = chunk * kChunk + row;
    const bool kept = token_kept(p, s, t);
    const int64_t tt = s.first_token + (kept ? t : 0);  // a valid address either way; nothing is read when not kept
    const __nv_bfloat16* q = p.query + s.batch_row * p.q_stride[0] + tt * p.q_stride[1] + h * p.q_stride[2];
    const __nv_bfloat16* k = p.key + s.batch_row * p.k_stride[0] + tt * p.k_stride[1] + h * p.k_stride[2];
    copy16_async(qs + row * kQKStride + piece * 8, q + piece * 8, kept ? 16 : 0);
    copy16_async(ks + row * kQKStride + piece * 8, k + piece * 8, kept ? 16 : 0);
  }
  for (int e = tid; e < kChunk * (kTile / 8); e += kThreads) {
    const int row = e / (kTile / 8), piece = e % (kTile / 8);
    const int64_t t = chunk * kChunk + row;
    const bool kept = token_kept(p, s, t);
    const int64_t tt = s.first_token + (kept ? t : 0);
    const __nv_bfloat16* v =
        p.value + s.batch_row * p.v_stride[0] + tt * p.v_stride[1] + h * p.v_stride[2] + col0 + piece * 8;
    copy16_async(vs + row * kVStride + piece * 8, v, kept ? 16 : 0);
  }
}

template <typename state_t>
__global__ void __launch_bounds__(kThreads, 1) fused_prefill_kernel(const __grid_constant__ FusedParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __nv_bfloat16* stages = reinterpret_cast<__nv_bfloat16*>(shared_raw);
  __nv_bfloat16* state_terms = stages + 2 * kStageElems;  // [term][col][row]
  __shared__ unsigned long long kept_bits[2];             // per stage: bit i = chunk token i unmasked
  __shared__ int first_bad[kTile];                        // first token of the chunk with a non-finite v[col]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tig = lane % 4;  // mma fragment coordinates
  const int64_t col0 = int64_t(blockIdx.x) * kTile, h = blockIdx.y;
  const Sequence seq = sequence_of(p, blockIdx.z);
  const int64_t out_token_stride = p.heads * kKeyDim;
  __nv_bfloat16* out = p.out + ((seq.batch_row * p.tokens + seq.first_token) * p.heads + h) * kKeyDim + col0;

  if (seq.state_row < 0) {  // skipped: zeros out, state and checkpoints untouched
    for (int64_t e = tid; e < int64_t(seq.length) * (kTile / 2); e += kThreads) {
      const int64_t t = e / (kTile / 2);
      reinterpret_cast<uint32_t*>(out + t * out_token_stride)[e % (kTile / 2)] = 0u;
    }
    return;
  }
  const float slope = p.slopes[h];
  state_t* state = static_cast<state_t*>(p.state) + (seq.state_row * p.heads + h) * kKeyDim * kKeyDim + col0;

  // State tile in mma C layout: warp w owns rows 32w..32w+31 (two m-tiles), 8 n-tiles of columns.
  float S[2][8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = warp * 32 + mt * 16 + g + (r / 2) * 8, col = nt * 8 + tig * 2 + (r % 2);
        S[mt][nt][r] = load_float(state[row * kKeyDim + col]);
      }
    }
  }

  const int64_t chunks = (seq.length + kChunk - 1) / kChunk;
  if (chunks > 0) load_chunk(p, seq, h, col0, 0, stages);  // an empty sequence copies nothing
  async_commit();
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int stage_index = int(chunk & 1);
    __nv_bfloat16* stage = stages + stage_index * kStageElems;
    if (chunk + 1 < chunks) load_chunk(p, seq, h, col0, chunk + 1, stages + (stage_index ^ 1) * kStageElems);
    async_commit();  // an empty group on the last chunk keeps the wait count uniform
    if (warp < 2) {
      const unsigned bits = __ballot_sync(0xffffffffu, token_kept(p, seq, chunk * kChunk + warp * 32 + lane));
      if (lane == 0) reinterpret_cast<unsigned*>(&kept_bits[stage_index])[warp] = bits;
    }
    if (tid < kTile) first_bad[tid] = kChunk;
    async_wait<1>();
    __syncthreads();

    const __nv_bfloat16* qs = stage;
    const __nv_bfloat16* ks = stage + kChunk * kQKStride;
    __nv_bfloat16* vs = stage + 2 * kChunk * kQKStride;
    const unsigned long long kept = kept_bits[stage_index];
    // Non-finite v -> 0 (selection) and the first such token per column.
    for (int e = tid; e < kChunk * kTile; e += kThreads) {
      const int row = e / kTile, col = e % kTile;
      const float x = __bfloat162float(vs[row * kVStride + col]);
      if (!isfinite(x)) {
        vs[row * kVStride + col] = __float2bfloat16_rn(0.0f);
        atomicMin(&first_bad[col], row);
      }
    }
    // The state before this chunk, transposed, as bfloat16 pieces: state_terms[t][col][row].
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = warp * 32 + mt * 16 + g + (r / 2) * 8, col = nt * 8 + tig * 2 + (r % 2);
#pragma unroll
          for (int t = 0; t < kSplitTermsS; ++t) {
            state_terms[t * kStateTermElems + col * kQKStride + row] =
                __float2bfloat16_rn(split_piece(S[mt][nt][r], t));
          }
        }
      }
    }
    __syncthreads();

    // Prefix counts c_i (unmasked tokens among 0..i) and the chunk total n.
    auto count_to = [&](int i) { return float(__popcll(kept & (~0ull >> (63 - i)))); };
    const float total = float(__popcll(kept));
    const int row0 = warp * 16 + g, row1 = row0 + 8;  // this thread's two output rows
    const float c_row0 = count_to(row0), c_row1 = count_to(row1);

    // o = lam^(c_i) q S (S in pieces) ...
    float O[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) O[nt][0] = O[nt][1] = O[nt][2] = O[nt][3] = 0.0f;
#pragma unroll 1  // a rolled loop bounds live registers (the state tile holds 64)
    for (int kt = 0; kt < kKeyDim / 16; ++kt) {
      uint32_t a[4];
      const int c = kt * 16 + tig * 2;
      a[0] = *reinterpret_cast<const uint32_t*>(qs + row0 * kQKStride + c);
      a[1] = *reinterpret_cast<const uint32_t*>(qs + row1 * kQKStride + c);
      a[2] = *reinterpret_cast<const uint32_t*>(qs + row0 * kQKStride + c + 8);
      a[3] = *reinterpret_cast<const uint32_t*>(qs + row1 * kQKStride + c + 8);
#pragma unroll
      for (int t = 0; t < kSplitTermsS; ++t) {
        const __nv_bfloat16* st = state_terms + t * kStateTermElems;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const __nv_bfloat16* col = st + (nt * 8 + g) * kQKStride;
          mma_bf16(O[nt], a, *reinterpret_cast<const uint32_t*>(col + c),
                   *reinterpret_cast<const uint32_t*>(col + c + 8));
        }
      }
    }
    const float decay_row0 = expf(-slope * c_row0), decay_row1 = expf(-slope * c_row1);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      O[nt][0] *= decay_row0, O[nt][1] *= decay_row0, O[nt][2] *= decay_row1, O[nt][3] *= decay_row1;
    }

    // ... + sum_{j<=i} (q_i . k_j) lam^(c_i - c_j) v_j: scores of the lower-triangular
    // tiles (key tiles nt <= 2 * warp + 1), decayed in place into P.
    float P[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) P[nt][0] = P[nt][1] = P[nt][2] = P[nt][3] = 0.0f;
#pragma unroll 1
    for (int kt = 0; kt < kKeyDim / 16; ++kt) {
      uint32_t a[4];
      const int c = kt * 16 + tig * 2;
      a[0] = *reinterpret_cast<const uint32_t*>(qs + row0 * kQKStride + c);
      a[1] = *reinterpret_cast<const uint32_t*>(qs + row1 * kQKStride + c);
      a[2] = *reinterpret_cast<const uint32_t*>(qs + row0 * kQKStride + c + 8);
      a[3] = *reinterpret_cast<const uint32_t*>(qs + row1 * kQKStride + c + 8);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        if (nt <= 2 * warp + 1) {  // warp-uniform
          const __nv_bfloat16* key_row = ks + (nt * 8 + g) * kQKStride;
          mma_bf16(P[nt], a, *reinterpret_cast<const uint32_t*>(key_row + c),
                   *reinterpret_cast<const uint32_t*>(key_row + c + 8));
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = r < 2 ? row0 : row1, j = nt * 8 + tig * 2 + (r % 2);
        const float ci = r < 2 ? c_row0 : c_row1;
        // Selection, not a product with 0: a later token's non-finite k stays out.
        P[nt][r] = j <= i ? P[nt][r] * expf(-slope * (ci - count_to(j))) : 0.0f;
      }
    }
#pragma unroll
    for (int kt = 0; kt < kChunk / 16; ++kt) {
      if (kt <= warp) {  // key tiles past this warp's rows are all zero
        const int j = kt * 16 + tig * 2;
#pragma unroll
        for (int t = 0; t < kSplitTermsP; ++t) {
          uint32_t a[4];  // the C fragments of key tiles 2kt, 2kt+1 are the A fragment of k-step kt
          a[0] = pack_bf16(split_piece(P[2 * kt][0], t), split_piece(P[2 * kt][1], t));
          a[1] = pack_bf16(split_piece(P[2 * kt][2], t), split_piece(P[2 * kt][3], t));
          a[2] = pack_bf16(split_piece(P[2 * kt + 1][0], t), split_piece(P[2 * kt + 1][1], t));
          a[3] = pack_bf16(split_piece(P[2 * kt + 1][2], t), split_piece(P[2 * kt + 1][3], t));
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            const int col = nt * 8 + g;
            mma_bf16(O[nt], a, pack_raw(vs[j * kVStride + col], vs[(j + 1) * kVStride + col]),
                     pack_raw(vs[(j + 8) * kVStride + col], vs[(j + 9) * kVStride + col]));
          }
        }
      }
    }
    // Store: masked tokens and tokens past the end by selection; poisoned columns NaN.
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = half == 0 ? row0 : row1;
        const int64_t t = chunk * kChunk + i;
        if (t < seq.length) {
          const int col = nt * 8 + tig * 2;
          const bool token_on = (kept >> i) & 1ull;
          float x0 = first_bad[col] <= i ? __int_as_float(0x7fc00000) : O[nt][half * 2] * p.scale;
          float x1 = first_bad[col + 1] <= i ? __int_as_float(0x7fc00000) : O[nt][half * 2 + 1] * p.scale;
          x0 = token_on ? x0 : 0.0f;
          x1 = token_on ? x1 : 0.0f;
          *reinterpret_cast<uint32_t*>(out + t * out_token_stride + col) = pack_bf16(x0, x1);
        }
      }
    }

    // Update: increment = sum_j (lam^(n - c_j) k_j)^T v_j in a fresh accumulator.
    float inc[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) inc[mt][nt][0] = inc[mt][nt][1] = inc[mt][nt][2] = inc[mt][nt][3] = 0.0f;
    }
#pragma unroll 1
    for (int kt = 0; kt < kChunk / 16; ++kt) {
      const int j = kt * 16 + tig * 2;
      float kd[4];  // decays of tokens j, j+1, j+8, j+9
      kd[0] = expf(-slope * (total - count_to(j)));
      kd[1] = expf(-slope * (total - count_to(j + 1)));
      kd[2] = expf(-slope * (total - count_to(j + 8)));
      kd[3] = expf(-slope * (total - count_to(j + 9)));
      uint32_t b[8][2];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int col = nt * 8 + g;
        b[nt][0] = pack_raw(vs[j * kVStride + col], vs[(j + 1) * kVStride + col]);
        b[nt][1] = pack_raw(vs[(j + 8) * kVStride + col], vs[(j + 9) * kVStride + col]);
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r0 = warp * 32 + mt * 16 + g, r1 = r0 + 8;  // state rows = key dims
        float x[8];  // A[row][token] = k[token][row] * decay(token)
        x[0] = __bfloat162float(ks[j * kQKStride + r0]) * kd[0];
        x[1] = __bfloat162float(ks[(j + 1) * kQKStride + r0]) * kd[1];
        x[2] = __bfloat162float(ks[j * kQKStride + r1]) * kd[0];
        x[3] = __bfloat162float(ks[(j + 1) * kQKStride + r1]) * kd[1];
        x[4] = __bfloat162float(ks[(j + 8) * kQKStride + r0]) * kd[2];
        x[5] = __bfloat162float(ks[(j + 9) * kQKStride + r0]) * kd[3];
        x[6] = __bfloat162float(ks[(j + 8) * kQKStride + r1]) * kd[2];
        x[7] = __bfloat162float(ks[(j + 9) * kQKStride + r1]) * kd[3];
#pragma unroll
        for (int t = 0; t < kSplitTermsK; ++t) {
          uint32_t a[4];
          a[0] = pack_bf16(split_piece(x[0], t), split_piece(x[1], t));
          a[1] = pack_bf16(split_piece(x[2], t), split_piece(x[3], t));
          a[2] = pack_bf16(split_piece(x[4], t), split_piece(x[5], t));
          a[3] = pack_bf16(split_piece(x[6], t), split_piece(x[7], t));
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) mma_bf16(inc[mt][nt], a, b[nt][0], b[nt][1]);
        }
      }
    }
    const float decay_less_one = expm1f(-slope * total);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int col = nt * 8 + tig * 2 + (r % 2);
          // lam^n S = S + (lam^n - 1) S keeps a flat head's precision; an infinite S stays infinite
          // (lam^n > 0), where Inf * (lam^n - 1) + Inf would give NaN, even for a fully masked chunk.
          const float s_old = S[mt][nt][r];
          const float updated =
              isfinite(s_old) ? fmaf(s_old, decay_less_one, s_old + inc[mt][nt][r]) : s_old + inc[mt][nt][r];
          S[mt][nt][r] = first_bad[col] < kChunk ? __int_as_float(0x7fc00000) : updated;
        }
      }
    }
    // Prefix-cache checkpoint at this chunk's end (checkpoint_every is a multiple of 64).
    const int64_t end = chunk * kChunk + kChunk < seq.length ? chunk * kChunk + kChunk : seq.length;
    // Checkpoints are counted in the sequence's own tokens: min(C, length / every) of them.
    const int64_t own = seq.length / p.checkpoint_every < p.checkpoint_count ? seq.length / p.checkpoint_every
                                                                             : p.checkpoint_count;
    if (p.checkpoints_written > 0 && end % p.checkpoint_every == 0 && end / p.checkpoint_every <= own) {
      state_t* dst = static_cast<state_t*>(p.checkpoints) +
                     ((int64_t(blockIdx.z) * p.checkpoint_count + end / p.checkpoint_every - 1) * p.heads + h) * kKeyDim *
                         kKeyDim +
                     col0;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int row = warp * 32 + mt * 16 + g + (r / 2) * 8, col = nt * 8 + tig * 2 + (r % 2);
            dst[row * kKeyDim + col] = store_as<state_t>(S[mt][nt][r]);
          }
        }
      }
    }
    __syncthreads();  // this stage and the state pieces are rewritten next chunk
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = warp * 32 + mt * 16 + g + (r / 2) * 8, col = nt * 8 + tig * 2 + (r % 2);
        state[row * kKeyDim + col] = store_as<state_t>(S[mt][nt][r]);
      }
    }
  }
#endif
}

}  // namespace

bool fused_prefill_supported(const at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const LightningDims& d, int64_t checkpoints_written,
                             int64_t checkpoint_every) noexcept {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, query.get_device()) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (major < 8 || d.key_dim != kKeyDim || d.value_dim != kKeyDim) return false;
  // The kernel needs sm_80 code (built from PTX of an older arch its body would be empty) and 137 KiB of
  // shared memory per block: sm_80 and sm_90 have it, sm_86 / sm_89 / sm_120 (99 KiB) take the ATen path.
  cudaFuncAttributes attributes{};
  int shared_optin = 0;
  const auto kernel = state.scalar_type() == at::kFloat ? fused_prefill_kernel<float>
                                                        : fused_prefill_kernel<__nv_bfloat16>;
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess ||
      cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, query.get_device()) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (attributes.ptxVersion < 80 || size_t(shared_optin) < kSharedBytes + attributes.sharedSizeBytes) return false;
  if (query.scalar_type() != at::kBFloat16 || key.scalar_type() != at::kBFloat16 ||
      value.scalar_type() != at::kBFloat16)
    return false;
  if ((state.scalar_type() != at::kFloat && state.scalar_type() != at::kBFloat16) || !state.is_contiguous())
    return false;
  if (checkpoints_written > 0 && checkpoint_every % kChunk != 0) return false;
  for (const at::Tensor* x : {&query, &key, &value}) {
    if (x->stride(3) != 1 || !aligned_to(static_cast<const char*>(x->const_data_ptr()), 16)) return false;
    for (int dim = 0; dim < 3; ++dim) {
      if (x->stride(dim) % 8 != 0 && x->size(dim) > 1) return false;  // 16-byte rows for cp.async
    }
  }
  return d.batch <= 65535 && d.heads <= 65535 && d.tokens <= INT_MAX && d.slots <= INT_MAX;
}

cudaError_t launch_fused_prefill(at::Tensor& state, at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& slopes_f, const int64_t* slots,
                                 const uint8_t* keep, void* checkpoints, int64_t checkpoint_count,
                                 int64_t checkpoints_written, int64_t checkpoint_every, const LightningDims& d,
                                 float scale, const int64_t* seq_bounds) noexcept {
  FusedParams p{};
  p.state = state.data_ptr();
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  p.query = reinterpret_cast<const __nv_bfloat16*>(query.const_data_ptr());
  p.key = reinterpret_cast<const __nv_bfloat16*>(key.const_data_ptr());
  p.value = reinterpret_cast<const __nv_bfloat16*>(value.const_data_ptr());
  p.slopes = slopes_f.const_data_ptr<float>();
  p.slots = slots;
  p.keep = keep;
  p.checkpoints = checkpoints;
  p.seq_bounds = seq_bounds;
  p.batch = d.batch, p.tokens = d.tokens, p.heads = d.heads, p.num_slots = d.slots;
  for (int dim = 0; dim < 3; ++dim) {
    p.q_stride[dim] = query.stride(dim), p.k_stride[dim] = key.stride(dim), p.v_stride[dim] = value.stride(dim);
  }
  p.checkpoint_count = checkpoint_count, p.checkpoints_written = checkpoints_written;
  p.checkpoint_every = checkpoint_every > 0 ? checkpoint_every : 1;
  p.scale = scale;
  const dim3 grid(kKeyDim / kTile, static_cast<unsigned>(d.heads), static_cast<unsigned>(d.batch));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto kernel) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSharedBytes));
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, kSharedBytes, stream>>>(p);
    return cudaGetLastError();
  };
  return state.scalar_type() == at::kFloat ? launch(fused_prefill_kernel<float>)
                                           : launch(fused_prefill_kernel<__nv_bfloat16>);
}

}  // namespace lightning_cache
