// concatenate_to_cache and write_to_cache on CUDA: one launch per call.
//
// Work unit: one token row r = (b, t) of the new block. Each block (256
// threads) takes rows r = blockIdx.x, blockIdx.x + gridDim.x, ...; per row it
// reads its pool row s = slots[b] (b without slot ids; -1 skips) and index[s]
// once, copies key[b, t] | value[b, t] into pool row s, cache column
// token_column(index[s], t) if the row is writable (16-byte vectors, 32-bit
// offsets inside the row), and, for concatenate_to_cache, writes mask row
// (b, i = t). There is one kernel, not one per (cache, input) dtype pair: the
// pair is a runtime switch per row around the small copy loop, so the mask
// code (most of the kernel) is compiled once, not once per dtype pair.
// The positions are advanced by the last block to finish (an atomic counter),
// after every block has read them: a grid cannot otherwise order its own reads
// before that write, and a second launch would cost a launch per call.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "../mask_rule.h"
#include "../quantize_rule.h"
#include "../validation.h"
#include "../write_plan_rule.h"
#include "launch_utils.cuh"
#include "launchers.h"

namespace lightning_cache {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 8;  // grid cap; rows beyond it are taken by a grid-stride loop
constexpr int kMaskChunk = 16;   // mask bytes per thread per pass: one 16-byte store

// "Last block advances the positions" counters, one slot per call in flight.
// A __device__ array: one copy per device, zero at module load, no allocation
// (so also nothing to do under CUDA graph capture). Each call takes the next
// slot round-robin and the last block resets it to 0 for its next user. Two
// calls only collide if they run at the same time on one device and are
// exactly a multiple of kCounterSlots calls apart (e.g. two CUDA graphs
// captured that far apart, replayed concurrently on different streams).
constexpr unsigned kCounterSlots = 1024;
__device__ unsigned int g_block_counters[kCounterSlots];

struct RowParams {
  void* kv;                                   // [B, L, H, Dk + Dv], contiguous
  const void* key;                            // [B, q, H, Dk], any strides
  const void* value;                          // [B, q, H, Dv], any strides
  int64_t* index;                             // [P]; read by every block, advanced by the last one
  const int64_t* slots;                       // [B] pool row of each batch row (-1: skip), or null: row b
  uint8_t* mask;                              // [B, 1, q, L] bools, or null (write_to_cache)
  int64_t batch, pool, new_tokens, capacity, rows;  // rows = B * q; pool = P
  int64_t width;                              // Dk + Dv: elements per head in the cache
  int heads, key_vecs, value_vecs;            // Dk / VEC, Dv / VEC
  ElemType cache_type, in_type;               // Float16, BFloat16, Float32 or Float64
  float* scales;                              // [P, L, H, 2] for int8 / fp8 codes, else null
  bool fp8;                                   // with scales: float8_e4m3fn codes, else int8
  bool wide;                                  // VEC = 16 bytes of cache elements, else 1
  int64_t key_stride[4], value_stride[4];     // elements
  bool key_dense, value_dense;                // unit last stride and every VEC-vector aligned to its full width
  bool ring;
  int64_t limit;   // position_limit: explicit causal mask's T, else no limit
  bool mask_wide;  // every mask row 16-byte aligned (L % 16 == 0)
  bool attn_wide;  // attention_mask is 1-byte, unit stride, rows 16-byte aligned
  unsigned counter_slot;
  MaskInputs mask_in;
  // Planned writes (block tables, packed batches): the host's WritePlan, on the device, as int64
  // [rows cells | write_rows index rows | write_rows starts | write_rows lengths]; null otherwise.
  const int64_t* plan;
  int64_t write_rows;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename cache_t, typename in_t>
__device__ __forceinline__ cache_t to_cache_type(in_t x) {
  if constexpr (std::is_same_v<cache_t, in_t>) {
    return x;  // exact, no float round trip (float64 and every other dtype)
  } else {
    // As ATen's casts: through float (double -> half/bfloat16 too).
    return static_cast<cache_t>(static_cast<float>(x));
  }
}

// Copies key[b, t] | value[b, t] (all heads) into cache cell `cell` (a row of
// key_value's first two dimensions flattened: slot * L + column, or page *
// page_size + page slot).
// Threads: x walks the VEC-vectors of one head, y walks heads.
template <typename cache_t, typename in_t, int VEC>
__device__ __forceinline__ void copy_token_row(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
  cache_t* dst_row = static_cast<cache_t*>(p.kv) + cell * p.heads * p.width;
  const in_t* key_tok = static_cast<const in_t*>(p.key) + b * p.key_stride[0] + t * p.key_stride[1];
  const in_t* value_tok = static_cast<const in_t*>(p.value) + b * p.value_stride[0] + t * p.value_stride[1];
  const int vecs = p.key_vecs + p.value_vecs;
  for (int h = threadIdx.y; h < p.heads; h += blockDim.y) {
    cache_t* dst = dst_row + h * p.width;
    const in_t* k = key_tok + h * p.key_stride[2];
    const in_t* v = value_tok + h * p.value_stride[2];
    for (int x = threadIdx.x; x < vecs; x += blockDim.x) {
      const bool is_key = x < p.key_vecs;
      const int e = (is_key ? x : x - p.key_vecs) * VEC;  // element inside the key (or value) head row
      const in_t* src = is_key ? k : v;
      Vec<cache_t, VEC> out;
      if (is_key ? p.key_dense : p.value_dense) {
        // Wide load (one or more 16-byte loads), converted in registers.
        const Vec<in_t, VEC> raw = *reinterpret_cast<const Vec<in_t, VEC>*>(src + e);
#pragma unroll
        for (int u = 0; u < VEC; ++u) out.v[u] = to_cache_type<cache_t, in_t>(raw.v[u]);
      } else {
        const int64_t step = is_key ? p.key_stride[3] : p.value_stride[3];
        const in_t* s = src + e * step;
#pragma unroll
        for (int u = 0; u < VEC; ++u) out.v[u] = to_cache_type<cache_t, in_t>(s[u * step]);
      }
      *reinterpret_cast<Vec<cache_t, VEC>*>(dst + x * VEC) = out;
    }
  }
}

// ---------------------------------------------------------------- mask rows
// A chunk is 16 mask bytes held as four little-endian words, built with
// shifts (explicit byte packing: no bool[16] / uint4 union pun).

// 0x01 in each of the first n bytes (n clamped to [0, 4]), 0 in the rest.
__device__ __forceinline__ uint32_t first_bytes(int n) {
  return n <= 0 ? 0u : n >= 4 ? 0x01010101u : 0x01010101u & ((1u << (8 * n)) - 1u);
}

// 0x01 in each byte of x that is nonzero, 0 elsewhere (no carry crosses a byte).
__device__ __forceinline__ uint32_t nonzero_bytes(uint32_t x) {
  return ((((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x) >> 7) & 0x01010101u;
}

__device__ __forceinline__ void store_chunk(uint8_t* row, int c, const uint32_t (&w)[4], int capacity, bool wide) {
  if (wide) {  // L % 16 == 0 and an aligned row: the chunk is whole
    *reinterpret_cast<uint4*>(row + c * kMaskChunk) = make_uint4(w[0], w[1], w[2], w[3]);
    return;
  }
#pragma unroll
  for (int u = 0; u < kMaskChunk; ++u) {
    const int j = c * kMaskChunk + u;
    if (j < capacity) row[j] = static_cast<uint8_t>((w[u / 4] >> (8 * (u % 4))) & 0xffu);
  }
}

// "nonzero" for each attention-mask element type (mask_rule.h's nonzero_at, typed).
template <typename T>
__device__ __forceinline__ bool nonzero(T x) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    return (x & 0x7fffu) != 0;  // float16 / bfloat16 bits: zero iff all but the sign bit are clear
  } else {
    return x != T(0);
  }
}

// Prefix-shaped row with an attention mask of element type T (any strides):
// mask[j] = j < limit && attn[j] != 0, the limit applied before the load.
template <typename T>
__device__ __forceinline__ void typed_prefix_row(uint8_t* row, const void* attn_row, int64_t stride_j, int limit,
                                                 int capacity, bool wide) {
  const T* a = static_cast<const T*>(attn_row);
  const int chunks = (capacity + kMaskChunk - 1) / kMaskChunk;
  for (int c = threadIdx.y * blockDim.x + threadIdx.x; c < chunks; c += blockDim.x * blockDim.y) {
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int u = 0; u < kMaskChunk; ++u) {
      const int j = c * kMaskChunk + u;
      if (j < limit && nonzero<T>(a[j * stride_j])) w[u / 4] |= 1u << (8 * (u % 4));
    }
    store_chunk(row, c, w, capacity, wide);
  }
}

// Writes mask row (b, i) of a block whose row b starts at `start`. Compiled
// once (not per K/V dtype). Rows in the no-ring, no-explicit-causal, no
// token-type case are a prefix rule (mask_rule.h prefix_limit): the limit is
// computed once per row and bool/uint8 attention masks are read 16 bytes at a
// time; everything else goes through the generic mask_value per column.
__device__ __forceinline__ void write_mask_row(const RowParams* params, int64_t b, int64_t i, int64_t start,
                                               bool writable) {
  const RowParams& p = *params;
  const MaskInputs& in = p.mask_in;
  const int capacity = static_cast<int>(p.capacity);  // host-checked to fit with room for a chunk
  uint8_t* row = p.mask + (b * p.new_tokens + i) * p.capacity;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int threads = blockDim.x * blockDim.y;
  const int chunks = (capacity + kMaskChunk - 1) / kMaskChunk;
  // A skipped row is all false: the prefix rule with limit 0 and no attention mask.
  const int64_t rule_limit = writable ? prefix_limit(in, i, start) : 0;

  if (rule_limit < 0) {  // ring, explicit causal mask or token types
    for (int c = tid; c < chunks; c += threads) {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int u = 0; u < kMaskChunk; ++u) {
        const int j = c * kMaskChunk + u;
        if (j < capacity && mask_value(in, b, i, j, start)) w[u / 4] |= 1u << (8 * (u % 4));
      }
      store_chunk(row, c, w, capacity, p.mask_wide);
    }
    return;
  }

