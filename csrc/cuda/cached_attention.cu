// cached_attention on CUDA, flash-decoding style.
//
// Pass 1: one block per (batch row, cache head, split of the columns). Its
// query rows are the (query token, query head of the head's group) pairs,
// taken kRows at a time; each of the block's warps walks every kWarps-th
// column of the split, a lane holding DPL consecutive key/value dims (coalesced
// loads of the stored codes, converted in registers), and keeps an online
// softmax per row (running max m, sum l, accumulator) in base 2. A quantized
// column's key scale multiplies the dot product and its value scale the
// weight. A column a row may not see is dropped by selection, so a non-finite
// value there never reaches the row. The warps' partials meet in shared
// memory; with one split the block writes the normalized output, otherwise
// (m, l, acc) per row go to a workspace and pass 2 combines the splits.
// Launchers are noexcept and return the launch status (see launchers.h).
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <climits>

#include "launch_utils.cuh"
#include "launchers.h"

namespace lightning_cache {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 8;  // query rows per pass over the columns
constexpr float kLog2e = 1.4426950408889634f;

struct AttnParams {
  const float* query;  // float32, strides below
  int64_t q_sb, q_si, q_sh, q_sd;
  const void* kv;  // codes; last dimension contiguous
  int64_t kv_sb, kv_sl, kv_sh;
  const float* scales;  // null for float caches
  int64_t sc_sb, sc_sl, sc_sh, sc_sc;
  const bool* mask;
  int64_t m_sb, m_si, m_sj;
  float* out;       // [B, q, Hq, Dv] float32, contiguous (written when splits == 1)
  float* part_acc;  // [B * H, splits, R, Dv] (splits > 1)
  float* part_ml;   // [B * H, splits, R, 2]
  int64_t batch, queries, query_heads, heads, group, capacity, key_dim, value_dim, rows, splits, chunk;
  float q_scale;  // softmax_scale * log2(e)
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Output offset of row r of (b, h): query i = r / G, query head h * G + r % G.
__device__ __forceinline__ int64_t out_row(const AttnParams& p, int64_t b, int64_t h, int64_t r) {
  const int64_t i = r / p.group, hq = h * p.group + r % p.group;
  return ((b * p.queries + i) * p.query_heads + hq) * p.value_dim;
}

template <typename T, int DPL>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const __grid_constant__ AttnParams p) {
  constexpr int kDims = 32 * DPL;
  __shared__ float m_sh[kWarps][kRows], l_sh[kWarps][kRows];
  __shared__ float acc_sh[kWarps][kRows][kDims];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t split = blockIdx.x % p.splits;
  const int64_t bh = blockIdx.x / p.splits;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t c_begin = split * p.chunk;
  const int64_t c_end = c_begin + p.chunk < p.capacity ? c_begin + p.chunk : p.capacity;
  const int64_t d0 = static_cast<int64_t>(lane) * DPL;  // this lane's first dim
  const T* kv_head = static_cast<const T*>(p.kv) + b * p.kv_sb + h * p.kv_sh;

  for (int64_t r0 = 0; r0 < p.rows; r0 += kRows) {
    const int nr = p.rows - r0 < kRows ? static_cast<int>(p.rows - r0) : kRows;
    float q[kRows][DPL], acc[kRows][DPL], m[kRows], l[kRows];
    const bool* mask_row[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;
      const int64_t row = r0 + (r < nr ? r : 0);
      const int64_t i = row / p.group, hq = h * p.group + row % p.group;
      const float* src = p.query + b * p.q_sb + i * p.q_si + hq * p.q_sh;
      mask_row[r] = p.mask + b * p.m_sb + i * p.m_si;
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        acc[r][e] = 0.0f;
        const int64_t d = d0 + e;
        q[r][e] = (r < nr && d < p.key_dim) ? src[d * p.q_sd] * p.q_scale : 0.0f;
      }
    }
    for (int64_t j = c_begin + warp; j < c_end; j += kWarps) {
      bool seen[kRows];
      bool any = false;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        seen[r] = r < nr && mask_row[r][j * p.m_sj];
        any |= seen[r];
      }
      if (!any) continue;  // uniform over the warp: every lane read the same bytes
      const T* col = kv_head + j * p.kv_sl;
      float kf[DPL], vf[DPL];
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        const int64_t d = d0 + e;
        kf[e] = d < p.key_dim ? to_float(col[d]) : 0.0f;
        vf[e] = d < p.value_dim ? to_float(col[p.key_dim + d]) : 0.0f;
      }
      float k_scale = 1.0f, v_scale = 1.0f;
      if (p.scales) {
        const float* sc = p.scales + b * p.sc_sb + j * p.sc_sl + h * p.sc_sh;
        k_scale = sc[0];
        v_scale = sc[p.sc_sc];
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (!seen[r]) continue;  // warp-uniform (depends on r and j only): padding and hidden rows cost nothing
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < DPL; ++e) dot = fmaf(q[r][e], kf[e], dot);
        dot = warp_sum(dot);  // every lane holds the row's score
        const float s = dot * k_scale;
        const float m_new = fmaxf(m[r], s);
        if (m_new == -INFINITY) continue;  // a -inf score before any finite one: weight 0 (and no -inf - -inf NaN)
        const float alpha = exp2f(m[r] - m_new);  // 0 while m was -inf
        const float w = exp2f(s - m_new);
        l[r] = l[r] * alpha + w;
        m[r] = m_new;
        const float wv = w * v_scale;
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[r][e] = fmaf(wv, vf[e], acc[r][e] * alpha);
      }
    }
    // The warps' partials meet in shared memory.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (lane == 0) {
        m_sh[warp][r] = m[r];
        l_sh[warp][r] = l[r];
      }
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc_sh[warp][r][lane * DPL + e] = acc[r][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nr * kDims; idx += kThreads) {
      const int r = idx / kDims, e = idx % kDims;
      if (e >= p.value_dim) continue;
      float mx = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_sh[w][r]);
      float total = 0.0f, a = 0.0f;
      if (mx != -INFINITY) {
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          if (m_sh[w][r] == -INFINITY) continue;  // that warp saw nothing: its partial is zero
          const float f = exp2f(m_sh[w][r] - mx);
          total += f * l_sh[w][r];
          a += f * acc_sh[w][r][e];
        }
      }
      const int64_t row = r0 + r;
      if (p.splits == 1) {
        if (e < p.value_dim) p.out[out_row(p, b, h, row) + e] = mx == -INFINITY ? 0.0f : a / total;
      } else {
        const int64_t part = (bh * p.splits + split) * p.rows + row;
        if (e < p.value_dim) p.part_acc[part * p.value_dim + e] = a;
        if (e == 0) {
          p.part_ml[part * 2] = mx;
          p.part_ml[part * 2 + 1] = total;
        }
      }
    }
    __syncthreads();  // shared memory is reused by the next row group
  }
}

