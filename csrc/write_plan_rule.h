// plan_writes' rule for paged writes of B rows x q tokens (block_tables, no
// cu_seqlens, no slot ids) without host checks, written once for every
// backend: one CUDA block (tid, threads, barrier = __syncthreads) and one CPU
// thread (0, 1, no barrier) run the same phases. On CUDA it runs on the device
// (no sync, so the call can be captured in a CUDA graph); on the CPU plan_writes
// runs it for the same calls when LIGHTNING_CACHE_CPU_PLAN=device, which the
// tests set to check it against the sequential rule.
//
// The rule (validation.h, WritePlan): a row is written whole or skipped whole.
// It is skipped when its position cannot take q tokens (row_writable), when a
// position it writes maps outside the pool, when two of its own tokens map to
// one page slot (a page listed twice), or when it writes a page slot that an
// earlier WRITTEN row writes (the first row in batch order keeps a contested
// slot; a skipped row claims nothing). Only the last clause depends on other
// rows' outcomes, so only rows that share a slot with an earlier candidate are
// resolved in batch order; the others are decided in parallel.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "mask_rule.h"
#include "paging_rule.h"

namespace lightning_cache {

struct PagedWritePlanArgs {
  const int64_t* position = nullptr;  // index [B]
  PageTable table;                    // the block tables, on the planner's device
  int64_t batch = 0, new_tokens = 0;  // B, q (both > 0)
  int64_t capacity = 0;               // L = max_pages * page_size
  int64_t position_limit = kNoPositionLimit;
  // Output, as the write kernel reads it: [cell (B * q) | row (B) | start (B) | length (B)].
  int64_t* plan = nullptr;
  int64_t* scratch = nullptr;  // [2 * B]: per row "skipped" and "contested"
};

inline int64_t paged_write_plan_size(int64_t batch, int64_t new_tokens) { return batch * new_tokens + 3 * batch; }
inline int64_t paged_write_scratch_size(int64_t batch) { return 2 * batch; }

// Segment k of row w: the part of its positions [start, start + q) inside one page. Pages of one
// row's table are compared, not tokens: O((B * segments)^2) instead of O((B * q)^2).
struct PageSegment {
  int64_t page = -1;  // the table entry; -1: no such segment
  int64_t lo = 0, hi = 0;  // slots [lo, hi) of that page
};

C10_HOST_DEVICE inline int64_t segments_per_row(int64_t new_tokens, int64_t page_size) {
  return (new_tokens - 1) / page_size + 2;  // a run of q positions touches at most this many pages
}

C10_HOST_DEVICE inline PageSegment page_segment(const PageTable& t, int64_t row, int64_t start, int64_t new_tokens,
                                                int64_t k) {
  const int64_t page_index = start / t.page_size + k;
  const int64_t first = page_index * t.page_size;
  const int64_t lo = start > first ? start : first;
  const int64_t end = start + new_tokens, page_end = first + t.page_size;
  const int64_t hi = end < page_end ? end : page_end;
  PageSegment s;
  if (lo >= hi) return s;
  s.page = page_entry(t, row, first);
  s.lo = lo - first;
  s.hi = hi - first;
  return s;
}

C10_HOST_DEVICE inline bool segments_overlap(const PageSegment& a, const PageSegment& b) {
  return a.page >= 0 && a.page == b.page && a.lo < b.hi && b.lo < a.hi;
}

template <typename Barrier>
C10_HOST_DEVICE void plan_paged_writes(const PagedWritePlanArgs& a, int64_t tid, int64_t threads,
                                       const Barrier& barrier) {
  const int64_t B = a.batch, q = a.new_tokens, n = B * q;
  const int64_t segs = segments_per_row(q, a.table.page_size);
  int64_t* cell = a.plan;
  int64_t* row = cell + n;
  int64_t* start = row + B;
  int64_t* length = start + B;
  int64_t* skipped = a.scratch;
  int64_t* contested = skipped + B;
  // 1. Rows whose position cannot take q tokens.
  for (int64_t w = tid; w < B; w += threads) {
    const int64_t s = a.position[w];
    const bool writable = row_writable(s, q, a.capacity, /*ring=*/false, a.position_limit);
    skipped[w] = writable ? 0 : 1;
    contested[w] = 0;
    start[w] = writable ? s : 0;
  }
  barrier();
  // 2. Each token's cell; one outside the pool skips its row. (Concurrent writes store the same 1.)
  for (int64_t i = tid; i < n; i += threads) {
    const int64_t w = i / q;
    const int64_t c = skipped[w] != 0 ? -1 : paged_cell(a.table, w, start[w] + i % q);
    cell[i] = c;
    if (c < 0) skipped[w] = 1;
  }
  barrier();
  // 3. Two segments of one row on the same page slots (a page listed twice in its table).
  for (int64_t i = tid; i < B * segs; i += threads) {
    const int64_t w = i / segs, k = i % segs;
    if (skipped[w] != 0) continue;
    const PageSegment mine = page_segment(a.table, w, start[w], q, k);
    for (int64_t j = 0; j < k && mine.page >= 0; ++j) {
      if (segments_overlap(mine, page_segment(a.table, w, start[w], q, j))) {
        skipped[w] = 1;
        break;
      }
    }
  }
  barrier();
  // 4. Candidates sharing a slot with an earlier candidate: decided in step 5.
  for (int64_t i = tid; i < B * segs; i += threads) {
    const int64_t w = i / segs, k = i % segs;
    if (skipped[w] != 0) continue;
    const PageSegment mine = page_segment(a.table, w, start[w], q, k);
    for (int64_t j = 0; j < w * segs && mine.page >= 0; ++j) {
      const int64_t v = j / segs;
      if (skipped[v] == 0 && segments_overlap(mine, page_segment(a.table, v, start[v], q, j % segs))) {
        contested[w] = 1;
        break;
      }
    }
  }
  barrier();
  // 5. In batch order, a contested row loses to an earlier row that is written (rows before w are final).
  for (int64_t w = 0; w < B; ++w) {
    if (contested[w] == 0 || skipped[w] != 0) continue;  // the same for every thread
    for (int64_t i = tid; i < segs * w * segs; i += threads) {
      const int64_t k = i / (w * segs), j = i % (w * segs), v = j / segs;
      if (skipped[v] == 0 && segments_overlap(page_segment(a.table, w, start[w], q, k),
                                              page_segment(a.table, v, start[v], q, j % segs))) {
        contested[w] = 2;
      }
    }
    barrier();
    if (tid == 0 && contested[w] == 2) skipped[w] = 1;
    barrier();
  }
  // 6. The plan: a skipped row writes nothing and keeps its position.
  for (int64_t i = tid; i < n; i += threads) {
    if (skipped[i / q] != 0) cell[i] = -1;
  }
  for (int64_t w = tid; w < B; w += threads) {
    const bool kept = skipped[w] == 0;
    row[w] = kept ? w : -1;
    if (!kept) start[w] = 0;
    length[w] = kept ? q : 0;
  }
}

}  // namespace lightning_cache
