// concatenate_to_cache on CUDA: one kernel writes the new K|V rows and the
// mask; a second, one-thread-per-row kernel advances the positions once every
// block has read them (a grid cannot order its own reads before that write).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../mask_rule.h"
#include "../validation.h"
#include "host_checks.cuh"

namespace lightning_cache {
namespace {

constexpr int kThreads = 256;
constexpr int kMaskBytesPerThread = 16;

struct CopyShape {
  int64_t batch, new_tokens, heads, key_dim, value_dim, capacity;
  // element strides of key and value [B, q, H, D]
  int64_t key_stride[4], value_stride[4];
};

// One vector of VEC consecutive elements of one head row. The row is either
// all key (e < Dk) or all value, since Dk and Dv are multiples of VEC.
template <typename cache_t, typename in_t, int VEC>
__device__ __forceinline__ void copy_vector(cache_t* __restrict__ kv, const in_t* __restrict__ key,
                                            const in_t* __restrict__ value, const CopyShape& s,
                                            const int64_t* __restrict__ index, bool ring, int64_t limit,
                                            int64_t vec_id) {
  const int64_t width = s.key_dim + s.value_dim;
  const int64_t vecs_per_head = width / VEC;
  const int64_t e = (vec_id % vecs_per_head) * VEC;
  int64_t rest = vec_id / vecs_per_head;
  const int64_t h = rest % s.heads;
  rest /= s.heads;
  const int64_t t = rest % s.new_tokens;
  const int64_t b = rest / s.new_tokens;
  const int64_t start = index[b];
  if (!row_writable(start, s.new_tokens, s.capacity, ring, limit)) return;
  const int64_t column = token_column(start, t, s.capacity, ring);

  const bool is_key = e < s.key_dim;
  const in_t* src = is_key ? key + b * s.key_stride[0] + t * s.key_stride[1] + h * s.key_stride[2] + e * s.key_stride[3]
                           : value + b * s.value_stride[0] + t * s.value_stride[1] + h * s.value_stride[2] +
                                 (e - s.key_dim) * s.value_stride[3];
  const int64_t src_step = is_key ? s.key_stride[3] : s.value_stride[3];
  struct alignas(sizeof(cache_t) * VEC) Pack {
    cache_t v[VEC];
  } out;
  if constexpr (std::is_same_v<cache_t, in_t>) {
    if (src_step == 1 && reinterpret_cast<uintptr_t>(src) % sizeof(Pack) == 0) {
      out = *reinterpret_cast<const Pack*>(src);  // one wide load (dense, aligned source)
    } else {
#pragma unroll
      for (int u = 0; u < VEC; ++u) out.v[u] = src[u * src_step];  // exact: no float32 round trip
    }
  } else {
#pragma unroll
    for (int u = 0; u < VEC; ++u) out.v[u] = static_cast<cache_t>(static_cast<float>(src[u * src_step]));
  }
  *reinterpret_cast<Pack*>(kv + ((b * s.capacity + column) * s.heads + h) * width + e) = out;
}

template <typename cache_t, typename in_t, int VEC>
__global__ void concatenate_kernel(cache_t* __restrict__ kv, const in_t* __restrict__ key,
                                   const in_t* __restrict__ value, CopyShape shape, const int64_t* __restrict__ index,
                                   MaskInputs mask_in, bool* __restrict__ mask, int64_t copy_vectors,
                                   int64_t copy_blocks) {
  if (blockIdx.x < copy_blocks) {
    // K|V part: consecutive threads write consecutive vectors of a token row.
    for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < copy_vectors;
         v += copy_blocks * int64_t(blockDim.x)) {
      copy_vector<cache_t, in_t, VEC>(kv, key, value, shape, index, mask_in.ring, position_limit(mask_in), v);
    }
    return;
  }
  // Mask part: each thread fills up to 16 consecutive columns of one row.
  const int64_t chunks_per_row = (shape.capacity + kMaskBytesPerThread - 1) / kMaskBytesPerThread;
  const int64_t chunk = (blockIdx.x - copy_blocks) * int64_t(blockDim.x) + threadIdx.x;
  if (chunk >= shape.batch * shape.new_tokens * chunks_per_row) return;
  const int64_t bi = chunk / chunks_per_row;
  const int64_t b = bi / shape.new_tokens, i = bi % shape.new_tokens;
  const int64_t j0 = (chunk % chunks_per_row) * kMaskBytesPerThread;
  const int64_t start = index[b];
  const bool writable = row_writable(start, shape.new_tokens, shape.capacity, mask_in.ring, position_limit(mask_in));
  bool* row = mask + bi * shape.capacity;
  if (j0 + kMaskBytesPerThread <= shape.capacity && shape.capacity % kMaskBytesPerThread == 0) {
    // Whole, aligned 16-byte chunk: one wide store.
    union {
      uint4 word;
      bool bytes[kMaskBytesPerThread];
    } out;
#pragma unroll
    for (int u = 0; u < kMaskBytesPerThread; ++u) out.bytes[u] = writable && mask_value(mask_in, b, i, j0 + u, start);
    *reinterpret_cast<uint4*>(row + j0) = out.word;
  } else {
    for (int64_t j = j0; j < j0 + kMaskBytesPerThread && j < shape.capacity; ++j) {
      row[j] = writable && mask_value(mask_in, b, i, j, start);
    }
  }
}

__global__ void advance_positions_kernel(int64_t* __restrict__ index, int64_t batch, int64_t new_tokens,
                                         int64_t capacity, bool ring, int64_t limit) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b < batch && row_writable(index[b], new_tokens, capacity, ring, limit)) index[b] += new_tokens;
}

