"""``python -m torch_lightning_cache demo --serve`` on the CPU, small sizes.

The demo checks itself (every request's tokens against that request decoded alone
without any cache) and exits 1 on a mismatch; these tests run it, read its report,
and show that the self-check catches a serving bug.
"""

from __future__ import annotations

import re

import pytest
import torch

from torch_lightning_cache import __main__ as cli
from torch_lightning_cache.cli import serve

SMALL = ["demo", "--serve", "--layers", "2", "--hidden", "32", "--heads", "2", "--requests", "7", "--pool-rows", "2",
         "--system-length", "11", "--prompt-length", "9", "--tokens", "12", "--draft-tokens", "3", "--max-length", "48",
         "--seed", "1"]
PADDED = SMALL + ["--engine", "padded"]


@pytest.fixture(autouse=True)
def one_thread():
    """The demo's model is tiny: one thread is fastest, and immune to a busy machine's other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(capsys, argv):
    rc = cli.main(argv)
    return rc, capsys.readouterr().out


def test_demo_serve_passes_and_reports(capsys):
    rc, out = _run(capsys, PADDED)
    assert rc == 0, out
    assert out.count("self-check against each request alone without any cache: PASS (0 differing tokens") == 2, out
    assert "plain and speculative serving produced the same tokens: True" in out
    for mode in ("plain", "speculative"):
        line = next(line for line in out.splitlines() if line.startswith(mode + ":"))
        assert re.search(r"[\d.]+ requests/s, +[\d.]+ tokens/s", line), line
        hits, lookups = map(int, re.search(r"prefix cache: (\d+) hits / (\d+) lookups", line).groups())
        # Requests 0-6 minus request 3 use the system prompt: the first is the one prefix-cached prefill.
        assert (hits, lookups) == (5, 6), line
    accepted, drafted = map(int, re.search(r"\((\d+)/(\d+) draft tokens", out).groups())
    assert 0 < accepted < drafted, out  # the draft is right sometimes and wrong sometimes: both paths ran


def test_demo_serve_self_check_catches_a_bad_accept(capsys, monkeypatch):
    """Keeping the lightning states of rejected draft tokens changes later tokens: exit 1."""

    def keep_positions_only(self, slot_ids, fed, kept, steps):
        for m in self.attention:
            torch.ops.lightning_cache.rewind_cache(m.index, fed - kept, slot_ids, False, True)

    monkeypatch.setattr(serve.Engine, "keep", keep_positions_only)
    rc, out = _run(capsys, PADDED)
    assert rc == 1, out
    checks = [line for line in out.splitlines() if "self-check" in line]
    assert "PASS (0 differing tokens" in checks[0] and "FAIL" in checks[1], out  # plain serving is not affected


def test_demo_serve_both_engines_side_by_side(capsys):
    """The packed engine serves the same requests to the same tokens, shares the system prompt's full pages and
    reports its pages against what contiguous rows would reserve."""
    rc, out = _run(capsys, SMALL + ["--engine", "both", "--page-size", "4", "--token-budget", "8"])
    assert rc == 0, out
    assert out.count("self-check against each request alone without any cache: PASS (0 differing tokens") == 4, out
    packed = next(line for line in out.splitlines() if line.startswith("packed:"))
    assert re.search(r"[\d.]+ tokens/s", packed), packed
    hits, lookups = map(int, re.search(r"prefix cache: (\d+) hits / (\d+) lookups", packed).groups())
    assert lookups == 6 and 1 <= hits <= 5, packed  # requests arriving before the prefix is saved are misses
    peak, pool, contiguous = map(int, re.search(r"pages: peak (\d+) of (\d+) in use.*reserve (\d+) tokens",
                                                out).groups())
    assert 0 < peak <= pool == 3 * 48 // 4 and peak * 4 < contiguous, out
    assert re.search(r"packed vs padded engine \(greedy, same requests\): [\d.]+ vs [\d.]+ tokens/s -> [\d.]+x; "
                     r"same tokens: True", out), out


@pytest.mark.parametrize("kv_quantization", ["int8", "fp8_e4m3"])
def test_demo_serve_quantized_kv_on_both_engines(capsys, kv_quantization):
    """--kv-quantization: both engines serve from codes (pages of codes in the packed one), each request checked
    against itself decoded alone on the same quantized storage; the engines agree token for token."""
    rc, out = _run(capsys, SMALL + ["--engine", "both", "--page-size", "4", "--token-budget", "8",
                                    "--kv-quantization", kv_quantization])
    assert rc == 0, out
    assert f"K|V storage: {kv_quantization} codes + float32 scales, 40 bytes per token and head" in out, out
    assert out.count(f"self-check against each request alone on its own {kv_quantization} cache: PASS (0 differing "
                     "tokens") == 4, out
    assert "same tokens: True" in out.splitlines()[-2], out


@pytest.mark.parametrize("kv_quantization", [None, "int8"])
def test_demo_serve_packed_self_check_catches_a_missing_prefix_state(capsys, monkeypatch, kv_quantization):
    """A prefix hit that shares the pages but starts the lightning states from zero changes tokens: exit 1."""
    from torch_lightning_cache.cli import engine

    original = engine.PackedEngine._save_prefix

    def save_zero_states(self, run):
        original(self, run)
        self.prefix_states = [torch.zeros_like(state) for state in self.prefix_states]

    monkeypatch.setattr(engine.PackedEngine, "_save_prefix", save_zero_states)
    quantized = ["--kv-quantization", kv_quantization] if kv_quantization else []
    rc, out = _run(capsys, SMALL + ["--page-size", "4"] + quantized)
    assert rc == 1, out
    assert "FAIL" in next(line for line in out.splitlines() if "self-check" in line), out


def test_demo_serve_rejects_bad_options(capsys):
    rc = cli.main(SMALL + ["--pool-rows", "0"])
    assert rc == 2
    assert "--pool-rows must be at least 1" in capsys.readouterr().err
    rc = cli.main(SMALL + ["--max-length", "30"])
    assert rc == 2
    assert "cache positions" in capsys.readouterr().err
    for option in ("--token-budget", "--page-size", "--max-running"):
        assert cli.main(SMALL + [option, "0"]) == 2
        assert f"{option} must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("kv_quantization", [None, "int8", "fp8_e4m3"])
def test_pool_cache_shares_the_model_buffers(kv_quantization):
    from torch_lightning_cache.models.hybrid import HybridConfig, HybridLM

    model = HybridLM(HybridConfig(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, intermediate_size=16,
                                  max_length=8, kv_quantization=kv_quantization), batch_size=3)
    pool = serve.pool_cache(model)

    def buffers():  # fp8 codes as their bytes (CPU has no fp8 random_ / equal)
        return [b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b for b in model.cache_buffers()]

    for buffer in buffers():
        buffer.random_(0, 100)
    expected = [b.clone() for b in buffers()]
    pool.copy_slots(torch.tensor([0]), torch.tensor([2]))
    for before, after in zip(expected, buffers()):
        if before.numel():  # an unquantized attention layer's scales are empty
            before[2] = before[0]
        assert torch.equal(before, after)


def test_demo_serve_packed_speculative_gives_plain_tokens_in_fewer_forwards(capsys):
    """Speculative decoding on the packed engine: the draft's proposals verified in the step's one packed
    forward; the same tokens as plain packed serving, in fewer target forwards, accepting some proposals and
    rejecting others (both paths ran)."""
    rc, out = _run(capsys, SMALL + ["--page-size", "4", "--token-budget", "8"])
    assert rc == 0, out
    assert "packed plain and speculative serving produced the same tokens: True" in out, out
    plain = next(line for line in out.splitlines() if line.startswith("packed:"))
    spec = next(line for line in out.splitlines() if line.startswith("packed-spec:"))
    calls = [int(re.search(r"(\d+) target forward calls", line).group(1)) for line in (plain, spec)]
    assert calls[1] < calls[0], out
    accepted, drafted = map(int, re.search(r"\((\d+)/(\d+) draft tokens", spec).groups())
    assert 0 < accepted < drafted, spec


def test_demo_serve_packed_speculative_self_check_catches_a_missing_rollback(capsys, monkeypatch):
    """Keeping the target's lightning states after rejected proposals changes later tokens: exit 1."""
    from torch_lightning_cache.cli import engine

    monkeypatch.setattr(engine.PackedEngine, "_roll_back", lambda self, run, sequence, ok: None)
    rc, out = _run(capsys, SMALL + ["--page-size", "4", "--token-budget", "8"])
    assert rc == 1, out
    checks = [line for line in out.splitlines() if "self-check" in line]
    assert "PASS (0 differing tokens" in checks[0] and "FAIL" in checks[1], out
