#include "validation.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>
#include <string_view>
#include <vector>

namespace lightning_cache {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

ElemType elem_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kBool: return ElemType::Bool;
    case at::kByte: return ElemType::UInt8;
    case at::kChar: return ElemType::Int8;
    case at::kShort: return ElemType::Int16;
    case at::kInt: return ElemType::Int32;
    case at::kLong: return ElemType::Int64;
    case at::kHalf: return ElemType::Float16;
    case at::kBFloat16: return ElemType::BFloat16;
    case at::kFloat: return ElemType::Float32;
    case at::kDouble: return ElemType::Float64;
    default: TORCH_CHECK_TYPE(false, name, " must be bool, integer or floating point, got ", t.scalar_type());
  }
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
                    "), got ", t.device());
}

// The explicit causal mask as its [T, T] view (it may come as [1, 1, T, T]).
at::Tensor causal_matrix(const at::Tensor& causal_mask) {
  return causal_mask.dim() == 4 ? causal_mask.select(0, 0).select(0, 0) : causal_mask;
}

// Byte extent [begin, end) of a non-empty tensor within its storage (torch
// strides are never negative).
struct Extent {
  int64_t begin, end;
};

Extent extent_of(const at::Tensor& t) {
  const int64_t item = t.element_size();
  int64_t last = 0;
  for (int64_t k = 0; k < t.dim(); ++k) last += (t.size(k) - 1) * t.stride(k);
  return {t.storage_offset() * item, (t.storage_offset() + last) * item + item};
}

// Does an element of `t` (its bytes [offset, offset + item)) touch [lo, hi)?
// Walks the dimensions from the largest stride, visiting only the sub-blocks
// whose extent meets [lo, hi); a sub-block starting inside it answers at
// once, so the walk is short. Past `budget` steps it answers "yes" (the
// conservative side).
class StridedHit {
 public:
  explicit StridedHit(const at::Tensor& t) : item_(t.element_size()) {
    for (int64_t k = 0; k < t.dim(); ++k) {
      if (t.size(k) > 1 && t.stride(k) > 0) dims_.push_back({t.stride(k) * item_, t.size(k)});
    }
    std::sort(dims_.begin(), dims_.end(), [](const Dim& a, const Dim& b) { return a.stride > b.stride; });
    span_.assign(dims_.size() + 1, 0);
    for (size_t k = dims_.size(); k-- > 0;) span_[k] = span_[k + 1] + (dims_[k].size - 1) * dims_[k].stride;
    offset_ = t.storage_offset() * item_;
  }
  bool touches(int64_t lo, int64_t hi) {
    budget_ = 4096;
    return walk(offset_, 0, lo, hi);
  }

 private:
  struct Dim {
    int64_t stride, size;
  };
  bool walk(int64_t offset, size_t k, int64_t lo, int64_t hi) {
    if (--budget_ < 0) return true;
    if (offset >= hi || offset + span_[k] + item_ <= lo) return false;  // this block's extent misses
    if (offset >= lo) return true;                                      // its first element is inside
    if (k == dims_.size()) return true;  // one element straddling lo (views of another dtype)
    const Dim d = dims_[k];
    const int64_t block = span_[k + 1] + item_;  // extent of one sub-block
    // Sub-blocks i with offset + i * stride + block > lo and offset + i * stride < hi.
    const int64_t below = lo - block - offset;
    int64_t first = below < 0 ? 0 : below / d.stride + 1;
    int64_t last = (hi - offset - 1) / d.stride;
    last = std::min(last, d.size - 1);
    for (int64_t i = first; i <= last; ++i) {
      if (walk(offset + i * d.stride, k + 1, lo, hi)) return true;
    }
    return false;
  }
  int64_t item_;
  int64_t offset_ = 0;
  int64_t budget_ = 0;
  std::vector<Dim> dims_;
  std::vector<int64_t> span_;  // span_[k]: bytes from a block's first element to its last, dims k..
};

bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  const Extent ea = extent_of(a), eb = extent_of(b);
  if (ea.end <= eb.begin || eb.end <= ea.begin) return false;
  // A dense tensor owns every byte of its extent: exact test of the other against it.
  if (a.is_non_overlapping_and_dense()) return StridedHit(b).touches(ea.begin, ea.end);
  if (b.is_non_overlapping_and_dense()) return StridedHit(a).touches(eb.begin, eb.end);
  return true;  // two strided tensors with interleaved extents: assume they meet
}

}  // namespace