template <typename T>
bool aligned(const T* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename cache_t, typename in_t>
void launch(at::Tensor& key_value, const at::Tensor& index, const at::Tensor& key, const at::Tensor& value,
            const KVCacheDims& d, const MaskInputs& mask_in, at::Tensor& mask) {
  CopyShape s{d.batch, d.new_tokens, d.heads, d.key_dim, d.value_dim, d.capacity, {}, {}};
  for (int k = 0; k < 4; ++k) {
    s.key_stride[k] = key.stride(k);
    s.value_stride[k] = value.stride(k);
  }
  cache_t* kv = key_value.data_ptr<cache_t>();
  const in_t* k_ptr = key.const_data_ptr<in_t>();
  const in_t* v_ptr = value.const_data_ptr<in_t>();
  const int64_t width = d.key_dim + d.value_dim;
  // Widest store (up to 16 bytes) that divides both head dims.
  constexpr int kWide = 16 / sizeof(cache_t) > 0 ? 16 / sizeof(cache_t) : 1;
  const bool wide_ok = d.key_dim % kWide == 0 && d.value_dim % kWide == 0 && aligned(kv, 16);
  const int vec =
      wide_ok ? kWide : (d.key_dim % 2 == 0 && d.value_dim % 2 == 0 && aligned(kv, 2 * sizeof(cache_t)) ? 2 : 1);
  const int64_t copy_vectors = d.batch * d.new_tokens * d.heads * width / vec;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, key_value.get_device()));
  const int max_blocks = sm_count * 8;
  const int64_t copy_blocks = std::min<int64_t>((copy_vectors + kThreads - 1) / kThreads, max_blocks);
  const int64_t mask_chunks = d.batch * d.new_tokens * ((d.capacity + kMaskBytesPerThread - 1) / kMaskBytesPerThread);
  const int64_t mask_blocks = (mask_chunks + kThreads - 1) / kThreads;
  const int64_t blocks = copy_blocks + mask_blocks;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "concatenate_to_cache: problem too large for one launch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* positions = index.const_data_ptr<int64_t>();
  bool* mask_ptr = mask.data_ptr<bool>();
#define LIGHTNING_CACHE_LAUNCH(VEC)                                                               \
  concatenate_kernel<cache_t, in_t, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>( \
      kv, k_ptr, v_ptr, s, positions, mask_in, mask_ptr, copy_vectors, copy_blocks)
  if (vec == kWide) {
    LIGHTNING_CACHE_LAUNCH(kWide);
  } else if (vec == 2) {
    LIGHTNING_CACHE_LAUNCH(2);
  } else {
    LIGHTNING_CACHE_LAUNCH(1);
  }
#undef LIGHTNING_CACHE_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor concatenate_to_cache_cuda(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key,
                                     const at::Tensor& value, const std::optional<at::Tensor>& attention_mask,
                                     const std::optional<at::Tensor>& causal_mask,
                                     const std::optional<at::Tensor>& token_type_ids, bool is_causal, bool ring,
                                     bool check_bounds) {
  const KVCacheDims d = check_concatenate_args(key_value, index, key, value, attention_mask, causal_mask,
                                               token_type_ids, is_causal, ring);
  const c10::cuda::CUDAGuard guard(key_value.device());
  if (host_checks_allowed(check_bounds)) check_positions(index, d, ring, causal_mask);

  at::Tensor mask = at::empty({d.batch, 1, d.new_tokens, d.capacity}, key_value.options().dtype(at::kBool));
  const MaskInputs mask_in = make_mask_inputs(d, attention_mask, causal_mask, token_type_ids, is_causal, ring);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key_value.scalar_type(), "concatenate_to_cache_cuda", [&] {
    using cache_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "concatenate_to_cache_cuda_in",
                                    [&] { launch<cache_t, scalar_t>(key_value, index, key, value, d, mask_in, mask); });
  });
  const int threads = 128;
  advance_positions_kernel<<<static_cast<unsigned>((d.batch + threads - 1) / threads), threads, 0,
                             c10::cuda::getCurrentCUDAStream()>>>(index.data_ptr<int64_t>(), d.batch, d.new_tokens,
                                                                  d.capacity, ring, position_limit(mask_in));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_cache, CUDA, m) {
  m.impl("concatenate_to_cache", &concatenate_to_cache_cuda);
}

}  // namespace lightning_cache
