// Lightning recurrent state on the CPU: decode as one pass per (row, head)
// over the state, prefill through the shared chunked implementation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../ops.h"

namespace lightning_cache {
namespace {

// Resolves the state row of batch row b: slot_ids[b] (or b), -1 if skipped.
int64_t state_row(const int64_t* slots, int64_t b, int64_t num_slots) {
  const int64_t slot = slots ? slots[b] : b;
  return slot >= 0 && slot < num_slots ? slot : -1;
}

template <typename in_t>
void load_row(float* dst, const at::Tensor& t, int64_t b, int64_t n, int64_t h) {
  const in_t* base = t.const_data_ptr<in_t>() + b * t.stride(0) + n * t.stride(1) + h * t.stride(2);
  const int64_t stride = t.stride(3);
  for (int64_t e = 0; e < t.size(3); ++e) dst[e] = static_cast<float>(base[e * stride]);
}

// One token on one float32 head state s [dk, dv]: s = decay * s + k^T v and
// o = q s. Columns go in tiles of kTile so the partial outputs stay in
// registers while the rows stream by; target_clones picks AVX-512 / AVX2 at
// load time where the CPU has them (the default build targets baseline x86-64).
constexpr int64_t kTile = 64;

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void decode_token(float* __restrict__ s, const float* __restrict__ q, const float* __restrict__ k,
                  const float* __restrict__ v, float* __restrict__ o, int64_t dk, int64_t dv, float decay) {
  for (int64_t j0 = 0; j0 < dv; j0 += kTile) {
    const int64_t width = std::min(kTile, dv - j0);
    float acc[kTile] = {};
    for (int64_t i = 0; i < dk; ++i) {
      float* __restrict__ row = s + i * dv + j0;
      const float k_i = k[i], q_i = q[i];
      for (int64_t j = 0; j < width; ++j) {
        const float updated = decay * row[j] + k_i * v[j0 + j];
        row[j] = updated;
        acc[j] += q_i * updated;
      }
    }
    for (int64_t j = 0; j < width; ++j) o[j0 + j] = acc[j];
  }
}

// For each token in order: S = lam * S + k^T v, then o = scale * q S.
template <typename state_t, typename in_t>
void decode_rows(at::Tensor& state, at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                 const at::Tensor& value, const at::Tensor& slopes, const int64_t* slots, const LightningDims& d,
                 float scale) {
  const at::Tensor slopes_f = slopes.to(at::kFloat).contiguous();
  const float* slope = slopes_f.const_data_ptr<float>();
  state_t* state_data = state.data_ptr<state_t>();
  in_t* out_data = out.data_ptr<in_t>();
  const int64_t dk = d.key_dim, dv = d.value_dim;
  // At least ~256 KiB of state per task, so small decodes do not pay for waking threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (dk * dv));
  at::parallel_for(0, d.batch * d.heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(dk), k(dk), v(dv), o(dv);
    std::vector<float> widened;  // float32 copy of a bfloat16 state
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.heads, h = bh % d.heads;
      const int64_t row = state_row(slots, b, d.slots);
      if (row < 0) {
        for (int64_t n = 0; n < d.tokens; ++n) {
          std::fill_n(out_data + ((b * d.tokens + n) * d.heads + h) * dv, dv, in_t(0));
        }
        continue;
      }
      state_t* s_raw = state_data + (row * d.heads + h) * dk * dv;
      float* s;
      if constexpr (std::is_same_v<state_t, float>) {
        s = s_raw;
      } else {
        widened.assign(s_raw, s_raw + dk * dv);
        s = widened.data();
      }
      const float decay = std::exp(-slope[h]);
      for (int64_t n = 0; n < d.tokens; ++n) {
        load_row<in_t>(q.data(), query, b, n, h);
        load_row<in_t>(k.data(), key, b, n, h);
        load_row<in_t>(v.data(), value, b, n, h);
        decode_token(s, q.data(), k.data(), v.data(), o.data(), dk, dv, decay);
        in_t* o_out = out_data + ((b * d.tokens + n) * d.heads + h) * dv;
        for (int64_t j = 0; j < dv; ++j) o_out[j] = static_cast<in_t>(o[j] * scale);
      }
      if constexpr (!std::is_same_v<state_t, float>) {
        for (int64_t e = 0; e < dk * dv; ++e) s_raw[e] = static_cast<state_t>(s[e]);
      }
    }
  });
}

at::Tensor lightning_decode_cpu(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& slopes,
                                const std::optional<at::Tensor>& slot_ids, double scale, bool check_bounds) {
  const LightningDims d =
      check_lightning_args("lightning_decode", state, query, key, value, slopes, std::nullopt, slot_ids, 1);
  const std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, d, check_bounds);
  at::Tensor out = at::empty({d.batch, d.tokens, d.heads, d.value_dim}, query.options());
  const int64_t* slot_ptr = slots ? slots->const_data_ptr<int64_t>() : nullptr;
  auto run = [&](auto state_tag) {  // state: float32 or bfloat16 (validated)
    using state_t = decltype(state_tag);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "lightning_decode_cpu", [&] {
      decode_rows<state_t, scalar_t>(state, out, query, key, value, slopes, slot_ptr, d, float(scale));
    });
  };
  if (state.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(at::BFloat16{});
  }
  return out;
}

void scatter_state_rows_cpu(at::Tensor& state, const at::Tensor& rows, const std::optional<at::Tensor>& slot_ids) {
  if (!slot_ids.has_value()) {
    state.copy_(rows);
    return;
  }
  const int64_t* slots = slot_ids->const_data_ptr<int64_t>();
  for (int64_t b = 0; b < rows.size(0); ++b) {
    const int64_t row = state_row(slots, b, state.size(0));
    if (row >= 0) state.select(0, row).copy_(rows.select(0, b));
  }
}

at::Tensor lightning_prefill_cpu(at::Tensor& state, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& slopes,
                                 const std::optional<at::Tensor>& attention_mask,
                                 const std::optional<at::Tensor>& slot_ids, int64_t block_size, double scale,
                                 bool check_bounds) {
  const LightningDims d =
      check_lightning_args("lightning_prefill", state, query, key, value, slopes, attention_mask, slot_ids, block_size);
  const std::optional<at::Tensor> slots = prepare_slot_ids(slot_ids, d, check_bounds);
  return lightning_prefill_chunked(state, query, key, value, slopes, attention_mask, slots, d, block_size, scale,
                                   &scatter_state_rows_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_cache, CPU, m) {
  m.impl("lightning_decode", &lightning_decode_cpu);
  m.impl("lightning_prefill", &lightning_prefill_cpu);
}

}  // namespace lightning_cache
