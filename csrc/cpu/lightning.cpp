// Lightning recurrent state on the CPU. Both ops run one task per (batch row,
// head) under at::parallel_for, each owning its state row and head, so no two
// tasks ever touch the same memory:
// - decode streams the head's state once per token (decode_step);
// - prefill is a fused chunked loop over the row's unmasked tokens, in inner
//   blocks sized for the cache (see inner_block), on float32 tiles (gemm_tile).
// Both equal sequential decoding (SPEC 3): a masked token is skipped whole, and
// nothing from token t reaches an earlier token's output, because every sum
// runs only over the tokens it should (no multiply-by-zero masking).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "../serving.h"
#include "lightning_tile.h"

namespace lightning_cache {
namespace {

using cpu::kTileRows;

// Batch row -> state row, -1 where the row is skipped: slot_ids[b] (or b).
// Slot ids are CPU data here, so this is a cheap host pass.
std::vector<int64_t> resolve_rows(const std::optional<at::Tensor>& slot_ids, const LightningDims& d) {
  std::vector<int64_t> rows(d.batch);
  if (!slot_ids.has_value()) {
    for (int64_t b = 0; b < d.batch; ++b) rows[b] = b;
    return rows;
  }
  // prepare_slot_ids has already made the ids unique (first occurrence wins)
  // or raised; the range test stays so that no id can index outside `state`.
  const int64_t* slots = slot_ids->const_data_ptr<int64_t>();
  for (int64_t b = 0; b < d.batch; ++b) rows[b] = slots[b] >= 0 && slots[b] < d.slots ? slots[b] : -1;
  return rows;
}

// A [B, n, H, D] input as a raw pointer and strides (any layout).
template <typename T>
struct Strided {
  const T* data;
  int64_t s0, s1, s2, s3;
  explicit Strided(const at::Tensor& t)
      : data(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* at(int64_t b, int64_t t, int64_t h) const { return data + b * s0 + t * s1 + h * s2; }
};

// dst[e * dst_stride] = float(src[e * s3]) for e < size.
template <typename T>
void widen(float* dst, int64_t dst_stride, const T* src, int64_t s3, int64_t size) {
  if constexpr (std::is_same_v<T, float>) {
    if (s3 == 1 && dst_stride == 1) {
      std::memcpy(dst, src, size * sizeof(float));
      return;
    }
  }
  for (int64_t e = 0; e < size; ++e) dst[e * dst_stride] = static_cast<float>(src[e * s3]);
}

// Asks for the cache lines of src[e * s3], e < size, ahead of use: a head's
// rows of consecutive tokens sit H * D elements apart, a page or more for
// large models, where the hardware prefetcher does not follow.
template <typename T>
void prefetch_row(const T* src, int64_t s3, int64_t size) {
  if (size <= 0) return;
  const char* first = reinterpret_cast<const char*>(src);
  const char* last = reinterpret_cast<const char*>(src + (size - 1) * s3);
  for (const char* p = first; p <= last; p += 64) __builtin_prefetch(p, 0, 1);
  __builtin_prefetch(last, 0, 1);
}

// dst[e] = src[e] for e < size, rounded to the state dtype.
template <typename state_t>
void store_state(state_t* dst, const float* src, int64_t size) {
  if constexpr (std::is_same_v<state_t, float>) {
    std::memcpy(dst, src, size * sizeof(float));
  } else {
    for (int64_t e = 0; e < size; ++e) dst[e] = static_cast<state_t>(src[e]);
  }
}

template <typename T>
void narrow_store(T* dst, const float* src, int64_t size, float factor) {
  for (int64_t e = 0; e < size; ++e) dst[e] = static_cast<T>(src[e] * factor);
}

// Tasks per parallel chunk so that each holds at least ~32K multiply-adds
// (waking a thread costs more than smaller work). Never divides by zero.
int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, work_per_task));
}

// ------------------------------------------------------------------ decode

