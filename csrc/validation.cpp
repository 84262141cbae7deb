#include "validation.h"

#include "write_plan_rule.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <set>
#include <unordered_map>
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
  check_no_overlap(op, std::vector<OpArgument>(args));
}

void check_no_overlap(const char* op, const std::vector<OpArgument>& args) {
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
                             const char* op, const std::optional<at::Tensor>& scales,
                             const std::optional<at::Tensor>& block_tables,
                             const std::optional<at::Tensor>& cu_seqlens) {
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
  d.paged = block_tables.has_value();
  d.packed = cu_seqlens.has_value();
  if (d.paged) {
    TORCH_CHECK_VALUE(!ring, op, ": ring=True cannot be used with block_tables (a paged row grows by whole pages)");
    TORCH_CHECK_VALUE(!slot_ids.has_value(), op, ": slot_ids cannot be used with block_tables (each row's block "
                      "table names its pages; index and block_tables have one row per batch row)");
    const PageTable table = check_block_tables(op, *block_tables, -1, key_value);
    d.pool = block_tables->size(0);  // rows of index: one per batch row
    d.capacity = table.max_pages * table.page_size;
    d.num_pages = table.num_pages;
    d.page_size = table.page_size;
  }
  TORCH_CHECK_VALUE(!(d.packed && ring), op, ": ring=True cannot be used with cu_seqlens");

  TORCH_CHECK_VALUE(key.dim() == 4, "key must be [batch, new_tokens, heads, key_dim], got shape ", shape_of(key));
  TORCH_CHECK_VALUE(value.dim() == 4, "value must be [batch, new_tokens, heads, value_dim], got shape ",
                    shape_of(value));
  d.new_tokens = key.size(1);
  d.key_dim = key.size(3);
  d.value_dim = value.size(3);
  // Without slot_ids batch row b is cache row b; with them key_value and
  // index are a pool of P rows and the batch is key's.
  // Packed: the batch is the S sequences of key [1, T, ...], which are rows of
  // index (or slot_ids, or block_tables).
  const int64_t key_batch = d.packed ? 1 : (slot_ids.has_value() ? key.size(0) : d.pool);
  d.batch = d.packed ? check_cu_seqlens(op, *cu_seqlens, key, "key") : key_batch;
  const char* batch_from = slot_ids.has_value() ? "slot_ids" : (d.paged ? "block_tables" : "key_value");
  const int64_t rows_in = d.packed ? 1 : d.batch;
  if (d.packed) batch_from = "cu_seqlens (packed)";
  TORCH_CHECK_VALUE(key.size(0) == rows_in, "key has batch ", key.size(0), " but ", batch_from, " has batch ", rows_in);
  TORCH_CHECK_VALUE(value.size(0) == rows_in, "value has batch ", value.size(0), " but ", batch_from, " has batch ",
                    rows_in);
  if (d.paged) {
    TORCH_CHECK_VALUE(d.batch == d.pool, op, ": block_tables has ", d.pool, " rows but the batch has ", d.batch,
                      d.packed ? " sequences (cu_seqlens)" : " rows (key)");
  }
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
  if (d.paged) {
    check_same_device(*block_tables, "block_tables", key_value, "key_value");
  } else {
    check_slot_ids(op, slot_ids, d.batch, d.packed ? "cu_seqlens" : "key", key_value, "key_value");
  }
  check_scales(op, key_value, scales);
  return d;
}

// The tensor arguments both sequence-cache writes take, for the overlap rule (key_value, index and
// scales are written); concatenate_to_cache adds its masks.
std::vector<OpArgument> write_arguments(const at::Tensor& key_value, const at::Tensor& index, const at::Tensor& key,
                                        const at::Tensor& value, const std::optional<at::Tensor>& slot_ids,
                                        const std::optional<at::Tensor>& scales,
                                        const std::optional<at::Tensor>& block_tables,
                                        const std::optional<at::Tensor>& cu_seqlens) {
  return {{"key_value", key_value, true}, {"index", index, true}, {"scales", scales, true},
          {"key", key},                   {"value", value},       {"slot_ids", slot_ids},
          {"block_tables", block_tables}, {"cu_seqlens", cu_seqlens}};
}

}  // namespace

