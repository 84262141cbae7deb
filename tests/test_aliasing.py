"""Aliased arguments (issue 24): every op that writes refuses a written tensor sharing memory with any
other argument it reads or writes, with a ValueError naming both, before anything is written.

The rule lives once in C++ (``check_no_overlap`` in csrc/validation.cpp, called from the preludes both
backends share), so the Python wrappers and the raw ``torch.ops`` calls are both checked here. The sweep
puts a view of each written tensor's bytes in the place of every other tensor argument (starting at the
same byte, and starting half-way in); disjoint views of one storage, including interleaved ones, must
still be accepted and give the result of separate tensors.
"""

from __future__ import annotations

import re

import pytest
import torch

import torch_lightning_cache as tlc
from conftest import randn

ops = torch.ops.lightning_cache
P, B, L, H, DK, DV, Q = 4, 3, 8, 2, 4, 3, 2


def _ids(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)


def _cache_args(device, gen, quantized, with_masks):
    args = dict(key_value=randn((P, L, H, DK + DV), gen, device=device), index=_ids([0, 3, 1, 2], device),
                key=randn((B, Q, H, DK), gen, device=device), value=randn((B, Q, H, DV), gen, device=device),
                slot_ids=_ids([2, 0, 3], device))
    if quantized:
        args["key_value"] = torch.randint(-100, 100, (P, L, H, DK + DV), generator=gen).to(torch.int8).to(device)
        args["scales"] = torch.rand((P, L, H, 2), generator=gen).to(device)
    if with_masks:
        args["attention_mask"] = torch.rand((B, L), generator=gen).lt(0.8).to(device)
        args["causal_mask"] = torch.ones(L, L, dtype=torch.bool).tril().to(device)
        args["token_type_ids"] = torch.randint(0, 2, (B, Q), generator=gen).to(device)
    return args


def _lightning_args(device, gen, op):
    args = dict(state=randn((P, H, DK, DV), gen, device=device), query=randn((B, Q, H, DK), gen, device=device),
                key=randn((B, Q, H, DK), gen, device=device), value=randn((B, Q, H, DV), gen, device=device),
                slopes=tlc.lightning_slopes(H).to(device), slot_ids=_ids([1, 3, 0], device))
    if op == "lightning_decode":
        args["step_states"] = torch.zeros(B, Q + 1, H, DK, DV, device=device)
    else:
        args["attention_mask"] = torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=torch.bool, device=device)
        args["checkpoints"] = torch.zeros(B, 1, H, DK, DV, device=device)
        args["checkpoint_every"] = Q
        args["block_size"] = 2
    return args


def _serving_args(device, gen, op):
    if op == "rewind_cache":
        return dict(index=_ids([5, 3, 7, 2], device), num_tokens=_ids([1, 2, 0], device),
                    slot_ids=_ids([0, 2, 3], device))
    return dict(state=randn((P, H, DK, DV), gen, device=device),
                step_states=randn((B, Q + 1, H, DK, DV), gen, device=device), num_accepted=_ids([0, 2, 1], device),
                slot_ids=_ids([3, 1, 2], device))


CU = [0, 1, 3, 4]  # packed (SPEC 11): three sequences of 1, 2 and 1 tokens
NUM_PAGES, PAGE_SIZE = 6, 4


def _paged_args(device, gen, quantized, concatenate):
    """A page pool of NUM_PAGES pages, each batch row owning two distinct pages."""
    args = dict(key_value=randn((NUM_PAGES, PAGE_SIZE, H, DK + DV), gen, device=device),
                index=_ids([0, 3, 5], device), key=randn((B, Q, H, DK), gen, device=device),
                value=randn((B, Q, H, DV), gen, device=device),
                block_tables=_ids([[4, 1], [0, 5], [2, 3]], device))
    if quantized:
        args["key_value"] = torch.randint(-100, 100, args["key_value"].shape, generator=gen).to(torch.int8).to(device)
        args["scales"] = torch.rand((NUM_PAGES, PAGE_SIZE, H, 2), generator=gen).to(device)
    if concatenate:
        args["is_causal"] = True
    return args


