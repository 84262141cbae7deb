// Lightning recurrent state on CUDA.
//
// Decode: one block per (row, head, 32 value columns). Thread (x, y) owns
// column j = tile * 32 + x and rows i = y, y + 8, ... of the state. It loads
// its elements into registers once, applies every token of the call there
// (decay + k^T v, accumulating q . S[:, j]), and stores them once, so each
// state element is read and written once per call whatever the token count,
// and a bfloat16 state is rounded once per call, as on the CPU. A warp touches
// 32 consecutive elements of one state row: every access is coalesced. The 8
// partial sums of a column meet in shared memory.
// Prefill: the shared chunked implementation (cuBLAS batched matmuls), with a
// kernel here to write the updated rows back to their slots.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops.h"
#include "host_checks.cuh"

namespace lightning_cache {
namespace {

constexpr int kTileColumns = 32;
constexpr int kRowGroups = 8;

struct DecodeShape {
  int64_t batch, tokens, heads, key_dim, value_dim, slots;
  int64_t q_stride[4], k_stride[4], v_stride[4];
};

__device__ __forceinline__ int64_t state_row(const int64_t* slots, int64_t b, int64_t num_slots) {
  const int64_t slot = slots ? slots[b] : b;
  return slot >= 0 && slot < num_slots ? slot : -1;
}

// ROWS: state rows per thread, so key_dim <= ROWS * kRowGroups.
template <typename state_t, typename in_t, int ROWS>
__global__ void decode_kernel(state_t* __restrict__ state, in_t* __restrict__ out, const in_t* __restrict__ query,
                              const in_t* __restrict__ key, const in_t* __restrict__ value,
                              const float* __restrict__ slopes, const int64_t* __restrict__ slots, DecodeShape s,
                              float scale) {
  extern __shared__ float shared[];
  float* q_sh = shared;                  // [Dk]
  float* k_sh = q_sh + s.key_dim;        // [Dk]
  float* v_sh = k_sh + s.key_dim;        // [32]
  float* partial = v_sh + kTileColumns;  // [8][32]

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / s.heads, h = bh % s.heads;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kTileColumns + tx;
  const int64_t j = int64_t(blockIdx.y) * kTileColumns + tx;
  const bool column_ok = j < s.value_dim;
  const int64_t row = state_row(slots, b, s.slots);

  if (row < 0) {  // skipped row: output zeros, state untouched (uniform over the block)
    if (ty == 0 && column_ok) {
      for (int64_t n = 0; n < s.tokens; ++n) out[((b * s.tokens + n) * s.heads + h) * s.value_dim + j] = in_t(0);
    }
    return;
  }
  state_t* S = state + (row * s.heads + h) * s.key_dim * s.value_dim;
  const float decay = expf(-slopes[h]);  // accurate expf, as the CPU uses: errors would compound over tokens

  // All loads issued together: ROWS independent requests in flight per thread.
  float cell[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t i = ty + int64_t(r) * kRowGroups;
    cell[r] = column_ok && i < s.key_dim ? static_cast<float>(S[i * s.value_dim + j]) : 0.0f;
  }

  for (int64_t n = 0; n < s.tokens; ++n) {
    const in_t* q = query + b * s.q_stride[0] + n * s.q_stride[1] + h * s.q_stride[2];
    const in_t* k = key + b * s.k_stride[0] + n * s.k_stride[1] + h * s.k_stride[2];
    const in_t* v = value + b * s.v_stride[0] + n * s.v_stride[1] + h * s.v_stride[2];
    for (int64_t i = tid; i < s.key_dim; i += kTileColumns * kRowGroups) {
      q_sh[i] = static_cast<float>(q[i * s.q_stride[3]]);
      k_sh[i] = static_cast<float>(k[i * s.k_stride[3]]);
    }
    if (ty == 0) v_sh[tx] = column_ok ? static_cast<float>(v[j * s.v_stride[3]]) : 0.0f;
    __syncthreads();

    const float v_j = v_sh[tx];
    float acc = 0.0f;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t i = ty + int64_t(r) * kRowGroups;
      if (i < s.key_dim) {
        cell[r] = decay * cell[r] + k_sh[i] * v_j;
        acc += q_sh[i] * cell[r];
      }
    }
    partial[ty * kTileColumns + tx] = acc;
    __syncthreads();
    if (ty == 0 && column_ok) {
      float total = 0.0f;
#pragma unroll
      for (int g = 0; g < kRowGroups; ++g) total += partial[g * kTileColumns + tx];
      out[((b * s.tokens + n) * s.heads + h) * s.value_dim + j] = static_cast<in_t>(total * scale);
    }
    __syncthreads();  // shared q/k/v and partial sums are reused by the next token
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t i = ty + int64_t(r) * kRowGroups;
    if (column_ok && i < s.key_dim) S[i * s.value_dim + j] = static_cast<state_t>(cell[r]);
  }
}

template <typename state_t>
__global__ void scatter_rows_kernel(state_t* __restrict__ state, const float* __restrict__ rows,
                                    const int64_t* __restrict__ slots, int64_t batch, int64_t row_elems,
                                    int64_t num_slots) {
  const int64_t total = batch * row_elems;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / row_elems;
    const int64_t row = state_row(slots, b, num_slots);
    if (row >= 0) state[row * row_elems + e % row_elems] = static_cast<state_t>(rows[e]);
  }
}