  const int limit = static_cast<int>(rule_limit < p.capacity ? rule_limit : p.capacity);
  if (!writable || in.attn == nullptr) {
    for (int c = tid; c < chunks; c += threads) {
      const int n = limit - c * kMaskChunk;  // bytes of this chunk below the limit
      const uint32_t w[4] = {first_bytes(n), first_bytes(n - 4), first_bytes(n - 8), first_bytes(n - 12)};
      store_chunk(row, c, w, capacity, p.mask_wide);
    }
    return;
  }

  const int64_t attn_offset = b * in.attn_stride_b + i * in.attn_stride_i;  // elements
  if (p.attn_wide) {  // 1-byte elements, unit stride, 16-byte aligned rows, L % 16 == 0
    const uint8_t* attn_row = static_cast<const uint8_t*>(in.attn) + attn_offset;
    for (int c = tid; c < chunks; c += threads) {
      const int n = limit - c * kMaskChunk;
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (n > 0) {  // chunks past the limit are all false: no load
        const uint4 a = *reinterpret_cast<const uint4*>(attn_row + c * kMaskChunk);
        w[0] = nonzero_bytes(a.x) & first_bytes(n);
        w[1] = nonzero_bytes(a.y) & first_bytes(n - 4);
        w[2] = nonzero_bytes(a.z) & first_bytes(n - 8);
        w[3] = nonzero_bytes(a.w) & first_bytes(n - 12);
      }
      store_chunk(row, c, w, capacity, p.mask_wide);
    }
    return;
  }
  switch (in.attn_type) {  // one switch per row, not per byte
    case ElemType::Bool:
    case ElemType::UInt8:
    case ElemType::Int8:
      typed_prefix_row<uint8_t>(row, static_cast<const uint8_t*>(in.attn) + attn_offset, in.attn_stride_j, limit,
                                capacity, p.mask_wide);
      break;
    case ElemType::Int16:
      typed_prefix_row<int16_t>(row, static_cast<const int16_t*>(in.attn) + attn_offset, in.attn_stride_j, limit,
                                capacity, p.mask_wide);
      break;
    case ElemType::Int32:
      typed_prefix_row<int32_t>(row, static_cast<const int32_t*>(in.attn) + attn_offset, in.attn_stride_j, limit,
                                capacity, p.mask_wide);
      break;
    case ElemType::Int64:
      typed_prefix_row<int64_t>(row, static_cast<const int64_t*>(in.attn) + attn_offset, in.attn_stride_j, limit,
                                capacity, p.mask_wide);
      break;
    case ElemType::Float16:
    case ElemType::BFloat16:
      typed_prefix_row<uint16_t>(row, static_cast<const uint16_t*>(in.attn) + attn_offset, in.attn_stride_j, limit,
                                 capacity, p.mask_wide);
      break;
    case ElemType::Float32:
      typed_prefix_row<float>(row, static_cast<const float*>(in.attn) + attn_offset, in.attn_stride_j, limit, capacity,
                              p.mask_wide);
      break;
    case ElemType::Float64:
      typed_prefix_row<double>(row, static_cast<const double*>(in.attn) + attn_offset, in.attn_stride_j, limit,
                               capacity, p.mask_wide);
      break;
  }
}

