"""Sequence-cache writes into a pool: ``concatenate_to_cache`` / ``write_to_cache`` with ``slot_ids`` (SPEC 7).

``key_value [P, L, H, Dk + Dv]`` and ``index [P]`` are a pool; batch row ``b`` writes pool row
``slot_ids[b]`` at that row's position and mask row ``b`` follows it. Masks and token types are
read at batch row ``b``. The oracle is ``reference.ref_concatenate_to_cache(..., slot_ids=...)``
(agreement bit for bit); untouched pool rows are also compared with their state before the call.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_lightning_cache as tlc
from conftest import LAYOUTS, make_inputs, randn
from reference import ref_concatenate_to_cache, ref_pool_rows, ref_write_to_cache
from test_concatenate_to_cache import FLOAT_DTYPES, HYPOTHESIS, MASK_DTYPES, make_attention_mask, make_causal

ops = torch.ops.lightning_cache


@st.composite
def pool_configs(draw):
    P = draw(st.integers(1, 5))
    B = draw(st.integers(1, 5))
    L = draw(st.integers(1, 8))
    ring = draw(st.booleans())
    q = draw(st.integers(1, L))
    # Ids: mostly distinct valid rows, sometimes -1; bad ids are tested separately (checks on) and
    # in the checks-off case below.
    rows = draw(st.permutations(range(P)))
    keep = draw(st.lists(st.integers(0, 3), min_size=B, max_size=B))  # 0: skip (-1)
    ids = [rows[b] if b < P and keep[b] else -1 for b in range(B)]
    hi = 4 * L if ring else L - q
    return dict(
        P=P, B=B, L=L, q=q, ring=ring, ids=ids,
        starts=draw(st.lists(st.integers(0, hi), min_size=P, max_size=P)),
        H=draw(st.integers(1, 3)), Dk=draw(st.integers(1, 5)), Dv=draw(st.integers(1, 5)),
        cache_dtype=draw(st.sampled_from(FLOAT_DTYPES)), input_dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        attn=draw(st.sampled_from([None, "2d", "2d-strided", "4d", "4d-expanded"])),
        attn_dtype=draw(st.sampled_from(MASK_DTYPES)),
        causal=draw(st.sampled_from([None, "flag", "2d", "4d"])),
        types=draw(st.sampled_from([None, torch.int64, torch.int32])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def build_pool_case(cfg, device):
    g = torch.Generator().manual_seed(cfg["seed"])
    P, B, L, q, H, Dk, Dv = (cfg[k] for k in ("P", "B", "L", "q", "H", "Dk", "Dv"))
    key_value = randn((P, L, H, Dk + Dv), g, cfg["cache_dtype"], device)
    index = torch.tensor(cfg["starts"], dtype=torch.int64, device=device)
    key, value = make_inputs(cfg["layout"], B, q, H, (Dk, Dv), g, cfg["input_dtype"], device)
    causal_mask, is_causal = make_causal(cfg["causal"], max(L, max(cfg["starts"]) + q), torch.bool, g, device)
    token_type_ids = None
    if cfg["types"] is not None:
        token_type_ids = torch.randint(0, 3, (B, q), generator=g).to(cfg["types"]).to(device)
    kwargs = dict(attention_mask=make_attention_mask(cfg["attn"], B, q, L, cfg["attn_dtype"], g, device),
                  causal_mask=causal_mask, token_type_ids=token_type_ids, is_causal=is_causal, ring=cfg["ring"],
                  slot_ids=torch.tensor(cfg["ids"], dtype=torch.int64, device=device))
    return key_value, index, key, value, kwargs


def assert_pool_write(key_value, index, key, value, kwargs, write_only=False):
    """Runs the op and the oracle on the same pool; bit-equal pool, positions and mask, and pool rows
    that no batch row wrote (skipped or not named) bit-identical to before, K/V and index."""
    kv_before, index_before = key_value.clone(), index.clone()
    P, B = key_value.shape[0], key.shape[0]
    written = {r for r in ref_pool_rows(kwargs.get("slot_ids"), B, P, kwargs.get("check_bounds", True))
               if r is not None}
    if write_only:
        exp_kv, exp_index = ref_write_to_cache(key_value, index, key, value, **kwargs)
        tlc.write_to_cache(key_value, index, key, value, **kwargs)
    else:
        exp_kv, exp_index, exp_mask = ref_concatenate_to_cache(key_value, index, key, value, **kwargs)
        key_cache, value_cache, mask = tlc.concatenate_to_cache(key_value, index, key, value, **kwargs)
        assert mask.shape == (B, 1, key.shape[1], key_value.shape[1]) and mask.dtype == torch.bool
        assert torch.equal(mask, exp_mask), f"mask differs:\n{mask.int()}\nexpected\n{exp_mask.int()}"
        assert key_cache.shape[0] == P and key_cache.data_ptr() == key_value.data_ptr()  # views of the whole pool
    assert torch.equal(index, exp_index), (index, exp_index)
    assert torch.equal(key_value, exp_kv), "pool content differs from the reference"
    for r in range(P):
        if r not in written:
            assert torch.equal(key_value[r], kv_before[r]) and index[r] == index_before[r], f"pool row {r} changed"


@settings(max_examples=150, **HYPOTHESIS)
@given(cfg=pool_configs())
def test_pool_writes_match_reference(device, cfg):
    assert_pool_write(*build_pool_case(cfg, device))


@settings(max_examples=40, **HYPOTHESIS)
@given(cfg=pool_configs())
def test_pool_write_to_cache_matches_reference(device, cfg):
    key_value, index, key, value, kwargs = build_pool_case(cfg, device)
    assert_pool_write(key_value, index, key, value, dict(ring=kwargs["ring"], slot_ids=kwargs["slot_ids"]),
                      write_only=True)


def _small_pool(device, gen, P=4, B=3, L=6, q=2, starts=(0, 3, 1, 2), dtype=torch.float32, layout="fused"):
    key_value = randn((P, L, 2, 5), gen, dtype, device)
    index = torch.tensor(starts, dtype=torch.int64, device=device)
    key, value = make_inputs(layout, B, q, 2, (2, 3), gen, dtype, device)
    return key_value, index, key, value


def test_rows_at_different_positions_and_mask_follows_pool_row(device, gen):
    """Batch rows 0, 1, 2 -> pool rows 2, 0, 3 at positions 1, 0, 2: each mask row is its pool row's."""
    key_value, index, key, value = _small_pool(device, gen)
    slot_ids = torch.tensor([2, 0, 3], device=device)
    attention_mask = torch.ones(3, 6, dtype=torch.bool, device=device)
    attention_mask[1, 0] = False  # batch row 1's own mask, not pool row 1's
    _, _, mask = tlc.concatenate_to_cache(key_value, index, key, value, attention_mask=attention_mask,
                                          is_causal=True, slot_ids=slot_ids)
    assert index.tolist() == [2, 3, 3, 4]
    expected = torch.zeros(3, 1, 2, 6, dtype=torch.bool)
    for b, start in enumerate((1, 0, 2)):
        for i in range(2):
            expected[b, 0, i, :start + i + 1] = True
    expected[1, 0, :, 0] = False
    assert torch.equal(mask.cpu(), expected)
    assert torch.equal(key_value[2, 1:3, :, :2], key[0]) and torch.equal(key_value[3, 2:4, :, 2:], value[2])


