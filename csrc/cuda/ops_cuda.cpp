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

// The mask kernel indexes its rows with 32-bit offsets, so only a call that builds a mask
// (concatenate_to_cache) is limited in max_length; write_to_cache takes what the CPU takes.
void check_kernel_limits(const KVCacheDims& d, bool builds_mask) {
  TORCH_CHECK_VALUE(!builds_mask || d.capacity <= INT_MAX - kMaskChunk, "key_value: max_length ", d.capacity,
                    " is larger than the CUDA kernel supports (", INT_MAX - kMaskChunk, ")");
  TORCH_CHECK_VALUE(d.key_dim + d.value_dim <= INT_MAX, "key_value: key_dim + value_dim is too large");
  TORCH_CHECK_VALUE(d.heads <= INT_MAX / 2, "key_value: ", d.heads, " heads is more than the CUDA kernel supports (",
                    INT_MAX / 2, ")");
}

// plan_writes' result as the write kernel reads it: one int64 tensor on `device`,
// [cells | rows | starts | lengths] (see launch_write_rows), copied in one transfer.
at::Tensor upload_plan(const WritePlan& plan, const at::Device& device) {
  std::vector<int64_t> flat(plan.cell);
  for (const std::vector<int64_t>* part : {&plan.row, &plan.start, &plan.length}) {
    flat.insert(flat.end(), part->begin(), part->end());
  }
  return int64_on(flat, device);
}

// write_plan_rule.h's plan computed on the device (no sync: capturable), in
// launch_write_rows' layout, followed by the planner's scratch.
at::Tensor plan_paged_writes_on_device(const at::Tensor& index, const KVCacheDims& d, const at::Tensor& block_tables,
                                       int64_t limit) {
  const int64_t size = paged_write_plan_size(d.batch, d.new_tokens);
  const PagedWriteMaps maps = paged_write_maps(d.batch, d.new_tokens, d.page_size, d.num_pages);
  at::Tensor plan = at::empty({size + paged_write_scratch_size(d.batch, maps)}, index.options().dtype(at::kLong));
  PagedWritePlanArgs args;
  args.position = index.const_data_ptr<int64_t>();
  args.table = page_table_of(block_tables, d);
  args.batch = d.batch;
  args.new_tokens = d.new_tokens;
  args.capacity = d.capacity;
  args.position_limit = limit;
  args.plan = plan.data_ptr<int64_t>();
  args.scratch = args.plan + size;
  args.map_bits = maps.page_bits;
  args.row_map_bits = maps.row_page_bits;
  C10_CUDA_CHECK(launch_plan_paged_writes(args));
  return plan;
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
  check_kernel_limits(d, /*builds_mask=*/true);
  const c10::cuda::CUDAGuard guard(key_value.device());
  const bool host_checks = host_checks_allowed(check_bounds);
  const std::optional<at::Tensor> slots = prepare_write_rows(index, d, slot_ids, ring, causal_mask, host_checks);

  at::Tensor mask = at::empty({d.batch, 1, d.new_tokens, d.capacity}, key_value.options().dtype(at::kBool));
  const MaskInputs mask_in = make_mask_inputs(d, attention_mask, causal_mask, token_type_ids, is_causal, ring);
  at::Tensor plan;
  if (plans_paged_writes_in_phases(d, slots, host_checks)) {  // planned on the device: no sync
    plan = plan_paged_writes_on_device(index, d, *block_tables, position_limit(mask_in));
  } else if (d.paged) {  // where each token lands is read from the block table on the host (checks raise here)
    const WritePlan host_plan =
        plan_writes(index, d, slots, block_tables, std::nullopt, ring, position_limit(mask_in), check_bounds);
    if (!is_empty_call(d)) plan = upload_plan(host_plan, key_value.device());
  }
  if (is_empty_call(d)) return mask;  // B = 0 or q = 0: nothing to write, no launch
  C10_CUDA_CHECK(launch_write_rows(key_value, index, key, value, slot_pointer(slots), scale_pointer(scales), d, ring,
                                   mask_in, mask.data_ptr<bool>(),
                                   plan.defined() ? plan.const_data_ptr<int64_t>() : nullptr,
                                   plan.defined() ? d.batch : 0));
  return mask;
}

