// Argument validation shared by the CPU and CUDA kernels. Every check runs
// before any write, so a rejected call leaves the cache and state untouched.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "mask_rule.h"

namespace lightning_cache {

struct KVCacheDims {
  int64_t batch = 0;       // B
  int64_t capacity = 0;    // L
  int64_t heads = 0;       // H
  int64_t key_dim = 0;     // Dk
  int64_t value_dim = 0;   // Dv
  int64_t new_tokens = 0;  // q
};

// Shapes, dtypes and devices of every concatenate_to_cache argument.
KVCacheDims check_concatenate_args(const at::Tensor& key_value, const at::Tensor& index, const at::Tensor& key,
                                   const at::Tensor& value, const std::optional<at::Tensor>& attention_mask,
                                   const std::optional<at::Tensor>& causal_mask,
                                   const std::optional<at::Tensor>& token_type_ids, bool is_causal, bool ring);

// Value checks on the positions. They live on the device, so on CUDA this
// copies them to the host (a sync): call only where that is allowed.
void check_positions(const at::Tensor& index, const KVCacheDims& dims, bool ring,
                     const std::optional<at::Tensor>& causal_mask);

// The mask rule's inputs as raw pointers and strides (see mask_rule.h).
MaskInputs make_mask_inputs(const KVCacheDims& dims, const std::optional<at::Tensor>& attention_mask,
                            const std::optional<at::Tensor>& causal_mask,
                            const std::optional<at::Tensor>& token_type_ids, bool is_causal, bool ring);

struct LightningDims {
  int64_t batch = 0;      // B
  int64_t tokens = 0;     // n
  int64_t heads = 0;      // H
  int64_t key_dim = 0;    // Dk
  int64_t value_dim = 0;  // Dv
  int64_t slots = 0;      // rows of the state
};

// Shapes, dtypes and devices of lightning_decode / lightning_prefill arguments.
// `op` names the operator in messages.
LightningDims check_lightning_args(const char* op, const at::Tensor& state, const at::Tensor& query,
                                   const at::Tensor& key, const at::Tensor& value, const at::Tensor& slopes,
                                   const std::optional<at::Tensor>& attention_mask,
                                   const std::optional<at::Tensor>& slot_ids, int64_t block_size);

// Contiguous slot ids for the kernels, value-checked (range, no duplicates)
// when `host_checks` is true, which on CUDA costs a sync.
std::optional<at::Tensor> prepare_slot_ids(const std::optional<at::Tensor>& slot_ids, const LightningDims& dims,
                                           bool host_checks);

// Shape/dtype checks of the two factory ops.
void check_init_sizes(const char* op, std::initializer_list<std::pair<const char*, int64_t>> sizes);
void check_state_dtype(at::ScalarType dtype);
void check_cache_dtype(at::ScalarType dtype);

}  // namespace lightning_cache