void check_no_overlap(const char* op, std::initializer_list<OpArgument> args) {
  for (const OpArgument& w : args) {
    if (w.tensor == nullptr || !w.written) continue;
    TORCH_CHECK_VALUE(at::has_internal_overlap(*w.tensor) != at::MemOverlap::Yes, op, ": ", w.name,
                      " is written but its elements overlap each other (e.g. expanded strides); pass a tensor "
                      "whose elements are distinct");
    for (const OpArgument& other : args) {
      if (other.tensor == nullptr || &other == &w) continue;
      // A pair of written arguments is reported once, at the first of the two.
      if (other.written && &other < &w) continue;
      TORCH_CHECK_VALUE(!shares_memory(*w.tensor, *other.tensor), op, ": ", w.name, " (written) shares memory with ",
                        other.name, "; an argument the op writes must not overlap any other argument (pass "
                        "separate tensors or a copy)");
    }
  }
}

namespace {

// check_write_args up to the overlap rule, which check_concatenate_args runs
// itself over the mask arguments too.
KVCacheDims write_args_dims(const at::Tensor& key_value, const at::Tensor& index, const at::Tensor& key,
                             const at::Tensor& value, bool ring, const std::optional<at::Tensor>& slot_ids,
                             const char* op, const std::optional<at::Tensor>& scales) {
  TORCH_CHECK_VALUE(key_value.dim() == 4,
                    "key_value must be [batch, max_length, heads, key_dim + value_dim], got shape ",
                    shape_of(key_value));
  TORCH_CHECK_TYPE(is_float_type(key_value.scalar_type()) || is_quantized_cache(key_value.scalar_type()),
                   "key_value must be float32, float16, bfloat16 or float64, got ", key_value.scalar_type(),
                   " (quantized storage: int8 or float8_e4m3fn codes with scales)");
  TORCH_CHECK_VALUE(key_value.is_contiguous(), "key_value must be contiguous (as init_kv_cache makes it)");
  KVCacheDims d;
  d.pool = key_value.size(0);
  d.capacity = key_value.size(1);
  d.heads = key_value.size(2);
  TORCH_CHECK_VALUE(d.capacity > 0, "key_value must have max_length > 0");

  TORCH_CHECK_VALUE(key.dim() == 4, "key must be [batch, new_tokens, heads, key_dim], got shape ", shape_of(key));
  TORCH_CHECK_VALUE(value.dim() == 4, "value must be [batch, new_tokens, heads, value_dim], got shape ",
                    shape_of(value));
  d.new_tokens = key.size(1);
  d.key_dim = key.size(3);
  d.value_dim = value.size(3);
  // Without slot_ids batch row b is cache row b; with them key_value and
  // index are a pool of P rows and the batch is key's.
  d.batch = slot_ids.has_value() ? key.size(0) : d.pool;
  const char* batch_from = slot_ids.has_value() ? "slot_ids" : "key_value";
  TORCH_CHECK_VALUE(key.size(0) == d.batch, "key has batch ", key.size(0), " but ", batch_from, " has batch ", d.batch);
  TORCH_CHECK_VALUE(value.size(0) == d.batch, "value has batch ", value.size(0), " but ", batch_from, " has batch ",
                    d.batch);
  TORCH_CHECK_VALUE(value.size(1) == d.new_tokens, "value has ", value.size(1), " new tokens but key has ",
                    d.new_tokens);
  TORCH_CHECK_VALUE(key.size(2) == d.heads, "key has ", key.size(2), " heads but key_value has ", d.heads);
  TORCH_CHECK_VALUE(value.size(2) == d.heads, "value has ", value.size(2), " heads but key_value has ", d.heads);
  TORCH_CHECK_VALUE(d.key_dim + d.value_dim == key_value.size(3), "key_dim + value_dim (", d.key_dim, " + ",
                    d.value_dim, ") must equal the last dimension of key_value (", key_value.size(3), ")");
  // Zero heads or head dims are rejected rather than run: a cache without
  // keys or values is a caller's bug, and the kernels size work by them.
  TORCH_CHECK_VALUE(d.heads > 0, "heads must be positive: key_value has shape ", shape_of(key_value));
  TORCH_CHECK_VALUE(d.key_dim > 0, "key_dim must be positive: key has shape ", shape_of(key));
  TORCH_CHECK_VALUE(d.value_dim > 0, "value_dim must be positive: value has shape ", shape_of(value));
  TORCH_CHECK_TYPE(is_float_type(key.scalar_type()), "key must be floating point, got ", key.scalar_type());
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), "value must have key's dtype (", key.scalar_type(),
                   "), got ", value.scalar_type());
  TORCH_CHECK_VALUE(!ring || d.new_tokens <= d.capacity, "with ring=True at most max_length (", d.capacity,
                    ") tokens can be written per call, got ", d.new_tokens);

  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == d.pool, "index must be [", slot_ids ? "pool" : "batch",
                    "] = [", d.pool, "], got shape ", shape_of(index));
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.is_contiguous(), "index must be contiguous (as init_kv_cache makes it)");
  check_same_device(index, "index", key_value, "key_value");
  check_same_device(key, "key", key_value, "key_value");
  check_same_device(value, "value", key_value, "key_value");
  check_slot_ids(op, slot_ids, d.batch, "key", key_value, "key_value");
  check_scales(op, key_value, scales);
  return d;
}

}  // namespace