// For each token in order: S = lam * S + k^T v, then o = scale * q S.
// `steps` (null, or contiguous [B, n + 1, H, Dk, Dv]) receives the head's state
// before the call (t = 0) and after each token (t + 1); skipped rows leave it.
template <typename state_t, typename in_t>
void decode_rows(at::Tensor& state, at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                 const at::Tensor& value, const float* slope, const std::vector<int64_t>& rows,
                 const LightningDims& d, float scale, state_t* steps) {
  const Strided<in_t> q(query), k(key), v(value);
  state_t* state_data = state.data_ptr<state_t>();
  in_t* out_data = out.data_ptr<in_t>();
  const int64_t dk = d.key_dim, dv = d.value_dim, heads = d.heads, tokens = d.tokens;
  at::parallel_for(0, d.batch * heads, grain_for(tokens * dk * dv), [&](int64_t begin, int64_t end) {
    // One scratch allocation per chunk: q, k, v, o and (bfloat16 state) the widened head state.
    const bool widened = !std::is_same_v<state_t, float>;
    std::vector<float> scratch(2 * dk + 2 * dv + (widened ? dk * dv : 0) + 1);
    float *qf = scratch.data(), *kf = qf + dk, *vf = kf + dk, *of = vf + dv, *wide = of + dv;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      in_t* o_row = out_data + (b * tokens * heads + h) * dv;  // token t at + t * heads * dv
      const int64_t row = rows[b];
      if (row < 0) {
        for (int64_t t = 0; t < tokens; ++t) std::fill_n(o_row + t * heads * dv, dv, in_t(0));
        continue;
      }
      state_t* s_raw = state_data + (row * heads + h) * dk * dv;
      float* s;
      if constexpr (std::is_same_v<state_t, float>) {
        s = s_raw;
      } else {
        for (int64_t e = 0; e < dk * dv; ++e) wide[e] = static_cast<float>(s_raw[e]);
        s = wide;
      }
      const float decay = std::exp(-slope[h]);
      // step t of this (row, head) at + t * heads * dk * dv
      state_t* step_row = steps == nullptr ? nullptr : steps + (b * (tokens + 1) * heads + h) * dk * dv;
      if (step_row != nullptr) store_state(step_row, s, dk * dv);
      for (int64_t t = 0; t < tokens; ++t) {
        widen(qf, 1, q.at(b, t, h), q.s3, dk);
        widen(kf, 1, k.at(b, t, h), k.s3, dk);
        widen(vf, 1, v.at(b, t, h), v.s3, dv);
        cpu::decode_step(s, qf, kf, vf, of, dk, dv, decay);
        narrow_store(o_row + t * heads * dv, of, dv, scale);
        if (step_row != nullptr) store_state(step_row + (t + 1) * heads * dk * dv, s, dk * dv);
      }
      if constexpr (!std::is_same_v<state_t, float>) {
        for (int64_t e = 0; e < dk * dv; ++e) s_raw[e] = static_cast<state_t>(wide[e]);
      }
    }
  });
}

// ------------------------------------------------------------------ prefill

// Rows of the inner block (the unit of work, not of the result: any block
// gives the same result up to float32 rounding). Per token the state terms
// cost 2 * dk * dv multiply-adds and the intra-block ones c * (dk + dv) / 2,
// which also run on smaller, less efficient tiles; c ~ (dk + dv) / 8 keeps the
// latter at an eighth of the former (36 at dk = dv = 128: 24 to 48 measured
// alike on a Zen 3 core, 64 ~15% slower). c stays a multiple of the tile
// height and within [12, 96] rows, so the block's q, k^T, v and scores
// (4 * c * (2 dk + dv + c) bytes: 60 KiB at dk = dv = 128) stay in L2.
int64_t inner_block(int64_t dk, int64_t dv) {
  const int64_t want = (dk + dv) / 8;
  const int64_t rounded = (want + kTileRows - 1) / kTileRows * kTileRows;
  return std::clamp<int64_t>(rounded, 2 * kTileRows, 16 * kTileRows);
}

