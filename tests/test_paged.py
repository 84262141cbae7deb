"""Paged K|V (SPEC 11): init_paged_kv_cache and block_tables= on concatenate_to_cache, write_to_cache
and cached_attention. Through block tables every op must give what it gives on a dense cache holding
the same tokens; shared prefix pages are read by reference; bad entries and contested page slots are
IndexErrors naming block_tables with checks (nothing written) and skipped rows / hidden columns
without, never an access outside the pool."""

from __future__ import annotations

import pytest
import torch
from conftest import randn
from reference import ref_cached_attention, ref_cached_attention_rows, ref_paged_to_dense, ref_paged_write

import torch_lightning_cache as tlc

_ops = torch.ops.lightning_cache
INT64_MAX = 2**63 - 1
H, DK, DV = 2, 8, 8
QUANTIZED = ("int8", "fp8_e4m3")


def make_pool(storage, num_pages, page_size, heads=H):
    if storage in QUANTIZED:
        return tlc.init_paged_kv_cache(num_pages, page_size, heads, DK, DV, kv_quantization=storage)
    return tlc.init_paged_kv_cache(num_pages, page_size, heads, DK, DV, dtype=getattr(torch, storage)), None


def make_dense(storage, B, L, heads=H):
    if storage in QUANTIZED:
        return tlc.init_quantized_kv_cache(B, L, heads, DK, DV, storage)
    kv, index = tlc.init_kv_cache(B, L, heads, DK, DV, dtype=getattr(torch, storage))
    return kv, index, None


def random_tables(gen, B, max_pages, num_pages, dtype=torch.int64):
    """Distinct pages per row (a random permutation of the pool)."""
    return torch.randperm(num_pages, generator=gen)[:B * max_pages].view(B, max_pages).to(dtype)


def bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def test_init_paged_kv_cache():
    kv = tlc.init_paged_kv_cache(5, 16, 2, 8, 4)
    assert kv.shape == (5, 16, 2, 12) and kv.dtype == torch.get_default_dtype() and not kv.any()
    assert tlc.init_paged_kv_cache(5, 16, 2, 8, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
    for storage, dtype in (("int8", torch.int8), ("fp8_e4m3", torch.float8_e4m3fn)):
        codes, scales = tlc.init_paged_kv_cache(5, 16, 2, 8, 4, kv_quantization=storage)
        assert codes.shape == (5, 16, 2, 12) and codes.dtype == dtype and scales.shape == (5, 16, 2, 2)
        assert scales.dtype == torch.float32 and not scales.any()
    with pytest.raises(ValueError, match="kv_quantization must be None or one of"):
        tlc.init_paged_kv_cache(5, 16, 2, 8, 4, kv_quantization="int4")
    with pytest.raises(TypeError, match="page_size must be an int"):
        tlc.init_paged_kv_cache(5, 16.0, 2, 8, 4)
    with pytest.raises(TypeError, match="kv_quantization must be a str"):
        tlc.init_paged_kv_cache(5, 16, 2, 8, 4, kv_quantization=8)
    with pytest.raises(ValueError, match="page_size must be positive"):
        tlc.init_paged_kv_cache(5, 0, 2, 8, 4)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_paged_writes_equal_dense_writes(gen, storage, page_size, table_dtype):
    B, max_pages = 3, 12 // page_size + 1
    L, N = max_pages * page_size, B * max_pages + 4
    pages, page_scales = make_pool(storage, N, page_size)
    tables = random_tables(gen, B, max_pages, N, table_dtype)
    index = torch.zeros(B, dtype=torch.int64)
    dense, dense_index, dense_scales = make_dense(storage, B, L)
    for q in (L // 3, 1, 2):
        k, v = randn((B, q, H, DK), gen), randn((B, q, H, DV), gen)
        _, _, mask = tlc.concatenate_to_cache(pages, index, k, v, is_causal=True, block_tables=tables,
                                              scales=page_scales)
        _, _, want_mask = tlc.concatenate_to_cache(dense, dense_index, k, v, is_causal=True, scales=dense_scales)
        assert torch.equal(mask, want_mask) and torch.equal(index, dense_index)
    assert torch.equal(bits(ref_paged_to_dense(pages, tables)), bits(dense))
    if page_scales is not None:
        assert torch.equal(ref_paged_to_dense(page_scales, tables), dense_scales)
    # Packed writes through the tables too.
    lengths = [2, 0, 3]
    k, v = randn((1, 5, H, DK), gen), randn((1, 5, H, DV), gen)
    cu = torch.tensor([0, 2, 2, 5])
    tlc.write_to_cache(pages, index, k, v, scales=page_scales, block_tables=tables, cu_seqlens=cu)
    tlc.write_to_cache(dense, dense_index, k, v, scales=dense_scales, cu_seqlens=cu)
    assert torch.equal(index, dense_index) and index.tolist() == [L // 3 + 3 + l for l in lengths]
    assert torch.equal(bits(ref_paged_to_dense(pages, tables)), bits(dense))


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("q", [1, 3])
def test_paged_attention_equals_dense(gen, storage, group, q):
    B, page_size, max_pages = 3, 4, 5
    L, N = page_size * max_pages, B * max_pages + 2
    pages, page_scales = make_pool(storage, N, page_size)
    tables = random_tables(gen, B, max_pages, N)
    index = torch.tensor([0, 7, L - q])
    k, v = randn((B, L, H, DK), gen), randn((B, L, H, DV), gen)
    dense, dense_index, dense_scales = make_dense(storage, B, L)
    # Fill both with the same tokens (every position), then attend with q new queries per row.
    tlc.write_to_cache(pages, torch.zeros(B, dtype=torch.int64), k, v, scales=page_scales, block_tables=tables)
    tlc.write_to_cache(dense, dense_index, k, v, scales=dense_scales)
    query = randn((B, q, H * group, DK), gen)
    valid = index + q
    got = tlc.cached_attention(query, pages, key_dim=DK, scales=page_scales, block_tables=tables,
                               cache_seqlens=valid)
    want = tlc.cached_attention(query, dense, key_dim=DK, scales=dense_scales, cache_seqlens=valid)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    ref = ref_cached_attention_rows(query, pages, DK, valid, block_tables=tables, scales=page_scales)
    tol = 2e-2 if storage == "bfloat16" else 1e-4
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    # With a mask (some columns hidden at random) instead of cache_seqlens.
    mask = torch.rand(B, 1, q, L, generator=gen) < 0.6
    got = tlc.cached_attention(query, pages, mask, DK, scales=page_scales, block_tables=tables)
    want = tlc.cached_attention(query, dense, mask, DK, scales=dense_scales)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    unchecked = tlc.cached_attention(query, pages, mask, DK, scales=page_scales, block_tables=tables,
                                     check_bounds=False)  # every entry in the pool: the mask is used as given
    torch.testing.assert_close(unchecked, want, rtol=1e-6, atol=1e-6)
    # Packed queries through the tables.
    lengths = [q, 0, 1]
    cu = torch.tensor([0, q, q, q + 1])
    packed_query = randn((1, q + 1, H * group, DK), gen)
    got = tlc.cached_attention(packed_query, pages, key_dim=DK, scales=page_scales, block_tables=tables,
                               cu_seqlens=cu, cache_seqlens=valid)
    ref = ref_cached_attention_rows(packed_query, pages, DK, valid, cu_seqlens=cu, block_tables=tables,
                                    scales=page_scales)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    assert lengths[1] == 0


def test_long_rows_split_columns(gen):
    """L = 8192 through pages of 64 (the CPU kernel splits the columns): equals the dense call."""
    B, page_size, L = 2, 64, 8192
    max_pages = L // page_size
    N = B * max_pages
    pages = randn((N, page_size, H, DK + DV), gen)
    tables = random_tables(gen, B, max_pages, N)
    dense = ref_paged_to_dense(pages, tables)
    query = randn((B, 1, 4 * H, DK), gen)
    valid = torch.tensor([L, 5000])
    got = tlc.cached_attention(query, pages, key_dim=DK, block_tables=tables, cache_seqlens=valid)
    want = tlc.cached_attention(query, dense, key_dim=DK, cache_seqlens=valid)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_shared_prefix_pages_by_reference(gen):
    """Two requests point at the same prefix pages (no copy); each writes only its own pages, and each
    attends exactly as a dense row holding prefix + its own tokens."""
    page_size, prefix_pages, own_pages = 4, 2, 2
    prefix = prefix_pages * page_size
    N = prefix_pages + 2 * own_pages
    pages = tlc.init_paged_kv_cache(N, page_size, H, DK, DV)
    tables = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 5]])
    # The owner (row 0) writes the prefix once.
    k0, v0 = randn((1, prefix, H, DK), gen), randn((1, prefix, H, DV), gen)
    tlc.write_to_cache(pages, torch.zeros(1, dtype=torch.int64), k0, v0, block_tables=tables[:1])
    before_prefix = pages[:2].clone()
    # Both rows continue from the prefix: disjoint page slots, one call.
    index = torch.tensor([prefix, prefix])
    k, v = randn((2, 3, H, DK), gen), randn((2, 3, H, DV), gen)
    tlc.write_to_cache(pages, index, k, v, block_tables=tables)
    assert torch.equal(pages[:2], before_prefix)  # the shared pages are not touched
    dense = torch.cat([torch.cat([k0[0], v0[0]], -1).expand(2, -1, -1, -1), torch.cat([k, v], -1)], dim=1)
    query = randn((2, 1, H, DK), gen)
    got = tlc.cached_attention(query, pages, key_dim=DK, block_tables=tables, cache_seqlens=index)
    mask = torch.ones(2, 1, 1, prefix + 3, dtype=torch.bool)
    want = ref_cached_attention(query, dense, mask, DK)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Writing into the shared prefix from both rows in one call is a contested slot.
    with pytest.raises(IndexError, match="block_tables: rows 0 and 1 both write page 0 slot 2"):
        tlc.write_to_cache(pages, torch.tensor([2, 2]), k[:, :1], v[:, :1], block_tables=tables)


