"""TorchScript from C++: a scripted module calling the ops runs the same in LibTorch.

The package's hybrid model (which calls ``torch.ops.lightning_cache.*``) is scripted and saved; the
CMake project (``CMakeLists.txt``) builds ``liblightning_cache_ops`` and
``examples/run_scripted.cpp`` against the installed torch's LibTorch; the C++
program loads the module, runs a few decode steps and saves the outputs, which
must match the same saved module run from Python.

The build goes to ``build/cmake`` (or ``$LIGHTNING_CACHE_CMAKE_BUILD_DIR``) and
is reused, so only the first run pays for compiling (about a minute on 2 cores).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from torch_lightning_cache.models.hybrid import HybridConfig, HybridLM

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = Path(os.environ.get("LIGHTNING_CACHE_CMAKE_BUILD_DIR", ROOT / "build" / "cmake"))
STEPS = 4
CONFIG = HybridConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, intermediate_size=64,
                      attention_every=2, max_length=16, block_size=4)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")]


# --------------------------------------------------------------------------- the scripted module
# To test another model, replace build_scripted_module: it returns the scripted
# module, the name of the method to call each step, and one list of positional
# arguments per step.


def build_scripted_module() -> Tuple[torch.jit.ScriptModule, str, List[List[torch.Tensor]]]:
    """The package's hybrid model: a prompt prefill, then single-token decode steps."""
    module = torch.jit.script(HybridLM(CONFIG, batch_size=2, seed=3).eval())
    ids = torch.randint(0, CONFIG.vocab_size, (2, 5 + STEPS), generator=torch.Generator().manual_seed(0))
    steps = [[ids[:, :5]]] + [[ids[:, 5 + t:6 + t]] for t in range(STEPS)]
    return module, "forward", steps


# --------------------------------------------------------------------------- building the C++ side


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _run(cmd: list, timeout: float) -> None:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                             f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")


@pytest.fixture(scope="module")
def run_scripted_exe() -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if _cxx_compiler() is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) found")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # One build at a time in the shared directory (pytest-xdist workers, parallel runs).
    with open(BUILD_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        configure = ["cmake", "-S", str(ROOT), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DLIGHTNING_CACHE_WITH_CUDA=OFF"]
        if not (BUILD_DIR / "CMakeCache.txt").exists() and shutil.which("ninja"):
            configure += ["-G", "Ninja"]  # the generator can only be chosen for a fresh directory
        _run(configure, timeout=300)
        _run(["cmake", "--build", str(BUILD_DIR), "--target", "run_scripted", "--parallel", str(os.cpu_count() or 2)],
             timeout=1800)
    exe = BUILD_DIR / "run_scripted"
    assert exe.is_file(), f"the build did not produce {exe}"
    return exe


# --------------------------------------------------------------------------- the test


def _flatten(value) -> list:
    """A step's outputs as a flat list (run_scripted writes lists back as tuples)."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def test_scripted_module_runs_the_same_in_cpp(run_scripted_exe: Path, tmp_path: Path):
    module, method, steps = build_scripted_module()
    module_path, inputs_path, outputs_path = tmp_path / "module.pt", tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    module.save(str(module_path))
    torch.save(steps, inputs_path)

    result = subprocess.run([str(run_scripted_exe), str(module_path), str(inputs_path), str(outputs_path), method],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"run_scripted failed:\n{result.stdout}\n{result.stderr}"
    cpp_outputs = torch.load(outputs_path, weights_only=True)

    # The same saved module, freshly loaded, so it starts from the same buffers.
    reference = torch.jit.load(str(module_path))
    with torch.no_grad():
        python_outputs = [getattr(reference, method)(*args) for args in steps]

    # The scripted model is the eager model: same logits, step by step.
    eager = HybridLM(CONFIG, batch_size=2, seed=3).eval()
    with torch.no_grad():
        for args, scripted in zip(steps, python_outputs):
            torch.testing.assert_close(scripted, eager(*args), rtol=1e-6, atol=1e-6)

    assert len(cpp_outputs) == len(python_outputs) == len(steps)
    for step, (got, expected) in enumerate(zip(cpp_outputs, python_outputs)):
        got, expected = _flatten(got), _flatten(expected)
        assert len(got) == len(expected), f"step {step}: {len(got)} outputs from C++, {len(expected)} from Python"
        for position, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g, e, rtol=0.0, atol=1e-6,
                                       msg=lambda m: f"step {step}, output {position}: {m}")
