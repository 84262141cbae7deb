// Small host-side helpers for the CUDA launches.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace lightning_cache {

// Multiprocessor count of `device`, queried once per device and cached: grid
// sizes need it on every call, and the attribute query is host work per call
// for a number that never changes. (Capture-safe either way: not a stream op.)
inline int multiprocessor_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  // Never throws (the launchers are noexcept): on a failed query the grid is
  // sized for one SM, which is slower but correct, and the error is cleared.
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  if (count < 1) count = 1;
  if (device >= 0 && device < kMaxDevices) cached[device].store(count, std::memory_order_relaxed);
  return count;
}

template <typename T>
inline bool aligned_to(const T* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace lightning_cache
