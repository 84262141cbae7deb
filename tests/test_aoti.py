"""AOTInductor: an exported HybridLM step calling the ops, compiled with aoti_compile_and_package, run from Python
(aoti_load_package) and from C++ (examples/run_aoti.cpp, torch::inductor::AOTIModelPackageLoader, linked with the op
library by CMakeLists.txt), step after step on live caches, with eager's logits.

One package is compiled (compiling is the slow part: about a minute on 2 cores): the single-token step. The prompt
goes through it token by token (which equals the chunked prefill: SPEC section 3), then 4 decode steps. The caches
are inputs (HybridLM.forward_with_caches), updated in place, so the caller keeps them alive between calls.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from test_torchscript_cpp import run_scripted_exe  # noqa: F401  (the same CMake build directory and lock)
from test_torchscript_cpp import BUILD_DIR, CONFIG, _run

from torch_lightning_cache.models.hybrid import HybridLM

pytestmark = [pytest.mark.slow]
PROMPT, STEPS = 5, 4


class Step(torch.nn.Module):
    def __init__(self, model: HybridLM):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *caches: torch.Tensor) -> torch.Tensor:
        return self.model.forward_with_caches(tokens, list(caches))


def fresh_model() -> HybridLM:
    model = HybridLM(CONFIG, batch_size=2, seed=3).eval()
    model.set_check_bounds(False)  # no host-side checks in compiled code; the kernels still skip bad rows
    return model


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    model = fresh_model()
    caches = [t.clone() for t in model.cache_buffers()]
    with torch.no_grad():
        exported = torch.export.export(Step(model), (torch.zeros(2, 1, dtype=torch.int64), *caches))
    path = tmp_path_factory.mktemp("aoti") / "step.pt2"
    return Path(torch._inductor.aoti_compile_and_package(exported, package_path=str(path)))


@pytest.fixture(scope="module")
def run_aoti_exe(run_scripted_exe) -> Path:  # noqa: F811  (after the shared build of the op library)
    _run(["cmake", "--build", str(BUILD_DIR), "--target", "run_aoti"], timeout=1800)
    exe = BUILD_DIR / "run_aoti"
    assert exe.is_file(), f"the build did not produce {exe}"
    return exe


def tokens() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))


def eager_logits() -> list[torch.Tensor]:
    """Eager HybridLM with its own buffers: prefill of the prompt (chunked kernel), then 4 decode steps; one
    [B, 1, V] logits per token."""
    model, ids = fresh_model(), tokens()
    with torch.no_grad():
        prefill = model(ids[:, :PROMPT])
        steps = [model(ids[:, t:t + 1]) for t in range(PROMPT, PROMPT + STEPS)]
    return [prefill[:, t:t + 1] for t in range(PROMPT)] + steps, model.cache_buffers()


def check(outputs, caches):
    expected, expected_caches = eager_logits()
    assert len(outputs) == PROMPT + STEPS
    for t, (got, want) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"token {t}: {m}")
    for got, want in zip(caches, expected_caches):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_aoti_package_from_python(package):
    runner = torch._inductor.aoti_load_package(str(package))
    caches = [torch.zeros_like(t) for t in fresh_model().cache_buffers()]
    ids = tokens()
    with torch.no_grad():
        # AOTInductor assumes the example inputs' strides: a column slice must be made contiguous
        outputs = [runner(ids[:, t:t + 1].contiguous(), *caches) for t in range(PROMPT + STEPS)]
    outputs = [o[0] if isinstance(o, (list, tuple)) else o for o in outputs]
    check(outputs, caches)
    index = caches[[i for i, t in enumerate(caches) if t.dtype == torch.int64][0]]
    assert index.tolist() == [PROMPT + STEPS] * 2  # the caller's cache advanced in place


def test_aoti_package_from_cpp(package, run_aoti_exe, tmp_path):
    caches = [torch.zeros_like(t) for t in fresh_model().cache_buffers()]
    ids = tokens()
    inputs, outputs_path = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save((caches, [ids[:, t:t + 1].contiguous() for t in range(PROMPT + STEPS)]), inputs)
    result = subprocess.run([str(run_aoti_exe), str(package), str(inputs), str(outputs_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"run_aoti failed:\n{result.stdout}\n{result.stderr}"
    outputs, cpp_caches = torch.load(outputs_path, weights_only=True)
    check(list(outputs), list(cpp_caches))
