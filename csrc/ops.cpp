// The operator schemas, defined once for every backend, and the two factory
// ops, which are backend-independent.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "validation.h"

namespace lightning_cache {
namespace {

std::tuple<at::Tensor, at::Tensor> init_kv_cache(int64_t batch_size, int64_t max_length, int64_t num_heads,
                                                 int64_t key_dim, int64_t value_dim,
                                                 std::optional<at::ScalarType> dtype,
                                                 std::optional<at::Device> device) {
  check_init_sizes("init_kv_cache", {{"batch_size", batch_size},
                                     {"max_length", max_length},
                                     {"num_heads", num_heads},
                                     {"key_dim", key_dim},
                                     {"value_dim", value_dim}});
  const at::ScalarType cache_dtype = dtype.value_or(c10::typeMetaToScalarType(c10::get_default_dtype()));
  check_cache_dtype(cache_dtype);
  const auto where = at::TensorOptions().device(device.value_or(at::kCPU));
  at::Tensor key_value = at::zeros({batch_size, max_length, num_heads, key_dim + value_dim}, where.dtype(cache_dtype));
  at::Tensor index = at::zeros({batch_size}, where.dtype(at::kLong));
  return {key_value, index};
}

at::Tensor init_state(int64_t batch_size, int64_t num_heads, int64_t key_dim, int64_t value_dim,
                      std::optional<at::ScalarType> dtype, std::optional<at::Device> device) {
  check_init_sizes(
      "init_state",
      {{"batch_size", batch_size}, {"num_heads", num_heads}, {"key_dim", key_dim}, {"value_dim", value_dim}});
  const at::ScalarType state_dtype = dtype.value_or(at::kFloat);
  check_state_dtype(state_dtype);
  return at::zeros({batch_size, num_heads, key_dim, value_dim},
                   at::TensorOptions().device(device.value_or(at::kCPU)).dtype(state_dtype));
}

}  // namespace

TORCH_LIBRARY(lightning_cache, m) {
  m.def(
      "init_kv_cache(int batch_size, int max_length, int num_heads, int key_dim, int value_dim, "
      "ScalarType? dtype=None, Device? device=None) -> (Tensor key_value, Tensor index)");
  m.def(
      "concatenate_to_cache(Tensor(a!) key_value, Tensor(b!) index, Tensor key, Tensor value, "
      "Tensor? attention_mask=None, Tensor? causal_mask=None, Tensor? token_type_ids=None, "
      "bool is_causal=False, bool ring=False, bool check_bounds=True, Tensor? slot_ids=None, "
      "Tensor(c!)? scales=None, Tensor? block_tables=None) -> Tensor mask");
  // concatenate_to_cache without the mask, for attention kernels that take lengths.
  m.def(
      "write_to_cache(Tensor(a!) key_value, Tensor(b!) index, Tensor key, Tensor value, bool ring=False, "
      "bool check_bounds=True, Tensor? slot_ids=None, Tensor(c!)? scales=None, Tensor? block_tables=None, "
      "Tensor? cu_seqlens=None) -> ()");
  // Quantized storage (int8 / float8_e4m3fn codes, scales [P, L, H, 2]) to dense keys and values.
  m.def("dequantize_kv(Tensor key_value, Tensor scales, int key_dim, ScalarType dtype) -> (Tensor key, Tensor value)");
  m.def(
      "init_state(int batch_size, int num_heads, int key_dim, int value_dim, "
      "ScalarType? dtype=None, Device? device=None) -> Tensor");
  m.def(
      "lightning_decode(Tensor(a!) state, Tensor query, Tensor key, Tensor value, Tensor slopes, "
      "Tensor? slot_ids=None, float scale=1.0, bool check_bounds=True, Tensor(b!)? step_states=None) -> Tensor output");
  m.def(
      "lightning_prefill(Tensor(a!) state, Tensor query, Tensor key, Tensor value, Tensor slopes, "
      "Tensor? attention_mask=None, Tensor? slot_ids=None, int block_size=256, float scale=1.0, "
      "bool check_bounds=True, Tensor(b!)? checkpoints=None, int checkpoint_every=0, Tensor? cu_seqlens=None) -> Tensor "
      "output");
  // Speculative decoding (csrc/serving.cpp): move positions back by the rejected
  // tokens; set each state row to the step state after its accepted tokens.
  m.def(
      "rewind_cache(Tensor(a!) index, Tensor num_tokens, Tensor? slot_ids=None, bool ring=False, "
      "bool check_bounds=True) -> ()");
  m.def(
      "lightning_accept(Tensor(a!) state, Tensor step_states, Tensor num_accepted, Tensor? slot_ids=None, "
      "bool check_bounds=True) -> ()");
  // Attention of new queries over the sequence cache (SPEC 8), reading the
  // stored codes directly: no dequantized copy of the cache is made.
  m.def(
      "cached_attention(Tensor query, Tensor key_value, Tensor? mask, int key_dim, Tensor? scales=None, "
      "float? softmax_scale=None, Tensor? block_tables=None, Tensor? cu_seqlens=None, Tensor? cache_seqlens=None, "
      "Tensor? slot_ids=None, bool check_bounds=True) -> Tensor output");
}

// Factory ops take no tensors, so they are registered for every backend at once.
TORCH_LIBRARY_IMPL(lightning_cache, CompositeExplicitAutograd, m) {
  m.impl("init_kv_cache", &init_kv_cache);
  m.impl("init_state", &init_state);
}

}  // namespace lightning_cache
