"""The pure-PyTorch baselines agree with the ops, compile without graph breaks, and the bench runs."""

from __future__ import annotations

import argparse
import csv
import itertools

import pytest
import torch

import torch_lightning_cache  # noqa: F401  (registers the ops)
from torch_lightning_cache.cli import baselines, bench

ops = torch.ops.lightning_cache


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- concatenate_to_cache


def _cache_inputs(seed, batch=3, capacity=16, heads=2, key_dim=4, value_dim=3, new_tokens=5, starts=(0, 3, 6),
                  attn=None, causal=None, token_types=False, key_dtype=torch.float32, cache_dtype=torch.bfloat16):
    g = _gen(seed)
    key_value = torch.randn(batch, capacity, heads, key_dim + value_dim, generator=g).to(cache_dtype)
    index = torch.tensor(starts, dtype=torch.int64)
    key = torch.randn(batch, new_tokens, heads, key_dim, generator=g).to(key_dtype)
    value = torch.randn(batch, new_tokens, heads, value_dim, generator=g).to(key_dtype)
    attention_mask = None
    if attn == "2d-int":
        attention_mask = (torch.rand(batch, capacity, generator=g) > 0.3).to(torch.int64)
    elif attn == "2d-bool":
        attention_mask = torch.rand(batch, capacity, generator=g) > 0.3
    elif attn == "4d-float":
        attention_mask = (torch.rand(batch, 1, new_tokens, capacity, generator=g) > 0.3).float()
    causal_mask, is_causal = None, causal == "flag"
    if causal == "explicit":
        horizon = max(capacity, max(starts) + 3 * new_tokens)  # covers every position three calls write
        causal_mask = torch.tril(torch.ones(1, 1, horizon, horizon, dtype=torch.bool))
    token_type_ids = torch.randint(0, 3, (batch, new_tokens), generator=g) if token_types else None
    return key_value, index, key, value, attention_mask, causal_mask, token_type_ids, is_causal


def _check_concatenate(ring, args, calls=1):
    key_value, index, key, value, attention_mask, causal_mask, token_type_ids, is_causal = args
    kv_base, index_base = key_value.clone(), index.clone()
    for _ in range(calls):
        want = ops.concatenate_to_cache(key_value, index, key, value, attention_mask, causal_mask, token_type_ids,
                                        is_causal, ring)
        got = baselines.concatenate_to_cache_eager(kv_base, index_base, key, value, attention_mask, causal_mask,
                                                   token_type_ids, is_causal, ring)
        assert got.dtype == torch.bool and got.shape == want.shape
        assert torch.equal(got, want)
        assert torch.equal(kv_base, key_value)  # bit-for-bit, including the dtype cast
        assert torch.equal(index_base, index)


@pytest.mark.parametrize("ring,causal,token_types,attn", list(itertools.product(
    [False, True], [None, "flag", "explicit"], [False, True], [None, "2d-int", "2d-bool", "4d-float"])))
@pytest.mark.parametrize("new_tokens", [1, 5])
def test_concatenate_matches_op(ring, causal, token_types, attn, new_tokens):
    # Ragged per-row positions; with a ring they wrap past the capacity.
    starts = (0, 14, 37) if ring else (0, 3, 6)
    args = _cache_inputs(7, new_tokens=new_tokens, starts=starts, attn=attn, causal=causal, token_types=token_types)
    _check_concatenate(ring, args, calls=2)


@pytest.mark.parametrize("key_dtype,cache_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32),
                                                   (torch.float64, torch.bfloat16), (torch.float16, torch.float16),
                                                   (torch.float64, torch.float64)])
def test_concatenate_casts_like_op(key_dtype, cache_dtype):
    args = _cache_inputs(3, causal="flag", key_dtype=key_dtype, cache_dtype=cache_dtype)
    _check_concatenate(False, args)


def test_concatenate_ring_fills_whole_cache_in_one_call():
    args = _cache_inputs(5, capacity=8, new_tokens=8, starts=(3, 8, 21), causal="flag", token_types=True)
    _check_concatenate(True, args, calls=3)


def test_concatenate_strided_inputs():
    # key/value as slices of a fused projection.
    g = _gen(11)
    fused = torch.randn(2, 4, 3, 10, generator=g)
    key_value, index = ops.init_kv_cache(2, 12, 3, 4, 6, dtype=torch.float32)
    index.copy_(torch.tensor([2, 5]))
    _check_concatenate(False, (key_value, index, fused[..., :4], fused[..., 4:], None, None, None, True))


