// Kernel entry points shared between translation units. Schemas live in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "validation.h"

namespace lightning_cache {

// Writes float32 `rows` [B, H, Dk, Dv] back into `state` at `slot_ids`
// (row b -> state[slot_ids[b]]; rows whose slot is -1 or out of range are
// skipped). One implementation per backend.
using ScatterStateRows = void (*)(at::Tensor& state, const at::Tensor& rows, const std::optional<at::Tensor>& slot_ids);

// `values` as an int64 tensor on `device` (host index data for a kernel or an ATen op).
at::Tensor int64_on(const std::vector<int64_t>& values, const at::Device& device);

// ScatterStateRows with ATen ops, for any device (slot ids sanitized).
void scatter_state_rows_aten(at::Tensor& state, const at::Tensor& rows, const std::optional<at::Tensor>& slot_ids);

// Chunked prefill shared by both backends: ATen batched matmuls over all rows
// and heads at once, one loop iteration per block of `block_size` tokens (a
// block is split where a checkpoint falls inside it). `checkpoints` (validated
// by check_checkpoints, or none) receives the state after every
// `checkpoint_every` tokens; skipped rows leave theirs untouched. `row_tokens`
// (with a mask only): each row's tokens before its masked tail, non-increasing;
// blocks then compute only the rows that still hold tokens.
at::Tensor lightning_prefill_chunked(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& slopes,
                                     const std::optional<at::Tensor>& attention_mask,
                                     const std::optional<at::Tensor>& slot_ids, const LightningDims& dims,
                                     int64_t block_size, double scale, ScatterStateRows scatter,
                                     const std::optional<at::Tensor>& checkpoints, int64_t checkpoint_every,
                                     const std::vector<int64_t>* row_tokens = nullptr);

// Packed sequences (cu_seqlens, prepared into `seqs`) through
// lightning_prefill_chunked, as one zero-padded [S, max_len] batch with the
// padding masked: each sequence's outputs, state and own checkpoints are those
// of the padded row. `slot_ids` are prepared slot ids (one per sequence) or
// none. Returns the packed output [1, T, H, Dv] (zeros for tokens of no kept
// sequence). The CUDA backend's packed path (ATen ops, any device).
at::Tensor lightning_prefill_packed(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, const at::Tensor& slopes,
                                    const std::optional<at::Tensor>& slot_ids, const LightningDims& dims,
                                    const PackedSequences& seqs, int64_t block_size, double scale,
                                    ScatterStateRows scatter, const std::optional<at::Tensor>& checkpoints,
                                    int64_t checkpoint_every);

}  // namespace lightning_cache