@pytest.mark.parametrize("write_only", [False, True])
def test_skip_row_writes_nothing_and_masks_false(device, gen, write_only):
    key_value, index, key, value = _small_pool(device, gen)
    kwargs = dict(slot_ids=torch.tensor([-1, 1, -1], device=device))
    if not write_only:
        kwargs["attention_mask"] = torch.ones(3, 6, device=device)
    assert_pool_write(key_value, index, key, value, kwargs, write_only=write_only)
    assert index.tolist() == [0, 5, 1, 2]


BAD_IDS = [
    ("out-of-range", [0, 4, 1], r"slot_ids\[1\] = 4 is out of range \[-1, 4\)"),
    ("negative", [0, -2, 1], r"slot_ids\[1\] = -2 is out of range"),
    ("int64-min", [0, 1, -2**63], r"slot_ids\[2\] = -9223372036854775808 is out of range"),
    ("int64-max", [2**63 - 1, 1, 0], r"slot_ids\[0\] = 9223372036854775807 is out of range"),
    ("repeat", [2, 1, 2], r"slot_ids\[2\] = 2 repeats an earlier row's slot"),
]


@pytest.mark.parametrize("write_only", [False, True])
@pytest.mark.parametrize("case", BAD_IDS, ids=[c[0] for c in BAD_IDS])
def test_bad_ids_raise_and_leave_pool_untouched(device, gen, case, write_only):
    _, ids, regex = case
    key_value, index, key, value = _small_pool(device, gen)
    kv_before, index_before = key_value.clone(), index.clone()
    slot_ids = torch.tensor(ids, device=device)
    with pytest.raises(IndexError, match=regex):
        if write_only:
            tlc.write_to_cache(key_value, index, key, value, slot_ids=slot_ids)
        else:
            tlc.concatenate_to_cache(key_value, index, key, value, is_causal=True, slot_ids=slot_ids)
    assert torch.equal(key_value, kv_before) and torch.equal(index, index_before)