@pytest.mark.parametrize("bad", [-1, 6, INT64_MAX, -(2**63)])
def test_write_entry_outside_pool(gen, bad):
    page_size, N = 4, 6
    pages = randn((N, page_size, H, DK + DV), gen)
    tables = torch.tensor([[0, 1, bad], [2, 3, 4]])
    index = torch.tensor([6, 1])  # row 0 writes positions 6..8: pages 1 and `bad`
    k, v = randn((2, 3, H, DK), gen), randn((2, 3, H, DV), gen)
    before, index_before = pages.clone(), index.clone()
    with pytest.raises(IndexError, match=r"block_tables\[0, 2\] = .* is outside the page pool \[0, 6\)"):
        tlc.write_to_cache(pages, index, k, v, block_tables=tables)
    assert torch.equal(pages, before) and torch.equal(index, index_before)
    tlc.write_to_cache(pages, index, k, v, block_tables=tables, check_bounds=False)
    assert index.tolist() == [6, 4]  # row 0 skipped whole: not even its first, valid page is written
    assert torch.equal(pages[1], before[1]) and torch.equal(pages[0], before[0])
    assert torch.equal(pages[2, 1:4, :, :DK], k[1])
    # An entry the write does not need may hold anything.
    index = torch.tensor([0, 1])
    tlc.write_to_cache(pages, index, k, v, block_tables=tables)
    assert index.tolist() == [3, 4]


def test_contested_slot_first_row_keeps_it(gen):
    page_size, N = 4, 4
    pages = randn((N, page_size, H, DK + DV), gen)
    tables = torch.tensor([[0, 1], [2, 1], [3, 3]])  # rows 0 and 1 share page 1; row 2 maps two positions to page 3
    index = torch.tensor([4, 5, 2])  # row 0 writes page 1 slots 0..1, row 1 slots 1..2: slot 1 contested
    k, v = randn((3, 2, H, DK), gen), randn((3, 2, H, DV), gen)
    before = pages.clone()
    with pytest.raises(IndexError, match="rows 0 and 1 both write page 1 slot 1"):
        tlc.write_to_cache(pages, index, k, v, block_tables=tables)
    assert torch.equal(pages, before)
    tlc.write_to_cache(pages, index, k, v, block_tables=tables, check_bounds=False)
    assert index.tolist() == [6, 5, 4]  # row 1 skipped whole; row 2 (positions 2, 3 of page 3) is fine
    assert torch.equal(pages[1, :2, :, :DK], k[0]) and torch.equal(pages[1, 2:], before[1, 2:])
    # One row whose positions meet the same page slot twice (table [3, 3]: positions 0 and 4) is refused too.
    with pytest.raises(IndexError, match="rows 0 and 0 both write page 3 slot 0"):
        tlc.write_to_cache(pages, torch.tensor([0]), randn((1, 5, H, DK), gen), randn((1, 5, H, DV), gen),
                           block_tables=torch.tensor([[3, 3]]))


