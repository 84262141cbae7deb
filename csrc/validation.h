// Argument validation shared by the CPU and CUDA kernels. Every check runs
// before any write, so a rejected call leaves the cache and state untouched.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "mask_rule.h"
#include "paging_rule.h"

namespace lightning_cache {

// One tensor argument of an op, for the overlap rule: its name, the tensor
// (nullptr for an absent optional) and whether the op writes it.
struct OpArgument {
  const char* name;
  const at::Tensor* tensor;
  bool written;
  OpArgument(const char* n, const at::Tensor& t, bool w = false) : name(n), tensor(&t), written(w) {}
  OpArgument(const char* n, const std::optional<at::Tensor>& t, bool w = false)
      : name(n), tensor(t.has_value() ? &*t : nullptr), written(w) {}
};

// The aliasing rule of every op that writes (the one place it lives): a
// written argument must not share a byte with any other argument, read or
// written, and must not overlap itself (e.g. expanded strides). ValueError
// naming both arguments otherwise, raised before anything is written.
// Disjoint views of one storage (separate slices) pass; the test is exact for
// a dense tensor against any strided one and conservative (byte extents) only
// when neither is dense. New arguments are one entry of `args` each.
void check_no_overlap(const char* op, std::initializer_list<OpArgument> args);
void check_no_overlap(const char* op, const std::vector<OpArgument>& args);

struct KVCacheDims {
  int64_t pool = 0;        // P: rows of key_value and index (== B without slot_ids)
  int64_t batch = 0;       // B: rows of key, value and the mask
  int64_t capacity = 0;    // L
  int64_t heads = 0;       // H
  int64_t key_dim = 0;     // Dk
  int64_t value_dim = 0;   // Dv
  int64_t new_tokens = 0;  // q (packed: T, all sequences' tokens)
  bool packed = false;     // cu_seqlens given: batch = S sequences of key [1, T, ...]
  bool paged = false;      // block_tables given: key_value is a page pool [N, page_size, ...]
  int64_t num_pages = 0;   // N (paged)
  int64_t page_size = 0;   // (paged)
};

// Shapes, dtypes and devices of the arguments write_to_cache and
// concatenate_to_cache share (the cache, its positions, the new keys/values,
// the optional slot ids [B] into a pool key_value [P, ...] / index [P]; without
// them P == B). Zero heads, key_dim or value_dim are a ValueError; B = 0 or
// q = 0 pass (an empty call, see is_empty_call). `op` names the op in messages.
//
// Paged storage (block_tables [B, max_pages], SPEC 11): key_value [N,
// page_size, H, Dk + Dv] is a page pool, P == B rows of index, L = max_pages *
// page_size; ring=True or slot_ids with it are a ValueError. Packed batches
// (cu_seqlens [S + 1]): key/value are [1, T, ...] and the batch is the S
// sequences (rows of index, of slot_ids or of block_tables).
KVCacheDims check_write_args(const at::Tensor& key_value, const at::Tensor& index, const at::Tensor& key,
                             const at::Tensor& value, bool ring,
                             const std::optional<at::Tensor>& slot_ids = std::nullopt,
                             const char* op = "write_to_cache", const std::optional<at::Tensor>& scales = std::nullopt,
                             const std::optional<at::Tensor>& block_tables = std::nullopt,
                             const std::optional<at::Tensor>& cu_seqlens = std::nullopt);

// check_write_args plus the mask arguments of concatenate_to_cache (masks and
// token types are per batch row: [B, ...]). Both end with check_no_overlap
// over every tensor argument (key_value, index and scales are written).
KVCacheDims check_concatenate_args(const at::Tensor& key_value, const at::Tensor& index, const at::Tensor& key,
                                   const at::Tensor& value, const std::optional<at::Tensor>& attention_mask,
                                   const std::optional<at::Tensor>& causal_mask,
                                   const std::optional<at::Tensor>& token_type_ids, bool is_causal, bool ring,
                                   const std::optional<at::Tensor>& slot_ids = std::nullopt,
                                   const std::optional<at::Tensor>& scales = std::nullopt,
                                   const std::optional<at::Tensor>& block_tables = std::nullopt);

// Quantized storage: key_value of int8 or float8_e4m3fn codes, which need
// scales [P, L, H, 2] float32 (contiguous, key_value's device); float storage
// takes no scales. `op` names the op in messages.
bool is_quantized_cache(at::ScalarType dtype);
void check_scales(const char* op, const at::Tensor& key_value, const std::optional<at::Tensor>& scales);

// The rows a sequence-cache write targets, the one prelude every backend runs
// after check_write_args / check_concatenate_args: the slot ids as
// prepare_slot_ids gives them (batch row b -> pool row of key_value / index;
// checks raise IndexError; without, bad or repeated ids become -1, first
// occurrence wins), then, with `host_checks`, the positions of the rows named
// (IndexError for a row that cannot take its q tokens: negative, past the
// capacity without ring, past the causal mask, int64 overflow). The positions
// live on the device, so on CUDA host checks copy them to the host (a sync):
// pass host_checks only where that is allowed.
std::optional<at::Tensor> prepare_write_rows(const at::Tensor& index, const KVCacheDims& dims,
                                             const std::optional<at::Tensor>& slot_ids, bool ring,
                                             const std::optional<at::Tensor>& causal_mask, bool host_checks);

// ---------------------------------------------------------------- packed batches and pages (SPEC 11)

// The sequences of a packed batch as the kernels use them: sequence s is
// tokens begin[s] .. begin[s] + length[s] - 1, or skipped when length[s] < 0.
struct PackedSequences {
  std::vector<int64_t> begin, length;
  int64_t count() const { return static_cast<int64_t>(begin.size()); }
};

// Shape, dtype and device of cu_seqlens [S + 1] (int32 or int64): ValueError
// otherwise, whatever check_bounds says. `tokens` (query or key, [1, T, ...])
// must have batch 1. Returns S.
int64_t check_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& tokens,
                         const char* tokens_name);

