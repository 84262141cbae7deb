"""The seed's classes, working: metadata validation, lazy allocation, views, hybrid caches, repr."""

from __future__ import annotations

import pytest
import torch

from reference import ref_concatenate_to_cache, ref_lightning
from torch_lightning_cache import (
    LightningCache,
    LightningCacheMetaData,
    LightningCacheView,
    LightningMetadata,
    lightning_slopes,
    minimax_layer_kinds,
)


def test_metadata_fallbacks_follow_easydel():
    m = LightningCacheMetaData.create(batch_size=2, num_heads=4, head_dim=8)
    assert (m.key_heads, m.value_heads, m.key_dim, m.value_dim) == (4, 4, 8, 8)
    m = LightningCacheMetaData.create(None, 2, 4, 8, None, None, 16, 32)  # the seed's positional order
    assert (m.key_heads, m.key_dim, m.value_dim) == (4, 16, 32)
    assert m.partition_axis is None and m.max_length is None


@pytest.mark.parametrize("field, kwargs", [
    ("batch_size", dict(batch_size=0, num_heads=2, head_dim=4)),
    ("num_heads", dict(num_heads=-1, head_dim=4)),
    ("head_dim", dict(num_heads=2, head_dim=0)),
    ("key_dim", dict(num_heads=2, key_dim=-3, head_dim=4)),
    ("max_length", dict(num_heads=2, head_dim=4, max_length=0)),
    ("block_size", dict(num_heads=2, head_dim=4, block_size=0)),
    ("key_heads", dict(head_dim=4)),  # missing, no fallback
    ("key_dim", dict(num_heads=2)),  # missing, no fallback
    ("value_heads", dict(num_heads=2, head_dim=4, value_heads=3)),  # inconsistent with key_heads
    ("state_dtype", dict(num_heads=2, head_dim=4, state_dtype=torch.float16)),
    ("dtype", dict(num_heads=2, head_dim=4, dtype=torch.int32)),
])
def test_metadata_rejects_bad_fields(field, kwargs):
    with pytest.raises(ValueError, match=field):
        LightningCacheMetaData.create(**kwargs)


def test_view_allocates_lazily_from_first_tensors(gen):
    meta = LightningCacheMetaData.create(num_heads=2, head_dim=4)
    view = LightningCacheView.init(meta, layer_index=3)
    assert view.key_value is None
    assert "key_value=None" in repr(view)
    q = torch.randn(3, 2, 2, 4, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    mask2d = torch.ones(3, 10, dtype=torch.bool)
    key_cache, value_cache, mask = view.concatenate_to_cache(q, q, q, mask2d)
    # capacity from the mask's last dimension, batch/dtype/device from the key
    assert view.key_value.shape == (3, 10, 2, 8) and view.key_value.dtype == torch.bfloat16
    assert view.index.tolist() == [2, 2, 2]
    assert key_cache.data_ptr() == view.key_value.data_ptr() and key_cache.shape == (3, 10, 2, 4)
    assert mask.shape == (3, 1, 2, 10)
    assert "positions=[2, 2, 2]" in repr(view)


def test_view_needs_a_capacity():
    view = LightningCacheView.init(LightningCacheMetaData.create(num_heads=2, head_dim=4))
    x = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="max_length"):
        view.concatenate_to_cache(x, x, x, None)
    assert view.key_value is None


def test_view_allocates_eagerly_when_metadata_is_complete():
    meta = LightningCacheMetaData.create(batch_size=2, num_heads=2, head_dim=4, max_length=6,
                                         dtype=torch.float16, device="cpu")
    view = LightningCacheView.init(meta)
    assert view.key_value.shape == (2, 6, 2, 8) and view.key_value.dtype == torch.float16
    state_view = LightningCacheView.init(meta, layer_kind="lightning")
    assert state_view.key_value.shape == (2, 2, 4, 4) and state_view.key_value.dtype == torch.float32