# --------------------------------------------------------------------------- lightning


def _lightning_inputs(seed, slots=3, batch=3, tokens=2, heads=2, key_dim=8, value_dim=6, in_dtype=torch.float32,
                      state_dtype=torch.float32):
    g = _gen(seed)
    state = torch.randn(slots, heads, key_dim, value_dim, generator=g).to(state_dtype)
    q, k = (torch.randn(batch, tokens, heads, key_dim, generator=g).to(in_dtype) for _ in range(2))
    v = torch.randn(batch, tokens, heads, value_dim, generator=g).to(in_dtype)
    slopes = torch.rand(heads, generator=g) * 0.5 + 0.05
    return state, q, k, v, slopes


def _close(got, want, rtol=1e-4):
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * max(1.0, want.float().abs().max()))


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot_ids", [None, [2, -1, 0], [-1, 0, -1], [1, 3, -1]])
def test_decode_matches_op(tokens, state_dtype, slot_ids):
    slots = 4 if slot_ids is not None else 3
    state, q, k, v, slopes = _lightning_inputs(1, slots=slots, tokens=tokens, state_dtype=state_dtype)
    state_base = state.clone()
    sid = None if slot_ids is None else torch.tensor(slot_ids)
    want = ops.lightning_decode(state, q, k, v, slopes, sid, 0.5)
    got = baselines.lightning_decode_eager(state_base, q, k, v, slopes, sid, 0.5)
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol = 1e-4 if state_dtype == torch.float32 else 1e-2
    _close(got, want, rtol)
    _close(state_base, state, rtol)
    if slot_ids is not None:
        skipped = torch.tensor(slot_ids) < 0
        assert torch.all(got[skipped] == 0)
        untouched = [s for s in range(slots) if s not in slot_ids]
        assert torch.equal(state_base[untouched], state[untouched])


def test_decode_low_precision_inputs():
    state, q, k, v, slopes = _lightning_inputs(2, tokens=1, in_dtype=torch.bfloat16)
    state_base = state.clone()
    want = ops.lightning_decode(state, q, k, v, slopes)
    got = baselines.lightning_decode_eager(state_base, q, k, v, slopes)
    assert got.dtype == torch.bfloat16
    _close(got, want, 1e-2)
    _close(state_base, state)


