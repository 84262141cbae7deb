// Chunked lightning prefill, shared by the CPU and CUDA backends.
//
// Within a block of c tokens starting from state S (all per row and head,
// lam = exp(-s), j, i block-relative), with e_t the number of unmasked tokens
// among block tokens 0..t (e_t = t + 1 without a mask) and E = e_{c-1}:
//   o_j   = scale * (sum_{i<=j, unmasked} lam^(e_j-e_i) (q_j . k_i) v_i + lam^(e_j) q_j S)   (0 if j is masked)
//   S_new = lam^E S + sum_{i unmasked} lam^(E-e_i) k_i^T v_i
// which is exactly c sequential decode steps in which a masked token is
// skipped whole (no decay, no k^T v, output 0). Decay powers are formed as
// exp(-s * distance) from non-negative distances, so nothing overflows and the
// result does not lose accuracy on long prompts. Everything runs in float32,
// with TF32 / reduced-precision matmuls off for the call.
//
// Non-finite inputs: every value that is dropped is dropped by selection
// (where / masked_fill), never by multiplying with 0, so a NaN or Inf in
// token t reaches neither the outputs of tokens before t nor, if t is masked,
// anything at all. The one product that cannot be written as a selection is
// the intra-block (scores @ v), whose zero upper triangle would still meet a
// later token's non-finite v (0 * Inf = NaN): it runs on v with non-finite
// entries zeroed, and output column d of token j then gets a NaN added if an
// unmasked token i <= j had a non-finite v[d] (sequential decode makes it
// NaN or +-Inf there too).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/version.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "ops.h"

namespace lightning_cache {
namespace {

// Forces full-float32 matmuls for its lifetime and restores the caller's
// settings. NoTF32Guard is thread-local and covers cuBLAS handles; the global
// per-backend precision (cuBLASLt, oneDNN's bf16 "medium" path) is process
// wide, so nested or concurrent guards share one save/restore, counted.
class FullFloat32Matmul {
 public:
  FullFloat32Matmul() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 12)
    std::lock_guard<std::mutex> lock(mutex());
    if (depth()++ == 0) {
      auto& ctx = at::globalContext();
      saved_cuda() = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
      saved_mkldnn() = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
      if (saved_cuda() != at::Float32Precision::IEEE) {
        ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
      }
      if (saved_mkldnn() != at::Float32Precision::IEEE) {
        ctx.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
      }
    }
#endif
  }
  ~FullFloat32Matmul() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 12)
    std::lock_guard<std::mutex> lock(mutex());
    if (--depth() == 0) {
      auto& ctx = at::globalContext();
      if (saved_cuda() != at::Float32Precision::IEEE) {
        ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, saved_cuda());
      }
      if (saved_mkldnn() != at::Float32Precision::IEEE) {
        ctx.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, saved_mkldnn());
      }
    }
#endif
  }
  FullFloat32Matmul(const FullFloat32Matmul&) = delete;
  FullFloat32Matmul& operator=(const FullFloat32Matmul&) = delete;

 private:
  at::NoTF32Guard no_tf32_;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 12)
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static int& depth() {
    static int d = 0;
    return d;
  }
  static at::Float32Precision& saved_cuda() {
    static at::Float32Precision p = at::Float32Precision::IEEE;
    return p;
  }
  static at::Float32Precision& saved_mkldnn() {
    static at::Float32Precision p = at::Float32Precision::IEEE;
    return p;
  }
#endif
};

}  // namespace