def test_block_tables_argument_errors(gen):
    pages = tlc.init_paged_kv_cache(4, 4, H, DK, DV)
    tables = torch.tensor([[0, 1], [2, 3]])
    index = torch.zeros(2, dtype=torch.int64)
    k, v = randn((2, 1, H, DK), gen), randn((2, 1, H, DV), gen)
    with pytest.raises(ValueError, match="ring=True cannot be used with block_tables"):
        tlc.write_to_cache(pages, index, k, v, ring=True, block_tables=tables)
    with pytest.raises(ValueError, match="slot_ids cannot be used with block_tables"):
        tlc.concatenate_to_cache(pages, index, k, v, slot_ids=torch.tensor([0, 1]), block_tables=tables)
    with pytest.raises(ValueError, match="block_tables must be \\[batch, max_pages\\]"):
        tlc.write_to_cache(pages, index, k, v, block_tables=tables.view(-1))
    with pytest.raises(TypeError, match="block_tables must be int32 or int64"):
        tlc.write_to_cache(pages, index, k, v, block_tables=tables.float())
    with pytest.raises(ValueError, match="key has batch 2 but block_tables has batch 3"):
        tlc.write_to_cache(pages, torch.zeros(3, dtype=torch.int64), k, v, block_tables=torch.zeros(3, 2).long())
    with pytest.raises(ValueError, match="overflows int64"):
        tlc.write_to_cache(pages, index, k, v, block_tables=torch.zeros(2, 1).long().expand(2, 2**61))
    with pytest.raises(TypeError, match="block_tables must be"):
        tlc.write_to_cache(pages, index, k, v, block_tables=[[0, 1], [2, 3]])
    query = randn((2, 1, H, DK), gen)
    with pytest.raises(ValueError, match="slot_ids cannot be used with block_tables"):
        tlc.cached_attention(query, pages, key_dim=DK, block_tables=tables, cache_seqlens=torch.tensor([1, 1]),
                             slot_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="larger than the cache's capacity \\(8\\)"):
        tlc.cached_attention(query, pages, key_dim=DK, block_tables=tables, cache_seqlens=torch.tensor([9, 1]))


@pytest.mark.parametrize("bad", [-1, 4, INT64_MAX])
def test_attention_visible_column_outside_pool(gen, bad):
    page_size, N = 4, 4
    pages = randn((N, page_size, H, DK + DV), gen)
    tables = torch.tensor([[0, bad, 1], [2, 3, bad]])
    query = randn((2, 1, H, DK), gen)
    valid = torch.tensor([6, 8])  # row 0 sees positions 0..5: its bad page 1 (positions 4..7) is visible
    with pytest.raises(IndexError, match=r"block_tables\[0, 1\] = .* is outside the page pool"):
        tlc.cached_attention(query, pages, key_dim=DK, block_tables=tables, cache_seqlens=valid)
    got = tlc.cached_attention(query, pages, key_dim=DK, block_tables=tables, cache_seqlens=valid,
                               check_bounds=False)
    # Without checks the bad page's columns are hidden: row 0 attends to positions 0..3 only.
    dense = ref_paged_to_dense(pages, tables)
    mask = torch.zeros(2, 1, 1, 12, dtype=torch.bool)
    mask[0, 0, 0, :4] = True
    mask[1, 0, 0, :8] = True
    torch.testing.assert_close(got.double(), ref_cached_attention(query, dense, mask, DK), rtol=1e-5, atol=1e-5)
    # Row 1's bad entry is past what it sees: never read, no error.
    out = tlc.cached_attention(query[1:], pages, key_dim=DK, block_tables=tables[1:], cache_seqlens=valid[1:])
    torch.testing.assert_close(out, got[1:], rtol=1e-6, atol=1e-6)
    # With a mask instead: an error exactly when the mask shows a column of the bad page.
    shows = torch.zeros(2, 1, 1, 12, dtype=torch.bool)
    shows[0, 0, 0, [0, 5]] = True  # column 5: page 1 of row 0
    shows[1, 0, 0, :3] = True
    with pytest.raises(IndexError, match=r"block_tables\[0, 1\] = .* is outside the page pool .* column 5"):
        tlc.cached_attention(query, pages, shows, DK, block_tables=tables)
    hides = shows.clone()
    hides[0, 0, 0, 5] = False
    out = tlc.cached_attention(query, pages, hides, DK, block_tables=tables)
    torch.testing.assert_close(out.double(), ref_cached_attention(query, dense, hides, DK), rtol=1e-5, atol=1e-5)


