// The CUDA entry points of every op: validation, host checks, allocation, and
// a call into the launchers of csrc/cuda/*.cu. This file is host C++ on
// purpose: every exception an op raises (bad arguments, host position checks)
// is thrown and unwound here and in validation.cpp, never through
// nvcc-compiled code (see launchers.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>

#include "../ops.h"
#include "../serving.h"
#include "host_checks.cuh"
#include "launchers.h"

namespace lightning_cache {
namespace {

// The kernels index inside a row with 32-bit offsets.
constexpr int64_t kMaskChunk = 16;

void check_kernel_limits(const KVCacheDims& d) {
  TORCH_CHECK_VALUE(d.capacity <= INT_MAX - kMaskChunk, "key_value: max_length ", d.capacity,
                    " is larger than the CUDA kernel supports (", INT_MAX - kMaskChunk, ")");
  TORCH_CHECK_VALUE(d.key_dim + d.value_dim <= INT_MAX, "key_value: key_dim + value_dim is too large");
}

// SPEC 11's layouts (block tables, packed batches) run on the CPU kernels so
// far: on CUDA they are refused by name rather than misread.
void not_yet_on_cuda(const char* op, std::initializer_list<std::pair<const char*, bool>> given) {
  for (const auto& [name, present] : given) {
    TORCH_CHECK_NOT_IMPLEMENTED(!present, op, ": ", name, " is not implemented on CUDA yet (CPU only)");
  }
}

// Slot ids the kernel reads (contiguous int64 [B], -1 = skip), or null.
const int64_t* slot_pointer(const std::optional<at::Tensor>& slots) {
  return slots.has_value() ? slots->const_data_ptr<int64_t>() : nullptr;
}

// Scales of quantized storage (validated: float32 [P, L, H, 2], contiguous), or null.
float* scale_pointer(const std::optional<at::Tensor>& scales) {
  return scales.has_value() ? scales->data_ptr<float>() : nullptr;
}

at::Tensor concatenate_to_cache_cuda(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key,
                                     const at::Tensor& value, const std::optional<at::Tensor>& attention_mask,
                                     const std::optional<at::Tensor>& causal_mask,
                                     const std::optional<at::Tensor>& token_type_ids, bool is_causal, bool ring,
                                     bool check_bounds, const std::optional<at::Tensor>& slot_ids,
                                     const std::optional<at::Tensor>& scales,
                                     const std::optional<at::Tensor>& block_tables) {
  const KVCacheDims d = check_concatenate_args(key_value, index, key, value, attention_mask, causal_mask,
                                               token_type_ids, is_causal, ring, slot_ids, scales, block_tables);
  not_yet_on_cuda("concatenate_to_cache", {{"block_tables", block_tables.has_value()}});
  check_kernel_limits(d);
  const c10::cuda::CUDAGuard guard(key_value.device());
  const bool host_checks = host_checks_allowed(check_bounds);
  const std::optional<at::Tensor> slots = prepare_write_rows(index, d, slot_ids, ring, causal_mask, host_checks);

  at::Tensor mask = at::empty({d.batch, 1, d.new_tokens, d.capacity}, key_value.options().dtype(at::kBool));
  if (is_empty_call(d)) return mask;  // B = 0 or q = 0: nothing to write, no launch
  const MaskInputs mask_in = make_mask_inputs(d, attention_mask, causal_mask, token_type_ids, is_causal, ring);
  C10_CUDA_CHECK(launch_write_rows(key_value, index, key, value, slot_pointer(slots), scale_pointer(scales), d, ring,
                                   mask_in, mask.data_ptr<bool>()));
  return mask;
}

void write_to_cache_cuda(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key, const at::Tensor& value,
                         bool ring, bool check_bounds, const std::optional<at::Tensor>& slot_ids,
                         const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& block_tables,
                         const std::optional<at::Tensor>& cu_seqlens) {
  const KVCacheDims d =
      check_write_args(key_value, index, key, value, ring, slot_ids, "write_to_cache", scales, block_tables, cu_seqlens);
  not_yet_on_cuda("write_to_cache", {{"block_tables", block_tables.has_value()}, {"cu_seqlens", cu_seqlens.has_value()}});
  check_kernel_limits(d);
  const c10::cuda::CUDAGuard guard(key_value.device());
  const bool host_checks = host_checks_allowed(check_bounds);
  const std::optional<at::Tensor> slots = prepare_write_rows(index, d, slot_ids, ring, std::nullopt, host_checks);
  if (is_empty_call(d)) return;  // B = 0 or q = 0: nothing to write, no launch
  MaskInputs no_mask;  // only position_limit (none) and the ring flag are read without a mask
  no_mask.new_tokens = d.new_tokens;
  no_mask.capacity = d.capacity;
  no_mask.ring = ring;
  C10_CUDA_CHECK(
      launch_write_rows(key_value, index, key, value, slot_pointer(slots), scale_pointer(scales), d, ring, no_mask,
                        nullptr));
}

at::Tensor lightning_decode_cuda(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& slopes,
                                 const std::optional<at::Tensor>& slot_ids, double scale, bool check_bounds,
                                 const std::optional<at::Tensor>& step_states) {
  const LightningDims d =
      check_lightning_args("lightning_decode", state, query, key, value, slopes, std::nullopt, slot_ids, 1,
                           "step_states", step_states);
  if (step_states.has_value()) check_step_states(*step_states, state, d);
  TORCH_CHECK_VALUE(d.key_dim <= 512, "lightning_decode: key_dim ", d.key_dim,
                    " is larger than the CUDA kernel supports (512)");
  TORCH_CHECK_VALUE(d.key_dim * d.value_dim <= INT_MAX, "lightning_decode: key_dim * value_dim (", d.key_dim, " * ",
                    d.value_dim, ") is larger than the CUDA kernel supports");
  const c10::cuda::CUDAGuard guard(state.device());
  const std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, d, host_checks_allowed(check_bounds));
  at::Tensor out = at::empty({d.batch, d.tokens, d.heads, d.value_dim}, query.options());
  if (out.numel() == 0) {  // B or n = 0: nothing to compute, no zero-sized grid
    if (step_states.has_value()) store_initial_step_states(*step_states, state, slots, d);
    return out;
  }
  const at::Tensor slopes_f = slopes.to(at::kFloat).contiguous();
  C10_CUDA_CHECK(launch_decode(state, out, query, key, value, slopes_f,
                               slots ? slots->const_data_ptr<int64_t>() : nullptr, d, static_cast<float>(scale),
                               step_states ? step_states->data_ptr() : nullptr));
  return out;
}

void scatter_state_rows_cuda(at::Tensor& state, const at::Tensor& rows, const std::optional<at::Tensor>& slot_ids) {
  if (!slot_ids.has_value()) {
    state.copy_(rows);
    return;
  }
  C10_CUDA_CHECK(launch_scatter_rows(state, rows.contiguous(), *slot_ids));
}

// The fused tensor-core prefill runs only when asked for (LIGHTNING_CACHE_FUSED_PREFILL=1,
// read per call) until a GPU run has verified it; see README "CUDA prefill".
bool fused_prefill_selected() {
  const char* flag = std::getenv("LIGHTNING_CACHE_FUSED_PREFILL");
  return flag != nullptr && std::string(flag) == "1";
}

at::Tensor lightning_prefill_cuda(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& slopes,
                                  const std::optional<at::Tensor>& attention_mask,
                                  const std::optional<at::Tensor>& slot_ids, int64_t block_size, double scale,
                                  bool check_bounds, const std::optional<at::Tensor>& checkpoints,
                                  int64_t checkpoint_every, const std::optional<at::Tensor>& cu_seqlens) {
  const LightningDims d =
      check_lightning_args("lightning_prefill", state, query, key, value, slopes, attention_mask, slot_ids,
                           block_size, "checkpoints", checkpoints, cu_seqlens);
  not_yet_on_cuda("lightning_prefill", {{"cu_seqlens", cu_seqlens.has_value()}});
  const int64_t written = check_checkpoints(checkpoints, checkpoint_every, state, d);
  const c10::cuda::CUDAGuard guard(state.device());
  const std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, d, host_checks_allowed(check_bounds));
  if (fused_prefill_selected() && !is_empty_call(d) && d.heads > 0 &&
      fused_prefill_supported(state, query, key, value, d, written, checkpoint_every)) {
    at::Tensor out = at::empty({d.batch, d.tokens, d.heads, d.value_dim}, query.options());
    const at::Tensor slopes_f = slopes.to(at::kFloat).contiguous();
    std::optional<at::Tensor> keep;
    if (attention_mask.has_value()) keep = attention_mask->ne(0).to(at::kByte).contiguous();
    C10_CUDA_CHECK(launch_fused_prefill(state, out, query, key, value, slopes_f, slot_pointer(slots),
                                        keep ? keep->const_data_ptr<uint8_t>() : nullptr,
                                        written > 0 ? checkpoints->data_ptr() : nullptr,
                                        written > 0 ? checkpoints->size(1) : 0, written, checkpoint_every, d,
                                        static_cast<float>(scale)));
    return out;
  }
  return lightning_prefill_chunked(state, query, key, value, slopes, attention_mask, slots, d, block_size, scale,
                                   &scatter_state_rows_cuda, checkpoints, checkpoint_every);
}