void scatter_state_rows_cuda(at::Tensor& state, const at::Tensor& rows, const std::optional<at::Tensor>& slot_ids) {
  if (!slot_ids.has_value()) {
    state.copy_(rows);
    return;
  }
  const at::Tensor src = rows.contiguous();
  const int64_t batch = src.size(0), row_elems = src[0].numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((batch * row_elems + threads - 1) / threads, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto state_tag) {  // state: float32 or bfloat16 (validated)
    using state_t = decltype(state_tag);
    scatter_rows_kernel<state_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        state.data_ptr<state_t>(), src.const_data_ptr<float>(), slot_ids->const_data_ptr<int64_t>(), batch, row_elems,
        state.size(0));
  };
  if (state.scalar_type() == at::kFloat) {
    launch(float{});
  } else {
    launch(at::BFloat16{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lightning_decode_cuda(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& slopes,
                                 const std::optional<at::Tensor>& slot_ids, double scale, bool check_bounds) {
  const LightningDims d =
      check_lightning_args("lightning_decode", state, query, key, value, slopes, std::nullopt, slot_ids, 1);
  TORCH_CHECK_VALUE(d.key_dim <= 64 * kRowGroups, "lightning_decode: key_dim ", d.key_dim,
                    " is larger than the CUDA kernel supports (512)");
  const c10::cuda::CUDAGuard guard(state.device());
  const std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, d, host_checks_allowed(check_bounds));
  const at::Tensor slopes_f = slopes.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({d.batch, d.tokens, d.heads, d.value_dim}, query.options());

  DecodeShape s{d.batch, d.tokens, d.heads, d.key_dim, d.value_dim, d.slots, {}, {}, {}};
  for (int k = 0; k < 4; ++k) {
    s.q_stride[k] = query.stride(k);
    s.k_stride[k] = key.stride(k);
    s.v_stride[k] = value.stride(k);
  }
  const dim3 grid(static_cast<unsigned>(d.batch * d.heads),
                  static_cast<unsigned>((d.value_dim + kTileColumns - 1) / kTileColumns));
  const dim3 block(kTileColumns, kRowGroups);
  const size_t shared_bytes = sizeof(float) * (2 * d.key_dim + kTileColumns + kRowGroups * kTileColumns);
  TORCH_CHECK(d.batch * d.heads < (int64_t(1) << 31), "lightning_decode: batch * heads too large for one launch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* slot_ptr = slots ? slots->const_data_ptr<int64_t>() : nullptr;

  auto launch = [&](auto state_tag, auto in_tag, auto rows_tag) {
    using state_t = decltype(state_tag);
    using in_t = decltype(in_tag);
    decode_kernel<state_t, in_t, decltype(rows_tag)::value><<<grid, block, shared_bytes, stream>>>(
        state.data_ptr<state_t>(), out.data_ptr<in_t>(), query.const_data_ptr<in_t>(), key.const_data_ptr<in_t>(),
        value.const_data_ptr<in_t>(), slopes_f.const_data_ptr<float>(), slot_ptr, s, static_cast<float>(scale));
  };
  // Registers per thread follow key_dim: 8 rows (Dk <= 64), 16 (<= 128), 32 (<= 256), 64 (<= 512).
  auto with_rows = [&](auto state_tag, auto in_tag) {
    if (d.key_dim <= 8 * kRowGroups) {
      launch(state_tag, in_tag, std::integral_constant<int, 8>{});
    } else if (d.key_dim <= 16 * kRowGroups) {
      launch(state_tag, in_tag, std::integral_constant<int, 16>{});
    } else if (d.key_dim <= 32 * kRowGroups) {
      launch(state_tag, in_tag, std::integral_constant<int, 32>{});
    } else {
      launch(state_tag, in_tag, std::integral_constant<int, 64>{});
    }
  };
  auto with_state = [&](auto in_tag) {
    if (state.scalar_type() == at::kFloat) {
      with_rows(float{}, in_tag);
    } else {
      with_rows(at::BFloat16{}, in_tag);
    }
  };
  switch (query.scalar_type()) {  // validated: float32, float16 or bfloat16
    case at::kFloat: with_state(float{}); break;
    case at::kHalf: with_state(at::Half{}); break;
    default: with_state(at::BFloat16{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor lightning_prefill_cuda(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& slopes,
                                  const std::optional<at::Tensor>& attention_mask,
                                  const std::optional<at::Tensor>& slot_ids, int64_t block_size, double scale,
                                  bool check_bounds) {
  const LightningDims d =
      check_lightning_args("lightning_prefill", state, query, key, value, slopes, attention_mask, slot_ids, block_size);
  const c10::cuda::CUDAGuard guard(state.device());
  const std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, d, host_checks_allowed(check_bounds));
  return lightning_prefill_chunked(state, query, key, value, slopes, attention_mask, slots, d, block_size, scale,
                                   &scatter_state_rows_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_cache, CUDA, m) {
  m.impl("lightning_decode", &lightning_decode_cuda);
  m.impl("lightning_prefill", &lightning_prefill_cuda);
}

}  // namespace lightning_cache