KVCacheDims check_write_args(const at::Tensor& key_value, const at::Tensor& index, const at::Tensor& key,
                             const at::Tensor& value, bool ring, const std::optional<at::Tensor>& slot_ids,
                             const char* op, const std::optional<at::Tensor>& scales,
                             const std::optional<at::Tensor>& block_tables,
                             const std::optional<at::Tensor>& cu_seqlens) {
  const KVCacheDims d =
      write_args_dims(key_value, index, key, value, ring, slot_ids, op, scales, block_tables, cu_seqlens);
  check_no_overlap(op, write_arguments(key_value, index, key, value, slot_ids, scales, block_tables, cu_seqlens));
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
                                   const std::optional<at::Tensor>& scales,
                                   const std::optional<at::Tensor>& block_tables) {
  const KVCacheDims d = write_args_dims(key_value, index, key, value, ring, slot_ids, "concatenate_to_cache", scales,
                                        block_tables, std::nullopt);
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
  std::vector<OpArgument> args =
      write_arguments(key_value, index, key, value, slot_ids, scales, block_tables, std::nullopt);
  args.insert(args.begin() + 5, {{"attention_mask", attention_mask}, {"causal_mask", causal_mask},  // after value
                                 {"token_type_ids", token_type_ids}});
  check_no_overlap("concatenate_to_cache", args);
  return d;
}

namespace {

// The IndexError for a row that row_writable refuses; the branches only pick the message.
[[noreturn]] void raise_unwritable(int64_t r, int64_t start, int64_t tokens, int64_t capacity, bool ring,
                                   int64_t horizon) {
  TORCH_CHECK_INDEX(start >= 0, "index[", r, "] = ", start, " is negative; positions start at 0");
  TORCH_CHECK_INDEX(ring || start <= capacity - tokens, "cache overflow in row ", r, ": position ", start, " + ",
                    tokens, " new tokens exceeds max_length ", capacity,
                    " (nothing was written; use a larger max_length or ring=True)");
  TORCH_CHECK_INDEX(start > kNoPositionLimit - tokens || start <= horizon - tokens, "causal_mask covers T = ",
                    horizon, " positions but row ", r, " starts at position ", start, " and needs ", tokens, " more");
  TORCH_CHECK_INDEX(false, "index[", r, "] = ", start, " + ", tokens, " new tokens overflows int64 (nothing was written)");
}

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
    if (!row_writable(start, d.new_tokens, d.capacity, ring, horizon)) {
      raise_unwritable(r, start, d.new_tokens, d.capacity, ring, horizon);
    }
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
  // Packed and paged writes check their rows in plan_writes (per-sequence lengths, pages).
  if (host_checks && !d.packed && !d.paged) check_positions(index, d, ring, causal_mask, slots);
  return slots;
}

int64_t check_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& tokens,
                         const char* tokens_name) {
  const at::Tensor& c = cu_seqlens;
  TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) >= 1, op, ": cu_seqlens must be [num_sequences + 1] (1-D, at least ",
                    "one entry), got shape ", shape_of(c));
  TORCH_CHECK_VALUE(c.scalar_type() == at::kInt || c.scalar_type() == at::kLong, op,
                    ": cu_seqlens must be int32 or int64, got ", c.scalar_type());
  check_same_device(c, "cu_seqlens", tokens, tokens_name);
  TORCH_CHECK_VALUE(tokens.dim() >= 1 && tokens.size(0) == 1, op, ": with cu_seqlens, ", tokens_name,
                    " must be packed as [1, total_tokens, ...], got shape ", shape_of(tokens));
  return c.size(0) - 1;
}

