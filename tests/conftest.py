"""Shared fixtures and input helpers for the operator tests.

* Any test taking a ``device`` argument runs once per device: ``cpu`` always,
  ``cuda`` as well (marked ``pytest.mark.cuda``; skipped where no GPU is present).
* ``gen`` is a per-test seeded ``torch.Generator`` (seed derived from the test id,
  so a failure reproduces on its own).
* ``make_inputs`` builds ``[B, n, H, D]`` inputs in several memory layouts, the way
  models hand them over: contiguous, slices of one fused projection, transposed
  views of ``[B, H, n, D]``, last-dim stride 2, and batch-broadcast (stride 0).

Test modules import the plain helpers with ``from conftest import ...`` (the
tests directory is on ``sys.path`` under pytest's default import mode).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
    ),
]

LAYOUTS = ["contiguous", "fused", "transposed", "step", "expanded"]


def pytest_generate_tests(metafunc):
    """Runs every test that takes a ``device`` argument on each of ``DEVICES``
    (unless the test parametrizes ``device`` itself)."""
    if "device" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if "device" in names:
            return
    metafunc.parametrize("device", DEVICES)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's node id (stable across runs)."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(shape, gen, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Standard normal (times ``scale``) drawn in float64 on the CPU, then cast and moved.

    Drawing in float64 matters: float64 inputs then carry bits that float32
    cannot hold, so a kernel that routes float64 data through float32 fails.
    """
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def make_inputs(layout, B, n, H, dims, gen, dtype=torch.float32, device="cpu", scales=None):
    """One ``[B, n, H, d]`` tensor per ``d`` in ``dims``, all in the memory layout ``layout``.

    Values are standard normal times ``scales[i]`` (default 1), drawn in float64,
    then cast to ``dtype`` and moved to ``device`` with the layout kept:

    - ``contiguous``: separate contiguous tensors;
    - ``fused``: slices of one fused projection ``[B, n, H, sum(dims) + 3]`` (like a fused QKV);
    - ``transposed``: ``[B, H, n, d]`` tensors viewed as ``[B, n, H, d]``;
    - ``step``: every other element of ``[B, n, H, 2d]`` (last-dim stride 2);
    - ``expanded``: ``[1, n, H, d]`` broadcast over the batch (batch stride 0).
    """
    scales = list(scales) if scales is not None else [1.0] * len(dims)

    def finish(base):
        return base.to(dtype=dtype, device=device)

    if layout == "contiguous":
        return [finish(randn((B, n, H, d), gen, torch.float64, scale=s)) for d, s in zip(dims, scales)]
    if layout == "fused":
        fused = randn((B, n, H, sum(dims) + 3), gen, torch.float64)
        bounds, offset = [], 1
        for d, s in zip(dims, scales):
            fused[..., offset:offset + d] *= s
            bounds.append((offset, offset + d))
            offset += d
        fused = finish(fused)
        return [fused[..., a:b] for a, b in bounds]
    if layout == "transposed":
        return [finish(randn((B, H, n, d), gen, torch.float64, scale=s)).transpose(1, 2) for d, s in zip(dims, scales)]
    if layout == "step":
        return [finish(randn((B, n, H, 2 * d), gen, torch.float64, scale=s))[..., ::2] for d, s in zip(dims, scales)]
    if layout == "expanded":
        return [finish(randn((1, n, H, d), gen, torch.float64, scale=s)).expand(B, n, H, d)
                for d, s in zip(dims, scales)]
    raise ValueError(f"unknown layout {layout!r}")


def random_mask(shape, gen, dtype=torch.bool, p_true=0.7, device="cpu") -> torch.Tensor:
    """A mask of the given dtype, "true" with probability ``p_true``.

    Float masks use a mix of true values (1, 0.5, -2) and false values (0, -0.0),
    so a kernel that tests the raw bits or the sign instead of "nonzero" fails.
    """
    keep = torch.rand(*shape, generator=gen) < p_true
    if dtype == torch.bool:
        return keep.to(device)
    if dtype.is_floating_point:
        true_vals = torch.tensor([1.0, 0.5, -2.0])[torch.randint(0, 3, shape, generator=gen)]
        false_vals = torch.tensor([0.0, -0.0])[torch.randint(0, 2, shape, generator=gen)]
        return torch.where(keep, true_vals, false_vals).to(dtype=dtype, device=device)
    true_vals = torch.randint(1, 3, shape, generator=gen)
    return torch.where(keep, true_vals, torch.zeros_like(true_vals)).to(dtype=dtype, device=device)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` in float64 (0 when both are all zero)."""
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    denom = e.abs().max().item()
    num = (a - e).abs().max().item()
    if denom == 0.0:
        return num
    return num / denom


def lightning_inputs(layout, B, n, H, Dk, Dv, gen, dtype=torch.float32, device="cpu"):
    """``q, k [B, n, H, Dk]`` and ``v [B, n, H, Dv]``: standard normal / sqrt(D), so of size ~1."""
    return make_inputs(layout, B, n, H, (Dk, Dk, Dv), gen, dtype, device,
                       scales=(1 / math.sqrt(Dk), 1 / math.sqrt(Dk), 1 / math.sqrt(Dv)))


# (output, state) relative-error bounds of the lightning ops against the float64
# reference, by (state dtype, input dtype); measured values in the README's table.
TOLERANCES = {
    (torch.float32, torch.float32): (3e-5, 3e-5),
    (torch.float32, torch.float16): (6e-4, 3e-5),
    (torch.float32, torch.bfloat16): (5e-3, 3e-5),
    (torch.bfloat16, torch.float32): (1e-2, 3e-2),
    (torch.bfloat16, torch.float16): (1e-2, 3e-2),
    (torch.bfloat16, torch.bfloat16): (1e-2, 3e-2),
}
F32_TOL = TOLERANCES[(torch.float32, torch.float32)][0]