KVCacheDims check_write_args(const at::Tensor& key_value, const at::Tensor& index, const at::Tensor& key,
                             const at::Tensor& value, bool ring, const std::optional<at::Tensor>& slot_ids,
                             const char* op, const std::optional<at::Tensor>& scales) {
  const KVCacheDims d = write_args_dims(key_value, index, key, value, ring, slot_ids, op, scales);
  check_no_overlap(op, {{"key_value", key_value, true},
                        {"index", index, true},
                        {"scales", scales, true},
                        {"key", key},
                        {"value", value},
                        {"slot_ids", slot_ids}});
  return d;
}

bool is_quantized_cache(at::ScalarType dtype) { return dtype == at::kChar || dtype == at::kFloat8_e4m3fn; }

void check_scales(const char* op, const at::Tensor& key_value, const std::optional<at::Tensor>& scales) {
  if (!is_quantized_cache(key_value.scalar_type())) {
    TORCH_CHECK_VALUE(!scales.has_value(), op, ": scales are only for quantized storage (int8 or float8_e4m3fn "
                      "key_value), but key_value is ", key_value.scalar_type());
    return;
  }
  TORCH_CHECK_VALUE(scales.has_value(), op, ": key_value holds ", key_value.scalar_type(),
                    " codes, so scales [pool, max_length, heads, 2] (float32) are required");
  const at::Tensor& s = *scales;
  TORCH_CHECK_VALUE(s.dim() == 4 && s.size(0) == key_value.size(0) && s.size(1) == key_value.size(1) &&
                        s.size(2) == key_value.size(2) && s.size(3) == 2,
                    op, ": scales must be [pool, max_length, heads, 2] = [", key_value.size(0), ", ",
                    key_value.size(1), ", ", key_value.size(2), ", 2], got shape ", shape_of(s));
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, op, ": scales must be float32, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.is_contiguous(), op, ": scales must be contiguous");
  check_same_device(s, "scales", key_value, "key_value");
}

