// Lightning recurrent state on CUDA.
//
// Decode: one block per (value tile of 32 columns, row, head); the tile is
// blockIdx.x so the blocks of one (row, head) run side by side and share its
// q/k in L2. Thread (x, y) owns column j = tile * 32 + x and rows
// i = y, y + GROUPS, ... (ROWS of them) of the state. It loads its elements
// into registers once, applies every token of the call there (decay + k^T v,
// accumulating q . S[:, j]), and stores them once, so each state element is
// read and written once per call whatever the token count, and a bfloat16
// state is rounded once per call, as on the CPU. A warp touches 32 consecutive
// elements of one state row: every access is coalesced. The GROUPS partial
// sums of a column meet in shared memory. Registers stay bounded (ROWS <= 16)
// for any key_dim up to 512: larger key_dims get more row groups (threads),
// not more rows per thread. Token n + 1's q/k/v are loaded while token n is
// applied (double-buffered shared memory, one barrier per token).
// Prefill: the shared chunked implementation (cuBLAS batched matmuls), with a
// kernel here to write the updated rows back to their slots.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <type_traits>

#include "../validation.h"
#include "launch_utils.cuh"
#include "launchers.h"

namespace lightning_cache {
namespace {

constexpr int kTileColumns = 32;

struct DecodeParams {
  void* state;  // [slots, H, Dk, Dv], contiguous
  void* out;    // [B, n, H, Dv], contiguous
  const void* query;
  const void* key;
  const void* value;
  const float* slopes;   // [H]
  const int64_t* slots;  // [B] or null (row b is state row b)
  void* step_states;     // [B, n + 1, H, Dk, Dv] (state dtype), contiguous, or null
  int64_t batch, tokens, heads, key_dim, value_dim, num_slots;
  int64_t q_stride[4], k_stride[4], v_stride[4];  // elements
  float scale;
};

// The state row batch row b updates, or -1 to skip it: slot out of
// [0, num_slots), or a repeat of an earlier row's slot (the first occurrence
// wins, so the result never depends on block order). The value is uniform over
// the block; every thread must call this (it holds a barrier).
__device__ __forceinline__ int64_t state_row(const int64_t* slots, int64_t b, int64_t num_slots, int tid, int threads) {
  if (slots == nullptr) return b < num_slots ? b : -1;
  const int64_t slot = slots[b];
  bool repeated = false;
  for (int64_t e = tid; e < b; e += threads) repeated |= slots[e] == slot;
  const bool seen = __syncthreads_or(repeated);
  return slot >= 0 && slot < num_slots && !seen ? slot : -1;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// ROWS: state rows per thread; GROUPS: row groups (blockDim.y); key_dim <=
// ROWS * GROUPS, and EXACT means equal (no per-row predicate anywhere).
// Register budget: EXACT variants fit 64 registers (50% occupancy) without
// spills; the rarer non-EXACT ones get up to 3/8 occupancy instead of spilling
// (except 1024-thread blocks, whose hardware limit is 64).
template <typename state_t, typename in_t, int ROWS, int GROUPS, bool EXACT>
__global__ void __launch_bounds__(kTileColumns* GROUPS,
                                  EXACT ? 1024 / (kTileColumns * GROUPS)
                                        : (768 / (kTileColumns * GROUPS) > 0 ? 768 / (kTileColumns * GROUPS) : 1))
    decode_kernel(const __grid_constant__ DecodeParams p) {
  constexpr int kRows = ROWS * GROUPS;
  constexpr int kThreadsPerBlock = kTileColumns * GROUPS;
  __shared__ float q_sh[2][kRows];
  __shared__ float k_sh[2][kRows];
  __shared__ float v_sh[2][kTileColumns];
  __shared__ float partial[2][GROUPS][kTileColumns];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kTileColumns + tx;
  const int64_t j = int64_t(blockIdx.x) * kTileColumns + tx;
  const bool column_ok = j < p.value_dim;
  const int64_t jj = column_ok ? j : 0;   // a valid column for address formation
  const bool loads_qk = tid < p.key_dim;  // one q and one k element per token (key_dim <= threads)
  const int64_t qk_elem = loads_qk ? tid : 0;
  const int key_dim = static_cast<int>(p.key_dim);      // <= 512
  const int value_dim = static_cast<int>(p.value_dim);  // Dk * Dv < 2^31, host-checked
  // This thread's rows ty + r * GROUPS below key_dim are r < valid_rows (a
  // compare with a constant per row, no per-row predicate kept live).
  const int valid_rows = EXACT ? ROWS : min(ROWS, max(0, (key_dim - ty + GROUPS - 1) / GROUPS));

  for (int64_t bh = blockIdx.y; bh < p.batch * p.heads; bh += gridDim.y) {
    const int64_t b = bh / p.heads, h = bh - b * p.heads;
    const int64_t row = state_row(p.slots, b, p.num_slots, tid, kThreadsPerBlock);
    in_t* o = static_cast<in_t*>(p.out) + (b * p.tokens * p.heads + h) * p.value_dim + jj;
    const int64_t o_step = p.heads * p.value_dim;  // next token, same head and column
    if (row < 0) {  // skipped row: output zeros, state untouched (uniform over the block)
      if (ty == 0 && column_ok) {
        for (int64_t n = 0; n < p.tokens; ++n) o[n * o_step] = in_t(0);
      }
      continue;
    }
    state_t* S = static_cast<state_t*>(p.state) + (row * p.heads + h) * p.key_dim * p.value_dim;
    const float decay = expf(-p.slopes[h]);  // accurate expf, as the CPU uses: errors would compound over tokens

    // All loads issued together: ROWS independent requests in flight per thread.
    float cell[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      cell[r] = column_ok && r < valid_rows ? to_float(S[(ty + r * GROUPS) * value_dim + jj]) : 0.0f;
    }
    // Speculative decoding: step_states[b, t] is the state after t tokens; each
    // thread stores its own cells (the state before the call at t = 0).
    const int64_t steps_stride = p.heads * p.key_dim * p.value_dim;  // next t, same head
    state_t* steps = p.step_states == nullptr ? nullptr
                                              : static_cast<state_t*>(p.step_states) +
                                                    (b * (p.tokens + 1) * p.heads + h) * p.key_dim * p.value_dim;
    if (steps != nullptr) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (column_ok && r < valid_rows) steps[(ty + r * GROUPS) * value_dim + jj] = static_cast<state_t>(cell[r]);
      }
    }

    const in_t* qp =
        static_cast<const in_t*>(p.query) + b * p.q_stride[0] + h * p.q_stride[2] + qk_elem * p.q_stride[3];
    const in_t* kp = static_cast<const in_t*>(p.key) + b * p.k_stride[0] + h * p.k_stride[2] + qk_elem * p.k_stride[3];
    const in_t* vp = static_cast<const in_t*>(p.value) + b * p.v_stride[0] + h * p.v_stride[2] + jj * p.v_stride[3];
    // Stage token 0. Rows past key_dim (non-EXACT) read q = k = 0 from shared
    // memory; their terms are dropped by selection below, so they stay inert
    // even when an input is not finite.
    if (loads_qk) {
      q_sh[0][tid] = to_float(*qp);
      k_sh[0][tid] = to_float(*kp);
    } else if (tid < kRows) {
      q_sh[0][tid] = q_sh[1][tid] = 0.0f;
      k_sh[0][tid] = k_sh[1][tid] = 0.0f;
    }
    if (ty == 0) v_sh[0][tx] = column_ok ? to_float(*vp) : 0.0f;
    __syncthreads();

    for (int64_t n = 0; n < p.tokens; ++n) {
      const int cur = static_cast<int>(n & 1);
      const bool has_next = n + 1 < p.tokens;
      float q_next = 0.0f, k_next = 0.0f, v_next = 0.0f;
      if (has_next) {  // next token's inputs: in flight while this token is applied
        qp += p.q_stride[1];
        kp += p.k_stride[1];
        vp += p.v_stride[1];
        if (loads_qk) {
          q_next = to_float(*qp);
          k_next = to_float(*kp);
        }
        if (ty == 0 && column_ok) v_next = to_float(*vp);
      }
      const float v_j = v_sh[cur][tx];
      float acc = 0.0f;
      // Branch-free, so the cells stay in registers; a padded row's term is
      // selected away (not multiplied by 0) and its cell is never stored.
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int i = ty + r * GROUPS;
        cell[r] = decay * cell[r] + k_sh[cur][i] * v_j;
        const float term = q_sh[cur][i] * cell[r];
        acc += r < valid_rows ? term : 0.0f;
      }
      if (steps != nullptr) {
        state_t* after = steps + (n + 1) * steps_stride;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (column_ok && r < valid_rows) after[(ty + r * GROUPS) * value_dim + jj] = static_cast<state_t>(cell[r]);
        }
      }
      partial[cur][ty][tx] = acc;
      if (has_next) {  // the other buffer was last read before the previous barrier
        if (loads_qk) {
          q_sh[cur ^ 1][tid] = q_next;
          k_sh[cur ^ 1][tid] = k_next;
        }
        if (ty == 0) v_sh[cur ^ 1][tx] = v_next;
      }
      __syncthreads();
      if (ty == 0 && column_ok) {
        float total = 0.0f;
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) total += partial[cur][g][tx];
        o[n * o_step] = static_cast<in_t>(total * p.scale);
      }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (column_ok && r < valid_rows) S[(ty + r * GROUPS) * value_dim + jj] = static_cast<state_t>(cell[r]);
    }
    __syncthreads();  // shared buffers are reused by the next (row, head)
  }
}

