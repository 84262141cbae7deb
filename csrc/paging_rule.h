// Addressing of paged K|V (SPEC 11), written once for every backend
// (C10_HOST_DEVICE): position p of batch row b lives in page
// block_tables[b, p / page_size], slot p % page_size, of the pool
// key_value [N, page_size, H, Dk + Dv].
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "mask_rule.h"

namespace lightning_cache {

// The block table as raw data (int32 or int64 entries); plain data so a CUDA
// kernel can take it by value. data == nullptr: dense storage, no table.
struct PageTable {
  const void* data = nullptr;
  ElemType type = ElemType::Int64;
  int64_t stride_row = 0, stride_page = 0;
  int64_t page_size = 0;  // slots per page (key_value.size(1))
  int64_t num_pages = 0;  // N (key_value.size(0))
  int64_t max_pages = 0;  // entries per row; the logical capacity is max_pages * page_size
};

// The raw entry for position `position` (0 <= position < max_pages * page_size) of row `row`.
C10_HOST_DEVICE inline int64_t page_entry(const PageTable& t, int64_t row, int64_t position) {
  return integer_at(t.data, t.type, row * t.stride_row + (position / t.page_size) * t.stride_page);
}

// The flat cell (page * page_size + slot) holding `position` of `row`, or -1
// when the entry is outside [0, N): such a position is never read or written.
C10_HOST_DEVICE inline int64_t paged_cell(const PageTable& t, int64_t row, int64_t position) {
  const int64_t page = page_entry(t, row, position);
  if (page < 0 || page >= t.num_pages) return -1;
  return page * t.page_size + position % t.page_size;
}

}  // namespace lightning_cache