KVCacheDims check_concatenate_args(const at::Tensor& key_value, const at::Tensor& index, const at::Tensor& key,
                                   const at::Tensor& value, const std::optional<at::Tensor>& attention_mask,
                                   const std::optional<at::Tensor>& causal_mask,
                                   const std::optional<at::Tensor>& token_type_ids, bool is_causal, bool ring,
                                   const std::optional<at::Tensor>& slot_ids,
                                   const std::optional<at::Tensor>& scales) {
  const KVCacheDims d =
      write_args_dims(key_value, index, key, value, ring, slot_ids, "concatenate_to_cache", scales);
  if (attention_mask.has_value()) {
    const at::Tensor& m = *attention_mask;
    check_same_device(m, "attention_mask", key_value, "key_value");
    elem_type(m, "attention_mask");
    const bool two_d = m.dim() == 2 && m.size(0) == d.batch && m.size(1) == d.capacity;
    const bool four_d =
        m.dim() == 4 && m.size(0) == d.batch && m.size(1) == 1 && m.size(2) == d.new_tokens && m.size(3) == d.capacity;
    TORCH_CHECK_VALUE(two_d || four_d, "attention_mask must be [batch, max_length] = [", d.batch, ", ", d.capacity,
                      "] or [batch, 1, new_tokens, max_length] = [", d.batch, ", 1, ", d.new_tokens, ", ", d.capacity,
                      "], got shape ", shape_of(m));
  }
  if (causal_mask.has_value()) {
    const at::Tensor& c = *causal_mask;
    TORCH_CHECK_VALUE(!is_causal, "pass either causal_mask or is_causal=True, not both");
    check_same_device(c, "causal_mask", key_value, "key_value");
    elem_type(c, "causal_mask");
    const bool square = (c.dim() == 2 && c.size(0) == c.size(1)) ||
                        (c.dim() == 4 && c.size(0) == 1 && c.size(1) == 1 && c.size(2) == c.size(3));
    TORCH_CHECK_VALUE(square, "causal_mask must be [T, T] or [1, 1, T, T], got shape ", shape_of(c));
    TORCH_CHECK_VALUE(c.size(-1) >= d.capacity, "causal_mask covers T = ", c.size(-1),
                      " positions but the cache holds max_length = ", d.capacity, "; T must be at least max_length");
  }
  if (token_type_ids.has_value()) {
    const at::Tensor& t = *token_type_ids;
    check_same_device(t, "token_type_ids", key_value, "key_value");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
                     "token_type_ids must be int64 or int32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == d.batch && t.size(1) == d.new_tokens,
                      "token_type_ids must be [batch, new_tokens] = [", d.batch, ", ", d.new_tokens, "], got shape ",
                      shape_of(t));
  }
  check_no_overlap("concatenate_to_cache", {{"key_value", key_value, true},
                                            {"index", index, true},
                                            {"scales", scales, true},
                                            {"key", key},
                                            {"value", value},
                                            {"attention_mask", attention_mask},
                                            {"causal_mask", causal_mask},
                                            {"token_type_ids", token_type_ids},
                                            {"slot_ids", slot_ids}});
  return d;
}

namespace {

// Value checks on the positions of the rows the call writes: index[slots[b]]
// (validated slot ids; -1 skips), or index[b] without slots.
void check_positions(const at::Tensor& index, const KVCacheDims& d, bool ring,
                     const std::optional<at::Tensor>& causal_mask, const std::optional<at::Tensor>& slots) {
  const at::Tensor index_cpu = index.cpu();
  const int64_t* position = index_cpu.const_data_ptr<int64_t>();
  const at::Tensor slots_cpu = slots.has_value() ? slots->cpu().contiguous() : at::Tensor();
  const int64_t* slot = slots.has_value() ? slots_cpu.const_data_ptr<int64_t>() : nullptr;
  const int64_t horizon = causal_mask.has_value() ? causal_mask->size(-1) : kNoPositionLimit;
  for (int64_t b = 0; b < d.batch; ++b) {
    const int64_t r = slot != nullptr ? slot[b] : b;  // the cache row batch row b writes (validated slot ids)
    if (r < 0) continue;                             // slot -1: skipped, nothing to check
    const int64_t start = position[r];
    // The same predicate the kernels use, so the host check and the in-kernel
    // skip cannot disagree; the branches below only pick the message.
    if (row_writable(start, d.new_tokens, d.capacity, ring, horizon)) continue;
    TORCH_CHECK_INDEX(start >= 0, "index[", r, "] = ", start, " is negative; positions start at 0");
    TORCH_CHECK_INDEX(ring || start <= d.capacity - d.new_tokens, "cache overflow in row ", r, ": position ", start,
                      " + ", d.new_tokens, " new tokens exceeds max_length ", d.capacity,
                      " (nothing was written; use a larger max_length or ring=True)");
    TORCH_CHECK_INDEX(start > kNoPositionLimit - d.new_tokens || start <= horizon - d.new_tokens,
                      "causal_mask covers T = ", horizon, " positions but row ", r, " starts at position ", start,
                      " and needs ", d.new_tokens, " more");
    TORCH_CHECK_INDEX(false, "index[", r, "] = ", start, " + ", d.new_tokens,
                      " new tokens overflows int64 (nothing was written)");
  }
}

}  // namespace