// The pool row batch row b writes, or -1 (skipped). Prepared slot ids are in
// [-1, P) and distinct; the range test is a guard, not a second rule.
__device__ __forceinline__ int64_t pool_row(const RowParams& p, int64_t b) {
  if (p.slots == nullptr) return b;
  const int64_t slot = p.slots[b];
  return slot >= 0 && slot < p.pool ? slot : -1;
}

// Called by every block once it is done with its rows: the last block to get
// here advances the positions of the writable rows and resets the counter.
__device__ __forceinline__ void advance_positions_if_last(const RowParams& p, int tid) {
  __shared__ bool is_last;
  __syncthreads();  // every thread of this block has finished with index
  if (tid == 0) {
    __threadfence();
    const unsigned done = atomicAdd(&g_block_counters[p.counter_slot], 1u);
    is_last = done == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int64_t b = tid; b < p.batch; b += blockDim.x * blockDim.y) {
    const int64_t slot = pool_row(p, b);
    if (slot < 0) continue;
    const int64_t start = p.index[slot];
    if (row_writable(start, p.new_tokens, p.capacity, p.ring, p.limit)) p.index[slot] = start + p.new_tokens;
  }
  if (tid == 0) g_block_counters[p.counter_slot] = 0u;  // ready for the next call on this slot
}

