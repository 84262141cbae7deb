// When the CUDA kernels may run host-side value checks.
#pragma once

#include <c10/cuda/CUDAGraphsC10Utils.h>

namespace lightning_cache {

// Value checks read device tensors on the host: a sync, which is illegal while
// a CUDA graph is being captured. Captured calls rely on the kernels instead,
// which skip rows whose position or slot is out of range.
inline bool host_checks_allowed(bool check_bounds) {
  return check_bounds && c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

}  // namespace lightning_cache