// Per (row, head), over the row's unmasked tokens tok[0..m) in blocks of c
// (j, i block-relative, lam = exp(-s), S the state before the block):
//   scores[j][i] = scale * lam^(j-i) (q_j . k_i)                     (i <= j only)
//   o_j          = scale * lam^(j+1) q_j S + sum_{i <= j} scores[j][i] v_i
//   S           <- lam^c S + sum_i lam^(c-1-i) k_i^T v_i
// `checkpoints` (null, or contiguous [B, C, H, Dk, Dv]) receives S after the
// first (k + 1) * every positions for k < written: after the row's unmasked
// tokens before that position (a block ends early at each such cut), so
// masked tokens count as positions and leave S as it is.
template <typename state_t, typename in_t>
void prefill_rows(at::Tensor& state, at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                  const at::Tensor& value, const float* slope, const std::vector<int64_t>& rows, const bool* keep,
                  const LightningDims& d, float scale, state_t* checkpoints, int64_t num_checkpoints,
                  int64_t written, int64_t every, const PackedSequences* seqs) {
  const Strided<in_t> q(query), k(key), v(value);
  state_t* state_data = state.data_ptr<state_t>();
  in_t* out_data = out.data_ptr<in_t>();
  const int64_t dk = d.key_dim, dv = d.value_dim, heads = d.heads, tokens = d.tokens;
  const int64_t c = inner_block(dk, dv);

  // Decay powers per head, lam^e for e in [0, c], formed as exp(-s * e) from
  // non-negative exponents in double (nothing overflows, nothing drifts).
  std::vector<float> powers(heads * (c + 1));
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t e = 0; e <= c; ++e) powers[h * (c + 1) + e] = static_cast<float>(std::exp(-double(slope[h]) * e));
  }

  auto run_items = [&](int64_t begin, int64_t end) {
    const bool widened = !std::is_same_v<state_t, float>;
    // Scratch per chunk: q [c, dk], k^T [dk, c], v [c, dv], scores [c, c], o tile [6, dv],
    // the row's token list [n], per-block factors [2c], and (bfloat16 state) the widened head state.
    const int64_t floats = c * dk + dk * c + c * dv + c * c + kTileRows * dv + 2 * c + (widened ? dk * dv : 0) + 1;
    std::vector<float> scratch(floats);
    std::vector<int64_t> tok(tokens);
    std::vector<int64_t> cut(written);  // checkpoint k: the row's unmasked tokens before position (k + 1) * every
    float* Q = scratch.data();
    float* Kt = Q + c * dk;
    float* V = Kt + dk * c;
    float* scores = V + c * dv;
    float* O = scores + c * c;
    float* q_factor = O + kTileRows * dv;  // scale * lam^(j+1)
    float* dist_factor = q_factor + c;     // scale * lam^e
    float* wide = dist_factor + c;

    int64_t tok_row = -1;  // the batch row `tok` holds
    int64_t m_total = 0;
    int64_t row_written = written;  // checkpoints this row writes (packed: counted in its own tokens)
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      // Packed: batch row b is sequence b, tokens seqs->begin[b] .. of input row 0
      // (a skipped sequence's tokens, and tokens of none, stay zero in the pre-zeroed output).
      const int64_t sb = seqs ? 0 : b;
      in_t* o_row = out_data + (sb * tokens * heads + h) * dv;  // token t at + t * heads * dv
      const int64_t row = seqs && seqs->length[b] < 0 ? -1 : rows[b];
      if (row < 0) {
        if (!seqs) {
          for (int64_t t = 0; t < tokens; ++t) std::fill_n(o_row + t * heads * dv, dv, in_t(0));
        }
        continue;
      }
      if (tok_row != b) {  // unmasked tokens of this row, in order
        m_total = 0;
        const int64_t first = seqs ? seqs->begin[b] : 0, count = seqs ? seqs->length[b] : tokens;
        for (int64_t t = first; t < first + count; ++t) {
          if (!keep || keep[b * tokens + t]) tok[m_total++] = t;
        }
        row_written = seqs ? checkpoints_written(count, num_checkpoints, every) : written;
        for (int64_t x = 0; x < row_written; ++x) {  // (x + 1) * every <= count: no overflow
          cut[x] = std::lower_bound(tok.data(), tok.data() + m_total, first + (x + 1) * every) - tok.data();
        }
        tok_row = b;
      }
      if (keep) {  // a masked token's output is zero, whatever its inputs
        for (int64_t t = 0; t < tokens; ++t) {
          if (!keep[b * tokens + t]) std::fill_n(o_row + t * heads * dv, dv, in_t(0));
        }
      }

      state_t* s_raw = state_data + (row * heads + h) * dk * dv;
      float* S;
      if constexpr (std::is_same_v<state_t, float>) {
        S = s_raw;
      } else {
        for (int64_t e = 0; e < dk * dv; ++e) wide[e] = static_cast<float>(s_raw[e]);
        S = wide;
      }
      const float* lam = powers.data() + h * (c + 1);  // lam[e] = lam^e
      for (int64_t j = 0; j < c; ++j) {
        q_factor[j] = scale * lam[j + 1];
        dist_factor[j] = scale * lam[j];
      }

      // Stores S as checkpoint x for each pending x whose cut is `done` tokens.
      int64_t next_checkpoint = 0;
      auto store_checkpoints = [&](int64_t done) {
        for (; next_checkpoint < row_written && cut[next_checkpoint] <= done; ++next_checkpoint) {
          store_state(checkpoints + ((b * num_checkpoints + next_checkpoint) * heads + h) * dk * dv, S, dk * dv);
        }
      };
      store_checkpoints(0);
      for (int64_t start = 0, m = 0; start < m_total; start += m) {
        m = std::min(c, m_total - start);
        if (next_checkpoint < row_written) m = std::min(m, cut[next_checkpoint] - start);  // > 0: cuts <= start are stored
        const int64_t* bt = tok.data() + start;
        for (int64_t j = 0; j < m; ++j) {
          widen(Q + j * dk, 1, q.at(sb, bt[j], h), q.s3, dk);
          widen(Kt + j, c, k.at(sb, bt[j], h), k.s3, dk);
          widen(V + j * dv, 1, v.at(sb, bt[j], h), v.s3, dv);
        }
        for (int64_t j = start + c; j < std::min(start + 2 * c, m_total); ++j) {  // the next block's rows
          prefetch_row(q.at(sb, tok[j], h), q.s3, dk);
          prefetch_row(k.at(sb, tok[j], h), k.s3, dk);
          prefetch_row(v.at(sb, tok[j], h), v.s3, dv);
        }
        // Scores, lower triangle by row tiles (entries right of the diagonal
        // inside a tile are computed but never read), then the decays.
        for (int64_t j0 = 0; j0 < m; j0 += kTileRows) {
          const int64_t r = std::min(kTileRows, m - j0);
          cpu::gemm_tile(r, j0 + r, dk, Q + j0 * dk, dk, Kt, c, scores + j0 * c, c, nullptr, false, 0.0f);
          for (int64_t j = j0; j < j0 + r; ++j) {
            float* sj = scores + j * c;
            for (int64_t i = 0; i <= j; ++i) sj[i] *= dist_factor[j - i];
          }
        }
        // Outputs: inter-block term from S, then tokens of earlier tiles, then
        // each row's own part of the diagonal tile (i <= j, row by row).
        for (int64_t j0 = 0; j0 < m; j0 += kTileRows) {
          const int64_t r = std::min(kTileRows, m - j0);
          cpu::gemm_tile(r, dv, dk, Q + j0 * dk, dk, S, dv, O, dv, q_factor + j0, false, 0.0f);
          if (j0 > 0) cpu::gemm_tile(r, dv, j0, scores + j0 * c, c, V, dv, O, dv, nullptr, true, 1.0f);
          for (int64_t x = 0; x < r; ++x) {
            cpu::gemm_tile(1, dv, x + 1, scores + (j0 + x) * c + j0, c, V + j0 * dv, dv, O + x * dv, dv, nullptr, true,
                           1.0f);
            narrow_store(o_row + bt[j0 + x] * heads * dv, O + x * dv, dv, 1.0f);
          }
        }
        // State: S = lam^m S + (k_i lam^(m-1-i))^T v.
        for (int64_t p = 0; p < dk; ++p) {
          float* kp = Kt + p * c;
          for (int64_t i = 0; i < m; ++i) kp[i] *= lam[m - 1 - i];
        }
        for (int64_t p0 = 0; p0 < dk; p0 += kTileRows) {
          const int64_t r = std::min(kTileRows, dk - p0);
          cpu::gemm_tile(r, dv, m, Kt + p0 * c, c, V, dv, S + p0 * dv, dv, nullptr, true, lam[m]);
        }
        store_checkpoints(start + m);
      }
      if constexpr (!std::is_same_v<state_t, float>) {
        for (int64_t e = 0; e < dk * dv; ++e) s_raw[e] = static_cast<state_t>(wide[e]);
      }
    }
  };
  if (seqs == nullptr) {
    at::parallel_for(0, d.batch * heads, grain_for(tokens * dk * dv), run_items);
    return;
  }
  // Packed: the items' work is their sequence's length, so equal item counts per thread would leave
  // threads idle; split the items into one contiguous run per thread of about equal work instead.
  const int64_t items = d.batch * heads;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  std::vector<int64_t> work_before(items + 1, 0);  // tokens (plus a state load/store's worth) before item i
  for (int64_t i = 0; i < items; ++i) {
    const int64_t b = i / heads;
    const int64_t length = seqs->length[b] < 0 || rows[b] < 0 ? 0 : seqs->length[b] + 8;
    work_before[i + 1] = work_before[i] + length;
  }
  std::vector<int64_t> bounds(parts + 1, items);
  bounds[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = work_before[items] * p / parts;
    bounds[p] = std::lower_bound(work_before.begin(), work_before.end(), target) - work_before.begin();
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (bounds[p] < bounds[p + 1]) run_items(bounds[p], bounds[p + 1]);
    }
  });
}