template <typename cache_t, typename in_t>
__device__ __forceinline__ void copy_token_row_as(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
  constexpr int kWide = static_cast<int>(16 / sizeof(cache_t));
  if (p.wide) {
    copy_token_row<cache_t, in_t, kWide>(p, b, t, cell);
  } else {
    copy_token_row<cache_t, in_t, 1>(p, b, t, cell);
  }
}

template <typename cache_t>
__device__ __forceinline__ void copy_token_row_to(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
  switch (p.in_type) {
    case ElemType::Float16: copy_token_row_as<cache_t, c10::Half>(p, b, t, cell); break;
    case ElemType::BFloat16: copy_token_row_as<cache_t, c10::BFloat16>(p, b, t, cell); break;
    case ElemType::Float32: copy_token_row_as<cache_t, float>(p, b, t, cell); break;
    default: copy_token_row_as<cache_t, double>(p, b, t, cell); break;  // Float64 (validated)
  }
}

// The dtype pair is uniform over the grid: the switches cost a few
// instructions per row, and each arm is a plain vector loop.
__device__ __forceinline__ void copy_token_row_any(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
  switch (p.cache_type) {
    case ElemType::Float16: copy_token_row_to<c10::Half>(p, b, t, cell); break;
    case ElemType::BFloat16: copy_token_row_to<c10::BFloat16>(p, b, t, cell); break;
    case ElemType::Float32: copy_token_row_to<float>(p, b, t, cell); break;
    default: copy_token_row_to<double>(p, b, t, cell); break;  // Float64 (validated)
  }
}

