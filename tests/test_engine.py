"""The serving engine's pieces: the page allocator (torch_lightning_cache/paging.py), the token-budget
scheduler (cli/engine.py) and HybridLM's packed forward over pages (models/hybrid.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torch_lightning_cache.cli.engine import TokenBudgetScheduler
from torch_lightning_cache.models import hybrid
from torch_lightning_cache.ops import KV_QUANTIZATION
from torch_lightning_cache.models.hybrid import HybridConfig, HybridLM, PackedBatch
from torch_lightning_cache.paging import OutOfPages, PageAllocator, pages_for

# --------------------------------------------------------------------------- page allocator


def test_alloc_share_free_refcounts():
    pool = PageAllocator(4)
    a = pool.alloc(2)
    assert a == [0, 1] and pool.num_free == 2 and all(pool.refcount(p) == 1 for p in a)
    shared = pool.share(a[:1])  # a second request points at the prefix page
    assert shared == [0] and pool.refcount(0) == 2
    pool.free(a)  # the first holder finishes: page 1 is free again, page 0 is still held
    assert pool.refcount(0) == 1 and pool.refcount(1) == 0 and pool.num_free == 3
    assert pool.alloc(1) == [1]  # lowest free id first
    pool.free(shared)
    assert pool.refcount(0) == 0 and pool.num_used == 1 and pool.peak_used == 2


def test_alloc_misuse_is_an_error_and_changes_nothing():
    pool = PageAllocator(3)
    pages = pool.alloc(2)
    with pytest.raises(OutOfPages, match="2 pages requested, 1 free"):
        pool.alloc(2)
    assert pool.num_free == 1
    with pytest.raises(ValueError, match="freed 2 times but has 1"):
        pool.free([pages[0], pages[0]])  # double free within one call
    assert pool.refcount(pages[0]) == 1
    pool.free([pages[0]])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([pages[0]])  # double free across calls
    with pytest.raises(ValueError, match="not allocated"):
        pool.share([pages[0]])
    with pytest.raises(ValueError, match="outside the pool"):
        pool.free([3])
    with pytest.raises(ValueError, match="outside the pool"):
        pool.refcount(-1)
    with pytest.raises(TypeError, match="ints"):
        pool.share([1.0])
    with pytest.raises(TypeError, match="num_pages"):
        PageAllocator("4")
    assert pool.refcount(pages[1]) == 1 and pool.num_free == 2


def test_check_writable_refuses_shared_pages():
    pool = PageAllocator(2)
    (page,) = pool.alloc(1)
    pool.check_writable(page)
    pool.share([page])
    with pytest.raises(ValueError, match="shared by 2 holders"):
        pool.check_writable(page)
    with pytest.raises(ValueError, match="not allocated"):
        pool.check_writable(1)


def test_pages_for():
    assert [pages_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="page_size"):
        pages_for(1, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "share", "free"]), st.integers(0, 5), st.integers(0, 10**6)),
                max_size=60))
def test_allocator_property_no_double_free_no_leak(actions):
    """Random holders allocating, sharing and freeing: the allocator's counts always equal the holders' own
    bookkeeping, a page is free exactly when nobody holds it, misuse raises without changing anything, and
    when every holder has let go every page is free (no leak)."""
    pool = PageAllocator(8)
    holders: list[list[int]] = []
    for action, count, pick in actions:
        if action == "alloc":
            if count > pool.num_free:
                with pytest.raises(OutOfPages):
                    pool.alloc(count)
            else:
                holders.append(pool.alloc(count))
        elif action == "share" and holders:
            source = holders[pick % len(holders)]
            holders.append(pool.share(source[: count]))
        elif action == "free" and holders:
            pages = holders.pop(pick % len(holders))
            pool.free(pages)
            if pages:  # freeing the same list again is a double free for at least one page... unless re-held
                still = {p for p in pages if any(p in h for h in holders)}
                if still != set(pages):
                    with pytest.raises(ValueError):
                        pool.free(pages)
        expected = [sum(h.count(p) for h in holders) for p in range(8)]
        assert [pool.refcount(p) for p in range(8)] == expected
        assert pool.num_free == expected.count(0)
    for pages in holders:
        pool.free(pages)
    assert pool.num_free == 8 and all(pool.refcount(p) == 0 for p in range(8))


# --------------------------------------------------------------------------- packed forward over pages

CONFIG = HybridConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, head_dim=16, intermediate_size=48,
                      max_length=64, block_size=8)


def _alone(model: HybridLM, row: int, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Last-token logits after each chunk of one request, fed to its own contiguous cache row."""
    return [model(chunk[None], row_start=row)[0, -1] for chunk in chunks]