std::optional<at::Tensor> prepare_write_rows(const at::Tensor& index, const KVCacheDims& d,
                                             const std::optional<at::Tensor>& slot_ids, bool ring,
                                             const std::optional<at::Tensor>& causal_mask, bool host_checks) {
  LightningDims rows;  // the slot-id rule is the lightning ops': batch rows -> rows of a pool
  rows.batch = d.batch;
  rows.slots = d.pool;
  std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, rows, host_checks);
  if (host_checks) check_positions(index, d, ring, causal_mask, slots);
  return slots;
}

MaskInputs make_mask_inputs(const KVCacheDims& d, const std::optional<at::Tensor>& attention_mask,
                            const std::optional<at::Tensor>& causal_mask,
                            const std::optional<at::Tensor>& token_type_ids, bool is_causal, bool ring) {
  MaskInputs in;
  in.new_tokens = d.new_tokens;
  in.capacity = d.capacity;
  in.ring = ring;
  in.is_causal = is_causal;
  if (attention_mask.has_value()) {
    const at::Tensor& m = *attention_mask;
    in.attn = m.const_data_ptr();
    in.attn_type = elem_type(m, "attention_mask");
    in.attn_stride_b = m.stride(0);
    in.attn_stride_i = m.dim() == 4 ? m.stride(2) : 0;
    in.attn_stride_j = m.stride(-1);
  }
  if (causal_mask.has_value()) {
    const at::Tensor c = causal_matrix(*causal_mask);
    in.causal = c.const_data_ptr();
    in.causal_type = elem_type(c, "causal_mask");
    in.causal_stride_p = c.stride(0);
    in.causal_stride_j = c.stride(1);
    in.causal_size = c.size(0);
  }
  // Token types only widen a causal term, and only for blocks of several tokens.
  const bool causal_in_force = is_causal || causal_mask.has_value();
  if (token_type_ids.has_value() && d.new_tokens > 1 && causal_in_force) {
    const at::Tensor& t = *token_type_ids;
    in.token_types = t.const_data_ptr();
    in.token_type_type = elem_type(t, "token_type_ids");
    in.token_type_stride_b = t.stride(0);
    in.token_type_stride_i = t.stride(1);
  }
  return in;
}

LightningDims check_lightning_args(const char* op, const at::Tensor& state, const at::Tensor& query,
                                   const at::Tensor& key, const at::Tensor& value, const at::Tensor& slopes,
                                   const std::optional<at::Tensor>& attention_mask,
                                   const std::optional<at::Tensor>& slot_ids, int64_t block_size,
                                   const char* output_name, const std::optional<at::Tensor>& output) {
  TORCH_CHECK_VALUE(state.dim() == 4, op, ": state must be [slots, heads, key_dim, value_dim], got shape ",
                    shape_of(state));
  check_state_dtype(state.scalar_type());
  TORCH_CHECK_VALUE(state.is_contiguous(), op, ": state must be contiguous (as init_state makes it)");
  LightningDims d;
  d.slots = state.size(0);
  d.heads = state.size(1);
  d.key_dim = state.size(2);
  d.value_dim = state.size(3);
  // Zero heads or head dims are rejected, so no kernel divides by them.
  TORCH_CHECK_VALUE(d.heads > 0, op, ": heads must be positive: state has shape ", shape_of(state));
  TORCH_CHECK_VALUE(d.key_dim > 0, op, ": key_dim must be positive: state has shape ", shape_of(state));
  TORCH_CHECK_VALUE(d.value_dim > 0, op, ": value_dim must be positive: state has shape ", shape_of(state));
  const struct {
    const at::Tensor* t;
    const char* name;
    int64_t last;
    const char* last_name;
  } inputs[] = {{&query, "query", d.key_dim, "key_dim"},
                {&key, "key", d.key_dim, "key_dim"},
                {&value, "value", d.value_dim, "value_dim"}};
  TORCH_CHECK_VALUE(query.dim() == 4, op, ": query must be [batch, tokens, heads, key_dim], got shape ",
                    shape_of(query));
  d.batch = query.size(0);
  d.tokens = query.size(1);
  for (const auto& in : inputs) {
    const at::Tensor& t = *in.t;
    TORCH_CHECK_VALUE(
        t.dim() == 4 && t.size(0) == d.batch && t.size(1) == d.tokens && t.size(2) == d.heads && t.size(3) == in.last,
        op, ": ", in.name, " must be [batch, tokens, heads, ", in.last_name, "] = [", d.batch, ", ", d.tokens, ", ",
        d.heads, ", ", in.last, "] to match query and state, got shape ", shape_of(t));
    TORCH_CHECK_TYPE(is_float_type(t.scalar_type()) && t.scalar_type() != at::kDouble, op, ": ", in.name,
                     " must be float32, float16 or bfloat16, got ", t.scalar_type());
    check_same_device(t, in.name, state, "state");
  }
  TORCH_CHECK_TYPE(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(), op,
                   ": query, key and value must share one dtype, got ", query.scalar_type(), ", ", key.scalar_type(),
                   " and ", value.scalar_type());
  TORCH_CHECK_VALUE(slopes.dim() == 1 && slopes.size(0) == d.heads, op, ": slopes must be [heads] = [", d.heads,
                    "], got shape ", shape_of(slopes));
  TORCH_CHECK_TYPE(is_float_type(slopes.scalar_type()), op, ": slopes must be floating point, got ",
                   slopes.scalar_type());
  check_same_device(slopes, "slopes", state, "state");
  if (attention_mask.has_value()) {
    const at::Tensor& m = *attention_mask;
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == d.batch && m.size(1) == d.tokens, op,
                      ": attention_mask must be [batch, tokens] = [", d.batch, ", ", d.tokens, "], got shape ",
                      shape_of(m));
    elem_type(m, "attention_mask");
    check_same_device(m, "attention_mask", state, "state");
  }
  check_slot_ids(op, slot_ids, d.batch, "query", state, "state");
  TORCH_CHECK_VALUE(block_size >= 1, op, ": block_size must be at least 1, got ", block_size);
  check_no_overlap(op, {{"state", state, true},
                        {output_name, output, true},
                        {"query", query},
                        {"key", key},
                        {"value", value},
                        {"slopes", slopes},
                        {"attention_mask", attention_mask},
                        {"slot_ids", slot_ids}});
  return d;
}

