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

  // [B, H, n, D] float32 views of the inputs; masked tokens get k = 0 so they
  // add nothing to the state while the decay still runs.
  // Contiguous once, so every block's matmuls read dense memory.
  const at::Tensor q = query.transpose(1, 2).to(at::kFloat).contiguous();
  at::Tensor k = key.transpose(1, 2).to(at::kFloat).contiguous();
  const at::Tensor v = value.transpose(1, 2).to(at::kFloat).contiguous();
  if (attention_mask.has_value()) {
    k = k * attention_mask->ne(0).to(at::kFloat).view({d.batch, 1, d.tokens, 1});
  }

  const int64_t block = std::min(block_size, d.tokens);
  const at::Tensor s = slopes.to(f32).view({d.heads, 1});                  // [H, 1]
  const at::Tensor pos = at::arange(block, f32);                           // [c]
  const at::Tensor distance = (pos.view({block, 1}) - pos.view({1, block})).clamp_min(0);
  const at::Tensor intra_decay =                                           // [H, c, c], lower triangular
      at::exp(-s.view({d.heads, 1, 1}) * distance).tril();
  const at::Tensor query_decay = at::exp(-s * (pos + 1)).unsqueeze(-1);    // [H, c, 1]
  const at::Tensor key_decay = at::exp(-s * (block - 1 - pos)).unsqueeze(-1);  // [H, c, 1]

  at::Tensor out = at::empty({d.batch, d.heads, d.tokens, d.value_dim}, f32);
  for (int64_t start = 0; start < d.tokens; start += block) {
    const int64_t c = std::min(block, d.tokens - start);
    const at::Tensor qb = q.narrow(2, start, c);
    const at::Tensor kb = k.narrow(2, start, c);
    const at::Tensor vb = v.narrow(2, start, c);
    const at::Tensor scores = at::matmul(qb, kb.transpose(-1, -2)).mul_(intra_decay.narrow(1, 0, c).narrow(2, 0, c));
    at::Tensor ob = at::matmul(scores, vb);
    ob.add_(at::matmul(qb * query_decay.narrow(1, 0, c), rows));
    out.narrow(2, start, c).copy_(ob);
    // A partial last block uses the tail of the key decays: lam^(c-1-i).
    const at::Tensor kd = key_decay.narrow(1, block - c, c);
    rows.mul_(at::exp(-s * static_cast<double>(c)).view({d.heads, 1, 1}))
        .add_(at::matmul((kb * kd).transpose(-1, -2), vb));
  }

  if (scale != 1.0) out.mul_(scale);
  // masked_fill, not a multiply: a skipped row's output is zero even if its inputs are not finite.
  if (row_valid.has_value()) out.masked_fill_(row_valid->logical_not().view({d.batch, 1, 1, 1}), 0.0f);
  scatter(state, rows, slot_ids);
  return out.transpose(1, 2).to(query.scalar_type()).contiguous();
}

}  // namespace lightning_cache
