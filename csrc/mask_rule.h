// The attention-mask rule of concatenate_to_cache, written once and compiled
// for both backends (C10_HOST_DEVICE), so CPU and CUDA cannot drift apart.
//
// For row b, new-token i (absolute position p = start + i, start = index[b]
// before the write) and cache column j:
//   mask = attn(b, i, j) AND filled(j) AND (causal(p, pos_j) OR same_type(i, pos_j))
// where pos_j is the absolute position of the token that column j holds once
// the new block is written (j itself without a ring; the newest position
// congruent to j modulo L with a ring).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

namespace lightning_cache {

// Element types a mask-like input may have. Masks are read as "nonzero means
// true", so one switch covers bool, integer and floating masks without
// instantiating the kernels once per mask dtype.
enum class ElemType : int8_t { Bool, UInt8, Int8, Int16, Int32, Int64, Float16, BFloat16, Float32, Float64 };

C10_HOST_DEVICE inline bool nonzero_at(const void* base, ElemType type, int64_t offset) {
  switch (type) {
    case ElemType::Bool:
    case ElemType::UInt8:
    case ElemType::Int8: return static_cast<const uint8_t*>(base)[offset] != 0;
    case ElemType::Int16: return static_cast<const int16_t*>(base)[offset] != 0;
    case ElemType::Int32: return static_cast<const int32_t*>(base)[offset] != 0;
    case ElemType::Int64: return static_cast<const int64_t*>(base)[offset] != 0;
    // Half-precision floats: zero iff every bit but the sign bit is clear.
    case ElemType::Float16:
    case ElemType::BFloat16: return (static_cast<const uint16_t*>(base)[offset] & 0x7fffu) != 0;
    case ElemType::Float32: return static_cast<const float*>(base)[offset] != 0.0f;
    case ElemType::Float64: return static_cast<const double*>(base)[offset] != 0.0;
  }
  return false;
}

C10_HOST_DEVICE inline int64_t integer_at(const void* base, ElemType type, int64_t offset) {
  return type == ElemType::Int32 ? static_cast<const int32_t*>(base)[offset]
                                 : static_cast<const int64_t*>(base)[offset];
}

// Everything the rule reads besides (b, i, j, start); plain data so it can be
// passed by value to a CUDA kernel. A null pointer means "input not given".
struct MaskInputs {
  int64_t new_tokens = 0;  // q
  int64_t capacity = 0;    // L
  bool ring = false;
  bool is_causal = false;  // on-the-fly causal term j <= p

  const void* attn = nullptr;  // [B, L] (stride_i == 0) or [B, 1, q, L]
  ElemType attn_type = ElemType::Bool;
  int64_t attn_stride_b = 0, attn_stride_i = 0, attn_stride_j = 0;

  const void* causal = nullptr;  // [T, T] view of the explicit causal mask
  ElemType causal_type = ElemType::Bool;
  int64_t causal_size = 0;  // T; rows p >= T read as false, never out of bounds
  int64_t causal_stride_p = 0, causal_stride_j = 0;

  const void* token_types = nullptr;  // [B, q]; only set when q > 1 and a causal term is in force
  ElemType token_type_type = ElemType::Int64;
  int64_t token_type_stride_b = 0, token_type_stride_i = 0;
};

// Absolute position held by column j once positions [0, end) have been
// written, or -1 if the column is still empty.
C10_HOST_DEVICE inline int64_t column_position(int64_t j, int64_t end, int64_t capacity, bool ring) {
  if (!ring) return j < end ? j : -1;
  if (j >= end) return -1;
  // Newest a < end with a % capacity == j.
  return j + ((end - 1 - j) / capacity) * capacity;
}

// Largest position a causal table of T rows can serve, or "no limit".
constexpr int64_t kNoPositionLimit = std::numeric_limits<int64_t>::max();

// A row may be written iff every position it writes, start .. start + q - 1,
// is valid: start >= 0, start + q fits the cache (unless ring), the explicit
// causal mask (`position_limit` = its T, else kNoPositionLimit) and int64.
// Written as `start <= limit - q` so that no sum can overflow for any int64
// start. Rows that fail are skipped whole (nothing written, index kept, mask
// row all false); eager calls with check_bounds=True reject them on the host
// first (validation.cpp asks this same function), so this only decides where
// host checks are off (check_bounds=False, CUDA graph capture).
C10_HOST_DEVICE inline bool row_writable(int64_t start, int64_t new_tokens, int64_t capacity, bool ring,
                                         int64_t position_limit = kNoPositionLimit) {
  if (start < 0) return false;
  if (start > kNoPositionLimit - new_tokens) return false;  // start + q itself must be representable
  if (!ring && start > capacity - new_tokens) return false;
  return start <= position_limit - new_tokens;
}

// Cache column of new token t of a row starting at `start` (a writable row).
// Ring: (start % L + t) % L, which stays in [0, L) for any start >= 0 and
// t < L, where (start + t) % L could overflow.
C10_HOST_DEVICE inline int64_t token_column(int64_t start, int64_t t, int64_t capacity, bool ring) {
  return ring ? (start % capacity + t) % capacity : start + t;
}

// The position limit the mask inputs impose: an explicit causal mask has T rows.
C10_HOST_DEVICE inline int64_t position_limit(const MaskInputs& in) {
  return in.causal != nullptr ? in.causal_size : kNoPositionLimit;
}

C10_HOST_DEVICE inline bool attention_allows(const MaskInputs& in, int64_t b, int64_t i, int64_t j) {
  return in.attn == nullptr ||
         nonzero_at(in.attn, in.attn_type, b * in.attn_stride_b + i * in.attn_stride_i + j * in.attn_stride_j);
}

C10_HOST_DEVICE inline bool mask_value(const MaskInputs& in, int64_t b, int64_t i, int64_t j, int64_t start) {
  const int64_t position = start + i;
  const int64_t held = column_position(j, start + in.new_tokens, in.capacity, in.ring);
  if (held < 0 || !attention_allows(in, b, i, j)) return false;
  bool visible = true;
  if (in.is_causal) {
    visible = held <= position;
  } else if (in.causal != nullptr) {
    visible = position < in.causal_size && held < in.causal_size &&
              nonzero_at(in.causal, in.causal_type, position * in.causal_stride_p + held * in.causal_stride_j);
  }
  if (!visible && in.token_types != nullptr && held >= start) {
    // held - start is the new token i' this column holds; positions are
    // relative to the new block, per row.
    const int64_t type_i =
        integer_at(in.token_types, in.token_type_type, b * in.token_type_stride_b + i * in.token_type_stride_i);
    const int64_t type_j = integer_at(in.token_types, in.token_type_type,
                                      b * in.token_type_stride_b + (held - start) * in.token_type_stride_i);
    visible = type_i != 0 && type_i == type_j;
  }
  return visible;
}

// Without a ring, an explicit causal mask or token types, the rule for row
// (b, i) is "attention_allows(b, i, j) and j < limit": returns that limit, or
// -1 when the row has no such shape. Lets a backend fill long rows without
// evaluating mask_value per column; it is the same rule, not a second one.
C10_HOST_DEVICE inline int64_t prefix_limit(const MaskInputs& in, int64_t i, int64_t start) {
  if (in.ring || in.causal != nullptr || in.token_types != nullptr) return -1;
  return in.is_causal ? start + i + 1 : start + in.new_tokens;
}

}  // namespace lightning_cache
