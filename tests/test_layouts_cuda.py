"""SPEC 11 layouts on CUDA: block tables, packed batches, cache_seqlens and slot ids on every op that
takes them. Each case runs the same call on the CPU kernels (which tests/test_paged.py and
tests/test_packed.py hold to the reference) and on the GPU, and compares every output and every
tensor the op writes: bit for bit for writes (quantization included: one rule, quantize_rule.h),
within float tolerance for attention and prefill. Refused calls must raise the same error on both
and leave the GPU tensors as they were. Needs a GPU (skipped elsewhere)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import HAS_CUDA, randn
from reference import ref_cached_attention_rows, ref_lightning_packed

import torch_lightning_cache as tlc

# LIGHTNING_TEST_LAYOUTS_DEVICE=cpu runs every comparison CPU against CPU: a check of the tests themselves.
DEV = os.environ.get("LIGHTNING_TEST_LAYOUTS_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEV == "cuda" and not HAS_CUDA, reason="needs a CUDA GPU")]

H, DK, DV = 2, 16, 16
QUANTIZED = ("int8", "fp8_e4m3")


def to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, copy=True)  # a copy even on the same device: the originals stay the inputs
    if isinstance(x, (tuple, list)):
        return type(x)(to(e, device) for e in x)
    return x


def bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def on_both(op, written, tol=None, **kwargs):
    """Runs tlc.<op>(**kwargs) on CPU copies and CUDA copies of every tensor; compares the results and
    the tensors named in `written` (exactly without `tol`). Returns the CUDA result."""
    cpu = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    gpu = {k: to(v, DEV) for k, v in kwargs.items()}
    want = getattr(tlc, op)(**cpu)
    got = getattr(tlc, op)(**gpu)
    if DEV == "cuda":
        torch.cuda.synchronize()
    pairs = [(got, want)] + [(gpu[name], cpu[name]) for name in written]
    for g, w in pairs:
        for a, b in zip(g if isinstance(g, tuple) else (g,), w if isinstance(w, tuple) else (w,)):
            if not isinstance(a, torch.Tensor):
                continue
            if tol is None:
                assert torch.equal(bits(a.cpu()), bits(b)), op
            else:
                torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
    return got


def pool_of(storage, num_pages, page_size):
    if storage in QUANTIZED:
        return tlc.init_paged_kv_cache(num_pages, page_size, H, DK, DV, kv_quantization=storage)
    return tlc.init_paged_kv_cache(num_pages, page_size, H, DK, DV, dtype=getattr(torch, storage)), None


def cu_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_paged_and_packed_writes_match_cpu(gen, storage, page_size, table_dtype):
    B, max_pages = 3, 48 // page_size
    N = B * max_pages + 2
    pages, scales = pool_of(storage, N, page_size)
    tables = torch.randperm(N, generator=gen)[:B * max_pages].view(B, max_pages).to(table_dtype)
    index = torch.tensor([0, 5, 17])
    for q in (7, 1):
        k, v = randn((B, q, H, DK), gen), randn((B, q, H, DV), gen)
        on_both("concatenate_to_cache", ["key_value", "index", "scales"], key_value=pages, index=index, key=k,
                value=v, is_causal=True, block_tables=tables, scales=scales)
        tlc.concatenate_to_cache(pages, index, k, v, is_causal=True, block_tables=tables, scales=scales)
    lengths = [4, 0, 9]
    k, v = randn((1, 13, H, DK), gen), randn((1, 13, H, DV), gen)
    on_both("write_to_cache", ["key_value", "index", "scales"], key_value=pages, index=index, key=k, value=v,
            block_tables=tables, cu_seqlens=cu_of(lengths), scales=scales)
    # Dense rows, packed, through slot ids.
    kv, idx = tlc.init_kv_cache(5, 40, H, DK, DV)
    on_both("write_to_cache", ["key_value", "index"], key_value=kv, index=idx, key=k, value=v,
            slot_ids=torch.tensor([3, 0, 1]), cu_seqlens=cu_of(lengths))


@pytest.mark.parametrize("bad", [-1, 10**6, 2**63 - 1])
def test_hostile_tables_and_cu_seqlens_match_cpu(gen, bad):
    page_size, N = 4, 6
    pages, _ = pool_of("float32", N, page_size)
    tables = torch.tensor([[0, 1, bad], [2, 3, 4]])
    index = torch.tensor([6, 2])
    k, v = randn((2, 3, H, DK), gen), randn((2, 3, H, DV), gen)
    gpu_pages, gpu_index = pages.to(DEV), index.to(DEV)
    with pytest.raises(IndexError, match="block_tables"):
        tlc.write_to_cache(gpu_pages, gpu_index, k.to(DEV), v.to(DEV), block_tables=tables.to(DEV))
    assert not gpu_pages.any() and gpu_index.cpu().tolist() == [6, 2]  # nothing written
    on_both("write_to_cache", ["key_value", "index"], key_value=pages, index=index, key=k, value=v,
            block_tables=tables, check_bounds=False)
    # Contested page slot: both rows write page 0 slot 2.
    shared = torch.tensor([[0, 1, 5], [0, 3, 4]])
    with pytest.raises(IndexError, match="both write page 0"):
        tlc.write_to_cache(gpu_pages, torch.tensor([2, 2], device=DEV), k[:, :1].to(DEV), v[:, :1].to(DEV),
                           block_tables=shared.to(DEV))
    on_both("write_to_cache", ["key_value", "index"], key_value=pages, index=torch.tensor([2, 2]), key=k[:, :1],
            value=v[:, :1], block_tables=shared, check_bounds=False)
    # Bad cu_seqlens: ValueError with checks, the kept sequences without.
    for values in ([0, 9, 6], [1, 3, 6], [0, 2**63 - 1, 6], [0, -(2**63), 6]):
        kv, idx = tlc.init_kv_cache(2, 16, H, DK, DV)
        kk, vv = randn((1, 6, H, DK), gen), randn((1, 6, H, DV), gen)
        with pytest.raises(ValueError, match="cu_seqlens"):
            tlc.write_to_cache(kv.to(DEV), idx.to(DEV), kk.to(DEV), vv.to(DEV), cu_seqlens=torch.tensor(values).to(DEV))
        on_both("write_to_cache", ["key_value", "index"], key_value=kv, index=idx, key=kk, value=vv,
                cu_seqlens=torch.tensor(values), check_bounds=False)
    # cached_attention: a visible column in a page outside the pool.
    query = randn((2, 1, H, DK), gen)
    with pytest.raises(IndexError, match=r"block_tables\[0, 2\] = .* is outside the page pool"):
        tlc.cached_attention(query.to(DEV), gpu_pages, key_dim=DK, block_tables=tables.to(DEV),
                             cache_seqlens=torch.tensor([10, 12], device=DEV))
    on_both("cached_attention", [], tol=1e-5, query=query, key_value=pages, key_dim=DK, block_tables=tables,
            cache_seqlens=torch.tensor([10, 12]), check_bounds=False)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("q", [1, 5])
def test_attention_layouts_match_cpu_and_reference(gen, storage, group, q):
    B, page_size, max_pages = 3, 16, 6
    L, N = page_size * max_pages, B * max_pages + 3
    pages, scales = pool_of(storage, N, page_size)
    tables = torch.randperm(N, generator=gen)[:B * max_pages].view(B, max_pages)
    k, v = randn((B, L, H, DK), gen), randn((B, L, H, DV), gen)
    tlc.write_to_cache(pages, torch.zeros(B, dtype=torch.int64), k, v, block_tables=tables, scales=scales)
    query = randn((B, q, H * group, DK), gen)
    valid = torch.tensor([q, 40, L])
    tol = 2e-2 if storage == "bfloat16" else 1e-4
    got = on_both("cached_attention", [], tol=1e-5, query=query, key_value=pages, key_dim=DK, scales=scales,
                  block_tables=tables, cache_seqlens=valid)
    want = ref_cached_attention_rows(query, pages, DK, valid, block_tables=tables, scales=scales)
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
    mask = torch.rand(B, 1, q, L, generator=gen) < 0.5
    on_both("cached_attention", [], tol=1e-5, query=query, key_value=pages, mask=mask, key_dim=DK, scales=scales,
            block_tables=tables)
    # Packed queries (one empty sequence), through the tables and through dense rows with slot ids.
    lengths = [q, 0, 2]
    packed = randn((1, q + 2, H * group, DK), gen)
    on_both("cached_attention", [], tol=1e-5, query=packed, key_value=pages, key_dim=DK, scales=scales,
            block_tables=tables, cu_seqlens=cu_of(lengths), cache_seqlens=valid)
    dense = randn((5, L, H, DK + DV), gen)
    got = on_both("cached_attention", [], tol=1e-5, query=packed, key_value=dense, key_dim=DK,
                  cu_seqlens=cu_of(lengths), cache_seqlens=valid, slot_ids=torch.tensor([4, 0, 2]))
    want = ref_cached_attention_rows(packed, dense, DK, valid, cu_seqlens=cu_of(lengths),
                                     slot_ids=torch.tensor([4, 0, 2]))
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)
    # Bad counts and slot ids without checks: those rows output zeros on both.
    on_both("cached_attention", [], tol=1e-5, query=query, key_value=dense, key_dim=DK,
            cache_seqlens=torch.tensor([q - 1, 40, L + 1]), slot_ids=torch.tensor([0, 7, 1]), check_bounds=False)


def test_attention_long_paged_rows_split_columns(gen):
    """L = 8192 through pages of 64, B = 4, GQA 4: the CUDA kernel splits the columns (flash-decoding)."""
    B, page_size, L = 4, 64, 8192
    max_pages = L // page_size
    N = B * max_pages
    pages = randn((N, page_size, H, DK + DV), gen).to(torch.bfloat16)
    tables = torch.randperm(N, generator=gen).view(B, max_pages)
    query = randn((B, 1, 4 * H, DK), gen).to(torch.bfloat16)
    on_both("cached_attention", [], tol=2e-2, query=query, key_value=pages, key_dim=DK, block_tables=tables,
            cache_seqlens=torch.tensor([L, 5000, 1, 4097]))


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_packed_prefill_matches_cpu_and_reference(gen, state_dtype):
    lengths = [70, 0, 1, 33, 129]
    S, pool, every, C = len(lengths), 8, 32, 4
    T = sum(lengths)
    q, k, v = (randn((1, T, H, d), gen) for d in (DK, DK, DV))
    slopes = tlc.lightning_slopes(H)
    state = randn((pool, H, DK, DV), gen).to(state_dtype)
    slot_ids = torch.tensor([5, 0, 7, -1, 2])
    checkpoints = torch.full((S, C, H, DK, DV), 3.0, dtype=state_dtype)
    tol = 1e-4 if state_dtype == torch.float32 else 2e-2
    out = on_both("lightning_prefill", ["state", "checkpoints"], tol=tol, state=state, query=q, key=k, value=v,
                  slopes=slopes, slot_ids=slot_ids, cu_seqlens=cu_of(lengths), block_size=64,
                  checkpoints=checkpoints, checkpoint_every=every, check_bounds=False)
    want_state, want_out = ref_lightning_packed(state, q, k, v, slopes, cu_of(lengths), slot_ids,
                                                check_bounds=False)
    torch.testing.assert_close(out.cpu().double(), want_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("op", ["write_to_cache", "lightning_prefill", "cached_attention"])
def test_packed_calls_refuse_capture_and_write_nothing(gen, op):
    """A cu_seqlens call reads the sequence bounds on the host, so inside a CUDA-graph capture it raises
    an error that says so before launching anything: the capture ends cleanly and the cache is as it was."""
    if DEV != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    lengths = [3, 5]
    T, cu = sum(lengths), cu_of(lengths).to(DEV)
    pages, _ = pool_of("float32", 4, 4)
    pages = to(pages, DEV)
    tables = torch.arange(4, device=DEV).view(2, 2)
    state = to(randn((2, H, DK, DV), gen), DEV)
    q, k, v = (to(randn((1, T, H, d), gen), DEV) for d in (DK, DK, DV))
    index, seqlens = torch.zeros(2, dtype=torch.long, device=DEV), torch.tensor(lengths, device=DEV)
    slopes = tlc.lightning_slopes(H).to(DEV)  # every input made before the capture: a copy from the host
    calls = {                                   # inside it would fail before the op is reached
        "write_to_cache": lambda: tlc.write_to_cache(pages, index, k, v, block_tables=tables, cu_seqlens=cu),
        "lightning_prefill": lambda: tlc.lightning_prefill(state, q, k, v, slopes, cu_seqlens=cu),
        "cached_attention": lambda: tlc.cached_attention(q, pages, key_dim=DK, block_tables=tables, cu_seqlens=cu,
                                                         cache_seqlens=seqlens),
    }
    before_pages, before_state, before_index = pages.clone(), state.clone(), index.clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=f"{op}: a call with cu_seqlens .* cannot be captured"):
        with torch.cuda.graph(graph):
            calls[op]()
    torch.cuda.synchronize()
    assert torch.equal(pages, before_pages) and torch.equal(state, before_state)
    assert torch.equal(index, before_index)
    calls[op]()  # outside a capture the same call runs


@pytest.mark.parametrize("B, q, page_size", [(6, 3, 2), (64, 1, 16), (4, 40, 16), (3, 300, 1)])
def test_device_planned_paged_writes_match_cpu(gen, B, q, page_size):
    """Paged [B, q] writes without checks are planned on the GPU (write_plan_rule.h, one block) and on the
    CPU by the same rule: random hostile tables (pages shared, repeated, outside the pool) and positions
    (negative, past the end, int64's limit) write the same cells and positions on both; every other case
    gives each row pages of its own but for one entry repeated in row 0, so most rows are written."""
    for case in range(12):
        max_pages = max(1, (q + 2 * page_size - 1) // page_size)
        L = max_pages * page_size
        if case % 2:
            N = B * max_pages
            tables = torch.randperm(N, generator=gen).view(B, max_pages)
            tables[0, -1] = tables[0, 0]
            index = torch.randint(0, L - q + 1, (B,), generator=gen)
        else:
            N = max(2, B * max_pages // 2)  # few pages: rows collide often
            tables = torch.randint(-1, N + 1, (B, max_pages), generator=gen)
            index = torch.randint(-1, L + 1, (B,), generator=gen)
        if case % 4 == 0:
            index[0] = 2**63 - 2
        storage = ["float32", "bfloat16", "int8"][case % 3]
        pages, scales = pool_of(storage, N, page_size)
        k, v = randn((B, q, H, DK), gen), randn((B, q, H, DV), gen)
        written = ["key_value", "index"] + (["scales"] if scales is not None else [])
        for op in ("write_to_cache", "concatenate_to_cache"):
            on_both(op, written, key_value=pages.clone(), index=index, key=k, value=v, block_tables=tables,
                    scales=None if scales is None else scales.clone(), check_bounds=False)


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_paged_decode_step_is_captured_in_a_cuda_graph(gen, storage):
    """A paged decode step (write_to_cache + cached_attention through block tables, cache_seqlens = the
    positions after the write) captured once in a CUDA graph and replayed with new tokens, positions and
    block-table entries gives the eager CPU step's outputs, pages and positions every time: nothing in it
    syncs with the host (checks are off inside a capture)."""
    if DEV != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    B, page_size, max_pages, group = 4, 16, 8, 4
    N = B * max_pages
    cpu_pages, cpu_scales = pool_of(storage, N, page_size)
    tables = torch.randperm(N, generator=gen).view(B, max_pages)
    index = torch.tensor([3, 17, 40, 0])
    pages, scales, gpu_tables, gpu_index = to(cpu_pages, DEV), to(cpu_scales, DEV), to(tables, DEV), to(index, DEV)
    query = torch.zeros(B, 1, group * H, DK, device=DEV)
    key, value = torch.zeros(B, 1, H, DK, device=DEV), torch.zeros(B, 1, H, DV, device=DEV)
    out = torch.zeros(B, 1, group * H, DV, device=DEV)

    def step():
        tlc.write_to_cache(pages, gpu_index, key, value, scales=scales, block_tables=gpu_tables)
        out.copy_(tlc.cached_attention(query, pages, key_dim=DK, scales=scales, block_tables=gpu_tables,
                                       cache_seqlens=gpu_index))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on copies, through the same (device-planned) paths
        tlc.write_to_cache(pages.clone(), gpu_index.clone(), key, value, scales=to(scales, DEV),
                           block_tables=gpu_tables, check_bounds=False)
        tlc.cached_attention(query, pages, key_dim=DK, scales=scales, block_tables=gpu_tables,
                             cache_seqlens=gpu_index, check_bounds=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # captured, not run
    for t in range(6):
        q_t, k_t, v_t = randn((B, 1, group * H, DK), gen), randn((B, 1, H, DK), gen), randn((B, 1, H, DV), gen)
        if t == 3:  # new block-table values in the same tensor: row 0's first page swapped for one never written
            tables[0, 0], tables[3, 7] = tables[3, 7].clone(), tables[0, 0].clone()
            gpu_tables.copy_(tables)
        query.copy_(q_t)
        key.copy_(k_t)
        value.copy_(v_t)
        graph.replay()
        tlc.write_to_cache(cpu_pages, index, k_t, v_t, scales=cpu_scales, block_tables=tables)
        want = tlc.cached_attention(q_t, cpu_pages, key_dim=DK, scales=cpu_scales, block_tables=tables,
                                    cache_seqlens=index)
        torch.cuda.synchronize()
        assert torch.equal(gpu_index.cpu(), index), t
        assert torch.equal(bits(pages.cpu()), bits(cpu_pages)), t
        torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-4)