PackedSequences prepare_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, int64_t total_tokens,
                                   bool host_checks) {
  const at::Tensor c = cu_seqlens.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* v = c.const_data_ptr<int64_t>();
  const int64_t S = c.size(0) - 1;
  if (host_checks) {
    TORCH_CHECK_VALUE(v[0] == 0, op, ": cu_seqlens must start at 0, got cu_seqlens[0] = ", v[0]);
    for (int64_t s = 0; s < S; ++s) {
      TORCH_CHECK_VALUE(v[s + 1] >= v[s], op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", s + 1, "] = ",
                        v[s + 1], " < cu_seqlens[", s, "] = ", v[s]);
    }
    TORCH_CHECK_VALUE(v[S] == total_tokens, op, ": cu_seqlens[-1] must equal the number of packed tokens (",
                      total_tokens, "), got ", v[S]);
  }
  PackedSequences seqs{std::vector<int64_t>(S, 0), std::vector<int64_t>(S, -1)};
  int64_t earlier_max = 0;  // the largest entry before c_s (and 0)
  for (int64_t s = 0; s < S; ++s) {
    const int64_t begin = v[s], end = v[s + 1];
    if (begin >= earlier_max && begin <= end && end <= total_tokens) {
      seqs.begin[s] = begin;
      seqs.length[s] = end - begin;  // no overflow: 0 <= begin <= end
    }
    earlier_max = std::max(earlier_max, begin);
  }
  return seqs;
}

PageTable check_block_tables(const char* op, const at::Tensor& block_tables, int64_t batch, const at::Tensor& pages) {
  const at::Tensor& t = block_tables;
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": block_tables must be [batch, max_pages], got shape ", shape_of(t));
  TORCH_CHECK_VALUE(batch < 0 || t.size(0) == batch, op, ": block_tables must have one row per batch row (", batch,
                    "), got shape ", shape_of(t));
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op,
                   ": block_tables must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(pages.dim() == 4 && pages.size(1) > 0, op,
                    ": with block_tables, key_value must be the page pool [num_pages, page_size, heads, key_dim + "
                    "value_dim] with page_size > 0 (init_paged_kv_cache), got shape ", shape_of(pages));
  PageTable table;
  table.data = t.const_data_ptr();
  table.type = t.scalar_type() == at::kInt ? ElemType::Int32 : ElemType::Int64;
  table.stride_row = t.stride(0);
  table.stride_page = t.stride(1);
  table.page_size = pages.size(1);
  table.num_pages = pages.size(0);
  table.max_pages = t.size(1);
  TORCH_CHECK_VALUE(table.max_pages <= std::numeric_limits<int64_t>::max() / table.page_size, op,
                    ": block_tables' max_pages (", table.max_pages, ") * page_size (", table.page_size,
                    ") overflows int64");
  return table;
}

bool cpu_runs_device_plans() {
  const char* plan = std::getenv("LIGHTNING_CACHE_CPU_PLAN");
  return plan != nullptr && (std::string_view(plan) == "device" || std::string_view(plan) == "device-unmapped");
}

namespace {

// LIGHTNING_CACHE_CPU_PLAN=device-unmapped: the device write planner without its hash maps, as CUDA
// runs it for calls past kMaxPageMapBits (too large to test there).
bool cpu_plan_without_page_map() {
  const char* plan = std::getenv("LIGHTNING_CACHE_CPU_PLAN");
  return plan != nullptr && std::string_view(plan) == "device-unmapped";
}

}  // namespace

PageTable page_table_of(const at::Tensor& block_tables, const KVCacheDims& d) {
  PageTable table;
  table.data = block_tables.const_data_ptr();
  table.type = block_tables.scalar_type() == at::kInt ? ElemType::Int32 : ElemType::Int64;
  table.stride_row = block_tables.stride(0);
  table.stride_page = block_tables.stride(1);
  table.page_size = d.page_size;
  table.num_pages = d.num_pages;
  table.max_pages = block_tables.size(1);
  return table;
}