@pytest.mark.parametrize("with_paged_ops,kv_quantization",
                         [(False, None), (True, None), (True, "int8"), (True, "fp8_e4m3")],
                         ids=["existing-ops", "paged-packed-ops", "paged-int8", "paged-fp8"])
@pytest.mark.parametrize("page_size", [4, 16])
def test_packed_paged_forward_equals_each_request_alone(page_size, with_paged_ops, kv_quantization, monkeypatch):
    """Three requests served in packed steps (prefill chunks and decodes mixed in one forward, pages scattered
    and a prefix page shared between two of them) give the logits of each request fed alone to the contiguous
    cache, chunk by chunk; with quantized K|V, pages of codes against quantized contiguous rows."""
    if with_paged_ops and not hybrid.PAGED_PACKED_OPS:
        pytest.skip("the built operator library has no block_tables / cu_seqlens arguments")
    monkeypatch.setattr(hybrid, "PAGED_PACKED_OPS", with_paged_ops)
    torch.manual_seed(0)
    config = dataclasses.replace(CONFIG, kv_quantization=kv_quantization)
    packed = HybridLM(config, batch_size=4, seed=3).eval()
    alone = HybridLM(config, batch_size=3, seed=3).eval()
    packed.init_pages(num_pages=32, page_size=page_size)
    assert all(layer.mixer.paged_ops == with_paged_ops for layer in packed.layers)  # the path under test
    if kv_quantization is not None:
        assert all(pool.dtype == KV_QUANTIZATION[kv_quantization] for pool in packed.pages)
    prefix = torch.randint(0, 64, (2 * page_size,))  # two full pages shared by requests 0 and 2
    prompts = [torch.cat([prefix, torch.randint(0, 64, (5,))]), torch.randint(0, 64, (11,)),
               torch.cat([prefix, torch.randint(0, 64, (3,))])]
    # Steps: (request, tokens) per sequence, decodes first. Request 2 arrives after request 0 has written the
    # prefix; it starts from request 0's prefix pages and the lightning states after the prefix.
    pages = PageAllocator(32)
    # Pages handed out in a scrambled order so that block tables are not the identity.
    pages.alloc(3)
    tables: list[list[int]] = [[], [], []]
    position = [0, 0, 0]
    slots = [2, 0, 3]  # state rows of the packed model
    feed = [list(p.tolist()) for p in prompts]
    expected_chunks: list[list[torch.Tensor]] = [[], [], []]
    prefix_states: dict[int, torch.Tensor] = {}
    got: list[list[torch.Tensor]] = [[], [], []]
    plan = [
        [(0, 2 * page_size), (1, 6)],  # prefill chunks: request 0's prefix, part of request 1
        [(0, 5), (1, 5)],  # the rest of both prompts
        [(0, 1), (1, 1), (2, 3)],  # two decodes, request 2's own tokens after the shared prefix
        [(0, 1), (1, 1), (2, 1)],  # three decodes
    ]
    for step, sequences in enumerate(plan):
        if step == 2:  # request 2: prefix pages shared by reference, lightning states copied from request 0's
            tables[2] = pages.share(tables[0][:2])
            position[2] = 2 * page_size
            feed[2] = feed[2][2 * page_size:]
            for layer in packed.layers:
                if layer.kind != "attention":
                    layer.mixer.state[slots[2]] = prefix_states[id(layer)]
        lengths, starts, ids = [], [], []
        for r, n in sequences:
            need = pages_for(position[r] + n, page_size) - len(tables[r])
            new = pages.alloc(need)
            for page in new:
                pages.check_writable(page)
            tables[r] += new
            tokens = torch.tensor(feed[r][:n])
            feed[r] = feed[r][n:]
            lengths.append(n)
            starts.append(position[r])
            ids.append(tokens)
            expected_chunks[r].append(tokens)
            position[r] += n
        batch = PackedBatch.build(lengths, starts, [slots[r] for r, _ in sequences], [tables[r] for r, _ in sequences],
                                  page_size)
        with torch.inference_mode():
            logits = packed.forward_packed(torch.cat(ids)[None], batch)
        for (r, _), row in zip(sequences, logits):
            got[r].append(row)
        if step == 0:  # the states after request 0's prefix, saved as the prefix cache would
            prefix_states.update({id(layer): layer.mixer.state[slots[0]].clone() for layer in packed.layers
                                  if layer.kind != "attention"})
        for r, _ in sequences:  # decode steps feed the greedy token
            if not feed[r]:
                feed[r] = [int(got[r][-1].argmax())]
    # Request 2 alone: the whole prefix then its own chunks (its first packed chunk started after the prefix).
    expected_chunks[2] = [prefix] + expected_chunks[2]
    with torch.inference_mode():
        for r in range(3):
            reference = _alone(alone, r, expected_chunks[r])
            if r == 2:
                reference = reference[1:]
            assert len(reference) == len(got[r])
            for a, b in zip(got[r], reference):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert pages.refcount(tables[0][0]) == 2 and pages.refcount(tables[1][0]) == 1
    if kv_quantization is not None:  # the pages written hold codes and their scales
        for pool, scales in zip(packed.pages, packed.page_scales):
            written = min(page_size, position[1])  # request 1's first page: its first tokens
            assert pool[tables[1][0], :written].abs().float().sum() > 0
            assert (scales[tables[1][0], :written] > 0).all()