void check_step_states(const at::Tensor& step_states, const at::Tensor& state, const LightningDims& d) {
  TORCH_CHECK_VALUE(step_states.dim() == 5 && step_states.size(0) == d.batch && step_states.size(1) == d.tokens + 1 &&
                        step_states.size(2) == d.heads && step_states.size(3) == d.key_dim &&
                        step_states.size(4) == d.value_dim,
                    "lightning_decode: step_states must be [batch, tokens + 1, heads, key_dim, value_dim] = [", d.batch,
                    ", ", d.tokens + 1, ", ", d.heads, ", ", d.key_dim, ", ", d.value_dim, "], got shape ",
                    shape_of(step_states));
  TORCH_CHECK_TYPE(step_states.scalar_type() == state.scalar_type(), "lightning_decode: step_states must have the "
                   "state's dtype ", state.scalar_type(), ", got ", step_states.scalar_type());
  check_same_device(step_states, "step_states", state, "state");
  TORCH_CHECK_VALUE(step_states.is_contiguous(), "lightning_decode: step_states must be contiguous");
}

int64_t check_checkpoints(const std::optional<at::Tensor>& checkpoints, int64_t checkpoint_every,
                          const at::Tensor& state, const LightningDims& d) {
  TORCH_CHECK_VALUE(checkpoint_every >= 0, "lightning_prefill: checkpoint_every must be non-negative, got ",
                    checkpoint_every);
  if (!checkpoints.has_value()) return 0;
  const at::Tensor& c = *checkpoints;
  TORCH_CHECK_VALUE(checkpoint_every > 0, "lightning_prefill: checkpoints were given but checkpoint_every is 0; pass "
                    "the number of tokens between checkpoints");
  TORCH_CHECK_VALUE(c.dim() == 5 && c.size(0) == d.batch && c.size(2) == d.heads && c.size(3) == d.key_dim &&
                        c.size(4) == d.value_dim,
                    "lightning_prefill: checkpoints must be [batch, num_checkpoints, heads, key_dim, value_dim] = [",
                    d.batch, ", C, ", d.heads, ", ", d.key_dim, ", ", d.value_dim, "], got shape ", shape_of(c));
  TORCH_CHECK_TYPE(c.scalar_type() == state.scalar_type(),
                   "lightning_prefill: checkpoints must have the state's dtype ", state.scalar_type(), ", got ",
                   c.scalar_type());
  check_same_device(c, "checkpoints", state, "state");
  TORCH_CHECK_VALUE(c.is_contiguous(), "lightning_prefill: checkpoints must be contiguous");
  return checkpoints_written(d.tokens, c.size(1), checkpoint_every);
}