@pytest.mark.parametrize("tokens,block_size", [(37, 8), (64, 16), (20, 256), (1, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_prefill_matches_op(tokens, block_size, masked):
    # Inputs of size ~1 and a non-zero starting state, so decay errors would show.
    state, q, k, v, slopes = _lightning_inputs(4, slots=2, batch=2, tokens=tokens, heads=3, key_dim=16, value_dim=16)
    attention_mask = (torch.rand(2, tokens, generator=_gen(5)) > 0.3) if masked else None
    state_base = state.clone()
    want = ops.lightning_prefill(state, q, k, v, slopes, attention_mask, None, block_size, 0.7)
    got = baselines.lightning_prefill_chunked_eager(state_base, q, k, v, slopes, attention_mask, block_size, 0.7)
    _close(got, want)
    _close(state_base, state)


def test_prefill_equals_decode_steps():
    state, q, k, v, slopes = _lightning_inputs(6, slots=2, batch=2, tokens=12, key_dim=8, value_dim=8)
    stepped = state.clone()
    outs = [baselines.lightning_decode_eager(stepped, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], slopes)
            for t in range(12)]
    chunked = state.clone()
    out = baselines.lightning_prefill_chunked_eager(chunked, q, k, v, slopes, block_size=5)
    _close(out, torch.cat(outs, dim=1))
    _close(chunked, stepped)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_baselines_compile_fullgraph_cpu():
    """One small case per baseline under torch.compile(fullgraph=True): no graph break, same results."""
    torch._dynamo.reset()
    key_value, index, key, value, attention_mask, _, token_type_ids, _ = _cache_inputs(
        8, attn="2d-bool", token_types=True)
    concatenate = torch.compile(baselines.concatenate_to_cache_eager, fullgraph=True, dynamic=False)
    kv_base, index_base = key_value.clone(), index.clone()
    for call in range(2):  # the second call reuses the graph: positions are tensors
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            got = concatenate(kv_base, index_base, key, value, attention_mask, None, token_type_ids, True)
        want = ops.concatenate_to_cache(key_value, index, key, value, attention_mask, None, token_type_ids, True)
        assert torch.equal(got, want) and torch.equal(kv_base, key_value) and torch.equal(index_base, index)

    state, q, k, v, slopes = _lightning_inputs(9, slots=4, tokens=1)
    decode = torch.compile(baselines.lightning_decode_eager, fullgraph=True, dynamic=False)
    state_base = state.clone()
    sid = torch.tensor([3, -1, 0])
    want = ops.lightning_decode(state, q, k, v, slopes, sid)
    got = decode(state_base, q, k, v, slopes, sid)
    _close(got, want)
    _close(state_base, state)

    state, q, k, v, slopes = _lightning_inputs(10, tokens=20)
    prefill = torch.compile(baselines.lightning_prefill_chunked_eager, fullgraph=True, dynamic=False)
    state_base = state.clone()
    want = ops.lightning_prefill(state, q, k, v, slopes, None, None, 8)
    got = prefill(state_base, q, k, v, slopes, None, 8)
    _close(got, want)
    _close(state_base, state)


# --------------------------------------------------------------------------- bench smoke test


def test_bench_runs_tiny(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    path = tmp_path / "bench.csv"
    args = parser.parse_args(["--device", "cpu", "--capacity", "32", "--tokens", "4", "--batch", "2", "--heads", "2",
                              "--head-dim", "8", "--decode-heads", "2", "--decode-batches", "1,2",
                              "--prefill-tokens", "24", "--block-size", "8", "--repeats", "2", "--warmup", "1",
                              "--attn-batch", "2", "--attn-heads", "2", "--attn-query-heads", "4",
                              "--attn-capacity", "40", "--attn-repeats", "2", "--no-compile", "--csv", str(path)])
    assert bench.run(args) == 0
    with open(path) as f:
        rows = list(csv.DictReader(f))
    cases = {r["case"] for r in rows}
    assert cases == {"cache-1tok", "cache-4tok", "write-1tok", "write-4tok", "write-paged", "decode-b1", "decode-b2", "prefill-24tok",
                     "attn-bfloat16", "attn-int8", "attn-fp8", "attn-paged16", "attn-paged64", "prefill-packed"}
    for r in rows:
        assert r["check"] in ("reference", "agrees", "agrees (output)") or r["check"].startswith("peer:"), r
        assert float(r["us_per_call"]) > 0
    # Every case is timed against a copy_ of the bytes it moves, and the op's ratio to it is reported.
    for case in cases:
        copy = next(r for r in rows if r["case"] == case and r["contender"] == "copy_ same bytes")
        op = next(r for r in rows if r["case"] == case and r["contender"] == "op")
        assert float(copy["ratio_to_copy"]) == 1.0
        assert float(op["ratio_to_copy"]) == pytest.approx(float(op["us_per_call"]) / float(copy["us_per_call"]))
    # The plot goes beside the CSV (matplotlib is a test dependency: .ci/run installs it).
    pytest.importorskip("matplotlib")
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_case_selection(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    path = tmp_path / "bench.csv"
    args = parser.parse_args(["--device", "cpu", "--capacity", "16", "--batch", "1", "--heads", "1", "--head-dim", "4",
                              "--decode-heads", "1", "--decode-batches", "2", "--repeats", "1", "--warmup", "0",
                              "--no-compile", "--cases", "decode", "--csv", str(path)])
    assert bench.run(args) == 0
    with open(path) as f:
        assert {r["case"] for r in csv.DictReader(f)} == {"decode-b2"}


def test_bench_cli(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "cli.csv"
    result = subprocess.run([sys.executable, "-m", "torch_lightning_cache", "bench", "--device", "cpu",
                             "--capacity", "16", "--tokens", "4", "--batch", "1", "--heads", "1", "--head-dim", "4",
                             "--decode-heads", "1", "--decode-batches", "1", "--prefill-tokens", "8",
                             "--block-size", "4", "--repeats", "1", "--warmup", "0", "--no-compile",
                             "--attn-batch", "1", "--attn-heads", "1", "--attn-query-heads", "2",
                             "--attn-capacity", "16", "--attn-repeats", "1",
                             "--csv", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(path) as f:
        assert len(list(csv.DictReader(f))) > 0