def test_quantized_pages_need_the_paged_ops(monkeypatch):
    monkeypatch.setattr(hybrid, "PAGED_PACKED_OPS", False)
    model = HybridLM(dataclasses.replace(CONFIG, kv_quantization="int8"), batch_size=2)
    with pytest.raises(ValueError, match="quantized pages .*need the paged and packed ops"):
        model.init_pages(num_pages=4, page_size=4)


# --------------------------------------------------------------------------- token-budget scheduler


class _Item:
    def __init__(self, name, prefill_left, chunk_limit=None):
        self.name, self.prefill_left = name, prefill_left
        self.chunk_limit = prefill_left if chunk_limit is None else chunk_limit


def _names(plan):
    return [(item.name, n) for item, n in plan]


def test_scheduler_decodes_first_then_chunked_prefills_in_arrival_order():
    scheduler = TokenBudgetScheduler(budget=10)
    running = [_Item("p0", 7), _Item("d0", 0), _Item("p1", 9), _Item("d1", 0)]
    # Both decodes (1 token each) first, then p0 whole (7), then p1 gets the last token of the budget.
    assert _names(scheduler.plan(running)) == [("d0", 1), ("d1", 1), ("p0", 7), ("p1", 1)]


def test_scheduler_respects_the_budget_and_chunk_limits():
    scheduler = TokenBudgetScheduler(budget=3)
    assert _names(scheduler.plan([_Item(f"d{i}", 0) for i in range(5)])) == [("d0", 1), ("d1", 1), ("d2", 1)]
    # A chunk limit (the prefix writer stops where the cached prefix ends) caps that request's chunk only.
    assert _names(scheduler.plan([_Item("p0", 8, chunk_limit=2), _Item("p1", 5)])) == [("p0", 2), ("p1", 1)]
    assert scheduler.plan([]) == []
    with pytest.raises(ValueError, match="budget"):
        TokenBudgetScheduler(0)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.lists(st.tuples(st.integers(0, 30), st.integers(1, 30)), max_size=12))
def test_scheduler_property(budget, items):
    """Never over budget; every decode before every prefill; a prefill chunk never exceeds what is left or its
    limit; requests keep arrival order within each kind; no request is scheduled twice; work is left undone only
    when the budget is used up."""
    running = [_Item(i, left, limit) for i, (left, limit) in enumerate(items)]
    plan = TokenBudgetScheduler(budget).plan(running)
    assert sum(n for _, n in plan) <= budget
    kinds = [item.prefill_left == 0 for item, _ in plan]
    assert kinds == sorted(kinds, reverse=True)
    for item, n in plan:
        assert n == 1 if item.prefill_left == 0 else 1 <= n <= min(item.prefill_left, item.chunk_limit)
    names = [item.name for item, _ in plan]
    assert len(set(names)) == len(names)
    decodes = [n for n, decode in zip(names, kinds) if decode]
    prefills = [n for n, decode in zip(names, kinds) if not decode]
    assert decodes == sorted(decodes) and prefills == sorted(prefills)
    if len(plan) < len(running):
        assert sum(n for _, n in plan) == budget