@pytest.mark.parametrize("case", BAD_IDS, ids=[c[0] for c in BAD_IDS])
def test_bad_ids_with_checks_off_are_skipped(device, gen, case):
    _, ids, _ = case
    key_value, index, key, value = _small_pool(device, gen)
    kwargs = dict(is_causal=True, ring=True, check_bounds=False, slot_ids=torch.tensor(ids, device=device))
    assert_pool_write(key_value, index, key, value, kwargs)


def test_overflow_in_a_named_row_raises_and_writes_nothing(device, gen):
    """Pool row 1 (named by batch row 2) would overflow: IndexError naming pool row 1, nothing written.
    Pool row 3 is full too, but no batch row names it: it is not an error."""
    key_value, index, key, value = _small_pool(device, gen, starts=(0, 5, 1, 6))
    kv_before, index_before = key_value.clone(), index.clone()
    with pytest.raises(IndexError, match=r"cache overflow in row 1: position 5 \+ 2 new tokens exceeds max_length 6"):
        tlc.concatenate_to_cache(key_value, index, key, value, slot_ids=torch.tensor([0, 2, 1], device=device))
    assert torch.equal(key_value, kv_before) and torch.equal(index, index_before)
    assert_pool_write(key_value, index, key, value, dict(slot_ids=torch.tensor([0, 2, -1], device=device)))
    # Checks off: the full row is skipped, the others written.
    assert_pool_write(key_value, index, key, value,
                      dict(slot_ids=torch.tensor([3, 1, 2], device=device), check_bounds=False))
    assert index.tolist() == [2, 5, 5, 6]


def test_bad_slot_id_arguments(device, gen):
    key_value, index, key, value = _small_pool(device, gen)
    kv_before, index_before = key_value.clone(), index.clone()
    with pytest.raises(ValueError, match=r"key has batch 3 but key_value has batch 4"):  # without slot_ids: P == B
        tlc.concatenate_to_cache(key_value, index, key, value)
    with pytest.raises(ValueError, match=r"key has batch 3 but key_value has batch 4"):
        tlc.write_to_cache(key_value, index, key, value)
    with pytest.raises(ValueError, match=r"value has batch 2 but slot_ids has batch 3"):
        tlc.write_to_cache(key_value, index, key, value[:2], slot_ids=torch.tensor([0, 1, 2], device=device))
    with pytest.raises(TypeError, match=r"concatenate_to_cache: slot_ids must be int64, got Int"):
        tlc.concatenate_to_cache(key_value, index, key, value, slot_ids=torch.tensor([0, 1, 2], device=device).int())
    with pytest.raises(ValueError, match=r"slot_ids must be \[batch\] = \[3\], got shape \[2\]"):
        tlc.concatenate_to_cache(key_value, index, key, value, slot_ids=torch.tensor([0, 1], device=device))
    with pytest.raises(ValueError, match=r"index must be \[pool\] = \[4\]"):
        tlc.concatenate_to_cache(key_value, index[:3], key, value, slot_ids=torch.tensor([0, 1, 2], device=device))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, max_length\] = \[3, 6\]"):
        tlc.concatenate_to_cache(key_value, index, key, value, attention_mask=torch.ones(4, 6, device=device),
                                 slot_ids=torch.tensor([0, 1, 2], device=device))
    with pytest.raises(TypeError, match=r"slot_ids must be a torch.Tensor or None, got list"):
        tlc.concatenate_to_cache(key_value, index, key, value, slot_ids=[0, 1, 2])
    with pytest.raises(ValueError, match=r"slot_ids must be on the same device"):
        tlc.concatenate_to_cache(key_value, index, key, value, slot_ids=torch.tensor([0, 1, 2], device="meta"))
    assert torch.equal(key_value, kv_before) and torch.equal(index, index_before)


