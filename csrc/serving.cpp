// Serving ops built from ATen ops only, so one implementation serves every
// backend: rewind_cache (speculative decoding on the sequence cache) and
// lightning_accept (keep the state after the accepted draft tokens).
//
// Both write only rows whose batch row is valid. Skipped rows (slot -1, an
// out-of-range or repeated slot, a bad count with checks off) are routed to a
// dummy row or kept by selection, never by arithmetic, so their contents stay
// bit-identical and nothing depends on the order of racing writes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "serving.h"
#include "validation.h"

namespace lightning_cache {
namespace {

// Batch row b -> pool row, or -1 to skip; slot_ids sanitized (checks off) or
// validated (checks on) by the one shared rule, prepare_slot_ids.
at::Tensor pool_rows(const std::optional<at::Tensor>& slot_ids, int64_t batch, int64_t pool, bool check_bounds,
                     const at::TensorOptions& long_options) {
  if (!slot_ids.has_value()) return at::arange(batch, long_options);
  LightningDims d;
  d.batch = batch;
  d.slots = pool;
  return *prepare_slot_ids(slot_ids, d, check_bounds);
}

// For every pool row, the batch row that writes it, or `batch` when none does.
// Valid targets are distinct (prepare_slot_ids drops repeats), so the scatter
// is deterministic; skipped batch rows all land on the dummy row `pool`.
at::Tensor writer_of_pool_row(const at::Tensor& target, int64_t batch, int64_t pool) {
  at::Tensor src = at::full({pool + 1}, batch, target.options());
  const at::Tensor dest = at::where(target.ge(0), target, at::full({}, pool, target.options()));
  src.scatter_(0, dest, at::arange(batch, target.options()));
  return src.narrow(0, 0, pool);
}

void rewind_cache(at::Tensor& index, const at::Tensor& num_tokens, const std::optional<at::Tensor>& slot_ids,
                  bool ring, bool check_bounds) {
  TORCH_CHECK_VALUE(!ring,
                    "rewind_cache: ring=True is not supported: in a ring cache the rewound columns already hold "
                    "overwritten tokens");
  TORCH_CHECK_VALUE(index.dim() == 1, "rewind_cache: index must be [pool], got ", index.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "rewind_cache: index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(num_tokens.dim() == 1, "rewind_cache: num_tokens must be [batch], got ", num_tokens.sizes());
  TORCH_CHECK_TYPE(num_tokens.scalar_type() == at::kLong, "rewind_cache: num_tokens must be int64, got ",
                   num_tokens.scalar_type());
  TORCH_CHECK_VALUE(num_tokens.device() == index.device(), "rewind_cache: num_tokens must be on ", index.device(),
                    " like index, got ", num_tokens.device());
  const int64_t batch = num_tokens.size(0);
  const int64_t pool = index.size(0);
  check_slot_ids("rewind_cache", slot_ids, batch, "num_tokens", index, "index");
  check_no_overlap("rewind_cache", {{"index", index, true}, {"num_tokens", num_tokens}, {"slot_ids", slot_ids}});
  if (check_bounds && batch > 0) {  // a sync on CUDA, like every host check
    const int64_t smallest = num_tokens.min().item<int64_t>();
    TORCH_CHECK_INDEX(smallest >= 0, "rewind_cache: num_tokens must be non-negative, got ", smallest);
  }
  at::Tensor target = pool_rows(slot_ids, batch, pool, check_bounds, index.options());
  if (batch == 0 || pool == 0) return;
  // A negative count (checks off) skips the row: rewinding never moves forward.
  target = at::where(num_tokens.ge(0), target, at::full({}, -1, target.options()));
  const at::Tensor writer = writer_of_pool_row(target, batch, pool);
  const at::Tensor has = writer.lt(batch);
  const at::Tensor count = num_tokens.index_select(0, at::where(has, writer, at::zeros({}, writer.options())));
  // Clamp at 0 without forming index - count, which could overflow for hostile
  // values; a negative (corrupt) position is left as it is.
  const at::Tensor zero = at::zeros({}, index.options());
  const at::Tensor rewound = at::where(index.le(count), zero, index - count);
  index.copy_(at::where(has.logical_and(index.ge(0)), rewound, index));
}

void lightning_accept(at::Tensor& state, const at::Tensor& step_states, const at::Tensor& num_accepted,
                      const std::optional<at::Tensor>& slot_ids, bool check_bounds) {
  TORCH_CHECK_VALUE(state.dim() == 4, "lightning_accept: state must be [slots, heads, key_dim, value_dim], got ",
                    state.sizes());
  check_state_dtype(state.scalar_type());
  TORCH_CHECK_VALUE(step_states.dim() == 5 && step_states.size(1) >= 1 && step_states.size(2) == state.size(1) &&
                        step_states.size(3) == state.size(2) && step_states.size(4) == state.size(3),
                    "lightning_accept: step_states must be [batch, n + 1, ", state.size(1), ", ", state.size(2), ", ",
                    state.size(3), "] to match state, got ", step_states.sizes());
  TORCH_CHECK_TYPE(step_states.scalar_type() == state.scalar_type(), "lightning_accept: step_states must have the "
                   "state's dtype ", state.scalar_type(), ", got ", step_states.scalar_type());
  TORCH_CHECK_VALUE(step_states.device() == state.device(), "lightning_accept: step_states must be on ",
                    state.device(), " like state, got ", step_states.device());
  const int64_t batch = step_states.size(0);
  const int64_t steps = step_states.size(1);  // n + 1
  const int64_t pool = state.size(0);
  TORCH_CHECK_VALUE(num_accepted.dim() == 1 && num_accepted.size(0) == batch,
                    "lightning_accept: num_accepted must be [batch] = [", batch, "], got ", num_accepted.sizes());
  TORCH_CHECK_TYPE(num_accepted.scalar_type() == at::kLong, "lightning_accept: num_accepted must be int64, got ",
                   num_accepted.scalar_type());
  TORCH_CHECK_VALUE(num_accepted.device() == state.device(), "lightning_accept: num_accepted must be on ",
                    state.device(), " like state, got ", num_accepted.device());
  check_slot_ids("lightning_accept", slot_ids, batch, "step_states", state, "state");
  check_no_overlap("lightning_accept", {{"state", state, true},
                                        {"step_states", step_states},
                                        {"num_accepted", num_accepted},
                                        {"slot_ids", slot_ids}});
  if (check_bounds && batch > 0) {  // a sync on CUDA, like every host check
    const at::Tensor bad = num_accepted.lt(0).logical_or(num_accepted.ge(steps));
    if (bad.any().item<bool>()) {
      const int64_t b = bad.nonzero().select(1, 0)[0].item<int64_t>();
      TORCH_CHECK_INDEX(false, "lightning_accept: num_accepted[", b, "] = ", num_accepted[b].item<int64_t>(),
                        " is out of range [0, ", steps - 1, "] for step_states with n = ", steps - 1, " tokens");
    }
  }
  const at::TensorOptions long_options = num_accepted.options();
  at::Tensor target = pool_rows(slot_ids, batch, pool, check_bounds, long_options);
  if (batch == 0 || pool == 0) return;
  // An out-of-range count (checks off) skips the row.
  const at::Tensor count_ok = num_accepted.ge(0).logical_and(num_accepted.lt(steps));
  target = at::where(count_ok, target, at::full({}, -1, long_options));
  const at::Tensor writer = writer_of_pool_row(target, batch, pool);
  const at::Tensor has = writer.lt(batch);
  const at::Tensor b = at::where(has, writer, at::zeros({}, long_options));
  const at::Tensor t = at::where(count_ok, num_accepted, at::zeros({}, long_options)).index_select(0, b);
  // Flat row b * (n + 1) + t of step_states, gathered for every pool row.
  const at::Tensor picked = step_states.flatten(0, 1).index_select(0, b * steps + t);
  state.copy_(at::where(has.view({pool, 1, 1, 1}), picked, state));
}

}  // namespace

void store_initial_step_states(const at::Tensor& step_states, const at::Tensor& state,
                               const std::optional<at::Tensor>& slots, const LightningDims& d) {
  if (d.batch == 0 || d.slots == 0) return;
  at::Tensor first = step_states.select(1, 0);
  if (!slots.has_value()) {  // batch == slots, no row skipped
    first.copy_(state);
    return;
  }
  const at::Tensor keep = slots->ge(0);  // sanitized: -1 is the only skip
  const at::Tensor src = state.index_select(0, at::where(keep, *slots, at::zeros({}, slots->options())));
  first.copy_(at::where(keep.view({d.batch, 1, 1, 1}), src, first));
}

// ATen-only, so one registration covers CPU, CUDA and every other backend.
TORCH_LIBRARY_IMPL(lightning_cache, CompositeExplicitAutograd, m) {
  m.impl("rewind_cache", &rewind_cache);
  m.impl("lightning_accept", &lightning_accept);
}

}  // namespace lightning_cache