// Quantized storage: the token's key and value heads become codes and one
// scale each (quantize_rule.h). The x-threads of one head (blockDim.x, a power
// of two <= 32, so they share a warp) reduce its amax with shuffles.
template <typename code_t, typename in_t>
__device__ __forceinline__ void quantize_token_row(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
  code_t* dst_row = static_cast<code_t*>(p.kv) + cell * p.heads * p.width;
  float* scale_row = p.scales + cell * p.heads * 2;
  const in_t* key_tok = static_cast<const in_t*>(p.key) + b * p.key_stride[0] + t * p.key_stride[1];
  const in_t* value_tok = static_cast<const in_t*>(p.value) + b * p.value_stride[0] + t * p.value_stride[1];
  const int lanes = blockDim.x;
  const int lane_in_warp = (threadIdx.y * blockDim.x + threadIdx.x) % 32;
  const unsigned group = lanes >= 32 ? 0xffffffffu : ((1u << lanes) - 1u) << (lane_in_warp & ~(lanes - 1));
  const int64_t key_dim = p.key_vecs, value_dim = p.value_vecs;  // VEC = 1 for quantized storage
  for (int h = threadIdx.y; h < p.heads; h += blockDim.y) {  // uniform over the head's x-threads
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const in_t* src = part == 0 ? key_tok + h * p.key_stride[2] : value_tok + h * p.value_stride[2];
      const int64_t step = part == 0 ? p.key_stride[3] : p.value_stride[3];
      const int64_t dim = part == 0 ? key_dim : value_dim;
      code_t* dst = dst_row + h * p.width + (part == 0 ? 0 : key_dim);
      float amax = 0.0f;
      for (int64_t e = threadIdx.x; e < dim; e += lanes) amax = amax_step(amax, static_cast<float>(src[e * step]));
      for (int offset = lanes / 2; offset > 0; offset /= 2) {
        amax = fmaxf(amax, __shfl_xor_sync(group, amax, offset, lanes));
      }
      const float scale = kv_scale(amax, code_max<code_t>());
      for (int64_t e = threadIdx.x; e < dim; e += lanes) {
        dst[e] = quantize_code<code_t>(static_cast<float>(src[e * step]), scale);
      }
      if (threadIdx.x == 0) scale_row[h * 2 + part] = scale;
    }
  }
}

template <typename code_t>
__device__ __forceinline__ void quantize_token_row_to(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
  switch (p.in_type) {
    case ElemType::Float16: quantize_token_row<code_t, c10::Half>(p, b, t, cell); break;
    case ElemType::BFloat16: quantize_token_row<code_t, c10::BFloat16>(p, b, t, cell); break;
    case ElemType::Float32: quantize_token_row<code_t, float>(p, b, t, cell); break;
    default: quantize_token_row<code_t, double>(p, b, t, cell); break;  // Float64 (validated)
  }
}

// The token copies of one row, into cell `cell`, for the storage of the call.
__device__ __forceinline__ void write_token(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
  if (p.scales == nullptr) {
    copy_token_row_any(p, b, t, cell);
  } else if (p.fp8) {
    quantize_token_row_to<c10::Float8_e4m3fn>(p, b, t, cell);
  } else {
    quantize_token_row_to<int8_t>(p, b, t, cell);
  }
}

// How the kernel writes a token, chosen on the host. One kernel that switches over every (cache,
// input) dtype pair and quantized storage inside (AnyStorage) needs more registers than the
// copy of one pair: at the 64 of __launch_bounds__(256, 4) it spilled 548 bytes, with reloads
// inside the copy loop. What serving uses (input dtype = cache dtype; int8 / fp8 codes from
// 16- and 32-bit floats) gets kernels of its own, as do calls without a mask (write_to_cache).
struct AnyStorage {
  __device__ __forceinline__ static void write(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
    write_token(p, b, t, cell);
  }
};

template <typename T>
struct SameType {  // cache and input of dtype T, no quantization
  __device__ __forceinline__ static void write(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
    copy_token_row_as<T, T>(p, b, t, cell);
  }
};

template <typename code_t, typename in_t>
struct Quantized {  // int8 / fp8 codes and scales from inputs of dtype in_t
  __device__ __forceinline__ static void write(const RowParams& p, int64_t b, int64_t t, int64_t cell) {
    quantize_token_row<code_t, in_t>(p, b, t, cell);
  }
};