bool plans_paged_writes_in_phases(const KVCacheDims& d, const std::optional<at::Tensor>& slots, bool host_checks) {
  return d.paged && !d.packed && !slots.has_value() && !host_checks && d.batch > 0 && d.new_tokens > 0;
}

namespace {

struct NoBarrier {
  void operator()() const {}
};

// write_plan_rule.h's phases on one CPU thread.
WritePlan plan_paged_writes_on_host(const at::Tensor& index, const KVCacheDims& d, const at::Tensor& block_tables,
                                    int64_t position_limit) {
  const at::Tensor index_cpu = index.cpu().contiguous();
  const at::Tensor table_cpu = block_tables.cpu();
  const int64_t B = d.batch, q = d.new_tokens;
  const PagedWriteMaps maps =
      cpu_plan_without_page_map() ? PagedWriteMaps{} : paged_write_maps(B, q, d.page_size, d.num_pages);
  std::vector<int64_t> flat(paged_write_plan_size(B, q)), scratch(paged_write_scratch_size(B, maps));
  PagedWritePlanArgs args;
  args.position = index_cpu.const_data_ptr<int64_t>();
  args.table = page_table_of(table_cpu, d);
  args.batch = B;
  args.new_tokens = q;
  args.capacity = d.capacity;
  args.position_limit = position_limit;
  args.plan = flat.data();
  args.scratch = scratch.data();
  args.map_bits = maps.page_bits;
  args.row_map_bits = maps.row_page_bits;
  plan_paged_writes(args, 0, 1, NoBarrier{});
  WritePlan plan{std::vector<int64_t>(flat.begin() + B * q, flat.begin() + B * q + B),
                 std::vector<int64_t>(flat.begin() + B * q + B, flat.begin() + B * q + 2 * B),
                 std::vector<int64_t>(flat.begin() + B * q + 2 * B, flat.end()), std::vector<int64_t>(B, 0),
                 std::vector<int64_t>(flat.begin(), flat.begin() + B * q)};
  for (int64_t w = 0; w < B; ++w) {
    if (plan.row[w] >= 0) plan.source[w] = w * q;
  }
  return plan;
}

}  // namespace