def test_opcheck_paged_arguments(gen):
    page_size, N, B = 4, 8, 2
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    pages = randn((N, page_size, H, DK + DV), gen)
    k, v = randn((B, 2, H, DK), gen), randn((B, 2, H, DV), gen)
    index = torch.tensor([0, 3])
    torch.library.opcheck(_ops.concatenate_to_cache, (pages, index, k, v),
                          dict(is_causal=True, block_tables=tables))
    torch.library.opcheck(_ops.write_to_cache, (pages, index, k, v), dict(block_tables=tables.long()))
    codes, scales = tlc.init_paged_kv_cache(N, page_size, H, DK, DV, kv_quantization="int8")
    torch.library.opcheck(_ops.write_to_cache, (codes, index, k, v), dict(scales=scales, block_tables=tables))
    torch.library.opcheck(_ops.write_to_cache, (pages, index, k[:1], v[:1]),
                          dict(block_tables=tables, cu_seqlens=torch.tensor([0, 1, 2])))
    query = randn((B, 2, 2 * H, DK), gen)
    torch.library.opcheck(_ops.cached_attention, (query, pages, None, DK),
                          dict(block_tables=tables, cache_seqlens=torch.tensor([5, 12])))
    torch.library.opcheck(_ops.cached_attention, (query, codes, torch.ones(B, 1, 2, 12, dtype=torch.bool), DK),
                          dict(scales=scales, block_tables=tables))
    torch.library.opcheck(_ops.cached_attention, (query[:1], pages, None, DK),
                          dict(block_tables=tables, cu_seqlens=torch.tensor([0, 1, 2]),
                               cache_seqlens=torch.tensor([3, 4])))


def test_compile_paged_step_no_recompile_when_block_tables_change(gen):
    page_size, N, B, max_pages = 4, 12, 2, 3
    pages = tlc.init_paged_kv_cache(N, page_size, H, DK, DV)

    def step(pages, index, tables, q, k, v):
        tlc.write_to_cache(pages, index, k, v, block_tables=tables, check_bounds=False)
        return tlc.cached_attention(q, pages, key_dim=DK, block_tables=tables, cache_seqlens=index,
                                    check_bounds=False)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    eager_pages = pages.clone()
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        tables = random_tables(gen, B, max_pages, N)
        index = torch.randint(0, 8, (B,), generator=gen)
        eager_index = index.clone()
        q, k, v = randn((B, 1, H, DK), gen), randn((B, 1, H, DK), gen), randn((B, 1, H, DV), gen)
        got = compiled(pages, index, tables, q, k, v)
        want = step(eager_pages, eager_index, tables, q, k, v)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(index, eager_index)
    assert torch.equal(pages, eager_pages)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("planner", ["host", "device", "device-unmapped"])
