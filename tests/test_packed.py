"""Packed variable-length batches (SPEC 11): ``cu_seqlens`` on lightning_prefill, write_to_cache and
cached_attention. A packed call of S sequences must equal S separate calls (bit for bit where the
arithmetic is the same: the CPU kernels process each sequence's tokens in the same blocks), and the
pure-PyTorch reference; bad ``cu_seqlens`` / ``cache_seqlens`` are clear errors with checks and
skipped sequences without, never an access outside a buffer."""

from __future__ import annotations

import pytest
import torch
from conftest import randn
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (ref_cached_attention_rows, ref_lightning_packed,
                       ref_packed_sequences, ref_quantize_kv_tokens)

import torch_lightning_cache as tlc

_ops = torch.ops.lightning_cache
INT64_MAX = 2**63 - 1
H, DK, DV = 2, 8, 8


def cu_of(lengths, dtype=torch.int64):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()) if lengths else [0], dtype=dtype)


def packed_inputs(lengths, gen, Dk=DK, Dv=DV, heads=H, dtype=torch.float32):
    T = sum(lengths)
    return (randn((1, T, heads, Dk), gen, dtype), randn((1, T, heads, Dk), gen, dtype),
            randn((1, T, heads, Dv), gen, dtype))


def random_lengths(gen, count, high):
    lengths = torch.randint(0, high + 1, (count,), generator=gen).tolist()
    return lengths + [0, 1]  # always an empty sequence and a decode step


# --------------------------------------------------------------------------- lightning_prefill


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_prefill_packed_equals_separate_calls_bit_for_bit(gen, cu_dtype, state_dtype):
    lengths = random_lengths(gen, 5, 70)
    S = len(lengths)
    q, k, v = packed_inputs(lengths, gen)
    slopes = tlc.lightning_slopes(H)
    pool = 2 * S
    slot_ids = torch.randperm(pool, generator=gen)[:S]
    state = randn((pool, H, DK, DV), gen).to(state_dtype)
    cu = cu_of(lengths, cu_dtype)

    packed_state = state.clone()
    out = tlc.lightning_prefill(packed_state, q, k, v, slopes, slot_ids=slot_ids, cu_seqlens=cu, block_size=16)
    assert out.shape == (1, sum(lengths), H, DV)
    separate_state = state.clone()
    for s, (begin, n) in enumerate(ref_packed_sequences(cu, q.shape[1], True)):
        part = slice(begin, begin + n)
        o = tlc.lightning_prefill(separate_state, q[:, part], k[:, part], v[:, part], slopes,
                                  slot_ids=slot_ids[s:s + 1], block_size=16)
        assert torch.equal(out[:, part], o), f"sequence {s} (length {n})"
    assert torch.equal(packed_state, separate_state)

    want_state, want_out = ref_lightning_packed(state, q, k, v, slopes, cu, slot_ids)
    tol = 1e-4 if state_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(packed_state.double(), want_state, rtol=tol, atol=tol)


def test_prefill_packed_checkpoints_count_each_sequences_own_tokens(gen):
    lengths = [9, 0, 4, 13, 1]
    S, every, C = len(lengths), 4, 3
    q, k, v = packed_inputs(lengths, gen)
    slopes = tlc.lightning_slopes(H)
    state = randn((S, H, DK, DV), gen)
    cu = cu_of(lengths)
    sentinel = torch.full((S, C, H, DK, DV), 7.0)
    packed = sentinel.clone()
    tlc.lightning_prefill(state.clone(), q, k, v, slopes, cu_seqlens=cu, checkpoints=packed, checkpoint_every=every)
    for s, (begin, n) in enumerate(ref_packed_sequences(cu, q.shape[1], True)):
        alone = sentinel[s:s + 1].clone()
        part = slice(begin, begin + n)
        tlc.lightning_prefill(state[s:s + 1].clone(), q[:, part], k[:, part], v[:, part], slopes,
                              checkpoints=alone, checkpoint_every=every)
        assert torch.equal(packed[s], alone[0]), f"sequence {s}"
        written = min(C, n // every)
        assert torch.equal(packed[s, written:], sentinel[s, written:])  # later ones untouched
        assert written == 0 or not torch.equal(packed[s, :written], sentinel[s, :written])


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6), block=st.sampled_from([1, 5, 256]),
       seed=st.integers(0, 2**31 - 1))
