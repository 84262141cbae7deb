"""Beam search and forking over a whole cache: reorder_cache, copy_slots, reset_slots (SPEC section 7).

Each method is compared with plain torch indexing of the original buffers, for every layer kind
(attention K/V rows and positions, lightning states); untouched rows must stay bit-identical and
the buffers must keep their addresses. Each method also compiles with fullgraph=True.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from torch_lightning_cache import LightningCache, LightningCacheMetaData, LightningCacheView, minimax_layer_kinds

POOL = 6


def make_cache(device, gen, pool=POOL):
    """Layers [lightning, attention, lightning, attention] filled with random data (NaNs included, so
    "bit-identical" is checked on bits), plus one empty slot and one unallocated view."""
    meta = LightningCacheMetaData.create(batch_size=pool, num_heads=2, key_dim=3, value_dim=5, max_length=7,
                                         dtype=torch.bfloat16, device=device)
    kinds = minimax_layer_kinds(4, attention_every=2)
    cache = LightningCache.init_cache(4, meta, layer_kinds=kinds)
    for view in cache:
        data = torch.randn(view.key_value.shape, generator=gen).to(view.key_value.dtype)
        data.view(-1)[::11] = float("nan")
        view.key_value.copy_(data)
        if view.index is not None:
            view.index.copy_(torch.randint(0, 1000, (pool,), generator=gen))
    lazy = LightningCacheView.init(LightningCacheMetaData.create(num_heads=2, head_dim=4), layer_index=5)
    assert lazy.key_value is None
    return LightningCache(list(cache.views) + [None, lazy])


def buffers(cache):
    out = []
    for view in cache:
        if view is not None and view.key_value is not None:
            out.append(view.key_value)
            if view.index is not None:
                out.append(view.index)
    return out


def bits(t):
    return t.contiguous().view(torch.uint8)


def assert_bits_equal(actual, expected):
    assert len(actual) == len(expected) == 6  # 4 layers: 2 states + 2 x (key_value, index)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert torch.equal(bits(a), bits(e))


def ids(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)


def run(cache, method, args, compiled):
    if not compiled:
        getattr(cache, method)(*args)
        return

    def fn(*a):
        getattr(cache, method)(*a)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    torch.compile(fn, backend=counter, fullgraph=True)(*args)
    # fullgraph=True raises on any graph break; check a graph was really traced (an empty copy_slots
    # returns before any tensor op, so dynamo has nothing to compile there).
    assert counter.frame_count == (1 if args[0].numel() else counter.frame_count) and counter.frame_count <= 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("beam_idx", [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 2, 0, 5, 5, 5], [3] * POOL])
def test_reorder_cache_gathers_every_layer(device, gen, beam_idx, compiled):
    cache = make_cache(device, gen)
    before = [b.clone() for b in buffers(cache)]
    pointers = [b.data_ptr() for b in buffers(cache)]
    index = ids(beam_idx, device)
    run(cache, "reorder_cache", (index,), compiled)
    assert_bits_equal(buffers(cache), [b[index] for b in before])
    assert [b.data_ptr() for b in buffers(cache)] == pointers  # CUDA-graph addresses stay valid
    assert cache[4] is None and cache[5].key_value is None


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("src, dst", [
    ([0], [3]),  # plain fork
    ([1, 4], [4, 1]),  # swap
    ([0, 2, 3], [2, 3, 0]),  # overlapping cycle: every source read before any write
    ([5, 5, 5], [0, 1, 2]),  # one source to several rows (n > 1 sampling)
    ([2], [2]),  # onto itself
    ([], []),  # nothing
])
def test_copy_slots_reads_all_sources_first(device, gen, src, dst, compiled):
    cache = make_cache(device, gen)
    before = [b.clone() for b in buffers(cache)]
    pointers = [b.data_ptr() for b in buffers(cache)]
    run(cache, "copy_slots", (ids(src, device), ids(dst, device)), compiled)
    expected = []
    for b in before:
        e = b.clone()
        e[ids(dst, device)] = b[ids(src, device)]  # untouched rows keep their original bits
        expected.append(e)
    assert_bits_equal(buffers(cache), expected)
    assert [b.data_ptr() for b in buffers(cache)] == pointers


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("rows", [[0], [5, 1], [3, 3, 2], list(range(POOL)), []])
def test_reset_slots_zeroes_positions_kv_and_states(device, gen, rows, compiled):
    cache = make_cache(device, gen)
    before = [b.clone() for b in buffers(cache)]
    pointers = [b.data_ptr() for b in buffers(cache)]
    run(cache, "reset_slots", (ids(rows, device),), compiled)
    expected = []
    for b in before:
        e = b.clone()
        e[ids(rows, device)] = 0
        expected.append(e)
    assert_bits_equal(buffers(cache), expected)
    assert [b.data_ptr() for b in buffers(cache)] == pointers


def test_repeated_dst_without_checks_first_occurrence_wins(device, gen):
    cache = make_cache(device, gen)
    before = [b.clone() for b in buffers(cache)]
    cache.copy_slots(ids([1, 2, 3], device), ids([4, 0, 4], device), check_bounds=False)
    expected = []
    for b in before:
        e = b.clone()
        e[4], e[0] = b[1], b[2]
        expected.append(e)
    assert_bits_equal(buffers(cache), expected)


def test_methods_on_an_unallocated_cache_do_nothing(device):
    cache = LightningCache.init_empty(2)
    cache[1] = LightningCacheView.init(LightningCacheMetaData.create(num_heads=1, head_dim=2))
    cache.reorder_cache(ids([0, 0, 0], device))  # no rows anywhere: any length is fine
    cache.copy_slots(ids([0], device), ids([1], device))
    cache.reset_slots(ids([7], device))
    assert cache[0] is None and cache[1].key_value is None


def _bad_calls(device):
    three = ids([0, 1, 2], device)
    return [
        ("reorder_cache", dict(beam_idx=[0, 1, 2, 3, 4, 5]), TypeError, "beam_idx must be a torch.Tensor"),
        ("reorder_cache", dict(beam_idx=ids(range(POOL), device).int()), TypeError, "beam_idx must be an int64"),
        ("reorder_cache", dict(beam_idx=ids(range(POOL), device).view(2, 3)), ValueError, "beam_idx must be 1-D"),
        ("reorder_cache", dict(beam_idx=three), ValueError, "beam_idx must have one entry per cache row"),
        ("reorder_cache", dict(beam_idx=ids([0, 1, 2, 3, 4, 6], device)), IndexError, r"beam_idx\[5\] = 6"),
        ("reorder_cache", dict(beam_idx=ids([0, -1, 2, 3, 4, 5], device)), IndexError, r"beam_idx\[1\] = -1"),
        ("reorder_cache", dict(beam_idx=ids(range(POOL), device), check_bounds=None), TypeError, "check_bounds"),
        ("reorder_cache", dict(beam_idx=ids(range(POOL), "meta")), ValueError, "beam_idx must be on the cache"),
        ("copy_slots", dict(src=None, dst=three), TypeError, "src must be a torch.Tensor"),
        ("copy_slots", dict(src=three, dst=three.float()), TypeError, "dst must be an int64"),
        ("copy_slots", dict(src=three, dst=ids([0, 1], device)), ValueError, "src and dst must have the same length"),
        ("copy_slots", dict(src=three, dst=ids([3, 4, 6], device)), IndexError, r"dst\[2\] = 6"),
        ("copy_slots", dict(src=ids([0, 1, 2**62], device), dst=three), IndexError, r"src\[2\] = 4611686018427387904"),
        ("copy_slots", dict(src=three, dst=ids([4, 5, 4], device)), IndexError, "dst repeats row 4"),
        ("copy_slots", dict(src=three, dst=three, check_bounds="False"), TypeError, "check_bounds must be a bool"),
        ("reset_slots", dict(ids=1), TypeError, "ids must be a torch.Tensor"),
        ("reset_slots", dict(ids=ids([[1]], device)), ValueError, "ids must be 1-D"),
        ("reset_slots", dict(ids=ids([-2**63], device)), IndexError, r"ids\[0\] = -9223372036854775808"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_arguments_raise_naming_the_argument_before_any_write(device, gen, case):
    method, kwargs, error, message = _bad_calls(device)[case]
    cache = make_cache(device, gen)
    before = [b.clone() for b in buffers(cache)]
    with pytest.raises(error, match=message):
        getattr(cache, method)(**kwargs)
    assert_bits_equal(buffers(cache), before)


BAD_IDS = [POOL, -1, -2**63, 2**63 - 1, POOL + 1, -POOL]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("pairs", [[(1, 4), (POOL, 0), (2, -1), (3, 5)], [(POOL, 2), (0, 3)], [(-1, 2), (2, 2**63 - 1)],
                                   [(0, 1), (2**62, 1), (4, 1), (5, -2**63)], [(2, 3), (3, 2), (1, POOL)]],
                         ids=["mixed", "bad-first", "all-bad", "repeats", "swap"])
def test_copy_slots_without_checks_skips_bad_pairs(device, gen, pairs, compiled):
    """Issue 24: an out-of-range src or dst (checks off, or compiled) skips its pair; nothing half-written."""
    cache = make_cache(device, gen)
    before = [b.clone() for b in buffers(cache)]
    src, dst = ids([p[0] for p in pairs], device), ids([p[1] for p in pairs], device)
    run_without_checks(cache, "copy_slots", (src, dst), compiled)
    # The reference: plain indexing with the bad pairs removed, all sources read first, first dst wins.
    good = [(s, d) for s, d in pairs if 0 <= s < POOL and 0 <= d < POOL]
    expected = []
    for b in before:
        e = b.clone()
        done = set()
        for s, d in good:
            if d not in done:
                e[d] = b[s]
                done.add(d)
        expected.append(e)
    assert_bits_equal(buffers(cache), expected)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("rows", [[POOL, 2, -1, 4], [-2**63, 2**63 - 1], [0, POOL + 1, 0, -POOL], [-1]],
                         ids=["mixed", "all-bad", "repeats", "minus-one"])
def test_reset_slots_without_checks_skips_bad_ids(device, gen, rows, compiled):
    cache = make_cache(device, gen)
    before = [b.clone() for b in buffers(cache)]
    run_without_checks(cache, "reset_slots", (ids(rows, device),), compiled)
    expected = []
    for b in before:
        e = b.clone()
        for r in rows:
            if 0 <= r < POOL:
                e[r] = 0
        expected.append(e)
    assert_bits_equal(buffers(cache), expected)


def run_without_checks(cache, method, args, compiled):
    if not compiled:
        getattr(cache, method)(*args, check_bounds=False)
        return
    torch._dynamo.reset()
    # Compiled code skips the host check whatever check_bounds says: the default (True) is traced.
    torch.compile(lambda *a: getattr(cache, method)(*a), backend="aot_eager", fullgraph=True)(*args)


@pytest.mark.parametrize("kv_quantization", ["int8", "fp8_e4m3"])
def test_slot_methods_move_codes_and_scales_of_quantized_storage(device, gen, kv_quantization):
    """Quantized attention layers: codes (fp8 included, which CPU indexing lacks) and scales move with their
    rows, bit for bit, in reorder_cache, copy_slots and reset_slots."""
    meta = LightningCacheMetaData.create(batch_size=POOL, num_heads=2, key_dim=3, value_dim=5, max_length=7,
                                         device=device, kv_quantization=kv_quantization)
    cache = LightningCache.init_cache(2, meta, layer_kinds=minimax_layer_kinds(2, attention_every=2))
    attention = cache[1]
    attention.concatenate_to_cache(*(torch.randn(POOL, 4, 2, d, generator=gen).to(device) for d in (3, 3, 5)), None)
    cache[0].key_value.copy_(torch.randn(cache[0].key_value.shape, generator=gen).to(device))

    def state():
        rows = (attention.key_value, attention.index.view(POOL, 1), attention.scales, cache[0].key_value)
        return [bits(t).clone() for t in rows]  # each [POOL, ...]: bytes in the last dim

    before = state()
    assert before[0].any() and before[2].any()  # something to move
    cache.reorder_cache(ids([5, 4, 3, 2, 1, 0], device))
    assert all(torch.equal(a, b.flip(0)) for a, b in zip(state(), before))
    cache.copy_slots(ids([0, 1], device), ids([3, 0], device))  # rows 0, 1 now hold the original rows 5, 4
    expected = [b.flip(0) for b in before]
    for e in expected:
        e[3], e[0] = e[0].clone(), e[1].clone()
    assert all(torch.equal(a, e) for a, e in zip(state(), expected))
    cache.reset_slots(ids([2], device))
    for e in expected:
        e[2] = 0
    assert all(torch.equal(a, e) for a, e in zip(state(), expected))
