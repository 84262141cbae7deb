// When the CUDA kernels may run host-side value checks.
#pragma once

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/Exception.h>

namespace lightning_cache {

// Value checks read device tensors on the host: a sync, which is illegal while
// a CUDA graph is being captured. Captured calls rely on the kernels instead,
// which skip rows whose position or slot is out of range.
inline bool host_checks_allowed(bool check_bounds) {
  return check_bounds && c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

// Packed (cu_seqlens) calls read the sequence bounds on the host whatever check_bounds says (their
// grid and workspace depend on the longest sequence), which a capture cannot do: refused with a
// clear error before anything is launched, instead of CUDA's invalidated capture.
inline void refuse_capture_of_packed_call(const char* op) {
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None, op,
              ": a call with cu_seqlens reads the sequence bounds on the host and cannot be captured in a CUDA "
              "graph; capture [B, q] calls (block_tables, cache_seqlens, slot_ids) instead");
}

}  // namespace lightning_cache