def test_empty_batch_and_empty_pool(device, gen):
    key_value, index, key, value = _small_pool(device, gen)
    _, _, mask = tlc.concatenate_to_cache(key_value, index, key[:0], value[:0],
                                          slot_ids=torch.empty(0, dtype=torch.int64, device=device))
    assert mask.shape == (0, 1, 2, 6)
    empty_kv, empty_index = key_value[:0].clone(), index[:0].clone()
    _, _, mask = tlc.concatenate_to_cache(empty_kv, empty_index, key, value, is_causal=True,
                                          slot_ids=torch.full((3,), -1, device=device))
    assert mask.shape == (3, 1, 2, 6) and not mask.any()
    with pytest.raises(IndexError, match=r"slot_ids\[0\] = 0 is out of range \[-1, 0\)"):
        tlc.concatenate_to_cache(empty_kv, empty_index, key, value, slot_ids=torch.zeros(3, dtype=torch.int64,
                                                                                        device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "step", "expanded"])
def test_strided_inputs_and_dtypes(device, gen, dtype, layout):
    key_value, index, key, value = _small_pool(device, gen, dtype=dtype, layout=layout)
    assert_pool_write(key_value, index, key, value, dict(slot_ids=torch.tensor([3, -1, 0], device=device),
                                                         is_causal=True, ring=True))


def test_opcheck_pool_writes(device, gen):
    key_value, index, key, value = _small_pool(device, gen)
    slot_ids = torch.tensor([2, -1, 0], device=device)
    torch.library.opcheck(ops.concatenate_to_cache.default, (key_value, index, key, value),
                          dict(attention_mask=torch.ones(3, 6, dtype=torch.bool, device=device), is_causal=True,
                               slot_ids=slot_ids))
    torch.library.opcheck(ops.concatenate_to_cache.default, (key_value, index, key, value),
                          dict(ring=True, check_bounds=False, slot_ids=torch.tensor([1, 1, 9], device=device)))
    torch.library.opcheck(ops.write_to_cache.default, (key_value, index, key, value), dict(slot_ids=slot_ids))


def test_compile_fullgraph_no_recompile_when_slot_ids_change(device, gen):
    """A decode step into a pool, compiled once: new slot ids (incl. -1, repeats, out of range with
    checks off) are data, not guards. Matches the eager op on a copy every step."""
    key_value, index, key, value = _small_pool(device, gen, q=1)
    eager_kv, eager_index = key_value.clone(), index.clone()

    def step(kv, idx, k, v, ids):
        _, _, mask = tlc.concatenate_to_cache(kv, idx, k, v, is_causal=True, ring=True, check_bounds=False,
                                              slot_ids=ids)
        tlc.write_to_cache(kv, idx, k, v, ring=True, check_bounds=False, slot_ids=ids.flip(0))
        return mask

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for ids in ([0, 1, 2], [3, -1, 1], [2, 2, 0], [-5, 3, 99]):
        ids = torch.tensor(ids, device=device)
        with torch._dynamo.config.patch(error_on_recompile=counter.frame_count > 0):
            mask = compiled(key_value, index, key, value, ids)
        assert torch.equal(mask, step(eager_kv, eager_index, key, value, ids))
        assert torch.equal(key_value, eager_kv) and torch.equal(index, eager_index)
    assert counter.frame_count == 1


def test_view_passes_slot_ids(device, gen):
    metadata = tlc.LightningCacheMetaData.create(batch_size=4, num_heads=2, key_dim=2, value_dim=3, max_length=6,
                                                 dtype=torch.float32, device=device)
    view = tlc.LightningCacheView.init(metadata, layer_index=0)
    key, value = make_inputs("contiguous", 2, 1, 2, (2, 3), gen, device=device)
    key_cache, value_cache, mask = view.concatenate_to_cache(None, key, value, None, causal_mask=True,
                                                             slot_ids=torch.tensor([3, 1], device=device))
    assert key_cache.shape == (4, 6, 2, 2) and value_cache.shape == (4, 6, 2, 3) and mask.shape == (2, 1, 1, 6)
    assert view.index.tolist() == [0, 1, 0, 1]
    assert torch.equal(key_cache[3, 0], key[0, 0]) and torch.equal(value_cache[1, 0], value[1, 0])
    lazy = tlc.LightningCacheView.init(tlc.LightningCacheMetaData.create(num_heads=2, key_dim=2, value_dim=3,
                                                                         max_length=6), layer_index=0)
    with pytest.raises(ValueError, match="with slot_ids, the pool size must be given as batch_size"):
        lazy.concatenate_to_cache(None, key, value, None, slot_ids=torch.tensor([0, 1], device=device))