void write_to_cache_cuda(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key, const at::Tensor& value,
                         bool ring, bool check_bounds, const std::optional<at::Tensor>& slot_ids,
                         const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& block_tables,
                         const std::optional<at::Tensor>& cu_seqlens) {
  const KVCacheDims d =
      check_write_args(key_value, index, key, value, ring, slot_ids, "write_to_cache", scales, block_tables, cu_seqlens);
  check_kernel_limits(d, /*builds_mask=*/false);
  if (d.packed) refuse_capture_of_packed_call("write_to_cache");
  const c10::cuda::CUDAGuard guard(key_value.device());
  const bool host_checks = host_checks_allowed(check_bounds);
  const std::optional<at::Tensor> slots = prepare_write_rows(index, d, slot_ids, ring, std::nullopt, host_checks);
  at::Tensor plan;
  if (plans_paged_writes_in_phases(d, slots, host_checks)) {  // planned on the device: no sync
    plan = plan_paged_writes_on_device(index, d, *block_tables, kNoPositionLimit);
  } else if (d.paged || d.packed) {  // block table / sequence bounds read on the host (checks raise here)
    const WritePlan host_plan =
        plan_writes(index, d, slots, block_tables, cu_seqlens, ring, kNoPositionLimit, check_bounds);
    if (!is_empty_call(d)) plan = upload_plan(host_plan, key_value.device());
  }
  if (is_empty_call(d)) return;  // B = 0 or q = 0: nothing to write, no launch
  MaskInputs no_mask;  // only position_limit (none) and the ring flag are read without a mask
  no_mask.new_tokens = d.new_tokens;
  no_mask.capacity = d.capacity;
  no_mask.ring = ring;
  C10_CUDA_CHECK(launch_write_rows(key_value, index, key, value, slot_pointer(slots), scale_pointer(scales), d, ring,
                                   no_mask, nullptr, plan.defined() ? plan.const_data_ptr<int64_t>() : nullptr,
                                   plan.defined() ? d.batch : 0));
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
  const int64_t written = check_checkpoints(checkpoints, checkpoint_every, state, d);
  if (d.packed) refuse_capture_of_packed_call("lightning_prefill");
  const c10::cuda::CUDAGuard guard(state.device());
  const std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, d, host_checks_allowed(check_bounds));
  PackedSequences seqs;  // sequence bounds are read on the host (a sync)
  if (d.packed) seqs = prepare_cu_seqlens("lightning_prefill", *cu_seqlens, d.tokens, check_bounds);
  if (fused_prefill_selected() && !is_empty_call(d) && d.heads > 0 &&
      fused_prefill_supported(state, query, key, value, d, written, checkpoint_every)) {
    // Packed: one CTA group per sequence, its bounds from the host; tokens of no sequence stay zero.
    at::Tensor bounds;
    if (d.packed) {
      std::vector<int64_t> flat;
      for (int64_t s = 0; s < d.batch; ++s) flat.insert(flat.end(), {seqs.begin[s], seqs.length[s]});
      bounds = int64_on(flat, query.device());
    }
    const auto shape = {d.packed ? int64_t(1) : d.batch, d.tokens, d.heads, d.value_dim};
    at::Tensor out = d.packed ? at::zeros(shape, query.options()) : at::empty(shape, query.options());
    const at::Tensor slopes_f = slopes.to(at::kFloat).contiguous();
    std::optional<at::Tensor> keep;
    if (attention_mask.has_value()) keep = attention_mask->ne(0).to(at::kByte).contiguous();
    C10_CUDA_CHECK(launch_fused_prefill(state, out, query, key, value, slopes_f, slot_pointer(slots),
                                        keep ? keep->const_data_ptr<uint8_t>() : nullptr,
                                        written > 0 ? checkpoints->data_ptr() : nullptr,
                                        written > 0 ? checkpoints->size(1) : 0, written, checkpoint_every, d,
                                        static_cast<float>(scale),
                                        bounds.defined() ? bounds.const_data_ptr<int64_t>() : nullptr));
    return out;
  }
  if (d.packed) {  // one padded ATen batch
    return lightning_prefill_packed(state, query, key, value, slopes, slots, d, seqs, block_size, scale,
                                    &scatter_state_rows_cuda, checkpoints, checkpoint_every);
  }
  return lightning_prefill_chunked(state, query, key, value, slopes, attention_mask, slots, d, block_size, scale,
                                   &scatter_state_rows_cuda, checkpoints, checkpoint_every);
}