at::Tensor cached_attention_cuda(const at::Tensor& query, const at::Tensor& key_value,
                                 const std::optional<at::Tensor>& mask_arg, int64_t key_dim,
                                 const std::optional<at::Tensor>& scales, std::optional<double> softmax_scale,
                                 const std::optional<at::Tensor>& block_tables,
                                 const std::optional<at::Tensor>& cu_seqlens,
                                 const std::optional<at::Tensor>& cache_seqlens,
                                 const std::optional<at::Tensor>& slot_ids, bool check_bounds) {
  const AttentionDims d = check_cached_attention_args(query, key_value, mask_arg, key_dim, scales, softmax_scale,
                                                      block_tables, cu_seqlens, cache_seqlens, slot_ids);
  not_yet_on_cuda("cached_attention", {{"block_tables", block_tables.has_value()},
                                       {"cu_seqlens", cu_seqlens.has_value()},
                                       {"cache_seqlens", cache_seqlens.has_value()},
                                       {"slot_ids", slot_ids.has_value()}});
  (void)check_bounds;  // read only by the layouts above
  const at::Tensor& mask = *mask_arg;  // validated: without cache_seqlens a mask is given
  TORCH_CHECK_VALUE(d.key_dim <= 256 && d.value_dim <= 256, "cached_attention: the CUDA kernel supports key_dim and ",
                    "value_dim up to 256, got ", d.key_dim, " and ", d.value_dim);
  TORCH_CHECK_VALUE(d.batch * d.heads <= INT_MAX / 64, "cached_attention: batch * heads (", d.batch * d.heads,
                    ") is larger than the CUDA kernel supports");
  const c10::cuda::CUDAGuard guard(query.device());
  const auto shape = {d.batch, d.queries, d.query_heads, d.value_dim};
  if (is_empty_call(d)) return at::empty(shape, query.options());
  if (d.capacity == 0) return at::zeros(shape, query.options());  // every row fully masked, no launch
  const at::Tensor kv = key_value.stride(3) == 1 ? key_value : key_value.contiguous();
  const at::Tensor query_f = query.to(at::kFloat);
  const int64_t splits = std::min<int64_t>(cached_attention_splits(d, query.get_device()), 64);
  at::Tensor out = at::empty(shape, query.options().dtype(at::kFloat));
  at::Tensor workspace;
  if (splits > 1) {
    workspace = at::empty({d.batch * d.heads * splits * d.group * d.queries * (d.value_dim + 2)}, out.options());
  }
  int64_t scale_strides[4] = {0, 0, 0, 0};
  if (scales.has_value()) {
    for (int k = 0; k < 4; ++k) scale_strides[k] = scales->stride(k);
  }
  C10_CUDA_CHECK(launch_cached_attention(out, query_f, kv, mask,
                                         scales.has_value() ? scales->const_data_ptr<float>() : nullptr, scale_strides,
                                         d, splits, splits > 1 ? workspace.data_ptr<float>() : nullptr));
  return query.scalar_type() == at::kFloat ? out : out.to(query.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_cache, CUDA, m) {
  m.impl("cached_attention", &cached_attention_cuda);
  m.impl("concatenate_to_cache", &concatenate_to_cache_cuda);
  m.impl("write_to_cache", &write_to_cache_cuda);
  m.impl("lightning_decode", &lightning_decode_cuda);
  m.impl("lightning_prefill", &lightning_prefill_cuda);
}

}  // namespace lightning_cache