// Writes float32 rows [B, row_elems] to state[slots[b]]. Grid: x splits a row,
// y walks batch rows. A row whose slot is out of range, or repeats an earlier
// row's slot (the first occurrence wins), is skipped, so each state row gets
// exactly one source row and the result never depends on block order.
template <typename state_t>
__global__ void scatter_rows_kernel(state_t* __restrict__ state, const float* __restrict__ rows,
                                    const int64_t* __restrict__ slots, int64_t batch, int64_t row_elems,
                                    int64_t num_slots) {
  const int tid = threadIdx.x, threads = blockDim.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t row = state_row(slots, b, num_slots, tid, threads);
    if (row >= 0) {
      state_t* dst = state + row * row_elems;
      const float* src = rows + b * row_elems;
      for (int64_t e = int64_t(blockIdx.x) * threads + tid; e < row_elems; e += int64_t(gridDim.x) * threads) {
        dst[e] = static_cast<state_t>(src[e]);
      }
    }
    __syncthreads();  // state_row's barrier is reused by the next row
  }
}

}  // namespace

cudaError_t launch_scatter_rows(at::Tensor& state, const at::Tensor& src, const at::Tensor& slot_ids) noexcept {
  const int64_t batch = src.size(0);
  const int64_t row_elems = src.size(1) * src.size(2) * src.size(3);  // no src[0]: B may be 0
  if (batch == 0 || row_elems == 0) return cudaSuccess;               // never a zero-sized grid
  const int threads = 256;
  // About 4 blocks per SM in all; each block scans the earlier slot ids once.
  const int64_t target = int64_t(multiprocessor_count(state.get_device())) * 4;
  const int64_t per_row =
      std::max<int64_t>(1, std::min<int64_t>((row_elems + threads - 1) / threads, (target + batch - 1) / batch));
  const dim3 grid(static_cast<unsigned>(per_row), static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto state_tag) {  // state: float32 or bfloat16 (validated)
    using state_t = decltype(state_tag);
    scatter_rows_kernel<state_t><<<grid, threads, 0, stream>>>(
        static_cast<state_t*>(state.data_ptr()), static_cast<const float*>(src.const_data_ptr()),
        static_cast<const int64_t*>(slot_ids.const_data_ptr()), batch, row_elems, state.size(0));
  };
  if (state.scalar_type() == at::kFloat) {
    launch(float{});
  } else {
    launch(at::BFloat16{});
  }
  return cudaGetLastError();
}