def test_paged_writes_without_checks_follow_the_sequential_rule(gen, planner, monkeypatch):
    """Random hostile tables (shared pages, repeated pages, entries outside the pool) and positions (negative,
    past the end, near int64's limit), checks off: every page slot and position equals the sequential rule's,
    chains included (row 1 loses a slot to row 0, so row 2 keeps one it shares only with row 1). This is the
    rule CUDA runs on the device (write_plan_rule.h, "device"; "device-unmapped": without its hash maps, as for
    calls too large for one), run here on the CPU, and the CPU's own loop."""
    monkeypatch.setenv("LIGHTNING_CACHE_CPU_PLAN", planner)
    for case in range(300):
        B, q = int(torch.randint(1, 7, (), generator=gen)), int(torch.randint(1, 6, (), generator=gen))
        page_size = [1, 2, 4][case % 3]
        max_pages, N = int(torch.randint(1, 5, (), generator=gen)), int(torch.randint(2, 7, (), generator=gen))
        L = max_pages * page_size
        tables = torch.randint(-1, N + 1, (B, max_pages), generator=gen)
        index = torch.randint(-1, L + 1, (B,), generator=gen)
        if case % 10 == 0:
            index[0] = INT64_MAX - 1
        pages = randn((N, page_size, H, DK + DV), gen)
        k, v = randn((B, q, H, DK), gen), randn((B, q, H, DV), gen)
        want_pages, want_index = ref_paged_write(pages, index, k, v, tables)
        for op in ("write_to_cache", "concatenate_to_cache"):
            got_pages, got_index = pages.clone(), index.clone()
            table = tables.int() if op == "concatenate_to_cache" else tables
            getattr(tlc, op)(got_pages, got_index, k, v, block_tables=table, check_bounds=False)
            assert torch.equal(got_pages, want_pages) and torch.equal(got_index, want_index), (case, op, tables, index)
    # Many rows over a small pool: the device planner sizes its page map by the pool's 100 pages (256 slots),
    # not by the rows' 300 page segments, and most pages are contested.
    B, q, page_size, N, max_pages = 60, 4, 1, 100, 8
    for case in range(4):
        tables = torch.randint(0, N, (B, max_pages), generator=gen)
        index = torch.randint(0, max_pages - q + 1, (B,), generator=gen)
        pages = randn((N, page_size, H, DK + DV), gen)
        k, v = randn((B, q, H, DK), gen), randn((B, q, H, DV), gen)
        want_pages, want_index = ref_paged_write(pages, index, k, v, tables)
        got_pages, got_index = pages.clone(), index.clone()
        tlc.write_to_cache(got_pages, got_index, k, v, block_tables=tables, check_bounds=False)
        assert torch.equal(got_pages, want_pages) and torch.equal(got_index, want_index), case
        assert 0 < int((got_index != index).sum()) < B  # some rows written, some skipped
    # A page listed twice in one row: positions 2..5 take slots 2, 3 and then 0, 1 of page 0 (no clash, written);
    # positions 2..6 take slot 2 twice (skipped), and so do 1..8 (three segments on page 0).
    for start, q, written in [(2, 4, True), (2, 5, False), (1, 8, False)]:
        pages, index = torch.zeros(1, 4, H, DK + DV), torch.tensor([start])
        k, v = randn((1, q, H, DK), gen), randn((1, q, H, DV), gen)
        tlc.write_to_cache(pages, index, k, v, block_tables=torch.tensor([[0, 0, 0]]), check_bounds=False)
        assert index.tolist() == [start + q if written else start] and bool(pages.any()) == written, (start, q)
    # The chain, explicitly: rows 0 and 1 share page 0 slot 1, rows 1 and 2 share page 1 slot 0.
    pages = torch.zeros(3, 2, H, DK + DV)
    tables = torch.tensor([[0, 2], [0, 1], [1, 2]])
    index = torch.tensor([1, 1, 0])
    k, v = randn((3, 2, H, DK), gen), randn((3, 2, H, DV), gen)
    tlc.write_to_cache(pages, index, k, v, block_tables=tables, check_bounds=False)
    assert index.tolist() == [3, 1, 2]  # row 1 skipped, so row 2 writes page 1


@pytest.mark.parametrize("planner", ["host", "device"])
@pytest.mark.parametrize("layout", ["slot_ids", "block_tables"])
def test_attention_rows_without_checks_skip_bad_ids_and_lengths(gen, layout, planner, monkeypatch):
    """[B, q] queries placed by cache_seqlens, checks off (the rows CUDA plans on the device): a row whose
    cache_seqlens is below its q queries, above L, negative or int64's limit, or whose slot id is outside the
    pool, gives zeros; every other row its reference attention. Checks on, each bad row is an error. Both the
    CPU's host plan and attention_plan_on_device (CUDA's, run here with LIGHTNING_CACHE_CPU_PLAN=device)."""
    monkeypatch.setenv("LIGHTNING_CACHE_CPU_PLAN", planner)
    B, q, page_size, N, P = 7, 2, 4, 8, 5
    query = randn((B, q, 2 * H, DK), gen)  # GQA 2
    valid = torch.tensor([5, 1, 9, -3, INT64_MAX, 2, 8])  # row 1: < q; row 2: > L = 8; rows 3, 4: hostile
    if layout == "slot_ids":
        kv = randn((P, 8, H, DK + DV), gen)
        slot_ids = torch.tensor([4, 0, 1, 2, 3, 5, -1])  # rows 5, 6: outside the pool / -1
        kwargs = dict(slot_ids=slot_ids)
        want = ref_cached_attention_rows(query, kv, DK, valid, slot_ids=slot_ids)
        bad = [1, 2, 3, 4, 5, 6]
    else:
        kv = randn((N, page_size, H, DK + DV), gen)
        tables = torch.randint(0, N, (B, 2), generator=gen)
        kwargs = dict(block_tables=tables)
        want = ref_cached_attention_rows(query, kv, DK, valid, block_tables=tables)
        bad = [1, 2, 3, 4]
    got = tlc.cached_attention(query, kv, key_dim=DK, cache_seqlens=valid, check_bounds=False, **kwargs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert not got[bad].any() and got[[r for r in range(B) if r not in bad]].abs().sum(-1).gt(0).all()
    with pytest.raises((IndexError, ValueError), match="cache_seqlens|slot_ids"):
        tlc.cached_attention(query, kv, key_dim=DK, cache_seqlens=valid, **kwargs)