// ------------------------------------------------------------------ entry points

// Runs fn(state_t{}, in_t{}) for the state dtype (float32 or bfloat16) and the
// input dtype (float32, float16 or bfloat16), both validated before.
template <typename Fn>
void dispatch_lightning(const at::Tensor& state, const at::Tensor& query, Fn&& fn) {
  auto with_state = [&](auto state_tag) {
    switch (query.scalar_type()) {
      case at::kFloat: return fn(state_tag, float{});
      case at::kHalf: return fn(state_tag, at::Half{});
      default: return fn(state_tag, at::BFloat16{});
    }
  };
  if (state.scalar_type() == at::kFloat) {
    with_state(float{});
  } else {
    with_state(at::BFloat16{});
  }
}

at::Tensor lightning_decode_cpu(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& slopes,
                                const std::optional<at::Tensor>& slot_ids, double scale, bool check_bounds,
                                const std::optional<at::Tensor>& step_states) {
  const LightningDims d =
      check_lightning_args("lightning_decode", state, query, key, value, slopes, std::nullopt, slot_ids, 1,
                           "step_states", step_states);
  if (step_states.has_value()) check_step_states(*step_states, state, d);
  const std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, d, check_bounds);
  at::Tensor out = at::empty({d.batch, d.tokens, d.heads, d.value_dim}, query.options());
  if (out.numel() == 0) {
    if (step_states.has_value()) store_initial_step_states(*step_states, state, slots, d);
    return out;
  }
  const std::vector<int64_t> rows = resolve_rows(slots, d);
  const at::Tensor slopes_f = slopes.to(at::kFloat).contiguous();
  dispatch_lightning(state, query, [&](auto state_tag, auto in_tag) {
    using state_t = decltype(state_tag);
    state_t* steps = step_states.has_value() ? step_states->data_ptr<state_t>() : nullptr;
    decode_rows<state_t, decltype(in_tag)>(state, out, query, key, value, slopes_f.const_data_ptr<float>(), rows, d,
                                           float(scale), steps);
  });
  return out;
}