def test_prefill_packed_property(lengths, block, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = packed_inputs(lengths, gen)
    slopes = tlc.lightning_slopes(H)
    S = len(lengths)
    state = randn((S, H, DK, DV), gen)
    cu = cu_of(lengths)
    got_state = state.clone()
    out = tlc.lightning_prefill(got_state, q, k, v, slopes, cu_seqlens=cu, block_size=block)
    want_state, want_out = ref_lightning_packed(state, q, k, v, slopes, cu)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_state.double(), want_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_prefill_packed_through_the_aten_path(gen, monkeypatch, state_dtype):
    """The CUDA backend's packed prefill (one zero-padded ATen batch, lightning_prefill_packed), run on the
    CPU with LIGHTNING_CACHE_CPU_PREFILL=aten: slot ids, a skipped sequence, an empty one, checkpoints
    counted in each sequence's own tokens, against the reference and the CPU kernels."""
    lengths = random_lengths(gen, 4, 40) + [23]
    S, every, C = len(lengths), 8, 3
    q, k, v = packed_inputs(lengths, gen)
    slopes = tlc.lightning_slopes(H)
    pool = S + 3
    slot_ids = torch.randperm(pool, generator=gen)[:S]
    slot_ids[1] = -1  # a skipped sequence: its state row and outputs untouched / zero
    state = randn((pool, H, DK, DV), gen).to(state_dtype)
    cu = cu_of(lengths)
    sentinel = torch.full((pool, C, H, DK, DV), 7.0, dtype=state_dtype)
    results = {}
    for path in ("kernels", "aten"):
        if path == "aten":
            monkeypatch.setenv("LIGHTNING_CACHE_CPU_PREFILL", "aten")
        st_, ck = state.clone(), sentinel[:S].clone()
        out = tlc.lightning_prefill(st_, q, k, v, slopes, slot_ids=slot_ids, cu_seqlens=cu, block_size=16,
                                    checkpoints=ck, checkpoint_every=every)
        results[path] = (out, st_, ck)
    out, got_state, got_ck = results["aten"]
    want_state, want_out = ref_lightning_packed(state, q, k, v, slopes, cu, slot_ids)
    tol = 1e-4 if state_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(got_state.double(), want_state, rtol=tol, atol=tol)
    untouched = sorted(set(range(pool)) - set(slot_ids[slot_ids >= 0].tolist()))
    assert torch.equal(got_state[untouched], state[untouched])  # the skipped sequence's and unnamed rows
    assert torch.equal(out[0, lengths[0]:lengths[0] + lengths[1]], torch.zeros_like(out[0, :lengths[1]]))
    kern_out, kern_state, kern_ck = results["kernels"]
    torch.testing.assert_close(out, kern_out, rtol=tol, atol=tol)
    torch.testing.assert_close(got_ck, kern_ck, rtol=tol, atol=tol)
    for s, n in enumerate(lengths):
        written = min(C, n // every) if slot_ids[s] >= 0 else 0
        assert torch.equal(got_ck[s, written:], sentinel[s, written:]), f"sequence {s}: a checkpoint past its end"
        assert written == 0 or not torch.equal(got_ck[s, :written], sentinel[s, :written])


BAD_CU = {
    "not_from_0": ([1, 3, 6], "must start at 0"),
    "decreasing": ([0, 4, 2, 6], "non-decreasing"),
    "last_not_T": ([0, 2, 5], "must equal the number of packed tokens"),
    "int64_max": ([0, INT64_MAX, 6], "non-decreasing|must equal"),
    "int64_min": ([0, -(2**63), 6], "non-decreasing"),
}


@pytest.mark.parametrize("case", sorted(BAD_CU))
def test_prefill_bad_cu_seqlens(gen, case):
    values, words = BAD_CU[case]
    q, k, v = packed_inputs([6], gen)
    slopes = tlc.lightning_slopes(H)
    S = len(values) - 1
    state = randn((S, H, DK, DV), gen)
    cu = torch.tensor(values, dtype=torch.int64)
    before = state.clone()
    with pytest.raises(ValueError, match=words):
        tlc.lightning_prefill(state, q, k, v, slopes, cu_seqlens=cu)
    assert torch.equal(state, before)
    # Without checks: the kept sequences run, the rest are skipped (state untouched, zeros out).
    out = tlc.lightning_prefill(state, q, k, v, slopes, cu_seqlens=cu, check_bounds=False)
    want_state, want_out = ref_lightning_packed(before, q, k, v, slopes, cu, check_bounds=False)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), want_state, rtol=1e-4, atol=1e-4)


