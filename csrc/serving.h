// Serving helpers shared by the backends (implemented in serving.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "validation.h"

namespace lightning_cache {

// lightning_decode with n = 0 and step_states: step_states[b, 0] = state[row(b)]
// for every batch row not skipped (`slots` from prepare_slot_ids, or none).
// ATen ops only, so it runs on any backend; the kernels do n >= 1.
void store_initial_step_states(const at::Tensor& step_states, const at::Tensor& state,
                               const std::optional<at::Tensor>& slots, const LightningDims& d);

}  // namespace lightning_cache