// LIGHTNING_CACHE_CPU_PREFILL=aten (read per call): lightning_prefill runs the
// shared ATen path the CUDA backend runs (lightning_prefill_chunked, and
// lightning_prefill_packed for cu_seqlens) instead of the CPU kernels, so the
// CPU test suite checks that path too.
bool aten_prefill_selected() {
  const char* flag = std::getenv("LIGHTNING_CACHE_CPU_PREFILL");
  return flag != nullptr && std::string(flag) == "aten";
}

at::Tensor lightning_prefill_cpu(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& slopes,
                                 const std::optional<at::Tensor>& attention_mask,
                                 const std::optional<at::Tensor>& slot_ids, int64_t block_size, double scale,
                                 bool check_bounds, const std::optional<at::Tensor>& checkpoints,
                                 int64_t checkpoint_every, const std::optional<at::Tensor>& cu_seqlens) {
  const LightningDims d =
      check_lightning_args("lightning_prefill", state, query, key, value, slopes, attention_mask, slot_ids,
                           block_size, "checkpoints", checkpoints, cu_seqlens);
  const int64_t written = check_checkpoints(checkpoints, checkpoint_every, state, d);
  const std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, d, check_bounds);
  PackedSequences seqs;
  if (d.packed) seqs = prepare_cu_seqlens("lightning_prefill", *cu_seqlens, d.tokens, check_bounds);
  if (aten_prefill_selected()) {  // the CUDA backend's ATen path, run here so the CPU tests cover it
    if (d.packed) {
      return lightning_prefill_packed(state, query, key, value, slopes, slots, d, seqs, block_size, scale,
                                      &scatter_state_rows_aten, checkpoints, checkpoint_every);
    }
    return lightning_prefill_chunked(state, query, key, value, slopes, attention_mask, slots, d, block_size, scale,
                                     &scatter_state_rows_aten, checkpoints, checkpoint_every);
  }
  at::Tensor out = at::empty({d.packed ? 1 : d.batch, d.tokens, d.heads, d.value_dim}, query.options());
  if (d.batch == 0 || d.tokens == 0 || d.heads == 0) return d.packed ? out.zero_() : out;
  const std::vector<int64_t> rows = resolve_rows(slots, d);
  if (d.packed) {  // tokens of no kept sequence output zeros; the kernel writes every other token
    std::vector<uint8_t> written_by_kernel(d.tokens, 0);
    for (int64_t s = 0; s < d.batch; ++s) {
      if (seqs.length[s] <= 0 || rows[s] < 0) continue;
      std::fill_n(written_by_kernel.begin() + seqs.begin[s], seqs.length[s], uint8_t{1});
    }
    at::Tensor tokens = out.view({d.tokens, -1});
    for (int64_t t = 0; t < d.tokens;) {  // one fill per run of such tokens
      int64_t end = t;
      while (end < d.tokens && !written_by_kernel[end]) ++end;
      if (end > t) tokens.narrow(0, t, end - t).zero_();
      t = end + 1;
    }
  }
  const at::Tensor slopes_f = slopes.to(at::kFloat).contiguous();
  // "Nonzero" in the mask's own dtype (so -0.0 is masked), as one bool per token.
  const std::optional<at::Tensor> keep =
      attention_mask.has_value() ? std::optional<at::Tensor>(attention_mask->ne(0).contiguous()) : std::nullopt;
  dispatch_lightning(state, query, [&](auto state_tag, auto in_tag) {
    using state_t = decltype(state_tag);
    state_t* checkpoint_data = written > 0 ? checkpoints->data_ptr<state_t>() : nullptr;
    prefill_rows<state_t, decltype(in_tag)>(state, out, query, key, value, slopes_f.const_data_ptr<float>(), rows,
                                            keep ? keep->const_data_ptr<bool>() : nullptr, d, float(scale),
                                            checkpoint_data, written > 0 ? checkpoints->size(1) : 0, written,
                                            checkpoint_every, d.packed ? &seqs : nullptr);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_cache, CPU, m) {
  m.impl("lightning_decode", &lightning_decode_cpu);
  m.impl("lightning_prefill", &lightning_prefill_cpu);
}

}  // namespace lightning_cache