def test_prefill_cu_seqlens_shape_dtype_and_mask_errors(gen):
    q, k, v = packed_inputs([3, 2], gen)
    slopes = tlc.lightning_slopes(H)
    state = randn((2, H, DK, DV), gen)
    cu = cu_of([3, 2])
    for bad, words in [(cu.view(1, 3), "1-D"), (cu.float(), "int32 or int64"), (cu.to(torch.int16), "int32 or int64"),
                       (torch.zeros(0, dtype=torch.int64), "1-D")]:
        with pytest.raises(ValueError, match=words):
            tlc.lightning_prefill(state, q, k, v, slopes, cu_seqlens=bad)
    with pytest.raises(ValueError, match="attention_mask cannot be used with cu_seqlens"):
        tlc.lightning_prefill(state, q, k, v, slopes, attention_mask=torch.ones(1, 5), cu_seqlens=cu)
    with pytest.raises(ValueError, match="packed as"):
        tlc.lightning_prefill(state, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                              slopes, cu_seqlens=cu)
    with pytest.raises(ValueError, match="without slot_ids the batch"):
        tlc.lightning_prefill(randn((3, H, DK, DV), gen), q, k, v, slopes, cu_seqlens=cu)
    with pytest.raises(TypeError, match="cu_seqlens must be"):
        tlc.lightning_prefill(state, q, k, v, slopes, cu_seqlens=[0, 3, 5])


def test_prefill_packed_repeated_and_bad_slots_without_checks(gen):
    lengths = [4, 3, 5]
    q, k, v = packed_inputs(lengths, gen)
    slopes = tlc.lightning_slopes(H)
    state = randn((4, H, DK, DV), gen)
    slot_ids = torch.tensor([2, 2, 9])
    with pytest.raises(IndexError):
        tlc.lightning_prefill(state.clone(), q, k, v, slopes, slot_ids=slot_ids, cu_seqlens=cu_of(lengths))
    got = state.clone()
    out = tlc.lightning_prefill(got, q, k, v, slopes, slot_ids=slot_ids, cu_seqlens=cu_of(lengths),
                                check_bounds=False)
    want_state, want_out = ref_lightning_packed(state, q, k, v, slopes, cu_of(lengths), slot_ids, check_bounds=False)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), want_state, rtol=1e-4, atol=1e-4)
    assert torch.equal(out[0, 4:], torch.zeros_like(out[0, 4:]))  # the repeat and the bad id output zeros


# --------------------------------------------------------------------------- write_to_cache


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8", "fp8_e4m3"])
def test_write_packed_equals_separate_writes(gen, storage):
    lengths = random_lengths(gen, 4, 9)
    S, L, pool = len(lengths), 24, len(lengths) + 2
    _, k, v = packed_inputs(lengths, gen)
    slot_ids = torch.randperm(pool, generator=gen)[:S]
    if storage in ("int8", "fp8_e4m3"):
        kv, index, scales = tlc.init_quantized_kv_cache(pool, L, H, DK, DV, storage)
    else:
        kv, index = tlc.init_kv_cache(pool, L, H, DK, DV, dtype=getattr(torch, storage))
        scales = None
    index.copy_(torch.randint(0, 8, (pool,), generator=gen))
    kv2, index2 = kv.clone(), index.clone()
    scales2 = scales.clone() if scales is not None else None
    tlc.write_to_cache(kv, index, k, v, slot_ids=slot_ids, scales=scales, cu_seqlens=cu_of(lengths))
    for s, (begin, n) in enumerate(ref_packed_sequences(cu_of(lengths), k.shape[1], True)):
        part = slice(begin, begin + n)
        tlc.write_to_cache(kv2, index2, k[:, part], v[:, part], slot_ids=slot_ids[s:s + 1], scales=scales2)
    assert torch.equal(index, index2)
    assert torch.equal(kv.view(torch.uint8) if kv.element_size() == 1 else kv,
                       kv2.view(torch.uint8) if kv2.element_size() == 1 else kv2)
    if scales is not None:
        assert torch.equal(scales, scales2)
        # and the codes are the reference quantizer's
        r, begin = int(slot_ids[0]), 0
        n = lengths[0]
        if n:
            codes, sc = ref_quantize_kv_tokens(k[0, :n], storage)
            start = int(index[r]) - n
            assert torch.equal(kv[r, start:start + n, :, :DK].view(torch.uint8), codes.view(torch.uint8))
            assert torch.equal(scales[r, start:start + n, :, 0], sc)