at::Tensor lightning_prefill_chunked(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& slopes,
                                     const std::optional<at::Tensor>& attention_mask,
                                     const std::optional<at::Tensor>& slot_ids, const LightningDims& d,
                                     int64_t block_size, double scale, ScatterStateRows scatter,
                                     const std::optional<at::Tensor>& checkpoints, int64_t checkpoint_every,
                                     const std::vector<int64_t>* row_tokens) {
  if (is_empty_call(d)) return empty_lightning_output(d, query);  // nothing read, nothing written
  TORCH_INTERNAL_ASSERT(row_tokens == nullptr || (attention_mask.has_value() &&
                                                  static_cast<int64_t>(row_tokens->size()) == d.batch));
  const FullFloat32Matmul full_float32;
  const auto f32 = at::TensorOptions().device(state.device()).dtype(at::kFloat);
  const at::Tensor zero = at::zeros({}, f32);

  // Which batch rows take part (slot ids are sanitized: -1 = skip): the rest
  // keep their state and output zeros.
  std::optional<at::Tensor> row_valid;
  at::Tensor rows;  // [B, H, Dk, Dv] float32 working copy of each row's state
  if (slot_ids.has_value()) {
    row_valid = slot_ids->ge(0).logical_and_(slot_ids->lt(d.slots));
    const at::Tensor gather_at = at::where(*row_valid, *slot_ids, at::zeros({}, slot_ids->options()));
    rows = state.index_select(0, gather_at).to(at::kFloat);  // skipped rows compute on a stand-in, never stored
  } else {
    rows = state.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  }

  // keep [B, 1, n, 1]: unmasked tokens. Masked tokens' q, k, v are selected
  // out (set to 0, whatever they held), so they add nothing anywhere.
  std::optional<at::Tensor> keep;
  if (attention_mask.has_value()) keep = attention_mask->ne(0).view({d.batch, 1, d.tokens, 1});

  // [B*H, n, D] float32 copies of the inputs, dense, so every block's batched
  // matmuls read contiguous memory.
  const int64_t bh = d.batch * d.heads;
  auto dense = [&](const at::Tensor& t) {
    at::Tensor x = t.transpose(1, 2).to(at::kFloat).contiguous();
    if (keep.has_value()) x.masked_fill_(keep->logical_not(), 0.0f);
    return x;
  };
  const at::Tensor q = dense(query).view({bh, d.tokens, d.key_dim});
  const at::Tensor k = dense(key).view({bh, d.tokens, d.key_dim});
  const at::Tensor v = dense(value).view({bh, d.tokens, d.value_dim});
  // v for the intra-block product (non-finite -> 0), and the NaN to put back:
  // v - v is 0 where v is finite and NaN where not, and a cumulative sum
  // carries that NaN to every later token (adding 0 changes no finite value).
  const at::Tensor v_intra = at::nan_to_num(v, 0.0, 0.0, 0.0);
  const at::Tensor poison = (v - v).cumsum(1);  // [B*H, n, Dv]
  at::Tensor state_rows = rows.view({bh, d.key_dim, d.value_dim});

  const int64_t block = std::min(block_size, d.tokens);
  const at::Tensor s = slopes.to(f32).view({d.heads, 1, 1});  // [H, 1, 1]
  const at::Tensor pos = at::arange(block, f32);              // [c]
  const at::Tensor later = at::ones({block, block}, f32.dtype(at::kBool)).triu_(1);  // i > j: not seen by j

  // Without a mask the decay factors depend only on the head: [H, ...],
  // broadcast over the batch rows, for one full block (the cheap path). With
  // a mask they depend on each row's count of unmasked tokens: e [B, 1, n]
  // (exact: counts are integers, block-local differences are at most c).
  at::Tensor intra_decay, query_decay, key_decay, full_block_decay;
  at::Tensor count;  // [B, n] int64, unmasked tokens among 0..t (mask only)
  if (!keep.has_value() || row_tokens != nullptr) {  // row_tokens: blocks of rows without masked tokens
    const at::Tensor distance = pos.view({block, 1}) - pos.view({1, block});       // j - i
    intra_decay = at::exp(-s * distance.clamp_min(0)).mul_(scale);                  // [H, c, c]
    query_decay = at::exp(-s * (pos + 1).view({block, 1})).mul_(scale);             // [H, c, 1]
    key_decay = at::exp(-s * (block - 1 - pos).view({block, 1}));                   // [H, c, 1]
    full_block_decay = at::exp(-s * static_cast<double>(block));                    // [H, 1, 1]
  }
  if (keep.has_value()) count = keep->view({d.batch, d.tokens}).to(at::kLong).cumsum(1);
  // [rows*H, c, D] block of a dense input (`rows` batch rows), times a [H or rows*H-shaped, c, 1] factor.
  auto times_factor = [&](const at::Tensor& x, const at::Tensor& factor, int64_t rows) {
    const int64_t c = x.size(1);
    return (x.view({rows, d.heads, c, x.size(2)}) * factor).view({rows * d.heads, c, x.size(2)});
  };

  // Checkpoint k (k < written) is the working state after position (k + 1) * every.
  const int64_t written =
      checkpoints.has_value() ? checkpoints_written(d.tokens, checkpoints->size(1), checkpoint_every) : 0;
  int64_t next_checkpoint = 0;
  auto store_checkpoint = [&](int64_t k) {
    at::Tensor dst = checkpoints->select(1, k);  // [B, H, Dk, Dv], state dtype
    if (row_valid.has_value()) {
      // Skipped rows keep what they hold, by selection (their working row is a stand-in).
      dst.copy_(at::where(row_valid->view({d.batch, 1, 1, 1}), rows, dst));
    } else {
      dst.copy_(rows);
    }
  };

  at::Tensor out = at::empty({bh, d.tokens, d.value_dim}, f32);
  for (int64_t start = 0, c = 0; start < d.tokens; start += c) {
    // Blocks start at multiples of `block` unless a checkpoint ends one early
    // (a checkpoint at a multiple of the block costs only its store).
    int64_t end = std::min(start + block - start % block, d.tokens);
    if (next_checkpoint < written) end = std::min(end, (next_checkpoint + 1) * checkpoint_every);
    c = end - start;
    // One block of batch rows [r0, r1), with the mask's decays or, for rows with no masked token in the
    // block, the head's.
    auto run_rows = [&](int64_t r0, int64_t r1, bool masked) {
      const int64_t n = r1 - r0, nh = n * d.heads;
      const at::Tensor qb = q.narrow(1, start, c).narrow(0, r0 * d.heads, nh);
      const at::Tensor kb = k.narrow(1, start, c).narrow(0, r0 * d.heads, nh);
      const at::Tensor vb = v.narrow(1, start, c).narrow(0, r0 * d.heads, nh);
      at::Tensor intra, qdecay, kdecay, sdecay;
      if (!masked) {
        intra = intra_decay.narrow(1, 0, c).narrow(2, 0, c);
        qdecay = query_decay.narrow(1, 0, c);
        kdecay = key_decay.narrow(1, block - c, c);  // a partial block (the last, or cut by a checkpoint): the tail
        sdecay = c == block ? full_block_decay : at::exp(-s * static_cast<double>(c));
      } else {
        // e_t within the block, per row: [n, 1, c, 1]; E = e_{c-1}: [n, 1, 1, 1].
        const at::Tensor row_count = count.narrow(0, r0, n);
        at::Tensor e = row_count.narrow(1, start, c);
        if (start > 0) e = e - row_count.narrow(1, start - 1, 1);
        e = e.to(at::kFloat).view({n, 1, c, 1});
        const at::Tensor total = e.narrow(2, c - 1, 1);
        const at::Tensor sh = s.view({1, d.heads, 1, 1});
        intra = at::exp(-sh * (e - e.transpose(2, 3)).clamp_min_(0)).mul_(scale);  // [n, H, c, c]
        qdecay = at::exp(-sh * e).mul_(scale);                                       // [n, H, c, 1]
        kdecay = at::exp(-sh * (total - e));                                         // [n, H, c, 1]
        sdecay = at::exp(-sh * total);                                               // [n, H, 1, 1]
      }
      at::Tensor scores = at::bmm(qb, kb.transpose(1, 2));
      // Decay, then drop i > j by selection: a later token's non-finite k must
      // not reach an earlier output through 0 * Inf.
      scores.view({n, d.heads, c, c}).mul_(intra).masked_fill_(later.narrow(0, 0, c).narrow(1, 0, c), 0.0f);
      // o = (q * lam^e_j) S + scores v, the second product accumulated in place.
      at::Tensor row_state = state_rows.narrow(0, r0 * d.heads, nh);
      at::Tensor ob = at::bmm(times_factor(qb, qdecay, n), row_state)
                          .baddbmm_(scores, v_intra.narrow(1, start, c).narrow(0, r0 * d.heads, nh));
      out.narrow(1, start, c).narrow(0, r0 * d.heads, nh).copy_(ob);
      // S = lam^E S + (k * lam^(E-e_i))^T v, with the raw v: every token here is before the block's end.
      rows.narrow(0, r0, n).mul_(sdecay);
      row_state.baddbmm_(times_factor(kb, kdecay, n).transpose(1, 2), vb);
    };
    if (row_tokens == nullptr) {
      run_rows(0, d.batch, keep.has_value());
    } else {
      // Rows [0, full) hold every token of the block, rows [full, active) end inside it, the rest ended
      // before it (masked from here on: state unchanged, outputs zeroed below, so no work at all).
      int64_t active = d.batch, full = 0;
      while (active > 0 && (*row_tokens)[active - 1] <= start) --active;
      while (full < active && (*row_tokens)[full] >= end) ++full;
      if (full > 0) run_rows(0, full, false);
      if (active > full) run_rows(full, active, true);
    }
    if (next_checkpoint < written && end == (next_checkpoint + 1) * checkpoint_every) {
      store_checkpoint(next_checkpoint++);
    }
  }
  out.add_(poison);

  out = out.view({d.batch, d.heads, d.tokens, d.value_dim});
  // masked_fill, not a multiply: skipped rows and masked tokens output zero even if their inputs are not finite.
  if (keep.has_value()) out.masked_fill_(keep->logical_not(), 0.0f);
  if (row_valid.has_value()) out.masked_fill_(row_valid->logical_not().view({d.batch, 1, 1, 1}), 0.0f);
  scatter(state, rows, slot_ids);
  return out.transpose(1, 2).to(query.scalar_type()).contiguous();
}