// The values of cu_seqlens over T tokens. With host_checks: c_0 = 0, c_s <=
// c_{s+1}, c_S = T, else ValueError naming cu_seqlens. Without: sequence s is
// kept iff 0 <= c_s <= c_{s+1} <= T and c_s is at least every earlier entry,
// which keeps the kept sequences' tokens disjoint and inside [0, T); the rest
// are skipped (length -1). The one place this rule lives. Reads the values on
// the host (a copy from the device on CUDA).
PackedSequences prepare_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, int64_t total_tokens,
                                   bool host_checks);

// Shape, dtype and device of block_tables [batch, max_pages] (int32 or int64)
// over the page pool `pages` [N, page_size, ...]; max_pages * page_size must
// fit int64. The table as the paging rule reads it (entries are not checked
// here: a write or a visible column checks the entries it needs).
PageTable check_block_tables(const char* op, const at::Tensor& block_tables, int64_t batch, const at::Tensor& pages);

// Where every token of a write lands, for writes through block tables or of a
// packed batch (and plain ones: one plan for every layout on the CPU). Per
// write row w (batch row, or sequence): the index row it advances (row, -1:
// skipped), its position before the call (start), its tokens (length) and the
// first of them in key's flattened [B * q] tokens (source). cell[token] is the
// flat cell (row * L + column, or page * page_size + slot) token `token` is
// written to, -1 for none. A row that cannot take its tokens (row_writable;
// a needed page outside [0, N); a page slot an earlier row of the call
// writes) raises IndexError with host_checks, naming the argument, before
// anything is written; without, it is skipped whole (the first row in batch
// order keeps a contested slot). `slots` are prepare_write_rows' result.
struct WritePlan {
  std::vector<int64_t> row, start, length, source;
  std::vector<int64_t> cell;
};
WritePlan plan_writes(const at::Tensor& index, const KVCacheDims& dims, const std::optional<at::Tensor>& slots,
                      const std::optional<at::Tensor>& block_tables, const std::optional<at::Tensor>& cu_seqlens,
                      bool ring, int64_t position_limit, bool host_checks);

// Paged [B, q] writes without host checks (no cu_seqlens, no slot ids, B, q > 0): planned by
// write_plan_rule.h's phases, which CUDA runs on the device (capturable) and plan_writes on the host.
bool plans_paged_writes_in_phases(const KVCacheDims& dims, const std::optional<at::Tensor>& slots, bool host_checks);

// LIGHTNING_CACHE_CPU_PLAN=device (read per call): the CPU plans the calls CUDA plans on the device
// (checks off, [B, q]) with CUDA's code (write_plan_rule.h, attention_plan_on_device) instead of its own
// host loops, which follow the same rules faster there. The tests run both.
bool cpu_runs_device_plans();

// The block table as PageTable (its data pointer on the tensor's device).
PageTable page_table_of(const at::Tensor& block_tables, const KVCacheDims& dims);

// The mask rule's inputs as raw pointers and strides (see mask_rule.h).
MaskInputs make_mask_inputs(const KVCacheDims& dims, const std::optional<at::Tensor>& attention_mask,
                            const std::optional<at::Tensor>& causal_mask,
                            const std::optional<at::Tensor>& token_type_ids, bool is_causal, bool ring);

// B = 0 or q = 0: nothing to write and nothing to compute. Kernels return the
// empty result (positions unchanged) without a launch or a division by zero.
inline bool is_empty_call(const KVCacheDims& d) { return d.batch == 0 || d.new_tokens == 0; }