at::Tensor cached_attention_cuda(const at::Tensor& query, const at::Tensor& key_value,
                                 const std::optional<at::Tensor>& mask, int64_t key_dim,
                                 const std::optional<at::Tensor>& scales, std::optional<double> softmax_scale,
                                 const std::optional<at::Tensor>& block_tables,
                                 const std::optional<at::Tensor>& cu_seqlens,
                                 const std::optional<at::Tensor>& cache_seqlens,
                                 const std::optional<at::Tensor>& slot_ids, bool check_bounds) {
  const AttentionDims d = check_cached_attention_args(query, key_value, mask, key_dim, scales, softmax_scale,
                                                      block_tables, cu_seqlens, cache_seqlens, slot_ids);
  if (d.packed) refuse_capture_of_packed_call("cached_attention");
  TORCH_CHECK_VALUE(d.key_dim <= 256 && d.value_dim <= 256, "cached_attention: the CUDA kernel supports key_dim and ",
                    "value_dim up to 256, got ", d.key_dim, " and ", d.value_dim);
  TORCH_CHECK_VALUE(d.rows * d.heads <= INT_MAX / 64, "cached_attention: rows * heads (", d.rows * d.heads,
                    ") is larger than the CUDA kernel supports");
  const c10::cuda::CUDAGuard guard(query.device());
  const auto shape = {d.batch, d.queries, d.query_heads, d.value_dim};
  if (is_empty_call(d)) return at::empty(shape, query.options());
  if (d.capacity == 0) return at::zeros(shape, query.options());  // every row fully masked, no launch

  // SPEC 11 rows (packed sequences, cache_seqlens, slot ids) are planned on the host: their
  // small index tensors are read there (a sync), and bad values raise with checks. Without host
  // checks, [B, q] calls are planned on the device instead (no sync: capturable in a CUDA graph).
  const bool planned = d.packed || cache_seqlens.has_value() || slot_ids.has_value();
  AttentionRows rows;
  at::Tensor plan;
  int64_t max_queries = d.queries;
  if (planned && !d.packed && !host_checks_allowed(check_bounds)) {  // planned on the device: no sync
    plan = attention_plan_on_device(d, cache_seqlens, slot_ids);
  } else if (planned) {
    rows = plan_attention_rows(d, cu_seqlens, cache_seqlens, slot_ids, check_bounds);
    std::vector<int64_t> flat;  // [rows, 5]: src, i0, count, kv_row, valid (-1 without cache_seqlens)
    max_queries = 0;
    for (int64_t r = 0; r < d.rows; ++r) {
      const AttentionRow& row = rows.rows[r];
      flat.insert(flat.end(), {row.src, row.i0, row.count, row.kv_row, rows.valid.empty() ? -1 : rows.valid[r]});
      if (row.kv_row >= 0) max_queries = std::max(max_queries, row.count);
    }
    plan = int64_on(flat, query.device());
  }
  PageTable table;
  if (d.paged) {
    table = check_block_tables("cached_attention", *block_tables, d.rows, key_value);  // device data
    if (host_checks_allowed(check_bounds)) check_visible_pages(d, *block_tables, mask, rows);
  }
  const at::Tensor kv = key_value.stride(3) == 1 ? key_value : key_value.contiguous();
  const at::Tensor query_f = query.to(at::kFloat);
  const int64_t splits = std::min<int64_t>(cached_attention_splits(d, std::max<int64_t>(max_queries, 1),
                                                                   query.get_device()), 64);
  // Planned calls may skip rows, and packed tokens of no sequence stay zero.
  at::Tensor out = planned ? at::zeros(shape, query.options().dtype(at::kFloat))
                           : at::empty(shape, query.options().dtype(at::kFloat));
  at::Tensor workspace;
  if (splits > 1) {
    workspace = at::empty({d.rows * d.heads * splits * d.group * max_queries * (d.value_dim + 2)}, out.options());
  }
  int64_t scale_strides[4] = {0, 0, 0, 0}, mask_strides[4] = {0, 0, 0, 0};
  if (scales.has_value()) {
    for (int k = 0; k < 4; ++k) scale_strides[k] = scales->stride(k);
  }
  if (mask.has_value()) {
    for (int k = 0; k < 4; ++k) mask_strides[k] = mask->stride(k);
  }
  C10_CUDA_CHECK(launch_cached_attention(out, query_f, kv, mask.has_value() ? mask->const_data_ptr<bool>() : nullptr,
                                         mask_strides, scales.has_value() ? scales->const_data_ptr<float>() : nullptr,
                                         scale_strides, d, plan.defined() ? plan.const_data_ptr<int64_t>() : nullptr,
                                         max_queries, table, splits,
                                         splits > 1 ? workspace.data_ptr<float>() : nullptr));
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
