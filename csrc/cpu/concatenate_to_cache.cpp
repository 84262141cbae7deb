// concatenate_to_cache and write_to_cache on the CPU: one pass copying K|V
// rows (shared by both ops), one pass building the mask, both split across
// threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../mask_rule.h"
#include "../quantize_rule.h"
#include "../validation.h"

namespace lightning_cache {
namespace {

// Strided view of one [B, q, H, D] input, read element by element.
template <typename T>
struct Strided4d {
  const T* data;
  int64_t s0, s1, s2, s3;
  explicit Strided4d(const at::Tensor& t)
      : data(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* row(int64_t b, int64_t t, int64_t h) const { return data + b * s0 + t * s1 + h * s2; }
};

template <typename cache_t, typename in_t>
void copy_head_rows(cache_t* out, const Strided4d<in_t>& src, int64_t b, int64_t t, int64_t h, int64_t dim) {
  const in_t* row = src.row(b, t, h);
  if constexpr (std::is_same_v<cache_t, in_t>) {  // exact copy (float64 must not pass through float32)
    if (src.s3 == 1) {
      std::copy(row, row + dim, out);
    } else {
      for (int64_t e = 0; e < dim; ++e) out[e] = row[e * src.s3];
    }
  } else {
    for (int64_t e = 0; e < dim; ++e) out[e] = static_cast<cache_t>(static_cast<float>(row[e * src.s3]));
  }
}

// Calls fn(b, t, cell) in parallel for every token (b, t) of key the plan
// writes (plan_writes, the one rule for every layout), where cell is the flat
// index of the token's slot in key_value's first two dimensions.
template <typename Fn>
void for_each_written_token(const WritePlan& plan, const at::Tensor& key, const KVCacheDims& d, const Fn& fn) {
  const int64_t per_row = key.size(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / ((d.key_dim + d.value_dim) * d.heads));
  at::parallel_for(0, static_cast<int64_t>(plan.cell.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t cell = plan.cell[bt];
      if (cell >= 0) fn(bt / per_row, bt % per_row, cell);
    }
  });
}

template <typename cache_t, typename in_t>
void write_tokens(at::Tensor& key_value, const at::Tensor& key, const at::Tensor& value, const WritePlan& plan,
                  const KVCacheDims& d) {
  cache_t* kv = key_value.data_ptr<cache_t>();
  const Strided4d<in_t> k(key), v(value);
  const int64_t width = d.key_dim + d.value_dim;
  for_each_written_token(plan, key, d, [&](int64_t b, int64_t t, int64_t cell) {
    cache_t* token = kv + cell * d.heads * width;
    for (int64_t h = 0; h < d.heads; ++h) {
      copy_head_rows(token + h * width, k, b, t, h, d.key_dim);
      copy_head_rows(token + h * width + d.key_dim, v, b, t, h, d.value_dim);
    }
  });
}

// Quantized storage: one token-head's key (or value) `dim` elements become
// codes at `out` and one scale at `scale_out` (quantize_rule.h).
template <typename code_t, typename in_t>
void quantize_head(code_t* out, float* scale_out, const Strided4d<in_t>& src, int64_t b, int64_t t, int64_t h,
                   int64_t dim) {
  const in_t* row = src.row(b, t, h);
  float amax = 0.0f;
  for (int64_t e = 0; e < dim; ++e) amax = amax_step(amax, static_cast<float>(row[e * src.s3]));
  const float scale = kv_scale(amax, code_max<code_t>());
  for (int64_t e = 0; e < dim; ++e) out[e] = quantize_code<code_t>(static_cast<float>(row[e * src.s3]), scale);
  *scale_out = scale;
}

// write_tokens for int8 / fp8 storage: the new tokens are quantized in the
// same pass that writes them; scales[row, column, h, 0 / 1] = key / value scale.
template <typename code_t, typename in_t>
void quantize_tokens(at::Tensor& key_value, at::Tensor& scales, const at::Tensor& key, const at::Tensor& value,
                     const WritePlan& plan, const KVCacheDims& d) {
  code_t* kv = key_value.data_ptr<code_t>();
  float* sc = scales.data_ptr<float>();
  const Strided4d<in_t> k(key), v(value);
  const int64_t width = d.key_dim + d.value_dim;
  for_each_written_token(plan, key, d, [&](int64_t b, int64_t t, int64_t cell) {
    for (int64_t h = 0; h < d.heads; ++h) {
      code_t* head = kv + (cell * d.heads + h) * width;
      float* head_scales = sc + (cell * d.heads + h) * 2;
      quantize_head(head, head_scales, k, b, t, h, d.key_dim);
      quantize_head(head + d.key_dim, head_scales + 1, v, b, t, h, d.value_dim);
    }
  });
}

// The part both ops share: copies the new tokens of every row the plan
// writes into their cells and advances those rows' positions. Returns the
// plan, which the mask is computed from.
WritePlan write_and_advance(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& slots, const std::optional<at::Tensor>& scales,
                            const std::optional<at::Tensor>& block_tables,
                            const std::optional<at::Tensor>& cu_seqlens, const KVCacheDims& d, bool ring,
                            int64_t limit, bool check_bounds) {
  WritePlan plan = plan_writes(index, d, slots, block_tables, cu_seqlens, ring, limit, check_bounds);
  if (is_empty_call(d)) return plan;  // nothing to copy; positions advance by 0
  if (is_quantized_cache(key_value.scalar_type())) {  // scales validated with the other arguments
    at::Tensor scale_buffer = *scales;
    const bool int8 = key_value.scalar_type() == at::kChar;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "quantize_to_cache_cpu", [&] {
      if (int8) {
        quantize_tokens<int8_t, scalar_t>(key_value, scale_buffer, key, value, plan, d);
      } else {
        quantize_tokens<c10::Float8_e4m3fn, scalar_t>(key_value, scale_buffer, key, value, plan, d);
      }
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key_value.scalar_type(), "write_to_cache_cpu", [&] {
      using cache_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "write_to_cache_cpu_key", [&] {
        write_tokens<cache_t, scalar_t>(key_value, key, value, plan, d);
      });
    });
  }
  int64_t* position = index.data_ptr<int64_t>();
  for (int64_t b = 0; b < d.batch; ++b) {
    if (plan.row[b] >= 0) position[plan.row[b]] = plan.start[b] + plan.length[b];  // index rows are distinct
  }
  return plan;
}

// row[j] = attention_allows(in, b, i, j) for j < limit, with the element type
// resolved once per row so the loop vectorizes (the rule reads it per element).
void fill_attention_prefix(bool* row, const MaskInputs& in, int64_t b, int64_t i, int64_t limit) {
  if (in.attn == nullptr) {
    std::fill(row, row + limit, true);
    return;
  }
  const int64_t base = b * in.attn_stride_b + i * in.attn_stride_i, step = in.attn_stride_j;
  auto fill = [&](auto typed) {
    using T = decltype(typed);
    const T* src = static_cast<const T*>(in.attn) + base;
    if (step == 1) {
      for (int64_t j = 0; j < limit; ++j) row[j] = src[j] != T(0);
    } else {
      for (int64_t j = 0; j < limit; ++j) row[j] = src[j * step] != T(0);
    }
  };
  switch (in.attn_type) {
    case ElemType::Bool:
    case ElemType::UInt8:
    case ElemType::Int8: return fill(uint8_t{});
    case ElemType::Int16: return fill(int16_t{});
    case ElemType::Int32: return fill(int32_t{});
    case ElemType::Int64: return fill(int64_t{});
    case ElemType::Float32: return fill(float{});
    case ElemType::Float64: return fill(double{});
    default:  // 16-bit floats: the rule's bit test
      for (int64_t j = 0; j < limit; ++j) row[j] = attention_allows(in, b, i, j);
  }
}

at::Tensor concatenate_to_cache_cpu(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key,
                                    const at::Tensor& value, const std::optional<at::Tensor>& attention_mask,
                                    const std::optional<at::Tensor>& causal_mask,
                                    const std::optional<at::Tensor>& token_type_ids, bool is_causal, bool ring,
                                    bool check_bounds, const std::optional<at::Tensor>& slot_ids,
                                    const std::optional<at::Tensor>& scales,
                                    const std::optional<at::Tensor>& block_tables) {
  const KVCacheDims d = check_concatenate_args(key_value, index, key, value, attention_mask, causal_mask,
                                               token_type_ids, is_causal, ring, slot_ids, scales, block_tables);
  const std::optional<at::Tensor> slots = prepare_write_rows(index, d, slot_ids, ring, causal_mask, check_bounds);

  const MaskInputs in = make_mask_inputs(d, attention_mask, causal_mask, token_type_ids, is_causal, ring);
  const int64_t limit = position_limit(in);
  const WritePlan rows =
      write_and_advance(key_value, index, key, value, slots, scales, block_tables, std::nullopt, d, ring, limit,
                        check_bounds);
  const std::vector<int64_t>& start = rows.start;

  at::Tensor mask = at::empty({d.batch, 1, d.new_tokens, d.capacity}, key_value.options().dtype(at::kBool));
  if (is_empty_call(d)) return mask;
  bool* out = mask.data_ptr<bool>();
  at::parallel_for(0, d.batch * d.new_tokens, std::max<int64_t>(1, 65536 / d.capacity),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t bi = begin; bi < end; ++bi) {
                       const int64_t b = bi / d.new_tokens, i = bi % d.new_tokens;
                       bool* row = out + bi * d.capacity;
                       if (rows.row[b] < 0) {  // skipped row: all false
                         std::fill(row, row + d.capacity, false);
                         continue;
                       }
                       const int64_t limit = prefix_limit(in, i, start[b]);
                       if (limit < 0) {
                         for (int64_t j = 0; j < d.capacity; ++j) row[j] = mask_value(in, b, i, j, start[b]);
                         continue;
                       }
                       // Prefix-shaped row: skip the per-column rule (the common decode case).
                       fill_attention_prefix(row, in, b, i, limit);
                       std::fill(row + limit, row + d.capacity, false);
                     }
                   });

  return mask;
}

void write_to_cache_cpu(at::Tensor& key_value, at::Tensor& index, const at::Tensor& key, const at::Tensor& value,
                        bool ring, bool check_bounds, const std::optional<at::Tensor>& slot_ids,
                        const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& block_tables,
                        const std::optional<at::Tensor>& cu_seqlens) {
  const KVCacheDims d =
      check_write_args(key_value, index, key, value, ring, slot_ids, "write_to_cache", scales, block_tables, cu_seqlens);
  const std::optional<at::Tensor> slots = prepare_write_rows(index, d, slot_ids, ring, std::nullopt, check_bounds);
  write_and_advance(key_value, index, key, value, slots, scales, block_tables, cu_seqlens, d, ring, kNoPositionLimit,
                    check_bounds);
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_cache, CPU, m) {
  m.impl("concatenate_to_cache", &concatenate_to_cache_cpu);
  m.impl("write_to_cache", &write_to_cache_cpu);
}

}  // namespace lightning_cache