WritePlan plan_writes(const at::Tensor& index, const KVCacheDims& d, const std::optional<at::Tensor>& slots,
                      const std::optional<at::Tensor>& block_tables, const std::optional<at::Tensor>& cu_seqlens,
                      bool ring, int64_t position_limit, bool host_checks) {
  // The phases are what CUDA runs on the device for these calls; the CPU's default is the loop below
  // (O(B * q) with a hash map, where the phases compare page segments pairwise).
  if (plans_paged_writes_in_phases(d, slots, host_checks) && cpu_runs_device_plans()) {
    return plan_paged_writes_on_host(index, d, *block_tables, position_limit);
  }
  const at::Tensor index_cpu = index.cpu();
  const int64_t* position = index_cpu.const_data_ptr<int64_t>();
  const at::Tensor slots_cpu = slots.has_value() ? slots->cpu().contiguous() : at::Tensor();
  const int64_t* slot = slots.has_value() ? slots_cpu.const_data_ptr<int64_t>() : nullptr;
  const int64_t source_rows = d.packed ? 1 : d.batch;
  WritePlan plan{std::vector<int64_t>(d.batch, -1), std::vector<int64_t>(d.batch, 0),
                 std::vector<int64_t>(d.batch, 0), std::vector<int64_t>(d.batch, 0),
                 std::vector<int64_t>(source_rows * d.new_tokens, -1)};
  PackedSequences seqs;
  if (d.packed) seqs = prepare_cu_seqlens("write_to_cache", *cu_seqlens, d.new_tokens, host_checks);
  at::Tensor table_cpu;
  PageTable table;
  if (d.paged) {
    table_cpu = block_tables->cpu();
    table = page_table_of(table_cpu, d);
  }
  // Page slots taken by earlier rows of this call -> the row that took them.
  std::unordered_map<int64_t, int64_t> claimed;
  std::vector<int64_t> cells;
  for (int64_t w = 0; w < d.batch; ++w) {
    const int64_t r = slot != nullptr ? slot[w] : w;  // sanitized slot ids: -1 skips
    if (r < 0 || r >= d.pool) continue;
    const int64_t length = d.packed ? seqs.length[w] : d.new_tokens;
    // A skipped sequence writes nothing; an empty one does nothing (its position is not even read).
    if (length <= 0) continue;
    const int64_t source = d.packed ? seqs.begin[w] : w * d.new_tokens;
    const int64_t start = position[r];
    if (!row_writable(start, length, d.capacity, ring, position_limit)) {
      if (host_checks) raise_unwritable(r, start, length, d.capacity, ring, position_limit);
      continue;
    }
    cells.resize(length);
    bool ok = true;
    for (int64_t t = 0; t < length && ok; ++t) {
      if (!d.paged) {
        cells[t] = r * d.capacity + token_column(start, t, d.capacity, ring);
        continue;
      }
      const int64_t p = start + t;
      cells[t] = paged_cell(table, r, p);
      if (cells[t] < 0) {
        TORCH_CHECK_INDEX(!host_checks, "block_tables[", r, ", ", p / d.page_size, "] = ", page_entry(table, r, p),
                          " is outside the page pool [0, ", d.num_pages, ") but row ", r, " writes position ", p,
                          " (nothing was written)");
        for (int64_t u = 0; u < t; ++u) claimed.erase(cells[u]);  // this row is skipped: release its slots
        ok = false;
        break;
      }
      const auto [taken, fresh] = claimed.emplace(cells[t], r);
      if (!fresh) {
        TORCH_CHECK_INDEX(!host_checks, "block_tables: rows ", taken->second, " and ", r, " both write page ",
                          cells[t] / d.page_size, " slot ", cells[t] % d.page_size,
                          "; a page slot may be written once per call (nothing was written)");
        for (int64_t u = 0; u < t; ++u) claimed.erase(cells[u]);  // this row is skipped: release its slots
        ok = false;
      }
    }
    if (!ok) continue;  // skipped whole: the earlier row keeps a contested slot
    plan.row[w] = r;
    plan.start[w] = start;
    plan.length[w] = length;
    plan.source[w] = source;
    std::copy(cells.begin(), cells.end(), plan.cell.begin() + source);
  }
  return plan;
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
                                   const char* output_name, const std::optional<at::Tensor>& output,
                                   const std::optional<at::Tensor>& cu_seqlens) {
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
  if (cu_seqlens.has_value()) {
    TORCH_CHECK_VALUE(!attention_mask.has_value(), op, ": attention_mask cannot be used with cu_seqlens (packing "
                      "replaces padding: give each sequence only its own tokens)");
    d.batch = check_cu_seqlens(op, *cu_seqlens, query, "query");
    d.packed = true;
  }
  check_slot_ids(op, slot_ids, d.batch, d.packed ? "cu_seqlens" : "query", state, "state");
  TORCH_CHECK_VALUE(block_size >= 1, op, ": block_size must be at least 1, got ", block_size);
  check_no_overlap(op, {{"state", state, true},
                        {output_name, output, true},
                        {"query", query},
                        {"key", key},
                        {"value", value},
                        {"slopes", slopes},
                        {"attention_mask", attention_mask},
                        {"slot_ids", slot_ids},
                        {"cu_seqlens", cu_seqlens}});
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
  return at::empty({input_rows(d), d.tokens, d.heads, d.value_dim}, query.options());
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

AttentionDims check_cached_attention_args(const at::Tensor& query, const at::Tensor& key_value,
                                          const std::optional<at::Tensor>& mask, int64_t key_dim,
                                          const std::optional<at::Tensor>& scales,
                                          std::optional<double> softmax_scale,
                                          const std::optional<at::Tensor>& block_tables,
                                          const std::optional<at::Tensor>& cu_seqlens,
                                          const std::optional<at::Tensor>& cache_seqlens,
                                          const std::optional<at::Tensor>& slot_ids) {
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
  d.pool_rows = key_value.size(0);
  d.packed = cu_seqlens.has_value();
  d.paged = block_tables.has_value();
  d.has_mask = mask.has_value();
  d.rows = d.packed ? check_cu_seqlens(op, *cu_seqlens, query, "query") : d.batch;
  TORCH_CHECK_VALUE(!(d.packed && d.has_mask), op, ": mask cannot be used with cu_seqlens (packed queries are placed "
                    "by cache_seqlens, causally)");
  TORCH_CHECK_VALUE(d.has_mask != cache_seqlens.has_value(), op, d.has_mask
                        ? ": pass either mask or cache_seqlens, not both"
                        : ": without a mask, cache_seqlens [rows] (each row's valid tokens) is required");
  if (d.paged) {
    TORCH_CHECK_VALUE(!slot_ids.has_value(), op, ": slot_ids cannot be used with block_tables (each row's block "
                      "table names its pages)");
    const PageTable table = check_block_tables(op, *block_tables, d.rows, key_value);
    check_same_device(*block_tables, "block_tables", query, "query");
    d.page_size = table.page_size;
    d.capacity = table.max_pages * table.page_size;
  } else if (slot_ids.has_value()) {
    const at::Tensor& ids = *slot_ids;
    TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == d.rows, op, ": slot_ids must be [rows] = [", d.rows,
                      "], got shape ", shape_of(ids));
    TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, op, ": slot_ids must be int64, got ", ids.scalar_type());
    check_same_device(ids, "slot_ids", query, "query");
  } else {
    TORCH_CHECK_VALUE(key_value.size(0) == d.rows, op, ": key_value has batch ", key_value.size(0), " but ",
                      d.packed ? "cu_seqlens has " : "query has batch ", d.rows,
                      d.packed ? " sequences" : "", " (pass slot_ids to read rows of a pool)");
  }
  if (cache_seqlens.has_value()) {
    const at::Tensor& c = *cache_seqlens;
    TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == d.rows, op, ": cache_seqlens must be [rows] = [", d.rows,
                      "], got shape ", shape_of(c));
    TORCH_CHECK_VALUE(c.scalar_type() == at::kInt || c.scalar_type() == at::kLong, op,
                      ": cache_seqlens must be int32 or int64, got ", c.scalar_type());
    check_same_device(c, "cache_seqlens", query, "query");
  }
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
  if (d.has_mask) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op, ": mask must be bool (as concatenate_to_cache returns it), ",
                     "got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 4 && m.size(0) == d.batch && m.size(1) == 1 && m.size(2) == d.queries &&
                          m.size(3) == d.capacity,
                      op, ": mask must be [batch, 1, queries, max_length] = [", d.batch, ", 1, ", d.queries, ", ",
                      d.capacity, "], got shape ", shape_of(m));
    check_same_device(m, "mask", query, "query");
  }
  check_same_device(key_value, "key_value", query, "query");
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
    TORCH_CHECK_VALUE(s.dim() == 4 && s.size(0) == key_value.size(0) && s.size(1) == key_value.size(1) &&
                          s.size(2) == d.heads && s.size(3) == 2,
                      op, ": scales must be [", d.paged ? "num_pages, page_size" : "batch, max_length",
                      ", heads, 2] = [", key_value.size(0), ", ", key_value.size(1), ", ", d.heads,
                      ", 2] like key_value, got shape ", shape_of(s));
    check_same_device(s, "scales", query, "query");
  }
  const double scale = softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(key_dim)));
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::isfinite(static_cast<float>(scale)), op,
                    ": softmax_scale must be finite in float32, got ", scale);
  d.softmax_scale = static_cast<float>(scale);
  return d;
}