at::Tensor int64_on(const std::vector<int64_t>& values, const at::Device& device) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(device);  // blocking: `values` may go
}

void scatter_state_rows_aten(at::Tensor& state, const at::Tensor& rows, const std::optional<at::Tensor>& slot_ids) {
  if (!slot_ids.has_value()) {
    state.copy_(rows);
    return;
  }
  // Sanitized ids: -1 or a distinct row of the state.
  const at::Tensor taken = slot_ids->ge(0).logical_and(slot_ids->lt(state.size(0))).nonzero().squeeze(1);
  state.index_copy_(0, slot_ids->index_select(0, taken), rows.index_select(0, taken).to(state.scalar_type()));
}

// Packed sequences as one padded batch: each sequence becomes a row of [S, max_len]
// (longest first), its tokens first and the rest masked (a masked token leaves the
// state as it is and outputs zero, so each row's state and outputs are its sequence's).
// Checkpoints go to a scratch buffer and only each sequence's own (counted in
// its own tokens) are kept: the padded row would also reach later ones.
at::Tensor lightning_prefill_packed(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, const at::Tensor& slopes,
                                    const std::optional<at::Tensor>& slot_ids, const LightningDims& d,
                                    const PackedSequences& seqs, int64_t block_size, double scale,
                                    ScatterStateRows scatter, const std::optional<at::Tensor>& checkpoints,
                                    int64_t checkpoint_every) {
  const auto options = query.options();
  at::Tensor out = at::zeros({1, d.tokens, d.heads, d.value_dim}, options);  // tokens of no sequence: zeros
  const int64_t S = seqs.count();
  int64_t longest = 0;
  for (int64_t s = 0; s < S; ++s) longest = std::max(longest, seqs.length[s]);
  if (S == 0 || longest == 0 || d.heads == 0) return out;

  // Padded row i holds sequence order[i], longest first, so the rows still holding tokens at any block are a
  // prefix and the chunked loop skips the rest (work ~ the tokens, not S * max_len).
  // gather[i * longest + t]: the packed token padded row i reads at t (T: a zero token).
  std::vector<int64_t> order(S);
  for (int64_t s = 0; s < S; ++s) order[s] = s;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return seqs.length[a] > seqs.length[b]; });
  std::vector<int64_t> gather(S * longest, d.tokens), row_tokens(S), kept(S), out_token, out_source;
  for (int64_t i = 0; i < S; ++i) {
    const int64_t s = order[i];
    kept[i] = seqs.length[s] >= 0;
    row_tokens[i] = std::max<int64_t>(seqs.length[s], 0);
    for (int64_t t = 0; t < row_tokens[i]; ++t) {
      gather[i * longest + t] = seqs.begin[s] + t;
      out_token.push_back(seqs.begin[s] + t);
      out_source.push_back(i * longest + t);
    }
  }
  const auto longs = at::TensorOptions().dtype(at::kLong);
  const at::Device device = query.device();
  const at::Tensor gather_at = int64_on(gather, device);
  const at::Tensor order_at = int64_on(order, device);
  auto padded = [&](const at::Tensor& x) {  // [1, T, H, D] -> [S, longest, H, D], zero-padded
    const at::Tensor rows = at::cat({x.select(0, 0), at::zeros({1, x.size(2), x.size(3)}, x.options())});
    return rows.index_select(0, gather_at).view({S, longest, x.size(2), x.size(3)});
  };
  const at::Tensor lengths = int64_on(row_tokens, device);
  const at::Tensor mask = at::arange(longest, longs.device(device)).unsqueeze(0).lt(lengths.unsqueeze(1));
  // Rows of skipped sequences are skipped rows (slot -1).
  const at::Tensor kept_at = int64_on(kept, device).ne(0);
  const at::Tensor slot_of = slot_ids.has_value() ? slot_ids->index_select(0, order_at) : order_at;
  const std::optional<at::Tensor> slots = at::where(kept_at, slot_of, at::full({}, -1, slot_of.options()));

  LightningDims pd = d;
  pd.packed = false;
  pd.batch = S;
  pd.tokens = longest;
  const int64_t written = checkpoints.has_value() ? checkpoints_written(longest, checkpoints->size(1), checkpoint_every) : 0;
  std::optional<at::Tensor> scratch;  // padded row order; rows the padded call skips keep what they hold
  if (written > 0) scratch = checkpoints->index_select(0, order_at);
  const at::Tensor padded_out =
      lightning_prefill_chunked(state, padded(query), padded(key), padded(value), slopes, mask, slots, pd, block_size,
                                scale, scatter, scratch, checkpoint_every, &row_tokens);
  if (written > 0) {
    // Checkpoint c of a sequence is its own when (c + 1) * every <= its length.
    std::vector<int64_t> own(S);
    for (int64_t i = 0; i < S; ++i) {
      own[i] = kept[i] ? checkpoints_written(row_tokens[i], checkpoints->size(1), checkpoint_every) : 0;
    }
    const at::Tensor own_at = int64_on(own, device);
    const at::Tensor take = at::arange(checkpoints->size(1), longs.device(device)).unsqueeze(0).lt(own_at.unsqueeze(1));
    at::Tensor dst = *checkpoints;
    dst.index_copy_(0, order_at, at::where(take.view({S, -1, 1, 1, 1}), *scratch, dst.index_select(0, order_at)));
  }
  if (!out_token.empty()) {
    out.select(0, 0).index_copy_(0, int64_on(out_token, device),
                                 padded_out.reshape({S * longest, d.heads, d.value_dim})
                                     .index_select(0, int64_on(out_source, device)));
  }
  return out;
}

}  // namespace lightning_cache