def test_write_packed_overflow_and_bad_cu(gen):
    lengths = [3, 5]
    _, k, v = packed_inputs(lengths, gen)
    kv, index = tlc.init_kv_cache(2, 6, H, DK, DV)
    index[1] = 2  # 2 + 5 > 6: row 1 overflows
    before = kv.clone(), index.clone()
    with pytest.raises(IndexError, match="cache overflow in row 1"):
        tlc.write_to_cache(kv, index, k, v, cu_seqlens=cu_of(lengths))
    assert torch.equal(kv, before[0]) and torch.equal(index, before[1])
    tlc.write_to_cache(kv, index, k, v, cu_seqlens=cu_of(lengths), check_bounds=False)
    assert index.tolist() == [3, 2]  # row 1 skipped whole
    assert torch.equal(kv[1], before[0][1]) and torch.equal(kv[0, :3, :, :DK], k[0, :3])
    for values in ([0, 9, 8], [2, 3, 8], [0, 3, 7], [0, INT64_MAX, 8]):
        kv, index = tlc.init_kv_cache(2, 16, H, DK, DV)
        with pytest.raises(ValueError, match="cu_seqlens"):
            tlc.write_to_cache(kv, index, k, v, cu_seqlens=torch.tensor(values))
        assert not kv.any() and not index.any()
        tlc.write_to_cache(kv, index, k, v, cu_seqlens=torch.tensor(values), check_bounds=False)
        seqs = ref_packed_sequences(torch.tensor(values), 8, False)
        assert index.tolist() == [s[1] if s is not None else 0 for s in seqs]
    with pytest.raises(ValueError, match="ring=True cannot be used with cu_seqlens"):
        tlc.write_to_cache(kv, index, k, v, ring=True, cu_seqlens=cu_of(lengths))


# --------------------------------------------------------------------------- cached_attention


def filled_pool(gen, pool, L, Dk=DK, Dv=DV, heads=H):
    kv = randn((pool, L, heads, Dk + Dv), gen)
    return kv


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("cs_dtype", [torch.int32, torch.int64])
def test_attention_packed_equals_separate_calls(gen, group, cs_dtype):
    lengths = random_lengths(gen, 4, 7)
    S, L, pool = len(lengths), 40, len(lengths) + 3
    kv = filled_pool(gen, pool, L)
    slot_ids = torch.randperm(pool, generator=gen)[:S]
    valid = torch.tensor([n + int(torch.randint(0, L - n + 1, (), generator=gen)) for n in lengths], dtype=cs_dtype)
    T = sum(lengths)
    query = randn((1, T, H * group, DK), gen)
    out = tlc.cached_attention(query, kv, key_dim=DK, cu_seqlens=cu_of(lengths), cache_seqlens=valid,
                               slot_ids=slot_ids)
    assert out.shape == (1, T, H * group, DV)
    for s, (begin, n) in enumerate(ref_packed_sequences(cu_of(lengths), T, True)):
        if n == 0:
            continue
        r = int(slot_ids[s])
        positions = torch.arange(int(valid[s]) - n, int(valid[s]))
        mask = (torch.arange(L)[None] <= positions[:, None]).view(1, 1, n, L)
        alone = tlc.cached_attention(query[:, begin:begin + n], kv[r:r + 1], mask, DK)
        assert torch.equal(out[:, begin:begin + n], alone), f"sequence {s}"
    want = ref_cached_attention_rows(query, kv, DK, valid, cu_seqlens=cu_of(lengths), slot_ids=slot_ids)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_attention_without_mask_uses_cache_seqlens_causally(gen):
    B, q, L = 3, 4, 30
    key_value, index = tlc.init_kv_cache(B, L, H, DK, DV)
    index.copy_(torch.tensor([0, 5, 26]))
    k, v = randn((B, q, H, DK), gen), randn((B, q, H, DV), gen)
    _, _, mask = tlc.concatenate_to_cache(key_value, index, k, v, is_causal=True)
    query = randn((B, q, 2 * H, DK), gen)
    with_mask = tlc.cached_attention(query, key_value, mask, DK)
    without = tlc.cached_attention(query, key_value, key_dim=DK, cache_seqlens=index)
    assert torch.equal(with_mask, without)