// Pass 2: one block per (b, h, row) in a grid-stride loop, threads over Dv.
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(const __grid_constant__ AttnParams p) {
  const int64_t total_rows = p.batch * p.heads * p.rows;
  for (int64_t unit = blockIdx.x; unit < total_rows; unit += gridDim.x) {
    const int64_t bh = unit / p.rows, row = unit % p.rows;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    float mx = -INFINITY;
    for (int64_t s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.part_ml[((bh * p.splits + s) * p.rows + row) * 2]);
    float* dst = p.out + out_row(p, b, h, row);
    for (int64_t e = threadIdx.x; e < p.value_dim; e += blockDim.x) {
      float total = 0.0f, a = 0.0f;
      if (mx != -INFINITY) {
        for (int64_t s = 0; s < p.splits; ++s) {
          const int64_t part = (bh * p.splits + s) * p.rows + row;
          const float ms = p.part_ml[part * 2];
          if (ms == -INFINITY) continue;
          const float f = exp2f(ms - mx);
          total += f * p.part_ml[part * 2 + 1];
          a += f * p.part_acc[part * p.value_dim + e];
        }
      }
      dst[e] = mx == -INFINITY ? 0.0f : a / total;
    }
  }
}

template <typename T>
cudaError_t launch_for_type(const AttnParams& p, int dims_per_lane, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads * p.splits));
  switch (dims_per_lane) {
    case 1: attention_split_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: attention_split_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: attention_split_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p); break;
    default: attention_split_kernel<T, 8><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace

