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
// resolved in batch order; the others are decided in parallel. A hash map of
// the pages written (the first candidate row of each) finds those rows: only
// segments on a page an earlier candidate writes are compared pairwise, so a
// step whose rows write pages of their own costs O(B), not O(B^2). A second
// map, of (row, page) pairs, finds a page listed twice in one row's table the
// same way: a prefill of q tokens at page size 1 costs O(q), not O(q^2).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <initializer_list>

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
  // [skipped (B) | contested (B) | page map: pages (S) | first candidate row per page (S) |
  //  row-page map: keys (R) | first segment per key (R)], S = 2^map_bits, R = 2^row_map_bits
  // (paged_write_maps; 0 bits: no such map, its check is pairwise).
  int64_t* scratch = nullptr;
  int map_bits = 0;
  int row_map_bits = 0;
};

inline int64_t paged_write_plan_size(int64_t batch, int64_t new_tokens) { return batch * new_tokens + 3 * batch; }

C10_HOST_DEVICE inline int64_t segments_per_row(int64_t new_tokens, int64_t page_size) {
  return (new_tokens - 1) / page_size + 2;  // a run of q positions touches at most this many pages
}

// The maps are open-addressing hash maps with at least twice as many slots as keys, so they never
// fill and a probe ends after a couple of slots on average. Only rows whose cells are all in the pool
// claim slots, so a call writes at most min(B * segments, num_pages) pages and min(B * segments,
// B * num_pages) (row, page) pairs. Past 2^20 slots (16 MiB of scratch per map) a map is dropped
// (0 bits): its check is pairwise, as a call that large (half a million pages written) is a prefill
// whose copy dwarfs the plan anyway.
constexpr int kMaxPageMapBits = 20;

struct PagedWriteMaps {
  int page_bits = 0;      // keys: pages
  int row_page_bits = 0;  // keys: row * num_pages + page
};

inline int paged_write_map_bits_for(int64_t keys) {
  if (keys > (int64_t{1} << kMaxPageMapBits) / 2) return 0;
  int bits = 6;
  while ((int64_t{1} << bits) < 2 * keys) ++bits;
  return bits;
}

inline PagedWriteMaps paged_write_maps(int64_t batch, int64_t new_tokens, int64_t page_size, int64_t num_pages) {
  const int64_t segments = segments_per_row(new_tokens, page_size);
  const int64_t all_segments = batch * segments;  // <= B * (q + 1): the call's tokens and one more per row
  PagedWriteMaps maps;
  maps.page_bits = paged_write_map_bits_for(batch > num_pages / segments ? num_pages : all_segments);
  // A row-page key must fit in int64: B * num_pages < 2^63 (else that map is dropped).
  if (num_pages == 0 || batch <= INT64_MAX / num_pages) maps.row_page_bits = paged_write_map_bits_for(all_segments);
  return maps;
}

inline int64_t paged_write_scratch_size(int64_t batch, const PagedWriteMaps& maps) {
  int64_t size = 2 * batch;
  for (const int bits : {maps.page_bits, maps.row_page_bits}) size += bits > 0 ? 2 * (int64_t{1} << bits) : 0;
  return size;
}

constexpr int64_t kNoPage = -1;           // an empty slot of a map (keys are >= 0)
constexpr int64_t kNoRow = INT64_MAX;     // no candidate row (or segment) yet

C10_HOST_DEVICE inline int64_t page_hash(int64_t page, int bits) {
  return static_cast<int64_t>((static_cast<uint64_t>(page) * 0x9E3779B97F4A7C15ull) >> (64 - bits));
}

// A map's slot for `page` (any key >= 0), claiming an empty one if the key is not there yet. Atomic
// among the threads of a CUDA block; on the CPU the phases run on one thread.
C10_HOST_DEVICE inline int64_t page_map_claim(int64_t* pages, int bits, int64_t page) {
  const int64_t mask = (int64_t{1} << bits) - 1;
  for (int64_t h = page_hash(page, bits);; h = (h + 1) & mask) {
#if defined(__CUDA_ARCH__)
    const auto seen = static_cast<int64_t>(atomicCAS(reinterpret_cast<unsigned long long*>(pages + h),
                                                     static_cast<unsigned long long>(kNoPage),
                                                     static_cast<unsigned long long>(page)));
#else
    const int64_t seen = pages[h];
    if (seen == kNoPage) pages[h] = page;
#endif
    if (seen == kNoPage || seen == page) return h;
  }
}

