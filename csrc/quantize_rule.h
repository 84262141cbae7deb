// The quantization rule of the sequence cache's int8 / fp8 storage, written
// once and compiled for both backends (C10_HOST_DEVICE), so CPU and CUDA write
// the same codes and scales bit for bit.
//
// One float32 scale per (token, head, key or value): a stored element means
// code * scale. With amax = max |x| over the token-head's key (or value):
//   int8:     scale = amax / 127, code = round_to_nearest_even(x / scale), in [-127, 127];
//   fp8 e4m3: scale = amax / 448 (e4m3fn's largest finite value), code = e4m3(x / scale),
//             rounded to nearest even (c10's conversion), clamped to +-448 first.
// The scale is capped at the largest float32 s whose product with the largest
// code (127 or 448) is finite, so every finite input dequantizes to a finite
// value: at the top of float32's range (amax within a few ulps of 3.4028235e38)
// the largest codes mean 127 * 0x1.020406p+121 = 3.4028233e38 (int8, one ulp
// below float32's max) and 448 * 0x1.249248p+119 = 3.4028235e38 (fp8).
// All-zero token-head: scale 0 and codes 0, so it dequantizes to exact zeros.
// A non-finite element (NaN, +-inf) makes amax +inf: scale NaN, codes 0, so the
// whole token-head (and nothing else) dequantizes to NaN.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Float8_e4m3fn.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace lightning_cache {

constexpr float kInt8Max = 127.0f;
constexpr float kFp8E4M3Max = 448.0f;

// Running amax: a non-finite element turns it into +inf for good.
C10_HOST_DEVICE inline float amax_step(float amax, float x) {
  const float a = ::fabsf(x);
  if (!(a <= std::numeric_limits<float>::max())) return std::numeric_limits<float>::infinity();  // NaN or inf
  return a > amax ? a : amax;
}

// Largest float32 s with code_max * s finite (float32 product, round to nearest).
C10_HOST_DEVICE inline float max_scale(float code_max) {
  return code_max == kInt8Max ? 0x1.020406p+121f : 0x1.249248p+119f;
}

C10_HOST_DEVICE inline float kv_scale(float amax, float code_max) {
  if (amax == std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::quiet_NaN();
  const float scale = amax / code_max;
  const float cap = max_scale(code_max);
  return scale > cap ? cap : scale;  // only amax within float32's last ulps reaches the cap
}

// Codes are only formed from a usable scale (> 0, finite); otherwise 0.
C10_HOST_DEVICE inline bool usable_scale(float scale) {
  return scale > 0.0f && scale <= std::numeric_limits<float>::max();
}

C10_HOST_DEVICE inline int8_t int8_code(float x, float scale) {
  if (!usable_scale(scale)) return 0;
  float y = ::rintf(x / scale);  // ties to even (the default rounding mode)
  y = y < -kInt8Max ? -kInt8Max : (y > kInt8Max ? kInt8Max : y);
  return static_cast<int8_t>(y);
}

C10_HOST_DEVICE inline c10::Float8_e4m3fn fp8_e4m3_code(float x, float scale) {
  if (!usable_scale(scale)) return c10::Float8_e4m3fn(0.0f);
  float y = x / scale;
  y = y < -kFp8E4M3Max ? -kFp8E4M3Max : (y > kFp8E4M3Max ? kFp8E4M3Max : y);
  return c10::Float8_e4m3fn(y);
}

template <typename code_t>
C10_HOST_DEVICE inline float code_max() {
  if constexpr (std::is_same_v<code_t, int8_t>) {
    return kInt8Max;
  } else {
    return kFp8E4M3Max;
  }
}

template <typename code_t>
C10_HOST_DEVICE inline code_t quantize_code(float x, float scale) {
  if constexpr (std::is_same_v<code_t, int8_t>) {
    return int8_code(x, scale);
  } else {
    return fp8_e4m3_code(x, scale);
  }
}

}  // namespace lightning_cache
