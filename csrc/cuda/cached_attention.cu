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
// SPEC 11 layouts change only where a unit (the block's row of work) reads:
// a unit is a batch row, or a packed sequence (its own query tokens), with a
// cache row (slot_ids) or a block-table row (paged: column j lives in page
// block_tables[row, j / page_size]; an entry outside the pool hides the
// column), and without a mask its queries sit causally at the last of its
// cache_seqlens positions (columns past them are not even walked).
// Launchers are noexcept and return the launch status (see launchers.h).
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <climits>

#include "../paging_rule.h"
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
  // SPEC 11: units (the grid's rows of work) and their plan, int64 [units, 5] = (src, i0, count,
  // kv_row, valid), or null: unit b is batch row b with every query and cache row b, masked by `mask`.
  // `rows` is then the most query rows of any unit (group * count). table.data: paged, else null.
  const int64_t* plan;
  int64_t units;
  PageTable table;
  bool has_mask;  // false: queries placed by `valid` (cache_seqlens), causally
};

// What one unit reads: input row src, query tokens i0 .. i0 + count - 1, cache (or block-table) row
// kv_row (-1: skipped, zeros out), valid tokens of the row (with no mask).
struct Unit {
  int64_t src, i0, count, kv_row, valid;
};

__device__ __forceinline__ Unit unit_of(const AttnParams& p, int64_t u) {
  if (p.plan == nullptr) return {u, 0, p.queries, u, -1};
  const int64_t* e = p.plan + u * 5;
  return {e[0], e[1], e[2], e[3], e[4]};
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Output offset of row r of (unit, h): query i = r / G (token i0 + i), query head h * G + r % G.
__device__ __forceinline__ int64_t out_row(const AttnParams& p, const Unit& u, int64_t h, int64_t r) {
  const int64_t i = r / p.group, hq = h * p.group + r % p.group;
  return ((u.src * p.queries + u.i0 + i) * p.query_heads + hq) * p.value_dim;
}

template <typename T, int DPL>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const __grid_constant__ AttnParams p) {
  constexpr int kDims = 32 * DPL;
  __shared__ float m_sh[kWarps][kRows], l_sh[kWarps][kRows];
  __shared__ float acc_sh[kWarps][kRows][kDims];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t split = blockIdx.x % p.splits;
  const int64_t bh = blockIdx.x / p.splits;
  const int64_t h = bh % p.heads;
  const Unit u = unit_of(p, bh / p.heads);
  if (u.kv_row < 0 || u.count == 0) return;  // skipped: zeros out (pre-zeroed), no partials (combine skips it)
  const int64_t unit_rows = p.group * u.count;
  const int64_t c_begin = split * p.chunk;
  int64_t c_end = c_begin + p.chunk < p.capacity ? c_begin + p.chunk : p.capacity;
  if (!p.has_mask && u.valid < c_end) c_end = u.valid;  // no query sees a column past the valid ones
  const int64_t d0 = static_cast<int64_t>(lane) * DPL;  // this lane's first dim
  const T* kv_base = static_cast<const T*>(p.kv) + h * p.kv_sh;

  for (int64_t r0 = 0; r0 < unit_rows; r0 += kRows) {
    const int nr = unit_rows - r0 < kRows ? static_cast<int>(unit_rows - r0) : kRows;
    float q[kRows][DPL], acc[kRows][DPL], m[kRows], l[kRows];
    const bool* mask_row[kRows];
    int64_t last_seen[kRows];  // no mask: the query's position (it sees columns 0 .. last_seen)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;
      const int64_t row = r0 + (r < nr ? r : 0);
      const int64_t i = row / p.group, hq = h * p.group + row % p.group;
      const float* src = p.query + u.src * p.q_sb + (u.i0 + i) * p.q_si + hq * p.q_sh;
      mask_row[r] = p.has_mask ? p.mask + u.src * p.m_sb + (u.i0 + i) * p.m_si : nullptr;
      last_seen[r] = u.valid - u.count + i;
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
        seen[r] = r < nr && (p.has_mask ? mask_row[r][j * p.m_sj] : j <= last_seen[r]);
        any |= seen[r];
      }
      if (!any) continue;  // uniform over the warp: every lane read the same bytes
      int64_t cache_row = u.kv_row, column = j;  // where column j is stored
      if (p.table.data != nullptr) {
        cache_row = page_entry(p.table, u.kv_row, j);
        if (cache_row < 0 || cache_row >= p.table.num_pages) continue;  // hidden (host checks raised if asked)
        column = j % p.table.page_size;
      }
      const T* col = kv_base + cache_row * p.kv_sb + column * p.kv_sl;
      float kf[DPL], vf[DPL];
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        const int64_t d = d0 + e;
        kf[e] = d < p.key_dim ? to_float(col[d]) : 0.0f;
        vf[e] = d < p.value_dim ? to_float(col[p.key_dim + d]) : 0.0f;
      }
      float k_scale = 1.0f, v_scale = 1.0f;
      if (p.scales) {
        const float* sc = p.scales + cache_row * p.sc_sb + column * p.sc_sl + h * p.sc_sh;
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
        // A NaN score enters the max as -FLT_MAX (fmaxf would drop it, so a NaN met while m is -inf would
        // get weight 0): its weight exp2(NaN - m) is NaN and the row's output NaN, as in SDPA and on the CPU.
        const float m_new = fmaxf(m[r], s != s ? -FLT_MAX : s);
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
        if (e < p.value_dim) p.out[out_row(p, u, h, row) + e] = mx == -INFINITY ? 0.0f : a / total;
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
  const int64_t total_rows = p.units * p.heads * p.rows;
  for (int64_t item = blockIdx.x; item < total_rows; item += gridDim.x) {
    const int64_t bh = item / p.rows, row = item % p.rows;
    const int64_t h = bh % p.heads;
    const Unit u = unit_of(p, bh / p.heads);
    if (u.kv_row < 0 || row >= p.group * u.count) continue;  // no such row: nothing to combine
    float mx = -INFINITY;
    for (int64_t s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.part_ml[((bh * p.splits + s) * p.rows + row) * 2]);
    float* dst = p.out + out_row(p, u, h, row);
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
  const dim3 grid(static_cast<unsigned>(p.units * p.heads * p.splits));
  switch (dims_per_lane) {
    case 1: attention_split_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: attention_split_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: attention_split_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p); break;
    default: attention_split_kernel<T, 8><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace

int64_t cached_attention_splits(const AttentionDims& d, int64_t max_queries, int device) noexcept {
  const int64_t items = d.rows * d.heads;
  if (items <= 0) return 1;
  const int64_t target = 2 * static_cast<int64_t>(multiprocessor_count(device));
  int64_t splits = items >= target ? 1 : (target + items - 1) / items;
  // At least 256 columns per split, and a workspace of at most 2^26 floats.
  const int64_t by_length = (d.capacity + 255) / 256;
  const int64_t row_floats = items * d.group * max_queries * (d.value_dim + 2);
  const int64_t by_workspace = row_floats > 0 ? (int64_t(1) << 26) / row_floats : 1;
  splits = splits < by_length ? splits : by_length;
  splits = splits < by_workspace ? splits : by_workspace;
  return splits < 1 ? 1 : splits;
}

cudaError_t launch_cached_attention(at::Tensor& out, const at::Tensor& query_f, const at::Tensor& key_value,
                                    const bool* mask, const int64_t* mask_strides, const float* scales,
                                    const int64_t* scale_strides, const AttentionDims& d, const int64_t* plan,
                                    int64_t max_queries, const PageTable& table, int64_t splits,
                                    float* workspace) noexcept {
  if (d.batch * d.queries * d.query_heads == 0 || d.rows == 0 || max_queries == 0 || d.capacity == 0 || splits < 1)
    return cudaSuccess;
  AttnParams p{};
  p.query = static_cast<const float*>(query_f.const_data_ptr());
  p.q_sb = query_f.stride(0), p.q_si = query_f.stride(1), p.q_sh = query_f.stride(2), p.q_sd = query_f.stride(3);
  p.kv = key_value.const_data_ptr();
  p.kv_sb = key_value.stride(0), p.kv_sl = key_value.stride(1), p.kv_sh = key_value.stride(2);
  p.scales = scales;
  if (scales) {
    p.sc_sb = scale_strides[0], p.sc_sl = scale_strides[1], p.sc_sh = scale_strides[2], p.sc_sc = scale_strides[3];
  }
  p.mask = mask;
  p.has_mask = mask != nullptr;
  if (mask) p.m_sb = mask_strides[0], p.m_si = mask_strides[2], p.m_sj = mask_strides[3];
  p.plan = plan;
  p.units = d.rows;
  p.table = table;
  p.out = static_cast<float*>(out.data_ptr());
  p.batch = d.batch, p.queries = d.queries, p.query_heads = d.query_heads, p.heads = d.heads, p.group = d.group;
  p.capacity = d.capacity, p.key_dim = d.key_dim, p.value_dim = d.value_dim;
  p.rows = d.group * max_queries;
  p.splits = splits;
  p.chunk = (d.capacity + splits - 1) / splits;
  p.q_scale = d.softmax_scale * kLog2e;
  if (splits > 1) {
    p.part_acc = workspace;
    p.part_ml = workspace + d.rows * d.heads * splits * p.rows * d.value_dim;
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
  const int64_t total_rows = d.rows * d.heads * p.rows;
  const int64_t blocks = total_rows < 65535 * 8 ? total_rows : 65535 * 8;
  combine_splits_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace lightning_cache
