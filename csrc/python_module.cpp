// The Python extension module. Importing it runs the static TORCH_LIBRARY
// registrations of the op sources linked into it; its only function reports
// how it was built.
#include <torch/extension.h>

#ifdef LIGHTNING_CACHE_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION (torch's headers stopped pulling in cuda.h's CUDA_VERSION)
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef LIGHTNING_CACHE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["torch_version"] = TORCH_VERSION;
  info["compiler"] = __VERSION__;
  info["openmp"] = AT_PARALLEL_OPENMP == 1;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch_lightning_cache operators (registered under torch.ops.lightning_cache)";
  m.def("build_info", &build_info, "How this copy of the operator library was built: CUDA or not, versions.");
}