@pytest.mark.parametrize("storage", ["int8", "fp8_e4m3"])
def test_attention_packed_quantized(gen, storage):
    lengths = [3, 1, 0, 5]
    S, L = len(lengths), 20
    kv, index, scales = tlc.init_quantized_kv_cache(S, L, H, DK, DV, storage)
    _, k, v = packed_inputs(lengths, gen)
    index.copy_(torch.tensor([4, 0, 2, 11]))
    tlc.write_to_cache(kv, index, k, v, scales=scales, cu_seqlens=cu_of(lengths))
    query = randn((1, sum(lengths), 2 * H, DK), gen)
    out = tlc.cached_attention(query, kv, key_dim=DK, scales=scales, cu_seqlens=cu_of(lengths), cache_seqlens=index)
    want = ref_cached_attention_rows(query, kv, DK, index, cu_seqlens=cu_of(lengths), scales=scales)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def test_attention_bad_cache_seqlens_and_arguments(gen):
    lengths = [3, 2]
    L = 8
    kv = filled_pool(gen, 2, L)
    query = randn((1, 5, H, DK), gen)
    cu = cu_of(lengths)
    for valid, words in [([9, 4], "larger than the cache's capacity"), ([2, 4], "smaller than the row's 3 queries"),
                         ([INT64_MAX, 4], "larger"), ([-(2**63), 4], "smaller")]:
        with pytest.raises(ValueError, match=words):
            tlc.cached_attention(query, kv, key_dim=DK, cu_seqlens=cu, cache_seqlens=torch.tensor(valid))
        out = tlc.cached_attention(query, kv, key_dim=DK, cu_seqlens=cu, cache_seqlens=torch.tensor(valid),
                                   check_bounds=False)
        assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))  # the bad row gives zeros
        want = ref_cached_attention_rows(query, kv, DK, torch.tensor([4, 4]), cu_seqlens=cu)
        torch.testing.assert_close(out[0, 3:].double(), want[0, 3:], rtol=1e-5, atol=1e-5)
    valid = torch.tensor([4, 4])
    with pytest.raises(ValueError, match="mask cannot be used with cu_seqlens"):
        tlc.cached_attention(query, kv, torch.ones(1, 1, 5, L, dtype=torch.bool), DK, cu_seqlens=cu,
                             cache_seqlens=valid)
    with pytest.raises(ValueError, match="cache_seqlens .* is required"):
        tlc.cached_attention(query, kv, key_dim=DK, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cache_seqlens must be \\[rows\\]"):
        tlc.cached_attention(query, kv, key_dim=DK, cu_seqlens=cu, cache_seqlens=torch.tensor([4]))
    with pytest.raises(ValueError, match="int32 or int64"):
        tlc.cached_attention(query, kv, key_dim=DK, cu_seqlens=cu, cache_seqlens=valid.float())
    with pytest.raises(IndexError, match="slot_ids\\[1\\] = 5 is out of range"):
        tlc.cached_attention(query, kv, key_dim=DK, cu_seqlens=cu, cache_seqlens=valid, slot_ids=torch.tensor([0, 5]))
    out = tlc.cached_attention(query, kv, key_dim=DK, cu_seqlens=cu, cache_seqlens=valid,
                               slot_ids=torch.tensor([-1, INT64_MAX]), check_bounds=False)
    assert not out.any()
    with pytest.raises(TypeError, match="key_dim must be an int"):
        tlc.cached_attention(query, kv, cu_seqlens=cu, cache_seqlens=valid)
    with pytest.raises(ValueError, match="non-decreasing"):
        tlc.cached_attention(query, kv, key_dim=DK, cu_seqlens=torch.tensor([0, 4, 3]), cache_seqlens=valid)


# --------------------------------------------------------------------------- opcheck and compile


def test_opcheck_packed_arguments(gen):
    lengths = [3, 0, 2]
    S, T = len(lengths), sum(lengths)
    q, k, v = packed_inputs(lengths, gen)
    slopes = tlc.lightning_slopes(H)
    cu = cu_of(lengths)
    state = randn((S + 1, H, DK, DV), gen)
    slots = torch.tensor([3, 0, 1])
    torch.library.opcheck(_ops.lightning_prefill, (state, q, k, v, slopes),
                          dict(slot_ids=slots, cu_seqlens=cu.int()))
    torch.library.opcheck(_ops.lightning_prefill, (state[:S], q, k, v, slopes),
                          dict(cu_seqlens=cu, checkpoints=torch.zeros(S, 2, H, DK, DV), checkpoint_every=1))
    kv, index = tlc.init_kv_cache(S + 1, 8, H, DK, DV)
    torch.library.opcheck(_ops.write_to_cache, (kv, index, k, v), dict(slot_ids=slots, cu_seqlens=cu))
    qkv, qindex, qscales = tlc.init_quantized_kv_cache(S, 8, H, DK, DV, "int8")
    torch.library.opcheck(_ops.write_to_cache, (qkv, qindex, k, v), dict(scales=qscales, cu_seqlens=cu))
    query = randn((1, T, 2 * H, DK), gen)
    valid = torch.tensor([5, 4, 6])
    torch.library.opcheck(_ops.cached_attention, (query, kv, None, DK),
                          dict(cu_seqlens=cu, cache_seqlens=valid, slot_ids=slots))
    torch.library.opcheck(_ops.cached_attention, (query, qkv, None, DK),
                          dict(scales=qscales, cu_seqlens=cu, cache_seqlens=valid.int()))
    torch.library.opcheck(_ops.cached_attention, (randn((S + 1, 2, H, DK), gen), kv, None, DK),
                          dict(cache_seqlens=torch.tensor([2, 3, 8, 4])))


def test_compile_packed_step_no_recompile_when_cu_seqlens_change(gen):
    """One packed prefill+decode step (lightning + K|V write + attention) compiled once; new cu_seqlens values
    (same shapes) reuse the graph and match eager."""
    S, T, L = 3, 8, 32
    slopes = tlc.lightning_slopes(H)

    def step(state, kv, index, q, k, v, cu):
        o = tlc.lightning_prefill(state, q, k, v, slopes, cu_seqlens=cu, check_bounds=False)
        tlc.write_to_cache(kv, index, k, v, cu_seqlens=cu, check_bounds=False)
        return o, tlc.cached_attention(q, kv, key_dim=DK, cu_seqlens=cu, cache_seqlens=index, check_bounds=False)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    state, eager_state = torch.zeros(S, H, DK, DV), torch.zeros(S, H, DK, DV)
    kv, index = tlc.init_kv_cache(S, L, H, DK, DV)
    eager_kv, eager_index = kv.clone(), index.clone()
    torch._dynamo.utils.counters.clear()
    for lengths in ([5, 2, 1], [1, 1, 6], [0, 7, 1]):
        assert sum(lengths) == T  # the same shapes every call: only the cu_seqlens values change
        q, k, v = packed_inputs(lengths, gen)
        cu = cu_of(lengths)
        got = compiled(state, kv, index, q, k, v, cu)
        want = step(eager_state, eager_kv, eager_index, q, k, v, cu)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert torch.equal(kv, eager_kv) and torch.equal(index, eager_index) and torch.equal(state, eager_state)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