// Planned writes: every cell, start and skip was decided on the host (plan_writes, the one rule
// for these layouts), so no block reads `index` and block 0 can store the new positions.
template <typename Storage, bool kMask>
__device__ __forceinline__ void planned_rows(const RowParams& p, int tid) {
  const int64_t* write_row = p.plan + p.rows;
  const int64_t* write_start = write_row + p.write_rows;
  const int64_t* write_length = write_start + p.write_rows;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const int64_t b = r / p.new_tokens, t = r - b * p.new_tokens;
    const int64_t cell = p.plan[r];
    if (cell >= 0) Storage::write(p, b, t, cell);
    if (kMask) write_mask_row(&p, b, t, write_start[b], write_row[b] >= 0);  // never packed
  }
  if (blockIdx.x != 0) return;
  for (int64_t w = tid; w < p.write_rows; w += blockDim.x * blockDim.y) {
    if (write_row[w] >= 0) p.index[write_row[w]] = write_start[w] + write_length[w];  // distinct rows
  }
}

// kMask: p.mask != nullptr (concatenate_to_cache).
template <typename Storage, bool kMask>
__global__ void __launch_bounds__(kThreads, 4) write_rows_kernel(const __grid_constant__ RowParams p) {
  __shared__ int64_t row_slot, row_start;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  if (p.plan != nullptr) {  // uniform over the grid
    planned_rows<Storage, kMask>(p, tid);
    return;
  }
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const int64_t b = r / p.new_tokens, t = r - b * p.new_tokens;
    if (tid == 0) {  // once per row; the values, not the addresses, are shared
      row_slot = pool_row(p, b);
      row_start = row_slot >= 0 ? p.index[row_slot] : -1;
    }
    __syncthreads();
    const int64_t slot = row_slot, start = row_start;
    const bool writable = slot >= 0 && row_writable(start, p.new_tokens, p.capacity, p.ring, p.limit);
    if (writable) Storage::write(p, b, t, slot * p.capacity + token_column(start, t, p.capacity, p.ring));
    if (kMask) write_mask_row(&p, b, t, start, writable);
    __syncthreads();  // row_start is overwritten for the next row
  }
  advance_positions_if_last(p, tid);
}

// Strides of size-1 dims never move a pointer: ignore them.
bool dims_aligned(const at::Tensor& t, int64_t elems) {
  for (int k = 0; k < t.dim() - 1; ++k) {
    if (t.size(k) != 1 && t.stride(k) % elems != 0) return false;
  }
  return true;
}

ElemType float_elem_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return ElemType::Float16;
    case at::kBFloat16: return ElemType::BFloat16;
    case at::kFloat: return ElemType::Float32;
    default: return ElemType::Float64;  // validated: floating point
  }
}

// Fills the parts of RowParams every call shares and launches the kernel for
// the (cache, input) dtype pair. `mask` is null for write_to_cache.
// __syncthreads for write_plan_rule.h's phases (host-device so the template instantiates cleanly).
struct BlockBarrier {
  C10_HOST_DEVICE void operator()() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

constexpr int kPlanThreads = 512;

__global__ void __launch_bounds__(kPlanThreads) plan_paged_writes_kernel(const __grid_constant__ PagedWritePlanArgs a) {
  plan_paged_writes(a, threadIdx.x, blockDim.x, BlockBarrier{});
}

}  // namespace

