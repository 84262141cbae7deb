// Kernel launchers of csrc/cuda/*.cu, called by the op entry points in
// ops_cuda.cpp. They validate nothing and throw nothing (noexcept, launch
// errors returned): every check, and so every C++ exception, lives in host
// C++ compiled by the host compiler, and no exception ever unwinds through
// nvcc-compiled frames.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include "../validation.h"

namespace lightning_cache {

// concatenate_to_cache (mask != nullptr, [B, 1, q, L]) and write_to_cache
// (mask == nullptr): copies the new K|V rows of writable rows, writes the mask
// rows and advances `index`, in one launch. Nothing is launched for B*q == 0.
// `slots` (device, [B]; null: batch row b is cache row b) are prepared slot
// ids: a pool row in [0, P), distinct, or -1 (row skipped). `scales` (float32
// [P, L, H, 2], contiguous) is non-null exactly when key_value holds int8 /
// float8_e4m3fn codes: the new tokens are then quantized as they are written.
cudaError_t launch_write_rows(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key,
                              const at::Tensor& value, const int64_t* slots, float* scales, const KVCacheDims& d,
                              bool ring, const MaskInputs& mask_in, bool* mask) noexcept;

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

}  // namespace lightning_cache
