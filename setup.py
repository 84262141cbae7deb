"""Builds torch_lightning_cache._C: the operator library plus a tiny pybind11 module.

CUDA kernels are compiled when the installed torch is a CUDA build and nvcc is
found (CUDA_HOME); otherwise the CPU-only library is built. Set
LIGHTNING_CACHE_FORCE_CPU=1 to skip CUDA even when it is available.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def want_cuda():
    if os.environ.get("LIGHTNING_CACHE_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    cxx_flags = ["-O3", "-std=c++20", *(["-fopenmp"] if torch.backends.openmp.is_available() else [])]
    srcs = sources("*.cpp") + sources("cpu/*.cpp")
    if want_cuda():
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DLIGHTNING_CACHE_WITH_CUDA"]
        return cpp_extension.CUDAExtension(
            "torch_lightning_cache._C",
            srcs + sources("cuda/*.cpp") + sources("cuda/*.cu"),
            extra_compile_args={"cxx": cxx_flags + ["-DLIGHTNING_CACHE_WITH_CUDA"], "nvcc": nvcc_flags},
        )
    return cpp_extension.CppExtension("torch_lightning_cache._C", srcs, extra_compile_args={"cxx": cxx_flags})


setup(
    name="torch_lightning_cache",
    version="0.1.0",
    description="Cache operators for Lightning-attention (MiniMax-style hybrid) models, in C++ and CUDA",
    packages=["torch_lightning_cache", "torch_lightning_cache.models", "torch_lightning_cache.integrations",
              "torch_lightning_cache.cli"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    # The test dependencies; transformers is pinned: the integration tests also measure where its own
    # MiniMaxCache fails, which is version-specific.
    extras_require={"test": ["pytest", "hypothesis", "numpy", "matplotlib", "transformers==5.23.0"],
                    "transformers": ["transformers>=5.23"]},
    entry_points={"console_scripts": ["lightning-cache=torch_lightning_cache.__main__:main"]},
)
