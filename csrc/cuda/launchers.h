// Kernel launchers of csrc/cuda/*.cu, called by the op entry points in
// ops_cuda.cpp. They validate nothing and throw nothing (noexcept, launch
// errors returned): every check, and so every C++ exception, lives in host
// C++ compiled by the host compiler, and no exception ever unwinds through
// nvcc-compiled frames.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include "../validation.h"
#include "../write_plan_rule.h"

namespace lightning_cache {

// concatenate_to_cache (mask != nullptr, [B, 1, q, L]) and write_to_cache
// (mask == nullptr): copies the new K|V rows of writable rows, writes the mask
// rows and advances `index`, in one launch. Nothing is launched for B*q == 0.
// `slots` (device, [B]; null: batch row b is cache row b) are prepared slot
// ids: a pool row in [0, P), distinct, or -1 (row skipped). `scales` (float32
// [P, L, H, 2], contiguous) is non-null exactly when key_value holds int8 /
// float8_e4m3fn codes: the new tokens are then quantized as they are written.
// `plan` (block tables, packed batches; null otherwise): plan_writes' result
// on the device, int64 [tokens of key: cells | write_rows index rows |
// write_rows starts | write_rows lengths]; the kernel then writes exactly
// those cells (key_value contiguous, page pools included) and sets
// index[row] = start + length, reading no position itself.
cudaError_t launch_write_rows(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key,
                              const at::Tensor& value, const int64_t* slots, float* scales, const KVCacheDims& d,
                              bool ring, const MaskInputs& mask_in, bool* mask, const int64_t* plan,
                              int64_t write_rows) noexcept;

// write_plan_rule.h's planner on the device (one block): fills args.plan with
// the plan launch_write_rows reads, for paged [B, q] writes without host checks.
cudaError_t launch_plan_paged_writes(const PagedWritePlanArgs& args) noexcept;

// lightning_decode into `out` [B, n, H, Dv]; `slopes_f` float32 contiguous;
// `slots` sanitized slot ids (prepare_slot_ids) or null. Needs key_dim <= 512
// and n >= 1. `step_states` (null, or contiguous [B, n + 1, H, Dk, Dv] of the
// state's dtype) receives the state before the call and after each token.
cudaError_t launch_decode(at::Tensor& state, at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& value, const at::Tensor& slopes_f, const int64_t* slots,
                          const LightningDims& d, float scale, void* step_states) noexcept;

// state[slot_ids[b]] = src[b] (float32 [B, H, Dk, Dv], contiguous) for every
// b whose slot is in range and not taken by an earlier row.
cudaError_t launch_scatter_rows(at::Tensor& state, const at::Tensor& src, const at::Tensor& slot_ids) noexcept;

// cached_attention: how many splits of the columns to run (flash-decoding),
// from the SM count of `device` and the sizes (max_queries: the most query
// tokens of one row, d.queries unless packed); at least 1.
int64_t cached_attention_splits(const AttentionDims& d, int64_t max_queries, int device) noexcept;

// cached_attention into `out` [B, q, Hq, Dv] float32 contiguous (pre-zeroed
// when any row may be skipped). `query_f` float32 (any strides), `key_value`
// validated with a contiguous last dimension, `mask` bool [B, 1, q, L] with
// its four strides, or null (queries placed by the plan's valid counts),
// `scales` (null for float caches) with its four strides. `plan`: null for a
// plain call (d.rows == B), else d.rows units of int64 (src, i0, count,
// kv_row, valid) from plan_attention_rows; max_queries their largest count.
// `table.data` (device block table) makes key_value a page pool. With
// splits > 1, `workspace` holds d.rows * H * splits * Hq / H * max_queries *
// (Dv + 2) floats. Needs key_dim, value_dim <= 256. Nothing is launched for an
// empty call or L = 0.
cudaError_t launch_cached_attention(at::Tensor& out, const at::Tensor& query_f, const at::Tensor& key_value,
                                    const bool* mask, const int64_t* mask_strides, const float* scales,
                                    const int64_t* scale_strides, const AttentionDims& d, const int64_t* plan,
                                    int64_t max_queries, const PageTable& table, int64_t splits,
                                    float* workspace) noexcept;

// Fused tensor-core prefill (lightning_prefill_fused.cu): whether it takes this call
// (sm_80+, bfloat16 q/k/v with 16-byte rows and unit last stride, key_dim = value_dim
// = 128, float32 or bfloat16 contiguous state, checkpoint_every a multiple of 64 when
// checkpoints are written). Every other call runs the ATen path.
bool fused_prefill_supported(const at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const LightningDims& d, int64_t checkpoints_written,
                             int64_t checkpoint_every) noexcept;

// One launch: outputs into `out` (bfloat16 [B, T, H, 128], contiguous), state rows and
// checkpoints updated in place. `slots` sanitized (prepare_slot_ids) or null; `keep`
// uint8 [B, T] contiguous (1 = unmasked) or null. Needs B, T >= 1. Packed (cu_seqlens):
// `seq_bounds` int64 [S, 2] on the device (first token, length; length < 0 = skipped,
// prepare_cu_seqlens), d.batch = S, inputs and `out` [1, T, ...] (out pre-zeroed), no keep.
cudaError_t launch_fused_prefill(at::Tensor& state, at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& slopes_f, const int64_t* slots,
                                 const uint8_t* keep, void* checkpoints, int64_t checkpoint_count,
                                 int64_t checkpoints_written, int64_t checkpoint_every, const LightningDims& d,
                                 float scale, const int64_t* seq_bounds) noexcept;

}  // namespace lightning_cache