at::Tensor empty_lightning_output(const LightningDims& d, const at::Tensor& query) {
  return at::empty({d.batch, d.tokens, d.heads, d.value_dim}, query.options());
}

void check_slot_ids(const char* op, const std::optional<at::Tensor>& slot_ids, int64_t batch, const char* batch_from,
                    const at::Tensor& pool, const char* pool_name) {
  if (slot_ids.has_value()) {
    const at::Tensor& s = *slot_ids;
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == batch, op, ": slot_ids must be [batch] = [", batch,
                      "], got shape ", shape_of(s));
    TORCH_CHECK_TYPE(s.scalar_type() == at::kLong, op, ": slot_ids must be int64, got ", s.scalar_type());
    check_same_device(s, "slot_ids", pool, pool_name);
  } else {
    TORCH_CHECK_VALUE(batch == pool.size(0), op, ": without slot_ids the batch (", batch,
                      ") must equal the number of ", pool_name, " rows (", pool.size(0), "); the batch is ", batch_from,
                      "'s first dimension");
  }
}

std::optional<at::Tensor> prepare_slot_ids(const std::optional<at::Tensor>& slot_ids, const LightningDims& d,
                                           bool host_checks) {
  if (!slot_ids.has_value()) return std::nullopt;
  const at::Tensor& ids = *slot_ids;
  if (host_checks) {
    const at::Tensor ids_cpu = ids.cpu().contiguous();
    const int64_t* slot = ids_cpu.const_data_ptr<int64_t>();
    std::set<int64_t> seen;
    for (int64_t b = 0; b < d.batch; ++b) {
      TORCH_CHECK_INDEX(slot[b] >= -1 && slot[b] < d.slots, "slot_ids[", b, "] = ", slot[b], " is out of range [-1, ",
                        d.slots, ") for a state with ", d.slots, " rows");
      if (slot[b] >= 0) {
        TORCH_CHECK_INDEX(seen.insert(slot[b]).second, "slot_ids[", b, "] = ", slot[b],
                          " repeats an earlier row's slot; each state row may be updated by one batch row per call");
      }
    }
    return ids.contiguous();
  }
  // No host checks: sanitize on the device. Out of range -> -1.
  const at::Tensor skip = at::full({}, -1, ids.options());
  at::Tensor clean = at::where(ids.ge(0).logical_and_(ids.lt(d.slots)), ids, skip);
  if (d.batch < 2) return clean;
  // Repeats -> -1, first occurrence kept: a stable sort keeps equal ids in
  // batch order, so in each run of equal ids all but the first are repeats.
  // O(B log B) with no sync; -1 entries may be "repeats" too, which is harmless.
  const auto [sorted, order] = at::sort(clean, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor repeat_sorted = at::cat({at::zeros({1}, ids.options().dtype(at::kBool)),
                                           sorted.narrow(0, 1, d.batch - 1).eq(sorted.narrow(0, 0, d.batch - 1))});
  const at::Tensor repeat = at::empty_like(repeat_sorted).scatter_(0, order, repeat_sorted);
  return clean.masked_fill_(repeat, -1);
}

AttentionDims check_cached_attention_args(const at::Tensor& query, const at::Tensor& key_value, const at::Tensor& mask,
                                          int64_t key_dim, const std::optional<at::Tensor>& scales,
                                          std::optional<double> softmax_scale) {
  constexpr const char* op = "cached_attention";
  TORCH_CHECK_VALUE(query.dim() == 4, op, ": query must be [batch, queries, query_heads, key_dim], got shape ",
                    shape_of(query));
  TORCH_CHECK_VALUE(key_value.dim() == 4, op, ": key_value must be [batch, max_length, heads, key_dim + value_dim], got ",
                    "shape ", shape_of(key_value));
  const at::ScalarType q_type = query.scalar_type(), kv_type = key_value.scalar_type();
  TORCH_CHECK_TYPE(q_type == at::kFloat || q_type == at::kHalf || q_type == at::kBFloat16, op,
                   ": query must be float32, float16 or bfloat16, got ", q_type);
  AttentionDims d;
  d.quantized = kv_type == at::kChar || kv_type == at::kFloat8_e4m3fn;
  TORCH_CHECK_TYPE(d.quantized || kv_type == at::kFloat || kv_type == at::kHalf || kv_type == at::kBFloat16, op,
                   ": key_value must be float32, float16, bfloat16, int8 or float8_e4m3fn, got ", kv_type);
  d.batch = query.size(0);
  d.queries = query.size(1);
  d.query_heads = query.size(2);
  d.capacity = key_value.size(1);
  d.heads = key_value.size(2);
  TORCH_CHECK_VALUE(key_value.size(0) == d.batch, op, ": key_value has batch ", key_value.size(0),
                    " but query has batch ", d.batch);
  TORCH_CHECK_VALUE(d.heads > 0, op, ": heads must be positive: key_value has shape ", shape_of(key_value));
  TORCH_CHECK_VALUE(key_dim >= 1 && key_dim < key_value.size(3), op, ": key_dim must be in [1, ", key_value.size(3),
                    ") so that key and value dims are positive (key_value's last dimension is key_dim + value_dim = ",
                    key_value.size(3), "), got ", key_dim);
  d.key_dim = key_dim;
  d.value_dim = key_value.size(3) - key_dim;
  TORCH_CHECK_VALUE(query.size(3) == key_dim, op, ": query's last dimension (", query.size(3),
                    ") must equal key_dim (", key_dim, ")");
  TORCH_CHECK_VALUE(d.query_heads % d.heads == 0, op, ": query_heads (", d.query_heads,
                    ") must be a multiple of the cache's heads (", d.heads, ") for grouped-query attention");
  d.group = d.query_heads / d.heads;
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": mask must be bool (as concatenate_to_cache returns it), ",
                   "got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 4 && mask.size(0) == d.batch && mask.size(1) == 1 && mask.size(2) == d.queries &&
                        mask.size(3) == d.capacity,
                    op, ": mask must be [batch, 1, queries, max_length] = [", d.batch, ", 1, ", d.queries, ", ",
                    d.capacity, "], got shape ", shape_of(mask));
  check_same_device(key_value, "key_value", query, "query");
  check_same_device(mask, "mask", query, "query");
  if (d.quantized) {
    TORCH_CHECK_VALUE(scales.has_value(), op, ": key_value is ", kv_type,
                      ": scales [batch, max_length, heads, 2] float32 are required");
  } else {
    TORCH_CHECK_VALUE(!scales.has_value(), op, ": scales are only for int8 or float8_e4m3fn caches, but key_value is ",
                      kv_type);
  }
  if (scales.has_value()) {
    const at::Tensor& s = *scales;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, op, ": scales must be float32, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 4 && s.size(0) == d.batch && s.size(1) == d.capacity && s.size(2) == d.heads &&
                          s.size(3) == 2,
                      op, ": scales must be [batch, max_length, heads, 2] = [", d.batch, ", ", d.capacity, ", ",
                      d.heads, ", 2], got shape ", shape_of(s));
    check_same_device(s, "scales", query, "query");
  }
  const double scale = softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(key_dim)));
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::isfinite(static_cast<float>(scale)), op,
                    ": softmax_scale must be finite in float32, got ", scale);
  d.softmax_scale = static_cast<float>(scale);
  return d;
}

void check_init_sizes(const char* op, std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  int64_t key_dim = 0, value_dim = 0;
  for (const auto& [name, size] : sizes) {
    TORCH_CHECK_VALUE(size > 0, op, ": ", name, " must be positive, got ", size);
    if (std::string_view(name) == "key_dim") key_dim = size;
    if (std::string_view(name) == "value_dim") value_dim = size;
  }
  // The unified cache's last dimension is key_dim + value_dim: it must not overflow.
  TORCH_CHECK_VALUE(key_dim <= std::numeric_limits<int64_t>::max() - value_dim, op, ": key_dim + value_dim (",
                    key_dim, " + ", value_dim, ") overflows int64");
}

void check_state_dtype(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16, "state dtype must be float32 or bfloat16, got ",
                   dtype);
}

void check_cache_dtype(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_float_type(dtype), "cache dtype must be float32, float16, bfloat16 or float64, got ", dtype);
}

}  // namespace lightning_cache
