// Chunked lightning prefill, shared by the CPU and CUDA backends.
//
// Within a block of c tokens starting from state S (all per row and head,
// lam = exp(-s), j, i block-relative):
//   o_j   = scale * (sum_{i<=j} lam^(j-i) (q_j . k_i) v_i + lam^(j+1) q_j S)
//   S_new = lam^c S + sum_i lam^(c-1-i) k_i^T v_i
// which is exactly c sequential decode steps. Decay powers are formed as
// exp(-s * distance) from non-negative distances, so nothing overflows and the
// result does not lose accuracy on long prompts. Everything runs in float32.
#include <ATen/ATen.h>

#include "ops.h"

namespace lightning_cache {

at::Tensor lightning_prefill_chunked(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& slopes,
                                     const std::optional<at::Tensor>& attention_mask,
                                     const std::optional<at::Tensor>& slot_ids, const LightningDims& d,
                                     int64_t block_size, double scale, ScatterStateRows scatter) {
  const auto f32 = at::TensorOptions().device(state.device()).dtype(at::kFloat);

  // Which batch rows take part: the rest keep their state and output zeros.
  std::optional<at::Tensor> row_valid;
  at::Tensor rows;  // [B, H, Dk, Dv] float32 working copy of each row's state
  if (slot_ids.has_value()) {
    row_valid = slot_ids->ge(0).logical_and_(slot_ids->lt(d.slots));
    const at::Tensor gather_at = at::where(*row_valid, *slot_ids, at::zeros({}, slot_ids->options()));
    rows = state.index_select(0, gather_at).to(at::kFloat);  // skipped rows compute on a stand-in, never stored
  } else {
    rows = state.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  }

  // [B*H, n, D] float32 copies of the inputs, dense, so every block's batched
  // matmuls read contiguous memory. Masked tokens get k = 0: they add nothing
  // to the state while the decay still runs.
  const int64_t bh = d.batch * d.heads;
  auto dense = [&](const at::Tensor& t) { return t.transpose(1, 2).to(at::kFloat).contiguous(); };
  const at::Tensor q = dense(query).view({bh, d.tokens, d.key_dim});
  at::Tensor k = dense(key);
  if (attention_mask.has_value()) k.mul_(attention_mask->ne(0).to(at::kFloat).view({d.batch, 1, d.tokens, 1}));
  k = k.view({bh, d.tokens, d.key_dim});
  const at::Tensor v = dense(value).view({bh, d.tokens, d.value_dim});
  at::Tensor state_rows = rows.view({bh, d.key_dim, d.value_dim});

  // Decay factors per head, for one full block, broadcast over the batch rows
  // (never materialized per row: [H, c, c] stays small for any batch).
  // `scale` is folded into the two factors that multiply queries.
  const int64_t block = std::min(block_size, d.tokens);
  const at::Tensor s = slopes.to(f32).view({d.heads, 1, 1});                // [H, 1, 1]
  const at::Tensor pos = at::arange(block, f32);                            // [c]
  const at::Tensor distance = pos.view({block, 1}) - pos.view({1, block});  // j - i
  const at::Tensor intra_decay =                                            // [H, c, c]
      at::where(distance.ge(0), at::exp(-s * distance.clamp_min(0)), at::zeros({}, f32)).mul_(scale);
  const at::Tensor query_decay = at::exp(-s * (pos + 1).view({block, 1})).mul_(scale);  // [H, c, 1]
  const at::Tensor key_decay = at::exp(-s * (block - 1 - pos).view({block, 1}));        // [H, c, 1]
  const at::Tensor full_block_decay = at::exp(-s * static_cast<double>(block));         // [H, 1, 1]
  // [B*H, c, D] block of a dense input, times a per-head [H, c, 1] factor.
  auto times_head_factor = [&](const at::Tensor& x, const at::Tensor& factor) {
    const int64_t c = x.size(1);
    return (x.view({d.batch, d.heads, c, x.size(2)}) * factor).view({bh, c, x.size(2)});
  };

  at::Tensor out = at::empty({bh, d.tokens, d.value_dim}, f32);
  for (int64_t start = 0; start < d.tokens; start += block) {
    const int64_t c = std::min(block, d.tokens - start);
    const at::Tensor qb = q.narrow(1, start, c);
    const at::Tensor kb = k.narrow(1, start, c);
    const at::Tensor vb = v.narrow(1, start, c);
    at::Tensor scores = at::bmm(qb, kb.transpose(1, 2));
    scores.view({d.batch, d.heads, c, c}).mul_(intra_decay.narrow(1, 0, c).narrow(2, 0, c));
    // o = (q * lam^(j+1)) S + scores v, the second product accumulated in place.
    at::Tensor ob = at::bmm(times_head_factor(qb, query_decay.narrow(1, 0, c)), state_rows).baddbmm_(scores, vb);
    out.narrow(1, start, c).copy_(ob);
    // S = lam^c S + (k * lam^(c-1-i))^T v; a partial last block uses the tail of the key decays.
    const at::Tensor kd = times_head_factor(kb, key_decay.narrow(1, block - c, c));
    rows.mul_(c == block ? full_block_decay : at::exp(-s * static_cast<double>(c)));
    state_rows.baddbmm_(kd.transpose(1, 2), vb);
  }

  out = out.view({d.batch, d.heads, d.tokens, d.value_dim});
  // masked_fill, not a multiply: a skipped row's output is zero even if its inputs are not finite.
  if (row_valid.has_value()) out.masked_fill_(row_valid->logical_not().view({d.batch, 1, 1, 1}), 0.0f);
  scatter(state, rows, slot_ids);
  return out.transpose(1, 2).to(query.scalar_type()).contiguous();
}

}  // namespace lightning_cache