namespace {

template <typename state_t, typename in_t, int ROWS, int GROUPS>
void launch_decode_config(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.value_dim + kTileColumns - 1) / kTileColumns),
                  static_cast<unsigned>(std::min<int64_t>(p.batch * p.heads, 65535)));
  const dim3 block(kTileColumns, GROUPS);
  if (p.key_dim == ROWS * GROUPS) {
    decode_kernel<state_t, in_t, ROWS, GROUPS, true><<<grid, block, 0, stream>>>(p);
  } else {
    decode_kernel<state_t, in_t, ROWS, GROUPS, false><<<grid, block, 0, stream>>>(p);
  }
}

}  // namespace

cudaError_t launch_decode(at::Tensor& state, at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& value, const at::Tensor& slopes_f, const int64_t* slots,
                          const LightningDims& d, float scale, void* step_states) noexcept {
  DecodeParams p{};
  p.state = state.data_ptr();
  p.out = out.data_ptr();
  p.query = query.const_data_ptr();
  p.key = key.const_data_ptr();
  p.value = value.const_data_ptr();
  p.slopes = static_cast<const float*>(slopes_f.const_data_ptr());
  p.slots = slots;
  p.step_states = step_states;
  p.batch = d.batch;
  p.tokens = d.tokens;
  p.heads = d.heads;
  p.key_dim = d.key_dim;
  p.value_dim = d.value_dim;
  p.num_slots = d.slots;
  for (int k = 0; k < 4; ++k) {
    p.q_stride[k] = query.stride(k);
    p.k_stride[k] = key.stride(k);
    p.v_stride[k] = value.stride(k);
  }
  p.scale = scale;
  auto stream = c10::cuda::getCurrentCUDAStream();

  // (ROWS, GROUPS): 8 x 8 (Dk <= 64), 16 x 8 (<= 128), 16 x 16 (<= 256), 16 x 32 (<= 512).
  auto with_config = [&](auto state_tag, auto in_tag) {
    using state_t = decltype(state_tag);
    using in_t = decltype(in_tag);
    if (d.key_dim <= 64) {
      launch_decode_config<state_t, in_t, 8, 8>(p, stream);
    } else if (d.key_dim <= 128) {
      launch_decode_config<state_t, in_t, 16, 8>(p, stream);
    } else if (d.key_dim <= 256) {
      launch_decode_config<state_t, in_t, 16, 16>(p, stream);
    } else {
      launch_decode_config<state_t, in_t, 16, 32>(p, stream);
    }
  };
  auto with_state = [&](auto in_tag) {
    if (state.scalar_type() == at::kFloat) {
      with_config(float{}, in_tag);
    } else {
      with_config(at::BFloat16{}, in_tag);
    }
  };
  switch (query.scalar_type()) {  // validated: float32, float16 or bfloat16
    case at::kFloat: with_state(float{}); break;
    case at::kHalf: with_state(at::Half{}); break;
    default: with_state(at::BFloat16{}); break;
  }
  return cudaGetLastError();
}

}  // namespace lightning_cache