def test_view_matches_reference_over_several_calls(gen):
    meta = LightningCacheMetaData.create(batch_size=2, num_heads=3, key_dim=4, value_dim=5, max_length=12)
    view = LightningCacheView.init(meta)
    attention_mask = torch.rand(2, 12, generator=gen) > 0.2
    kv, index = None, None
    for q in (4, 1, 3):
        k = torch.randn(2, q, 3, 4, generator=gen)
        v = torch.randn(2, q, 3, 5, generator=gen)
        if kv is None:
            kv, index = torch.zeros(2, 12, 3, 9), torch.zeros(2, dtype=torch.int64)
        kv, index, expected_mask = ref_concatenate_to_cache(kv, index, k, v, attention_mask=attention_mask,
                                                            is_causal=True)
        key_cache, value_cache, mask = view.concatenate_to_cache(k, k, v, attention_mask, causal_mask=True)
        assert torch.equal(mask, expected_mask)
        assert torch.equal(view.key_value, kv) and torch.equal(view.index, index)
        assert torch.equal(key_cache, kv[..., :4]) and torch.equal(value_cache, kv[..., 4:])


def test_quantizer_is_refused_before_any_write():
    """SPEC 8: quantizer is None or the storage's kv_quantization string; anything else raises first."""
    meta = LightningCacheMetaData.create(batch_size=1, num_heads=1, head_dim=2, max_length=4)
    view = LightningCacheView.init(meta)
    x = torch.ones(1, 1, 1, 2)
    with pytest.raises(TypeError, match="quantizer must be None or a str"):
        view.concatenate_to_cache(x, x, x, None, quantizer=lambda t: t)
    with pytest.raises(ValueError, match=r"quantizer='int8' does not match the cache storage"):
        view.concatenate_to_cache(x, x, x, None, quantizer="int8")
    assert view.key_value is None


def test_lightning_view_runs_the_recurrence(gen):
    meta = LightningCacheMetaData.create(batch_size=2, num_heads=4, head_dim=8, block_size=3)
    view = LightningCacheView.init(meta, layer_index=1, layer_kind="lightning", num_layers=4)
    slopes = lightning_slopes(4, 1, 4)
    state = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    for n in (7, 1, 1, 5):
        q, k, v = (torch.randn(2, n, 4, 8, generator=gen) / 8 ** 0.5 for _ in range(3))
        out = view.recurrent_update(q, k, v)
        state, expected = ref_lightning(state, q, k, v, slopes)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(view.key_value.double(), state, rtol=1e-5, atol=1e-5)
    assert torch.equal(view.layer_slopes(), slopes)
    assert "state=(2, 4, 8, 8)" in repr(view)


def test_each_view_refuses_the_other_kind():
    meta = LightningCacheMetaData.create(batch_size=1, num_heads=1, head_dim=2, max_length=4)
    cache = LightningCache.init_cache(2, meta, layer_kinds=["lightning", "attention"])
    x = torch.ones(1, 1, 1, 2)
    with pytest.raises(TypeError, match="concatenate_to_cache is for attention layers.*layer 0 is a lightning"):
        cache[0].concatenate_to_cache(x, x, x, None)
    with pytest.raises(TypeError, match="recurrent_update is for lightning layers.*layer 1 is a attention"):
        cache[1].recurrent_update(x, x, x)
    assert cache[0].key_value is None and cache[1].key_value is None


def test_cache_container():
    meta = LightningCacheMetaData.create(batch_size=1, num_heads=2, head_dim=4, max_length=8)
    cache = LightningCache.init_cache(3, meta)
    assert len(cache) == 3 and [v.layer_kind for v in cache] == ["attention"] * 3  # the seed's default
    assert [v.layer_index for v in cache] == [0, 1, 2]
    empty = LightningCache.init_empty(2)
    assert len(empty) == 2 and empty[0] is None and empty[1] is None
    assert repr(empty).count("None") == 2
    before = repr(cache)
    x = torch.ones(1, 2, 2, 4)
    cache[1].concatenate_to_cache(x, x, x, None, causal_mask=True)
    after = repr(cache)
    assert before.count("key_value=None") == 3 and after.count("key_value=None") == 2
    assert "positions=[2]" in after
    cache.reset()
    assert cache[1].index.tolist() == [0] and cache[1].key_value.abs().sum() == 0
    with pytest.raises(ValueError, match="layer_kinds"):
        LightningCache.init_cache(2, meta, layer_kinds=["attention"])
    with pytest.raises(ValueError, match="layer_kind"):
        LightningCache.init_cache(1, meta, layer_kinds=["mamba"])
    with pytest.raises(ValueError, match="num_hidden_layers"):
        LightningCache.init_empty(0)


def test_minimax_layer_pattern_and_runtime_metadata():
    kinds = minimax_layer_kinds(16)
    assert [i for i, k in enumerate(kinds) if k == "attention"] == [7, 15]
    assert repr(LightningMetadata()) == "LightningMetadata()"