int64_t cached_attention_splits(const AttentionDims& d, int device) noexcept {
  const int64_t items = d.batch * d.heads;
  if (items <= 0) return 1;
  const int64_t target = 2 * static_cast<int64_t>(multiprocessor_count(device));
  int64_t splits = items >= target ? 1 : (target + items - 1) / items;
  // At least 256 columns per split, and a workspace of at most 2^26 floats.
  const int64_t by_length = (d.capacity + 255) / 256;
  const int64_t row_floats = items * d.group * d.queries * (d.value_dim + 2);
  const int64_t by_workspace = row_floats > 0 ? (int64_t(1) << 26) / row_floats : 1;
  splits = splits < by_length ? splits : by_length;
  splits = splits < by_workspace ? splits : by_workspace;
  return splits < 1 ? 1 : splits;
}

cudaError_t launch_cached_attention(at::Tensor& out, const at::Tensor& query_f, const at::Tensor& key_value,
                                    const at::Tensor& mask, const float* scales, const int64_t* scale_strides,
                                    const AttentionDims& d, int64_t splits, float* workspace) noexcept {
  if (d.batch * d.queries * d.query_heads == 0 || d.capacity == 0 || splits < 1) return cudaSuccess;
  AttnParams p{};
  p.query = static_cast<const float*>(query_f.const_data_ptr());
  p.q_sb = query_f.stride(0), p.q_si = query_f.stride(1), p.q_sh = query_f.stride(2), p.q_sd = query_f.stride(3);
  p.kv = key_value.const_data_ptr();
  p.kv_sb = key_value.stride(0), p.kv_sl = key_value.stride(1), p.kv_sh = key_value.stride(2);
  p.scales = scales;
  if (scales) {
    p.sc_sb = scale_strides[0], p.sc_sl = scale_strides[1], p.sc_sh = scale_strides[2], p.sc_sc = scale_strides[3];
  }
  p.mask = static_cast<const bool*>(mask.const_data_ptr());
  p.m_sb = mask.stride(0), p.m_si = mask.stride(2), p.m_sj = mask.stride(3);
  p.out = static_cast<float*>(out.data_ptr());
  p.batch = d.batch, p.queries = d.queries, p.query_heads = d.query_heads, p.heads = d.heads, p.group = d.group;
  p.capacity = d.capacity, p.key_dim = d.key_dim, p.value_dim = d.value_dim;
  p.rows = d.group * d.queries;
  p.splits = splits;
  p.chunk = (d.capacity + splits - 1) / splits;
  p.q_scale = d.softmax_scale * kLog2e;
  if (splits > 1) {
    p.part_acc = workspace;
    p.part_ml = workspace + d.batch * d.heads * splits * p.rows * d.value_dim;
  }
  const int64_t widest = d.key_dim > d.value_dim ? d.key_dim : d.value_dim;
  const int dims_per_lane = widest <= 32 ? 1 : widest <= 64 ? 2 : widest <= 128 ? 4 : 8;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status = cudaSuccess;
  switch (key_value.scalar_type()) {
    case at::kFloat: status = launch_for_type<float>(p, dims_per_lane, stream); break;
    case at::kHalf: status = launch_for_type<c10::Half>(p, dims_per_lane, stream); break;
    case at::kBFloat16: status = launch_for_type<c10::BFloat16>(p, dims_per_lane, stream); break;
    case at::kChar: status = launch_for_type<int8_t>(p, dims_per_lane, stream); break;
    case at::kFloat8_e4m3fn: status = launch_for_type<c10::Float8_e4m3fn>(p, dims_per_lane, stream); break;
    default: return cudaErrorInvalidValue;  // validated on the host; never reached
  }
  if (status != cudaSuccess || splits == 1) return status;
  const int64_t total_rows = d.batch * d.heads * p.rows;
  const int64_t blocks = total_rows < 65535 * 8 ? total_rows : 65535 * 8;
  combine_splits_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace lightning_cache