struct LightningDims {
  int64_t batch = 0;      // B
  int64_t tokens = 0;     // n
  int64_t heads = 0;      // H
  int64_t key_dim = 0;    // Dk
  int64_t value_dim = 0;  // Dv
  int64_t slots = 0;      // rows of the state
  bool packed = false;    // cu_seqlens: batch = S sequences of query [1, n, ...] (n = T, all their tokens)
};

// Shapes, dtypes and devices of lightning_decode / lightning_prefill arguments.
// `op` names the operator in messages. Zero heads, key_dim or value_dim are a
// ValueError; B = 0 or n = 0 pass (an empty call, see is_empty_call). Ends
// with check_no_overlap over every argument: state and `output` (the op's
// optional extra output, step_states or checkpoints, named `output_name`) are
// written.
LightningDims check_lightning_args(const char* op, const at::Tensor& state, const at::Tensor& query,
                                   const at::Tensor& key, const at::Tensor& value, const at::Tensor& slopes,
                                   const std::optional<at::Tensor>& attention_mask,
                                   const std::optional<at::Tensor>& slot_ids, int64_t block_size,
                                   const char* output_name, const std::optional<at::Tensor>& output,
                                   const std::optional<at::Tensor>& cu_seqlens = std::nullopt);

// step_states of lightning_decode: [B, n + 1, H, Dk, Dv], the state's dtype and
// device, contiguous (the kernels write it with flat offsets).
void check_step_states(const at::Tensor& step_states, const at::Tensor& state, const LightningDims& d);

// checkpoints of lightning_prefill: [B, C, H, Dk, Dv], the state's dtype and
// device, contiguous (overlaps: check_lightning_args); checkpoint_every >= 0, and
// positive when checkpoints are given (checkpoint_every without checkpoints
// stores nothing). Returns how many checkpoints the call writes (see
// checkpoints_written).
int64_t check_checkpoints(const std::optional<at::Tensor>& checkpoints, int64_t checkpoint_every,
                          const at::Tensor& state, const LightningDims& d);

// Checkpoint c (c < C) holds the state after the first (c + 1) * every tokens
// of the call, masked tokens counted (they leave the state as it is): it is
// written when (c + 1) * every <= n. Counted by division, so no product can
// overflow for any int64 `every`.
inline int64_t checkpoints_written(int64_t tokens, int64_t count, int64_t every) {
  if (every <= 0 || count <= 0) return 0;
  const int64_t reached = tokens / every;
  return reached < count ? reached : count;
}

// B = 0 or n = 0: the output is empty and the state is left as it is.
inline bool is_empty_call(const LightningDims& d) { return d.batch == 0 || d.tokens == 0; }
// Rows of query/key/value and of the output: the batch, or 1 when packed.
inline int64_t input_rows(const LightningDims& d) { return d.packed ? 1 : d.batch; }

// The empty output [B, n, H, Dv] of an empty lightning call.
at::Tensor empty_lightning_output(const LightningDims& d, const at::Tensor& query);

// Shape, dtype and device of optional slot_ids [batch] picking rows of `pool`
// (state rows, or index rows of a pool); without them, batch (the first
// dimension of `batch_from`) must equal its rows.
void check_slot_ids(const char* op, const std::optional<at::Tensor>& slot_ids, int64_t batch, const char* batch_from,
                    const at::Tensor& pool, const char* pool_name);

// The slot ids every kernel reads: contiguous int64 [B] in which each entry is
// a state row in [0, slots) or -1 (skip the batch row: state untouched, output
// zeros). With `host_checks` (a sync on CUDA) an out-of-range (< -1 or >= slots)
// or repeated id raises IndexError. Without, it is sanitized with device ops and
// no sync: out-of-range ids become -1, and so does every id equal to an earlier
// batch row's (the first occurrence wins), so no two rows ever race for a
// state row. The one place this rule lives; kernels just skip -1.
std::optional<at::Tensor> prepare_slot_ids(const std::optional<at::Tensor>& slot_ids, const LightningDims& dims,
                                           bool host_checks);

struct AttentionDims {
  int64_t batch = 0;        // B
  int64_t queries = 0;      // q
  int64_t query_heads = 0;  // Hq
  int64_t heads = 0;        // H, the cache's (key/value) heads
  int64_t group = 0;        // Hq / H query heads per cache head
  int64_t capacity = 0;     // L
  int64_t key_dim = 0;      // Dk
  int64_t value_dim = 0;    // Dv
  bool quantized = false;   // int8 / float8_e4m3fn codes with float32 scales
  float softmax_scale = 0;  // the given one, or 1 / sqrt(Dk)
  // SPEC 11. rows: the attention rows (B, or S sequences when packed); each
  // reads cache row slot_ids[r] (or r) of the pool_rows, or, paged, the pages
  // block_tables[r] names. Without a mask, queries are placed by cache_seqlens.
  int64_t rows = 0;
  int64_t pool_rows = 0;  // P (dense) or N (paged): key_value.size(0)
  int64_t page_size = 0;  // paged only
  bool packed = false, paged = false, has_mask = true;
};