std::vector<int64_t> prepare_cache_seqlens(const at::Tensor& cache_seqlens, const std::vector<int64_t>& queries,
                                           int64_t capacity, bool host_checks) {
  const at::Tensor c = cache_seqlens.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* v = c.const_data_ptr<int64_t>();
  std::vector<int64_t> valid(queries.size(), -1);
  for (size_t r = 0; r < queries.size(); ++r) {
    if (queries[r] < 0) continue;
    const bool ok = v[r] >= queries[r] && v[r] <= capacity;
    if (!ok && host_checks) {
      TORCH_CHECK_VALUE(v[r] <= capacity, "cached_attention: cache_seqlens[", r, "] = ", v[r],
                        " is larger than the cache's capacity (", capacity, ")");
      TORCH_CHECK_VALUE(false, "cached_attention: cache_seqlens[", r, "] = ", v[r], " is smaller than the row's ",
                        queries[r], " queries (the count after writing them)");
    }
    if (ok) valid[r] = v[r];
  }
  return valid;
}

at::Tensor attention_plan_on_device(const AttentionDims& d, const std::optional<at::Tensor>& cache_seqlens,
                                    const std::optional<at::Tensor>& slot_ids) {
  const at::Tensor& like = cache_seqlens.has_value() ? *cache_seqlens : *slot_ids;
  const auto options = like.options().dtype(at::kLong);
  const at::Tensor rows = at::arange(d.rows, options);
  const at::Tensor none = at::full({d.rows}, -1, options);
  at::Tensor kv_row = rows;
  if (slot_ids.has_value()) {  // out of range -> skipped
    const at::Tensor ids = slot_ids->to(at::kLong);
    kv_row = at::where(ids.ge(0).logical_and_(ids.lt(d.pool_rows)), ids, none);
  }
  at::Tensor valid = none;
  if (cache_seqlens.has_value()) {  // a kept row needs count <= cache_seqlens <= L
    const at::Tensor v = cache_seqlens->to(at::kLong);
    const at::Tensor ok = kv_row.ge(0).logical_and_(v.ge(d.queries)).logical_and_(v.le(d.capacity));
    valid = at::where(ok, v, none);
    kv_row = at::where(ok, kv_row, none);
  }
  return at::stack({rows, at::zeros_like(rows), at::full_like(rows, d.queries), kv_row, valid}, 1);
}

