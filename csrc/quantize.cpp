// dequantize_kv: int8 / float8_e4m3fn sequence-cache storage to dense keys and
// values, element = code * scale (quantize_rule.h), computed in float32 and
// cast to `dtype`. ATen only, so one registration serves every backend.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "validation.h"

namespace lightning_cache {
namespace {

std::tuple<at::Tensor, at::Tensor> dequantize_kv(const at::Tensor& key_value, const at::Tensor& scales, int64_t key_dim,
                                                 at::ScalarType dtype) {
  TORCH_CHECK_VALUE(key_value.dim() == 4, "dequantize_kv: key_value must be [pool, max_length, heads, key_dim + "
                    "value_dim], got shape ", key_value.sizes());
  TORCH_CHECK_TYPE(is_quantized_cache(key_value.scalar_type()),
                   "dequantize_kv: key_value must hold int8 or float8_e4m3fn codes, got ", key_value.scalar_type());
  check_scales("dequantize_kv", key_value, scales);
  const int64_t width = key_value.size(3);
  TORCH_CHECK_VALUE(key_dim > 0 && key_dim < width, "dequantize_kv: key_dim must be in [1, ", width - 1,
                    "] (the last dimension of key_value is key_dim + value_dim = ", width, "), got ", key_dim);
  TORCH_CHECK_TYPE(at::isFloatingType(dtype) && !at::isFloat8Type(dtype),
                   "dequantize_kv: dtype must be float32, float16, bfloat16 or float64, got ", dtype);
  const at::Tensor codes = key_value.to(at::kFloat);  // exact for both code types
  at::Tensor key = (codes.narrow(3, 0, key_dim) * scales.narrow(3, 0, 1)).to(dtype);
  at::Tensor value = (codes.narrow(3, key_dim, width - key_dim) * scales.narrow(3, 1, 1)).to(dtype);
  return {key.contiguous(), value.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_cache, CompositeExplicitAutograd, m) { m.impl("dequantize_kv", &dequantize_kv); }

}  // namespace lightning_cache