// The slot of a key already in the map.
C10_HOST_DEVICE inline int64_t page_map_find(const int64_t* pages, int bits, int64_t page) {
  const int64_t mask = (int64_t{1} << bits) - 1;
  int64_t h = page_hash(page, bits);
  while (pages[h] != page) h = (h + 1) & mask;
  return h;
}

C10_HOST_DEVICE inline void min_into(int64_t* slot, int64_t value) {
#if defined(__CUDA_ARCH__)
  atomicMin(reinterpret_cast<long long*>(slot), static_cast<long long>(value));
#else
  if (value < *slot) *slot = value;
#endif
}

// Segment k of row w: the part of its positions [start, start + q) inside one page. Pages of one
// row's table are compared, not tokens, and (with the page map) only segments on a page an earlier row has.
struct PageSegment {
  int64_t page = -1;  // the table entry; -1: no such segment
  int64_t lo = 0, hi = 0;  // slots [lo, hi) of that page
};

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
  const bool mapped = a.map_bits > 0;
  const int64_t map_slots = mapped ? int64_t{1} << a.map_bits : 0;
  int64_t* map_page = contested + B;
  int64_t* map_first = map_page + map_slots;
  const bool row_mapped = a.row_map_bits > 0;
  const int64_t row_map_slots = row_mapped ? int64_t{1} << a.row_map_bits : 0;
  int64_t* row_map_key = map_first + map_slots;
  int64_t* row_map_first = row_map_key + row_map_slots;
  for (int64_t h = tid; h < map_slots; h += threads) {
    map_page[h] = kNoPage;
    map_first[h] = kNoRow;
  }
  for (int64_t h = tid; h < row_map_slots; h += threads) {
    row_map_key[h] = kNoPage;
    row_map_first[h] = kNoRow;
  }
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
  // 3. Two segments of one row on the same page slots (a page listed twice in its table). With the
  // row-page map each segment is compared with its row's first segment on that page only: of a row's
  // segments on one page all but the first and last cover the whole page, so a clash among them
  // always involves that first one.
  for (int64_t i = tid; row_mapped && i < B * segs; i += threads) {
    const int64_t w = i / segs, k = i % segs;
    if (skipped[w] != 0) continue;
    const PageSegment mine = page_segment(a.table, w, start[w], q, k);
    if (mine.page >= 0) {
      min_into(&row_map_first[page_map_claim(row_map_key, a.row_map_bits, w * a.table.num_pages + mine.page)], k);
    }
  }
  barrier();
  for (int64_t i = tid; i < B * segs; i += threads) {
    const int64_t w = i / segs, k = i % segs;
    if (skipped[w] != 0) continue;
    const PageSegment mine = page_segment(a.table, w, start[w], q, k);
    if (mine.page < 0) continue;
    if (row_mapped) {
      const int64_t first =
          row_map_first[page_map_find(row_map_key, a.row_map_bits, w * a.table.num_pages + mine.page)];
      if (first != k && segments_overlap(mine, page_segment(a.table, w, start[w], q, first))) skipped[w] = 1;
      continue;
    }
    for (int64_t j = 0; j < k; ++j) {
      if (segments_overlap(mine, page_segment(a.table, w, start[w], q, j))) {
        skipped[w] = 1;
        break;
      }
    }
  }
  barrier();
  // 4. Candidates sharing a slot with an earlier candidate: decided in step 5. First each page's first
  // candidate row: a segment on a page no earlier candidate writes is compared with nothing.
  for (int64_t i = tid; mapped && i < B * segs; i += threads) {
    const int64_t w = i / segs, k = i % segs;
    if (skipped[w] != 0) continue;
    const PageSegment mine = page_segment(a.table, w, start[w], q, k);
    if (mine.page >= 0) min_into(&map_first[page_map_claim(map_page, a.map_bits, mine.page)], w);
  }
  barrier();
  for (int64_t i = tid; i < B * segs; i += threads) {
    const int64_t w = i / segs, k = i % segs;
    if (skipped[w] != 0) continue;
    const PageSegment mine = page_segment(a.table, w, start[w], q, k);
    if (mine.page < 0 || (mapped && map_first[page_map_find(map_page, a.map_bits, mine.page)] == w)) continue;
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