def _packed_args(device, gen, op):
    T = CU[-1]
    if op == "write_to_cache":
        return dict(key_value=randn((P, L, H, DK + DV), gen, device=device), index=_ids([0, 3, 1, 2], device),
                    key=randn((1, T, H, DK), gen, device=device), value=randn((1, T, H, DV), gen, device=device),
                    slot_ids=_ids([2, 0, 3], device), cu_seqlens=_ids(CU, device))
    return dict(state=randn((P, H, DK, DV), gen, device=device), query=randn((1, T, H, DK), gen, device=device),
                key=randn((1, T, H, DK), gen, device=device), value=randn((1, T, H, DV), gen, device=device),
                slopes=tlc.lightning_slopes(H).to(device), slot_ids=_ids([1, 3, 0], device),
                cu_seqlens=_ids(CU, device), checkpoints=torch.zeros(B, 2, H, DK, DV, device=device),
                checkpoint_every=1)


# op, setup, written arguments (every `!` of the op's schema in csrc/ops.cpp)
SETUPS = {
    "concatenate_to_cache": (lambda d, g: _cache_args(d, g, False, True), ("key_value", "index")),
    "concatenate_to_cache-int8": (lambda d, g: _cache_args(d, g, True, True), ("key_value", "index", "scales")),
    "write_to_cache": (lambda d, g: _cache_args(d, g, False, False), ("key_value", "index")),
    "write_to_cache-int8": (lambda d, g: _cache_args(d, g, True, False), ("key_value", "index", "scales")),
    "lightning_decode": (lambda d, g: _lightning_args(d, g, "lightning_decode"), ("state", "step_states")),
    "lightning_prefill": (lambda d, g: _lightning_args(d, g, "lightning_prefill"), ("state", "checkpoints")),
    "concatenate_to_cache-paged": (lambda d, g: _paged_args(d, g, False, True), ("key_value", "index")),
    "write_to_cache-paged": (lambda d, g: _paged_args(d, g, False, False), ("key_value", "index")),
    "write_to_cache-paged-int8": (lambda d, g: _paged_args(d, g, True, False), ("key_value", "index", "scales")),
    "write_to_cache-packed": (lambda d, g: _packed_args(d, g, "write_to_cache"), ("key_value", "index")),
    "lightning_prefill-packed": (lambda d, g: _packed_args(d, g, "lightning_prefill"), ("state", "checkpoints")),
    "rewind_cache": (lambda d, g: _serving_args(d, g, "rewind_cache"), ("index",)),
    "lightning_accept": (lambda d, g: _serving_args(d, g, "lightning_accept"), ("state",)),
}
TENSOR_ARGS = {  # every tensor argument of each setup (the sweep's targets)
    name: [k for k, v in setup(torch.device("cpu"), torch.Generator().manual_seed(0)).items()
           if isinstance(v, torch.Tensor)]
    for name, (setup, _) in SETUPS.items()
}
PAIRS = [(op, w, r) for op, (_, written) in SETUPS.items() for w in written for r in TENSOR_ARGS[op] if r != w]


def _call(op, entry, args):
    fn = getattr(tlc if entry == "wrapper" else ops, op.split("-")[0])
    return fn(**args)


def _bytes_of(t):
    return t.detach().contiguous().view(-1).view(torch.uint8).cpu().clone()


def _carve(written, other, offset):
    """``(w, r)``: copies of ``written`` and ``other`` living in one byte buffer, ``r`` starting ``offset``
    bytes after ``w`` (so they overlap when ``offset`` is inside ``w``)."""
    wbytes, rbytes = written.numel() * written.element_size(), other.numel() * other.element_size()
    buffer = torch.zeros(max(wbytes, offset + rbytes) + 16, dtype=torch.uint8, device=written.device)
    w = buffer[:wbytes].view(written.dtype).view(written.shape)
    r = buffer[offset:offset + rbytes].view(other.dtype).view(other.shape)
    w.copy_(written)
    r.copy_(other)  # where they overlap, r's bytes win (the op must not read anything anyway)
    return w, r


def _name_in(name, message):
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message) is not None