// Shapes, dtypes and devices of cached_attention's arguments: query [B, q, Hq,
// Dk] (float32/16, bfloat16), key_value [B, L, H, Dk + Dv] (those, or int8 /
// float8_e4m3fn codes with scales [B, L, H, 2] float32), mask [B, 1, q, L]
// bool, Hq a multiple of H. Zero H, Dk or Dv are a ValueError; B, q or Hq = 0
// pass (an empty call), and L = 0 gives zeros (every row fully masked).
//
// SPEC 11: block_tables [rows, max_pages] makes key_value the page pool [N,
// page_size, H, Dk + Dv] and L = max_pages * page_size (slot_ids with it: a
// ValueError); cu_seqlens packs S sequences in query [1, T, ...]; mask
// becomes optional, and without one cache_seqlens [rows] (int32 / int64)
// places each row's queries causally at its last positions (exactly one of
// mask and cache_seqlens; a mask with cu_seqlens is a ValueError).
AttentionDims check_cached_attention_args(const at::Tensor& query, const at::Tensor& key_value,
                                          const std::optional<at::Tensor>& mask, int64_t key_dim,
                                          const std::optional<at::Tensor>& scales,
                                          std::optional<double> softmax_scale,
                                          const std::optional<at::Tensor>& block_tables = std::nullopt,
                                          const std::optional<at::Tensor>& cu_seqlens = std::nullopt,
                                          const std::optional<at::Tensor>& cache_seqlens = std::nullopt,
                                          const std::optional<at::Tensor>& slot_ids = std::nullopt);

// The valid-token counts of cached_attention's rows (cache_seqlens), on the
// host: with host_checks, a count above the capacity L or below the row's
// query count is a ValueError naming cache_seqlens; without, that row is
// skipped (-1: its outputs are zeros). `queries[r]` is row r's query count
// (-1: the row is already skipped).
std::vector<int64_t> prepare_cache_seqlens(const at::Tensor& cache_seqlens, const std::vector<int64_t>& queries,
                                           int64_t capacity, bool host_checks);

// The rows of a cached_attention call as every backend runs them: a run of
// queries reading one cache row: batch row b (or packed sequence s), query
// tokens i0 .. i0 + count - 1 of input row src; kv_row is the cache row
// (dense, after slot_ids) or the block-table row (paged), -1 when the row is
// skipped (bad slot id, sequence or count without checks: zeros out).
// valid[r] is row r's cache_seqlens (empty without them; -1 when skipped).
// Reads cu_seqlens, cache_seqlens and slot_ids on the host (a copy from the
// device on CUDA); with host_checks their errors raise here. The one place
// this rule lives.
struct AttentionRow {
  int64_t src, i0, count, kv_row;
};
struct AttentionRows {
  std::vector<AttentionRow> rows;
  std::vector<int64_t> valid;
  bool any_skipped = false;
};
// plan_attention_rows for [B, q] queries (no cu_seqlens) without host checks, as ATen ops on the
// arguments' device (no sync: capturable): int64 [B, 5] = (src, i0, count, kv_row, valid) per row, the
// layout the CUDA kernel reads. Needs cache_seqlens or slot_ids.
at::Tensor attention_plan_on_device(const AttentionDims& d, const std::optional<at::Tensor>& cache_seqlens,
                                    const std::optional<at::Tensor>& slot_ids);
AttentionRows plan_attention_rows(const AttentionDims& d, const std::optional<at::Tensor>& cu_seqlens,
                                  const std::optional<at::Tensor>& cache_seqlens,
                                  const std::optional<at::Tensor>& slot_ids, bool host_checks);

// Paged cached_attention with checks, on every backend: every column a query
// of a kept row sees (by `mask`, or causally by plan.valid) must lie in a page
// of the pool, else IndexError naming the block_tables entry. ATen ops on the
// table's device; one sync.
void check_visible_pages(const AttentionDims& d, const at::Tensor& block_tables, const std::optional<at::Tensor>& mask,
                         const AttentionRows& plan);

inline bool is_empty_call(const AttentionDims& d) { return d.batch == 0 || d.queries == 0 || d.query_heads == 0; }

// Shape/dtype checks of the two factory ops.
void check_init_sizes(const char* op, std::initializer_list<std::pair<const char*, int64_t>> sizes);
void check_state_dtype(at::ScalarType dtype);
void check_cache_dtype(at::ScalarType dtype);

}  // namespace lightning_cache
