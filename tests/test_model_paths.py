"""The hybrid model on every path users take: eager, torch.compile, CUDA graphs, torch.export, the demo.

Compiler behaviour is asserted on the compiler's own counters, never on timing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from torch_lightning_cache.models.hybrid import HybridConfig, HybridLM

SMALL = HybridConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, intermediate_size=64,
                     attention_every=2, max_length=32, block_size=4)
PROMPT, STEPS = 6, 8


def make_model(device, batch=2):
    return HybridLM(SMALL, batch_size=batch, device=device, seed=1).eval()


def tokens(batch, n, seed=0):
    return torch.randint(0, SMALL.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def eager_reference(device, ids):
    """Logits of PROMPT prefill + STEPS decode steps, eager."""
    model = make_model(device)
    with torch.no_grad():
        model(ids[:, :PROMPT])
        return [model(ids[:, t:t + 1]) for t in range(PROMPT, PROMPT + STEPS)]


def test_cached_decoding_matches_full_recomputation(device):
    model = make_model(device)
    ids = tokens(2, PROMPT + STEPS).to(device)
    with torch.no_grad():
        logits = [model(ids[:, :PROMPT])] + [model(ids[:, t:t + 1]) for t in range(PROMPT, PROMPT + STEPS)]
        full = model.forward_uncached(ids)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)
    assert model.layers[1].mixer.index.tolist() == [PROMPT + STEPS] * 2


def test_ragged_rows_decode_at_their_own_positions(device):
    model = make_model(device)
    lengths = [6, 3]
    ids = tokens(2, max(lengths) + STEPS, seed=3).to(device)
    with torch.no_grad():
        for b, n in enumerate(lengths):  # prefill row by row into that row's cache
            model(ids[b:b + 1, :n], row_start=b)
        assert model.layers[1].mixer.index.tolist() == lengths
        steps = [model(torch.stack([ids[b, n + t] for b, n in enumerate(lengths)]).view(2, 1))
                 for t in range(STEPS)]
        for b, n in enumerate(lengths):
            full = model.forward_uncached(ids[b:b + 1, :n + STEPS])[0, n:]
            torch.testing.assert_close(torch.cat([s[b] for s in steps]), full, rtol=1e-4, atol=1e-4)


def test_compiled_decode_has_no_graph_break_or_recompile(device):
    torch._dynamo.reset()
    counters.clear()
    ids = tokens(2, PROMPT + STEPS).to(device)
    expected = eager_reference(device, ids)
    model = make_model(device)
    step = torch.compile(model, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        model(ids[:, :PROMPT])  # prefill eagerly
        got = [step(ids[:, t:t + 1]) for t in range(PROMPT, PROMPT + STEPS)]
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    assert counters["aot_autograd"]["total"] == 1  # one compilation for all STEPS steps
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_capture_the_cache_updates():
    torch._dynamo.reset()
    counters.clear()
    ids = tokens(2, PROMPT + STEPS).cuda()
    expected = eager_reference("cuda", ids)
    model = make_model("cuda")
    model.mark_static_cache()  # static addresses: the captured graph writes the live buffers
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        model(ids[:, :PROMPT])
        got = [step(ids[:, t:t + 1]).clone() for t in range(PROMPT, PROMPT + STEPS)]
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert model.layers[1].mixer.index.tolist() == [PROMPT + STEPS] * 2


def test_export_decode_step_matches_eager(device):
    ids = tokens(2, PROMPT + STEPS).to(device)
    expected = eager_reference(device, ids)
    model = make_model(device)
    with torch.no_grad():
        model(ids[:, :PROMPT])
        exported = torch.export.export(model, (ids[:, PROMPT:PROMPT + 1],))
        step = exported.module()
        got = [step(ids[:, t:t + 1]) for t in range(PROMPT, PROMPT + STEPS)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The exported program updated the live cache buffers, step after step.
    assert model.layers[1].mixer.index.tolist() == [PROMPT + STEPS] * 2
    targets = {str(node.target) for node in exported.graph.nodes}
    assert any("lightning_cache.concatenate_to_cache" in t for t in targets)
    assert any("lightning_cache.lightning_decode" in t for t in targets)


def run_demo(*options):
    return subprocess.run([sys.executable, "-m", "torch_lightning_cache", "demo", *options], capture_output=True,
                          text=True, timeout=300)


def test_demo_runs_and_checks_itself():
    done = run_demo("--tokens", "5", "--prompt-length", "7", "--batch", "3", "--ragged", "--layers", "2",
                    "--hidden", "32", "--heads", "2", "--max-length", "16")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "self-check: max |logits with cache - recomputed without cache|" in done.stdout
    assert "PASS" in done.stdout and "greedy tokens identical without cache: True" in done.stdout
    assert "prompt lengths [7, 6, 5]" in done.stdout


@pytest.mark.parametrize("options, message", [
    (("--device", "cuda"), "no CUDA GPU is available"),
    (("--tokens", "0"), "--tokens must be at least 1"),
    (("--prompt-length", "30", "--tokens", "5", "--max-length", "32"), "needs 35 cache positions"),
    (("--device", "tpu"), "is not a device"),
])
def test_demo_rejects_bad_options_without_a_traceback(options, message):
    if "cuda" in options and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = run_demo(*options)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