@pytest.mark.parametrize("entry", ["wrapper", "op"])
@pytest.mark.parametrize("start", ["same-start", "half-way"])
@pytest.mark.parametrize("op,written,other", PAIRS, ids=[f"{o}:{w}~{r}" for o, w, r in PAIRS])
def test_written_argument_overlapping_another_is_refused(device, gen, op, written, other, start, entry):
    setup, _ = SETUPS[op]
    args = setup(device, gen)
    wbytes = args[written].numel() * args[written].element_size()
    offset = 0 if start == "same-start" else wbytes // 2 // 8 * 8
    args[written], args[other] = _carve(args[written], args[other], offset)
    before = {k: _bytes_of(v) for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError) as raised:
        _call(op, entry, args)
    message = str(raised.value)
    assert _name_in(written, message) and _name_in(other, message), message
    assert "shares memory" in message
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(_bytes_of(v), before[k]), f"{k} was modified"


@pytest.mark.parametrize("op,written,other", PAIRS, ids=[f"{o}:{w}~{r}" for o, w, r in PAIRS])
def test_disjoint_views_of_one_storage_are_accepted(device, gen, op, written, other):
    setup, writes = SETUPS[op]
    args = setup(device, gen)
    separate = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    wbytes = args[written].numel() * args[written].element_size()
    args[written], args[other] = _carve(args[written], args[other], (wbytes + 15) // 8 * 8)  # right after w
    out, expected = _call(op, "op", args), _call(op, "op", separate)
    if isinstance(out, torch.Tensor):
        assert torch.equal(_bytes_of(out), _bytes_of(expected))
    for k in writes:
        assert torch.equal(_bytes_of(args[k]), _bytes_of(separate[k])), k


def test_interleaved_disjoint_views_are_accepted(device, gen):
    """A key whose rows sit on both sides of the state (same storage, no shared byte) is fine."""
    state_elems = 2 * H * DK * DV
    base = torch.zeros(3, state_elems, device=device)
    state = base[1].view(2, H, DK, DV)
    state.copy_(randn((2, H, DK, DV), gen, device=device))
    base[0::2, :H * DK].copy_(randn((2, H * DK), gen, device=device))
    key = base[0::2, :H * DK].view(2, 1, H, DK)  # rows 0 and 2 of base: the state (row 1) lies between them
    q, v = randn((2, 1, H, DK), gen, device=device), randn((2, 1, H, DV), gen, device=device)
    slopes = tlc.lightning_slopes(H).to(device)
    state_copy, key_copy = state.clone(), key.clone()
    out = tlc.lightning_decode(state, q, key, v, slopes)
    expected = tlc.lightning_decode(state_copy, q, key_copy, v, slopes)
    assert torch.equal(out, expected) and torch.equal(state, state_copy)


# --------------------------------------------------------------------------- the cases the issue names


def _assert_refused(fn, names, *untouched):
    before = [_bytes_of(t) for t in untouched]
    with pytest.raises(ValueError, match="shares memory|overlap") as raised:
        fn()
    for name in names:
        assert _name_in(name, str(raised.value)), str(raised.value)
    for t, b in zip(untouched, before):
        assert torch.equal(_bytes_of(t), b)


def test_step_states_overlapping_state(device, gen):
    state = randn((8, H, DK, DV), gen, device=device)
    steps = state.view(-1)[:2 * (Q + 1) * H * DK * DV].view(2, Q + 1, H, DK, DV)  # index 0 would be read late
    x = randn((2, Q, H, DK), gen, device=device)
    v = randn((2, Q, H, DV), gen, device=device)
    _assert_refused(lambda: tlc.lightning_decode(state, x, x, v, tlc.lightning_slopes(H).to(device),
                                                 slot_ids=_ids([5, 6], device), step_states=steps),
                    ["state", "step_states"], state)


def test_key_is_a_view_into_state(device, gen):
    state = randn((B, H, DK, DV), gen, device=device)
    key = state[..., 0].unsqueeze(1)  # [B, 1, H, DK], strided
    q, v = randn((B, 1, H, DK), gen, device=device), randn((B, 1, H, DV), gen, device=device)
    for fn in (tlc.lightning_decode, tlc.lightning_prefill):
        _assert_refused(lambda fn=fn: fn(state, q, key, v, tlc.lightning_slopes(H).to(device)), ["state", "key"],
                        state)


def test_checkpoints_overlapping_key(device, gen):
    state = randn((B, H, DK, DV), gen, device=device)
    key = randn((B, 8, H, DK), gen, device=device)
    checkpoints = key.view(-1)[:B * 2 * H * DK * DV].view(B, 2, H, DK, DV)
    q, v = randn((B, 8, H, DK), gen, device=device), randn((B, 8, H, DV), gen, device=device)
    _assert_refused(lambda: tlc.lightning_prefill(state, q, key, v, tlc.lightning_slopes(H).to(device),
                                                  checkpoints=checkpoints, checkpoint_every=4),
                    ["checkpoints", "key"], state, key)


def test_step_states_overlapping_query(device, gen):
    state = randn((B, H, DK, DV), gen, device=device)
    query = randn((B, 16, H, DK), gen, device=device)
    steps = query.view(-1)[:B * 2 * H * DK * DV].view(B, 2, H, DK, DV)
    k, v = randn((B, 1, H, DK), gen, device=device), randn((B, 1, H, DV), gen, device=device)
    _assert_refused(lambda: tlc.lightning_decode(state, query[:, :1], k, v, tlc.lightning_slopes(H).to(device),
                                                 step_states=steps),
                    ["step_states", "query"], state, query)


@pytest.mark.parametrize("op", ["concatenate_to_cache", "write_to_cache"])
def test_key_value_that_are_views_of_key_value(device, gen, op):
    key_value, index = tlc.init_kv_cache(P, L, H, DK, DV, device=device)
    key_value.copy_(randn(key_value.shape, gen, device=device))
    fn = getattr(tlc, op)
    _assert_refused(lambda: fn(key_value, index, key_value[:, 2:4, :, :DK], key_value[:, 2:4, :, DK:]),
                    ["key_value", "key"], key_value, index)
    _assert_refused(lambda: fn(key_value, index, randn((P, 2, H, DK), gen, device=device),
                               key_value[:, 5:7, :, DK:]), ["key_value", "value"], key_value, index)


def test_written_tensor_with_overlapping_elements(device, gen):
    index = _ids([4], device).expand(P)  # one int64 seen as four rows
    _assert_refused(lambda: tlc.rewind_cache(index, _ids([1, 1, 1, 1], device)), ["index"], index)
    state = randn((1, H, DK, DV), gen, device=device).expand(B, H, DK, DV)
    steps = randn((B, 2, H, DK, DV), gen, device=device)
    _assert_refused(lambda: tlc.lightning_accept(state, steps, _ids([1, 0, 1], device)), ["state"], state)


def test_num_tokens_that_is_the_index(device):
    index = _ids([5, 3, 7, 2], device)
    _assert_refused(lambda: tlc.rewind_cache(index, index), ["index", "num_tokens"], index)


# --------------------------------------------------------------------------- cache methods


@pytest.mark.parametrize("method", ["reorder_cache", "copy_slots", "reset_slots"])
def test_cache_methods_read_ids_before_writing(device, gen, method):
    """Ids that are a view of a cache buffer (a layer's index) are read as they were before the call."""
    meta = tlc.LightningCacheMetaData.create(batch_size=P, num_heads=H, key_dim=DK, value_dim=DV, max_length=L,
                                             dtype=torch.float32, device=device)
    cache = tlc.LightningCache.init_cache(2, meta, layer_kinds=["attention", "attention"])
    for view in cache:
        view.key_value.copy_(randn(view.key_value.shape, gen, device=device))
    cache[0].index.copy_(_ids([3, 0, 2, 1], device))  # a permutation: valid ids
    cache[1].index.copy_(_ids([1, 2, 3, 0], device))
    twin = tlc.LightningCache.init_cache(2, meta, layer_kinds=["attention", "attention"])
    for a, b in zip(twin, cache):
        a.key_value.copy_(b.key_value)
        a.index.copy_(b.index)
    aliased = cache[0].index  # the ids ARE layer 0's positions, written by the call
    copied = aliased.clone()
    args = {"reorder_cache": lambda ids: (ids,), "copy_slots": lambda ids: (ids[:2], ids[2:]),
            "reset_slots": lambda ids: (ids[:2],)}[method]
    getattr(cache, method)(*args(aliased))
    getattr(twin, method)(*args(copied))
    for a, b in zip(cache, twin):
        assert torch.equal(a.key_value, b.key_value) and torch.equal(a.index, b.index)