AttentionRows plan_attention_rows(const AttentionDims& d, const std::optional<at::Tensor>& cu_seqlens,
                                  const std::optional<at::Tensor>& cache_seqlens,
                                  const std::optional<at::Tensor>& slot_ids, bool host_checks) {
  AttentionRows plan;
  std::vector<AttentionRow>& rows = plan.rows;
  rows.resize(d.rows);
  if (!d.packed && !host_checks && (cache_seqlens.has_value() || slot_ids.has_value()) && cpu_runs_device_plans()) {
    // The rule CUDA runs on the device for these calls, read back here (its ATen ops cost more than the
    // loop below on the CPU, so only when asked: the tests do).
    const at::Tensor flat = attention_plan_on_device(d, cache_seqlens, slot_ids).cpu().contiguous();
    const int64_t* e = flat.const_data_ptr<int64_t>();
    if (cache_seqlens.has_value()) plan.valid.resize(d.rows);
    for (int64_t r = 0; r < d.rows; ++r, e += 5) {
      rows[r] = {e[0], e[1], e[2], e[3]};
      if (cache_seqlens.has_value()) plan.valid[r] = e[4];
      plan.any_skipped |= e[3] < 0;
    }
    return plan;
  }
  if (d.packed) {
    const PackedSequences seqs = prepare_cu_seqlens("cached_attention", *cu_seqlens, d.queries, host_checks);
    for (int64_t s = 0; s < d.rows; ++s) {
      rows[s] = {0, seqs.length[s] < 0 ? 0 : seqs.begin[s], std::max<int64_t>(seqs.length[s], 0),
                 seqs.length[s] < 0 ? -1 : s};
    }
  } else {
    for (int64_t b = 0; b < d.rows; ++b) rows[b] = {b, 0, d.queries, b};
  }
  if (slot_ids.has_value()) {
    const at::Tensor ids = slot_ids->to(at::kCPU).contiguous();
    const int64_t* id = ids.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < d.rows; ++r) {
      TORCH_CHECK_INDEX(!host_checks || (id[r] >= -1 && id[r] < d.pool_rows), "cached_attention: slot_ids[", r,
                        "] = ", id[r], " is out of range [-1, ", d.pool_rows, ") for key_value with ", d.pool_rows,
                        " rows");
      if (rows[r].kv_row >= 0) rows[r].kv_row = id[r] >= 0 && id[r] < d.pool_rows ? id[r] : -1;
    }
  }
  if (cache_seqlens.has_value()) {
    std::vector<int64_t> counts(d.rows);
    for (int64_t r = 0; r < d.rows; ++r) counts[r] = rows[r].kv_row < 0 ? -1 : rows[r].count;
    plan.valid = prepare_cache_seqlens(*cache_seqlens, counts, d.capacity, host_checks);
    for (int64_t r = 0; r < d.rows; ++r) {
      if (plan.valid[r] < 0) rows[r].kv_row = -1;
    }
  }
  for (const AttentionRow& row : rows) plan.any_skipped |= row.kv_row < 0;
  return plan;
}