cudaError_t launch_plan_paged_writes(const PagedWritePlanArgs& args) noexcept {
  plan_paged_writes_kernel<<<1, kPlanThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_write_rows(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key,
                              const at::Tensor& value, const int64_t* slots, float* scales, const KVCacheDims& d,
                              bool ring, const MaskInputs& mask_in, bool* mask, const int64_t* plan,
                              int64_t write_rows) noexcept {
  static std::atomic<unsigned> next_slot{0};
  RowParams p{};
  p.kv = key_value.data_ptr();
  p.key = key.const_data_ptr();
  p.value = value.const_data_ptr();
  p.index = index.data_ptr<int64_t>();
  p.slots = slots;
  p.scales = scales;
  p.fp8 = key_value.scalar_type() == at::kFloat8_e4m3fn;
  p.mask = reinterpret_cast<uint8_t*>(mask);
  p.batch = d.batch;
  p.pool = d.pool;
  p.new_tokens = d.new_tokens;
  p.capacity = d.capacity;
  p.rows = (d.packed ? 1 : d.batch) * d.new_tokens;  // tokens of key: [B, q] or packed [1, T]
  p.plan = plan;
  p.write_rows = write_rows;
  p.width = d.key_dim + d.value_dim;
  p.heads = static_cast<int>(d.heads);
  for (int k = 0; k < 4; ++k) {
    p.key_stride[k] = key.stride(k);
    p.value_stride[k] = value.stride(k);
  }
  p.ring = ring;
  p.limit = position_limit(mask_in);
  p.mask_wide = mask != nullptr && d.capacity % kMaskChunk == 0 && aligned_to(mask, kMaskChunk);
  const bool byte_attn = mask_in.attn_type == ElemType::Bool || mask_in.attn_type == ElemType::UInt8 ||
                         mask_in.attn_type == ElemType::Int8;
  p.attn_wide = mask_in.attn != nullptr && byte_attn && mask_in.attn_stride_j == 1 && d.capacity % kMaskChunk == 0 &&
                aligned_to(mask_in.attn, kMaskChunk) && (d.batch == 1 || mask_in.attn_stride_b % kMaskChunk == 0) &&
                (d.new_tokens == 1 || mask_in.attn_stride_i % kMaskChunk == 0);
  p.counter_slot = next_slot.fetch_add(1, std::memory_order_relaxed) % kCounterSlots;
  p.mask_in = mask_in;
  if (p.rows == 0) return cudaSuccess;  // never a zero-sized grid

  // Copy vectors: 16 bytes of cache elements when both head dims allow it.
  p.cache_type = float_elem_type(key_value.scalar_type());
  p.in_type = float_elem_type(key.scalar_type());
  const int64_t wide_elems = 16 / key_value.element_size();
  // Quantized storage is written element by element (VEC = 1): each head needs its amax first.
  p.wide = scales == nullptr && d.key_dim % wide_elems == 0 && d.value_dim % wide_elems == 0 && aligned_to(p.kv, 16);
  const int64_t vec = p.wide ? wide_elems : 1;
  p.key_vecs = static_cast<int>(d.key_dim / vec);
  p.value_vecs = static_cast<int>(d.value_dim / vec);
  // Dense: unit last stride and every vector aligned to its full width in the input dtype.
  auto dense = [&](const at::Tensor& t) {
    return (t.size(3) <= 1 || t.stride(3) == 1) && dims_aligned(t, vec) &&
           aligned_to(t.const_data_ptr(), static_cast<size_t>(vec * t.element_size()));
  };
  p.key_dense = dense(key);
  p.value_dense = dense(value);

  // x threads per head: the power of two covering a head's vectors, at most a warp.
  int tx = 1;
  while (tx < 32 && tx < p.key_vecs + p.value_vecs) tx *= 2;
  const dim3 block(tx, kThreads / tx);
  const int64_t blocks =
      std::min<int64_t>(p.rows, int64_t(multiprocessor_count(key_value.get_device())) * kBlocksPerSM);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto storage) {
    using Storage = decltype(storage);
    if (p.mask != nullptr) {
      write_rows_kernel<Storage, true><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
    } else {
      write_rows_kernel<Storage, false><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
    }
    return cudaGetLastError();
  };
  if (p.scales == nullptr && p.cache_type == p.in_type) {
    switch (p.cache_type) {
      case ElemType::BFloat16: return launch(SameType<c10::BFloat16>{});
      case ElemType::Float16: return launch(SameType<c10::Half>{});
      case ElemType::Float32: return launch(SameType<float>{});
      default: break;  // float64: the general kernel
    }
  }
  if (p.scales != nullptr) {
    auto quantized = [&](auto code) {
      using code_t = decltype(code);
      switch (p.in_type) {
        case ElemType::BFloat16: return launch(Quantized<code_t, c10::BFloat16>{});
        case ElemType::Float16: return launch(Quantized<code_t, c10::Half>{});
        case ElemType::Float32: return launch(Quantized<code_t, float>{});
        default: return launch(AnyStorage{});  // float64 inputs
      }
    };
    return p.fp8 ? quantized(c10::Float8_e4m3fn{}) : quantized(int8_t{});
  }
  return launch(AnyStorage{});
}

}  // namespace lightning_cache