void check_visible_pages(const AttentionDims& d, const at::Tensor& block_tables, const std::optional<at::Tensor>& mask,
                         const AttentionRows& plan) {
  const at::Tensor table = block_tables.to(at::kLong);
  const at::Tensor outside = table.lt(0).logical_or(table.ge(d.pool_rows));  // [rows, max_pages]
  if (!outside.any().item<bool>()) return;  // the common case: one reduction, one sync
  const int64_t L = d.capacity;
  const at::Tensor hidden_column = outside.repeat_interleave(d.page_size, 1).narrow(1, 0, L);  // [rows, L]
  // seen[r, j]: some query of row r sees column j.
  at::Tensor seen;
  if (mask.has_value()) {
    // [B, L]. A mask excludes cu_seqlens and cache_seqlens, and block tables exclude slot_ids: every
    // row is a batch row and none is skipped.
    seen = mask->select(1, 0).any(1);
  } else {
    std::vector<int64_t> limit(d.rows, 0);  // skipped rows see nothing
    for (int64_t r = 0; r < d.rows; ++r) {
      if (plan.rows[r].kv_row >= 0 && plan.rows[r].count > 0) limit[r] = plan.valid[r];
    }
    const at::Tensor limits = at::tensor(limit, at::TensorOptions().dtype(at::kLong)).to(table.device());
    seen = at::arange(L, table.options()).unsqueeze(0).lt(limits.unsqueeze(1));
  }
  const at::Tensor hits = seen.logical_and(hidden_column).nonzero().cpu();  // [n, 2]: (row, column)
  if (hits.size(0) == 0) return;
  const int64_t r = hits[0][0].item<int64_t>(), j = hits[0][1].item<int64_t>();
  const int64_t page = j / d.page_size;
  int64_t query = 0;  // the first query of row r that sees column j
  if (mask.has_value()) {
    query = (*mask)[r][0].select(1, j).nonzero()[0][0].item<int64_t>();
  } else {
    const AttentionRow& row = plan.rows[r];
    query = std::max<int64_t>(0, j - (plan.valid[r] - row.count));
  }
  TORCH_CHECK_INDEX(false, "cached_attention: block_tables[", r, ", ", page, "] = ", table[r][page].item<int64_t>(),
                    " is outside the page pool [0, ", d.pool_rows, ") but column ", j, " is visible to query ", query,
                    " of row ", r);
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
