"""Tests of ``init_kv_cache`` and ``concatenate_to_cache`` (SPEC section 2).

The oracle is ``reference.ref_concatenate_to_cache`` (the SPEC rule, written
with loops); agreement is bit-for-bit (``torch.equal``) on the cache, the index
and the mask. ``reference.seed_concatenate_to_cache`` (the seed's JAX code
transcribed) checks that with all rows at one position and no ring the op
reproduces the seed. A few hand-written expected masks guard the oracle itself.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import torch_lightning_cache as tlc
from conftest import HAS_CUDA, LAYOUTS, make_inputs, randn, random_mask
from reference import ref_concatenate_to_cache, seed_concatenate_to_cache

ops = torch.ops.lightning_cache

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float16, torch.bfloat16]

HYPOTHESIS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    # No "explain" phase: it writes patch files under .hypothesis/ and needs libcst.
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- case construction


@st.composite
def concat_configs(draw, ring=None):
    B = draw(st.integers(1, 4))
    L = draw(st.integers(1, 10))
    ring = draw(st.booleans()) if ring is None else ring
    q = draw(st.integers(1, L))
    if ring:
        starts = draw(st.lists(st.integers(0, 4 * L), min_size=B, max_size=B))
    else:
        starts = draw(st.lists(st.integers(0, L - q), min_size=B, max_size=B))
    return dict(
        B=B, L=L, q=q, ring=ring, starts=starts,
        H=draw(st.integers(1, 3)), Dk=draw(st.integers(1, 5)), Dv=draw(st.integers(1, 5)),
        cache_dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        input_dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        attn=draw(st.sampled_from([None, "2d", "2d-strided", "4d", "4d-expanded"])),
        attn_dtype=draw(st.sampled_from(MASK_DTYPES)),
        causal=draw(st.sampled_from([None, "flag", "2d", "4d", "2d-transposed"])),
        causal_dtype=draw(st.sampled_from(MASK_DTYPES)),
        causal_extra=draw(st.integers(0, 3)),
        types=draw(st.sampled_from([None, torch.int64, torch.int32])),
        num_types=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_attention_mask(kind, B, q, L, dtype, gen, device):
    if kind is None:
        return None
    if kind == "2d":
        return random_mask((B, L), gen, dtype, device=device)
    if kind == "2d-strided":
        return random_mask((B, 2 * L), gen, dtype, device=device)[:, ::2]
    if kind == "4d":
        return random_mask((B, 1, q, L), gen, dtype, device=device)
    if kind == "4d-expanded":
        return random_mask((B, 1, 1, L), gen, dtype, device=device).expand(B, 1, q, L)
    raise ValueError(kind)


def make_causal(kind, T, dtype, gen, device):
    """(causal_mask, is_causal) for a kind; explicit masks are random bits, not just tril."""
    if kind is None:
        return None, False
    if kind == "flag":
        return None, True
    bits = random_mask((T, T), gen, dtype, p_true=0.6, device=device)
    if kind == "2d":
        return bits, False
    if kind == "4d":
        return bits[None, None], False
    if kind == "2d-transposed":
        return bits.t(), False
    raise ValueError(kind)


def build_case(cfg, device):
    g = torch.Generator().manual_seed(cfg["seed"])
    B, L, q, H, Dk, Dv = (cfg[k] for k in ("B", "L", "q", "H", "Dk", "Dv"))
    key_value = randn((B, L, H, Dk + Dv), g, cfg["cache_dtype"], device)
    index = torch.tensor(cfg["starts"], dtype=torch.int64, device=device)
    key, value = make_inputs(cfg["layout"], B, q, H, (Dk, Dv), g, cfg["input_dtype"], device)
    T = max(L, max(cfg["starts"]) + q) + cfg["causal_extra"]
    causal_mask, is_causal = make_causal(cfg["causal"], T, cfg["causal_dtype"], g, device)
    token_type_ids = None
    if cfg["types"] is not None:
        token_type_ids = torch.randint(0, cfg["num_types"] + 1, (B, q), generator=g).to(cfg["types"]).to(device)
    kwargs = dict(
        attention_mask=make_attention_mask(cfg["attn"], B, q, L, cfg["attn_dtype"], g, device),
        causal_mask=causal_mask,
        token_type_ids=token_type_ids,
        is_causal=is_causal,
        ring=cfg["ring"],
    )
    return key_value, index, key, value, kwargs


def check_against_reference(key_value, index, key, value, kwargs):
    """Runs the op (through the wrapper) and the oracle; asserts bit-for-bit agreement."""
    exp_kv, exp_index, exp_mask = ref_concatenate_to_cache(key_value, index, key, value, **kwargs)
    key_cache, value_cache, mask = tlc.concatenate_to_cache(key_value, index, key, value, **kwargs)
    Dk = key.shape[-1]
    assert mask.dtype == torch.bool
    assert mask.shape == (key_value.shape[0], 1, key.shape[1], key_value.shape[1])
    assert mask.device == key_value.device
    assert torch.equal(index, exp_index), (index, exp_index)
    assert torch.equal(key_value, exp_kv), "cache content differs from the reference"
    assert torch.equal(key_cache, exp_kv[..., :Dk])
    assert torch.equal(value_cache, exp_kv[..., Dk:])
    assert torch.equal(mask, exp_mask), f"mask differs from the reference:\n{mask.int()}\nexpected\n{exp_mask.int()}"
    return mask


# --------------------------------------------------------------------------- agreement with the oracle


@settings(max_examples=400, **HYPOTHESIS)
@given(cfg=concat_configs())
def test_matches_reference(device, cfg):
    key_value, index, key, value, kwargs = build_case(cfg, device)
    check_against_reference(key_value, index, key, value, kwargs)


@settings(max_examples=100, **HYPOTHESIS)
@given(cfg=concat_configs(ring=True))
def test_matches_reference_ring(device, cfg):
    key_value, index, key, value, kwargs = build_case(cfg, device)
    check_against_reference(key_value, index, key, value, kwargs)


@st.composite
def call_sequences(draw):
    """A cache plus a sequence of calls (block sizes and mask inputs per step)."""
    ring = draw(st.booleans())
    B = draw(st.integers(1, 3))
    if ring:
        L = draw(st.integers(1, 6))
        steps = draw(st.lists(st.integers(1, L), min_size=3, max_size=10))
        starts = draw(st.lists(st.integers(0, L), min_size=B, max_size=B))
    else:
        steps = draw(st.lists(st.integers(1, 4), min_size=2, max_size=6))
        starts = draw(st.lists(st.integers(0, 3), min_size=B, max_size=B))
        L = max(starts) + sum(steps) + draw(st.integers(0, 2))
    per_step = [
        dict(
            attn=draw(st.sampled_from([None, "2d", "4d"])),
            causal=draw(st.sampled_from([None, "flag", "4d"])),
            types=draw(st.sampled_from([None, torch.int64])),
        )
        for _ in steps
    ]
    return dict(
        ring=ring, B=B, L=L, steps=steps, starts=starts, per_step=per_step,
        H=draw(st.integers(1, 2)), Dk=draw(st.integers(1, 4)), Dv=draw(st.integers(1, 4)),
        cache_dtype=draw(st.sampled_from(FLOAT_DTYPES)), input_dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=80, **HYPOTHESIS)
@given(cfg=call_sequences())
def test_sequence_of_calls_matches_reference(device, cfg):
    g = torch.Generator().manual_seed(cfg["seed"])
    B, L, H, Dk, Dv = (cfg[k] for k in ("B", "L", "H", "Dk", "Dv"))
    key_value = randn((B, L, H, Dk + Dv), g, cfg["cache_dtype"], device)
    index = torch.tensor(cfg["starts"], dtype=torch.int64, device=device)
    # One causal mask for the whole run, as a model builds it once.
    T = max(cfg["starts"]) + sum(cfg["steps"]) + L
    full_causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    exp_kv, exp_index = key_value.clone(), index.clone()
    for q, step in zip(cfg["steps"], cfg["per_step"]):
        key, value = make_inputs(cfg["layout"], B, q, H, (Dk, Dv), g, cfg["input_dtype"], device)
        kwargs = dict(
            attention_mask=make_attention_mask(step["attn"], B, q, L, torch.bool, g, device),
            causal_mask=full_causal if step["causal"] == "4d" else None,
            is_causal=step["causal"] == "flag",
            token_type_ids=(torch.randint(0, 3, (B, q), generator=g).to(device) if step["types"] else None),
            ring=cfg["ring"],
        )
        exp_kv, exp_index, exp_mask = ref_concatenate_to_cache(exp_kv, exp_index, key, value, **kwargs)
        _, _, mask = tlc.concatenate_to_cache(key_value, index, key, value, **kwargs)
        assert torch.equal(index, exp_index)
        assert torch.equal(key_value, exp_kv)
        assert torch.equal(mask, exp_mask)
    assert index.tolist() == [s + sum(cfg["steps"]) for s in cfg["starts"]]


def test_ring_wraps_many_times(device, gen):
    """A ring of 5 slots fed 37 tokens in blocks of 1..5: the cache always holds the last 5 tokens."""
    B, L, H, Dk, Dv = 2, 5, 2, 3, 2
    key_value, index = tlc.init_kv_cache(B, L, H, Dk, Dv, dtype=torch.float32, device=device)
    index.copy_(torch.tensor([0, 3]))
    history = [[], []]  # every (position, key, value) written per row
    sizes = [1, 3, 5, 2, 4, 1, 5, 5, 3, 2, 1, 4, 1]
    for q in sizes:
        key, value = make_inputs("fused", B, q, H, (Dk, Dv), gen, torch.float32, device)
        start = index.tolist()
        exp_kv, exp_index, exp_mask = ref_concatenate_to_cache(key_value, index, key, value, is_causal=True,
                                                               ring=True)
        _, _, mask = tlc.concatenate_to_cache(key_value, index, key, value, is_causal=True, ring=True)
        assert torch.equal(key_value, exp_kv) and torch.equal(index, exp_index) and torch.equal(mask, exp_mask)
        for b in range(B):
            for t in range(q):
                history[b].append((start[b] + t, key[b, t].cpu(), value[b, t].cpu()))
            # Independent of the oracle: the slots hold exactly the last L tokens, at position % L.
            for pos, k, v in history[b][-L:]:
                assert torch.equal(key_value[b, pos % L, :, :Dk].cpu(), k)
                assert torch.equal(key_value[b, pos % L, :, Dk:].cpu(), v)
            # The last query sees the L most recent positions (those below L count as filled).
            assert int(mask[b, 0, q - 1].sum()) == min(L, int(index[b]))
    assert index.tolist() == [sum(sizes), 3 + sum(sizes)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("input_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("cache_dtype", FLOAT_DTYPES, ids=str)
def test_write_casts_like_torch(device, gen, cache_dtype, input_dtype, layout):
    """Every (cache dtype, input dtype, layout): the cache holds exactly ``key.to(cache dtype)``.

    float64 inputs carry bits float32 cannot hold, so a copy that passes
    through float32 is caught (float64 cache, strided float64 input)."""
    B, q, H, Dk, Dv, L = 2, 3, 2, 5, 3, 4
    key_value = randn((B, L, H, Dk + Dv), gen, cache_dtype, device)
    index = torch.tensor([0, 1], device=device)
    key, value = make_inputs(layout, B, q, H, (Dk, Dv), gen, input_dtype, device)
    tlc.concatenate_to_cache(key_value, index, key, value)
    for b, start in enumerate((0, 1)):
        assert torch.equal(key_value[b, start:start + q, :, :Dk], key[b].to(cache_dtype))
        assert torch.equal(key_value[b, start:start + q, :, Dk:], value[b].to(cache_dtype))


# --------------------------------------------------------------------------- hand-written masks


def _mask_of(device, B, L, starts, q, **kwargs):
    key_value, index = tlc.init_kv_cache(B, L, 1, 1, 1, device=device)
    index.copy_(torch.tensor(starts))
    key = torch.ones(B, q, 1, 1, device=device)
    _, _, mask = tlc.concatenate_to_cache(key_value, index, key, key, **kwargs)
    return mask[:, 0].int().cpu().tolist()


def test_handwritten_masks(device):
    # Per-row positions with the on-the-fly causal term.
    assert _mask_of(device, 2, 5, [0, 2], 2, is_causal=True) == [
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]],
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]],
    ]
    # No causal term (the seed without a causal mask): every filled column.
    assert _mask_of(device, 1, 5, [2], 2) == [[[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]]
    # Ring of 4 at position 5, q = 2: columns hold positions 4, 5, 6, 3.
    assert _mask_of(device, 1, 4, [5], 2, is_causal=True, ring=True) == [[[1, 1, 0, 1], [1, 1, 1, 1]]]
    # Token types, per row, relative to the new block; type 0 never matches.
    types = torch.tensor([[1, 1, 0], [2, 2, 2]], device=device)
    assert _mask_of(device, 2, 6, [0, 3], 3, is_causal=True, token_type_ids=types) == [
        [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]],
    ]
    # Token types are ignored without a causal term and for single-token calls.
    assert _mask_of(device, 1, 3, [0], 2, token_type_ids=torch.tensor([[1, 1]], device=device)) == [
        [[1, 1, 0], [1, 1, 0]]]
    assert _mask_of(device, 1, 3, [1], 1, is_causal=True, token_type_ids=torch.tensor([[1]], device=device)) == [
        [[1, 1, 0]]]
    # Explicit causal mask: row p, column = held position.
    causal = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool, device=device)
    assert _mask_of(device, 1, 4, [1], 2, causal_mask=causal) == [[[0, 1, 0, 0], [1, 0, 1, 0]]]
    # 2-D attention mask broadcast over queries, ANDed with the rest.
    attn = torch.tensor([[0, 1, 1, 1]], device=device)
    assert _mask_of(device, 1, 4, [1], 2, attention_mask=attn, is_causal=True) == [[[0, 1, 0, 0], [0, 1, 1, 0]]]


# --------------------------------------------------------------------------- seed equivalence


@st.composite
def seed_configs(draw, with_types=False):
    if with_types:
        B, P = 1, 0
        L = draw(st.integers(2, 10))
        q = draw(st.integers(2, L))
    else:
        B = draw(st.integers(1, 3))
        L = draw(st.integers(1, 10))
        q = draw(st.integers(1, L))
        P = draw(st.integers(0, L - q))
    return dict(
        B=B, L=L, q=q, P=P, H=draw(st.integers(1, 2)), Dk=draw(st.integers(1, 4)), Dv=draw(st.integers(1, 4)),
        attn=draw(st.sampled_from([None, "2d", "4d"])),
        attn_dtype=draw(st.sampled_from(MASK_DTYPES)),
        causal=draw(st.sampled_from(["flag", "4d"] if with_types else [None, "flag", "4d"])),
        tril=draw(st.booleans()),
        cache_dtype=draw(st.sampled_from(FLOAT_DTYPES)), input_dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        with_types=with_types, seed=draw(st.integers(0, 2**32 - 1)),
    )


def check_seed_equivalence(cfg, device):
    g = torch.Generator().manual_seed(cfg["seed"])
    B, L, q, P, H, Dk, Dv = (cfg[k] for k in ("B", "L", "q", "P", "H", "Dk", "Dv"))
    key_value = randn((B, L, H, Dk + Dv), g, cfg["cache_dtype"], device)
    index = torch.full((B,), P, dtype=torch.int64, device=device)
    key, value = make_inputs("fused", B, q, H, (Dk, Dv), g, cfg["input_dtype"], device)
    attention_mask = make_attention_mask(cfg["attn"], B, q, L, cfg["attn_dtype"], g, device)
    seed_attention = attention_mask if attention_mask is not None else torch.ones(B, L, dtype=torch.bool,
                                                                                  device=device)
    T = L + 2
    if cfg["causal"] == "flag":
        ours = dict(is_causal=True)
        seed_causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    elif cfg["causal"] == "4d":
        bits = torch.ones(T, T, dtype=torch.bool).tril() if cfg["tril"] else random_mask((T, T), g, p_true=0.6)
        seed_causal = bits[None, None].to(device)
        ours = dict(causal_mask=seed_causal)
    else:
        ours, seed_causal = {}, None
    token_type_ids = None
    if cfg["with_types"]:
        token_type_ids = torch.randint(0, 3, (B, q), generator=g).to(device)
        ours["token_type_ids"] = token_type_ids

    exp_k, exp_v, exp_mask, exp_index = seed_concatenate_to_cache(
        key_value[..., :Dk].clone(), key_value[..., Dk:].clone(), index, key, value, seed_attention,
        causal_mask=seed_causal, token_type_ids=token_type_ids)
    key_cache, value_cache, mask = tlc.concatenate_to_cache(key_value, index, key, value,
                                                            attention_mask=attention_mask, **ours)
    assert torch.equal(key_cache, exp_k)
    assert torch.equal(value_cache, exp_v)
    assert torch.equal(mask, exp_mask)
    assert torch.equal(index, exp_index)


@settings(max_examples=120, **HYPOTHESIS)
@given(cfg=seed_configs())
def test_seed_equivalence(device, cfg):
    check_seed_equivalence(cfg, device)


@settings(max_examples=60, **HYPOTHESIS)
@given(cfg=seed_configs(with_types=True))
def test_seed_equivalence_token_types(device, cfg):
    check_seed_equivalence(cfg, device)


def test_seed_token_types_example(device):
    """B = 1 at position 0: the seed's token-type widening, written out."""
    cfg = dict(B=1, L=5, q=4, P=0, H=1, Dk=2, Dv=2, attn=None, attn_dtype=torch.bool, causal="flag", tril=True,
               cache_dtype=torch.float32, input_dtype=torch.float32, with_types=True, seed=3)
    check_seed_equivalence(cfg, device)
    mask = _mask_of(device, 1, 5, [0], 4, is_causal=True, token_type_ids=torch.tensor([[0, 1, 1, 2]], device=device))
    assert mask == [[[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]]


# --------------------------------------------------------------------------- views and fresh outputs


def test_returned_caches_are_views_and_mask_is_fresh(device, gen):
    B, L, H, Dk, Dv, q = 2, 6, 3, 4, 5, 2
    key_value, index = tlc.init_kv_cache(B, L, H, Dk, Dv, device=device)
    key, value = make_inputs("contiguous", B, q, H, (Dk, Dv), gen, device=device)
    attention_mask = torch.ones(B, 1, q, L, dtype=torch.bool, device=device)
    key_cache, value_cache, mask = tlc.concatenate_to_cache(key_value, index, key, value,
                                                            attention_mask=attention_mask)
    elem = key_value.element_size()
    assert key_cache.shape == (B, L, H, Dk) and value_cache.shape == (B, L, H, Dv)
    assert key_cache.data_ptr() == key_value.data_ptr()
    assert value_cache.data_ptr() == key_value.data_ptr() + Dk * elem
    assert key_cache._base is key_value and value_cache._base is key_value
    # Live views: writing through the cache tensor shows in them.
    key_value[0, 5, 0, 0] = 7.0
    key_value[0, 5, 0, Dk] = 8.0
    assert key_cache[0, 5, 0, 0].item() == 7.0 and value_cache[0, 5, 0, 0].item() == 8.0

    raw = ops.concatenate_to_cache(key_value, index, key, value, attention_mask)
    for out in (mask, raw):
        assert out._base is None
        storage = out.untyped_storage().data_ptr()
        for other in (key_value, index, key, value, attention_mask):
            assert storage != other.untyped_storage().data_ptr()
    assert torch.equal(raw, torch.ones_like(raw).logical_and(
        torch.arange(L, device=device) < 4))  # positions 0..3 filled, no causal term


# --------------------------------------------------------------------------- opcheck


def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    B, L, H, Dk, Dv = 2, 8, 2, 3, 4

    def fresh(starts, dtype=torch.float32):
        kv = randn((B, L, H, Dk + Dv), g, dtype, device)
        return kv, torch.tensor(starts, dtype=torch.int64, device=device)

    kv, idx = fresh([1, 3])
    k, v = make_inputs("fused", B, 2, H, (Dk, Dv), g, torch.float32, device)
    yield (kv, idx, k, v), {}
    kv, idx = fresh([0, 5], torch.bfloat16)
    k, v = make_inputs("transposed", B, 3, H, (Dk, Dv), g, torch.float16, device)
    yield (kv, idx, k, v), dict(attention_mask=random_mask((B, L), g, torch.int64, device=device), is_causal=True,
                                token_type_ids=torch.tensor([[1, 1, 0], [2, 0, 2]], device=device))
    kv, idx = fresh([2, 6])
    k, v = make_inputs("contiguous", B, 2, H, (Dk, Dv), g, torch.float32, device)
    yield (kv, idx, k, v), dict(attention_mask=random_mask((B, 1, 2, L), g, device=device),
                                causal_mask=torch.ones(1, 1, 10, 10, dtype=torch.bool, device=device).tril())
    kv, idx = fresh([7, 13])
    k, v = make_inputs("step", B, 3, H, (Dk, Dv), g, torch.float32, device)
    yield (kv, idx, k, v), dict(is_causal=True, ring=True)


def test_opcheck_concatenate_to_cache(device):
    for args, kwargs in _opcheck_cases(device):
        before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(ops.concatenate_to_cache.default, args, kwargs)
        # opcheck works on copies; the inputs themselves are untouched.
        assert all(torch.equal(a, b) for a, b in zip(args, before))


def test_opcheck_init_kv_cache(device):
    for dtype in (None, torch.float32, torch.float16, torch.bfloat16):
        torch.library.opcheck(ops.init_kv_cache.default, (2, 5, 3, 4, 2),
                              {"dtype": dtype, "device": torch.device(device)})


# --------------------------------------------------------------------------- init_kv_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_init_kv_cache(device, dtype):
    key_value, index = tlc.init_kv_cache(3, 7, 2, 5, 4, dtype=dtype, device=device)
    assert key_value.shape == (3, 7, 2, 9) and key_value.dtype == dtype
    assert key_value.is_contiguous() and key_value.device.type == device
    assert index.shape == (3,) and index.dtype == torch.int64 and index.device.type == device
    assert not key_value.any() and not index.any()
    raw_kv, raw_index = ops.init_kv_cache(3, 7, 2, 5, 4, dtype=dtype, device=torch.device(device))
    assert torch.equal(raw_kv, key_value) and torch.equal(raw_index, index)


def test_init_kv_cache_default_dtype_follows_torch_default():
    assert tlc.init_kv_cache(1, 2, 1, 1, 1)[0].dtype == torch.get_default_dtype()
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert tlc.init_kv_cache(1, 2, 1, 1, 1)[0].dtype == torch.float64
        torch.set_default_dtype(torch.float16)
        assert tlc.init_kv_cache(1, 2, 1, 1, 1)[0].dtype == torch.float16
    finally:
        torch.set_default_dtype(previous)
    assert tlc.init_kv_cache(1, 2, 1, 1, 1)[0].device.type == "cpu"


@pytest.mark.parametrize("position", range(5))
@pytest.mark.parametrize("bad", [0, -3])
def test_init_kv_cache_bad_sizes(position, bad):
    names = ["batch_size", "max_length", "num_heads", "key_dim", "value_dim"]
    sizes = [2, 4, 2, 3, 3]
    sizes[position] = bad
    with pytest.raises(ValueError, match=rf"init_kv_cache: {names[position]} must be positive, got {bad}"):
        tlc.init_kv_cache(*sizes)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_init_kv_cache_bad_dtype(dtype):
    with pytest.raises(TypeError, match="cache dtype must be float"):
        tlc.init_kv_cache(1, 2, 1, 1, 1, dtype=dtype)


# --------------------------------------------------------------------------- bad inputs


def _base(device, gen):
    B, L, H, Dk, Dv, q = 2, 6, 2, 3, 4, 2
    key_value = randn((B, L, H, Dk + Dv), gen, device=device)
    index = torch.tensor([1, 3], device=device)
    key, value = make_inputs("contiguous", B, q, H, (Dk, Dv), gen, device=device)
    return dict(key_value=key_value, index=index, key=key, value=value, kw={})


def _with(**changes):
    def apply(a, device):
        a = dict(a, kw=dict(a["kw"]))
        for name, fn in changes.items():
            if name in ("key_value", "index", "key", "value"):
                a[name] = fn(a, device)
            else:
                a["kw"][name] = fn(a, device)
        return a
    return apply


def _t(*shape, dtype=torch.float32):
    return lambda a, device: torch.ones(*shape, dtype=dtype, device=device)


BAD_INPUTS = [
    # (id, change, exception, message regex)
    ("kv-3d", _with(key_value=lambda a, d: a["key_value"][0]), ValueError, r"key_value must be \[batch, max_length"),
    ("kv-int", _with(key_value=lambda a, d: a["key_value"].to(torch.int32)), TypeError,
     r"key_value must be float32, float16, bfloat16 or float64, got Int"),
    ("kv-noncontiguous", _with(key_value=lambda a, d: a["key_value"].transpose(0, 1).contiguous().transpose(0, 1)),
     ValueError, r"key_value must be contiguous"),
    ("kv-empty-length", _with(key_value=lambda a, d: a["key_value"][:, :0]), ValueError, r"max_length > 0"),
    ("key-3d", _with(key=lambda a, d: a["key"][0]), ValueError, r"key must be \[batch, new_tokens, heads, key_dim\]"),
    ("value-5d", _with(value=lambda a, d: a["value"][None]), ValueError,
     r"value must be \[batch, new_tokens, heads, value_dim\]"),
    ("key-batch", _with(key=lambda a, d: a["key"][:1]), ValueError, r"key has batch 1 but key_value has batch 2"),
    ("value-batch", _with(value=lambda a, d: torch.cat([a["value"]] * 2)), ValueError,
     r"value has batch 4 but key_value has batch 2"),
    ("value-tokens", _with(value=lambda a, d: a["value"][:, :1]), ValueError, r"value has 1 new tokens but key has 2"),
    ("key-heads", _with(key=lambda a, d: a["key"][:, :, :1]), ValueError, r"key has 1 heads but key_value has 2"),
    ("value-heads", _with(value=lambda a, d: a["value"][:, :, :1]),
     ValueError, r"value has 1 heads but key_value has 2"),
    ("dims-sum", _with(value=lambda a, d: a["value"][..., :3]), ValueError,
     r"key_dim \+ value_dim \(3 \+ 3\) must equal the last dimension of key_value \(7\)"),
    ("key-dim", _with(key=lambda a, d: torch.ones(2, 2, 2, 4, device=d)), ValueError,
     r"key_dim \+ value_dim \(4 \+ 4\) must equal"),
    ("zero-heads", _with(key_value=lambda a, d: a["key_value"][:, :, :0].contiguous(),
                         key=lambda a, d: a["key"][:, :, :0], value=lambda a, d: a["value"][:, :, :0]), ValueError,
     r"heads must be positive: key_value has shape \[2, 6, 0, 7\]"),
    ("zero-head-dims", _with(key_value=lambda a, d: a["key_value"][..., :0].contiguous(),
                             key=lambda a, d: a["key"][..., :0], value=lambda a, d: a["value"][..., :0]), ValueError,
     r"key_dim must be positive"),
    ("zero-value-dim", _with(key_value=lambda a, d: a["key_value"][..., :3].contiguous(),
                             value=lambda a, d: a["value"][..., :0]), ValueError, r"value_dim must be positive"),
    ("key-int", _with(key=lambda a, d: a["key"].to(torch.int64), value=lambda a, d: a["value"].to(torch.int64)),
     TypeError, r"key must be floating point, got Long"),
    ("key-bool", _with(key=lambda a, d: a["key"] > 0, value=lambda a, d: a["value"] > 0), TypeError,
     r"key must be floating point"),
    ("value-dtype", _with(value=lambda a, d: a["value"].half()),
     TypeError, r"value must have key's dtype \(Float\), got Half"),
    ("index-int32", _with(index=lambda a, d: a["index"].int()), TypeError, r"index must be int64, got Int"),
    ("index-float", _with(index=lambda a, d: a["index"].float()), TypeError, r"index must be int64"),
    ("index-shape", _with(index=lambda a, d: a["index"][:1]),
     ValueError, r"index must be \[batch\] = \[2\], got shape \[1\]"),
    ("index-2d", _with(index=lambda a, d: a["index"][None]), ValueError, r"index must be \[batch\] = \[2\]"),
    ("index-scalar", _with(index=lambda a, d: a["index"][0]), ValueError, r"index must be \[batch\]"),
    ("overflow", _with(index=lambda a, d: torch.tensor([1, 5], device=d)), IndexError,
     r"cache overflow in row 1: position 5 \+ 2 new tokens exceeds max_length 6"),
    ("overflow-row0", _with(index=lambda a, d: torch.tensor([6, 0], device=d)), IndexError,
     r"cache overflow in row 0: position 6 \+ 2 new tokens exceeds max_length 6"),
    ("overflow-huge", _with(index=lambda a, d: torch.tensor([0, 2**40], device=d)), IndexError,
     r"cache overflow in row 1: position 1099511627776 \+ 2 new tokens exceeds max_length 6"),
    ("negative", _with(index=lambda a, d: torch.tensor([1, -2], device=d)), IndexError,
     r"index\[1\] = -2 is negative"),
    ("negative-ring", _with(index=lambda a, d: torch.tensor([-1, 0], device=d), ring=lambda a, d: True), IndexError,
     r"index\[0\] = -1 is negative"),
    ("ring-too-many", _with(key=lambda a, d: torch.ones(2, 7, 2, 3, device=d),
                            value=lambda a, d: torch.ones(2, 7, 2, 4, device=d), ring=lambda a, d: True),
     ValueError, r"with ring=True at most max_length \(6\) tokens can be written per call, got 7"),
    ("attn-2d-length", _with(attention_mask=_t(2, 7, dtype=torch.bool)), ValueError,
     r"attention_mask must be \[batch, max_length\] = \[2, 6\] or \[batch, 1, new_tokens, max_length\] = "
     r"\[2, 1, 2, 6\], got shape \[2, 7\]"),
    ("attn-2d-batch", _with(attention_mask=_t(1, 6, dtype=torch.bool)), ValueError, r"attention_mask must be"),
    ("attn-4d-tokens", _with(attention_mask=_t(2, 1, 3, 6, dtype=torch.bool)), ValueError,
     r"attention_mask must be .*got shape \[2, 1, 3, 6\]"),
    ("attn-4d-heads", _with(attention_mask=_t(2, 2, 2, 6, dtype=torch.bool)), ValueError, r"attention_mask must be"),
    ("attn-4d-length", _with(attention_mask=_t(2, 1, 2, 5, dtype=torch.bool)), ValueError, r"attention_mask must be"),
    ("attn-3d", _with(attention_mask=_t(2, 2, 6, dtype=torch.bool)), ValueError, r"attention_mask must be"),
    ("attn-1d", _with(attention_mask=_t(6, dtype=torch.bool)), ValueError, r"attention_mask must be"),
    ("attn-complex", _with(attention_mask=_t(2, 6, dtype=torch.complex64)), TypeError,
     r"attention_mask must be bool, integer or floating point"),
    ("causal-and-flag", _with(causal_mask=_t(6, 6, dtype=torch.bool), is_causal=lambda a, d: True), ValueError,
     r"either causal_mask or is_causal=True, not both"),
    ("causal-not-square", _with(causal_mask=_t(8, 9, dtype=torch.bool)), ValueError,
     r"causal_mask must be \[T, T\] or \[1, 1, T, T\], got shape \[8, 9\]"),
    ("causal-4d-batch", _with(causal_mask=_t(2, 1, 8, 8, dtype=torch.bool)),
     ValueError, r"causal_mask must be \[T, T\]"),
    ("causal-3d", _with(causal_mask=_t(1, 8, 8, dtype=torch.bool)), ValueError, r"causal_mask must be \[T, T\]"),
    ("causal-too-small", _with(causal_mask=_t(1, 1, 5, 5, dtype=torch.bool)), ValueError,
     r"causal_mask covers T = 5 positions but the cache holds max_length = 6"),
    ("valid-control-last-causal-row", _with(causal_mask=_t(6, 6, dtype=torch.bool),
                                            index=lambda a, d: torch.tensor([0, 5], device=d),
                                            key=lambda a, d: a["key"][:, :1], value=lambda a, d: a["value"][:, :1]),
     None, None),  # valid: p = 5 < T = 6, must succeed (control case for the next two)
    ("causal-p-beyond-T-ring", _with(causal_mask=_t(6, 6, dtype=torch.bool), ring=lambda a, d: True,
                                     index=lambda a, d: torch.tensor([0, 5], device=d)), IndexError,
     r"causal_mask covers T = 6 positions but row 1 starts at position 5 and needs 2 more"),
    ("causal-p-beyond-T-big", _with(causal_mask=_t(7, 7, dtype=torch.bool), ring=lambda a, d: True,
                                    index=lambda a, d: torch.tensor([9, 0], device=d)), IndexError,
     r"causal_mask covers T = 7 positions but row 0 starts at position 9 and needs 2 more"),
    ("causal-complex", _with(causal_mask=_t(6, 6, dtype=torch.complex64)), TypeError,
     r"causal_mask must be bool, integer or floating point"),
    ("types-float", _with(token_type_ids=_t(2, 2, dtype=torch.float32)), TypeError,
     r"token_type_ids must be int64 or int32, got Float"),
    ("types-int16", _with(token_type_ids=_t(2, 2, dtype=torch.int16)),
     TypeError, r"token_type_ids must be int64 or int32"),
    ("types-bool", _with(token_type_ids=_t(2, 2, dtype=torch.bool)),
     TypeError, r"token_type_ids must be int64 or int32"),
    ("types-shape", _with(token_type_ids=_t(2, 3, dtype=torch.int64)), ValueError,
     r"token_type_ids must be \[batch, new_tokens\] = \[2, 2\], got shape \[2, 3\]"),
    ("types-1d", _with(token_type_ids=_t(2, dtype=torch.int64)),
     ValueError, r"token_type_ids must be \[batch, new_tokens\]"),
    ("types-batch", _with(token_type_ids=_t(1, 2, dtype=torch.int32)),
     ValueError, r"token_type_ids must be \[batch, new_tokens\]"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_and_leave_cache_untouched(device, gen, case):
    _, change, exc, regex = case
    base = _base(device, gen)
    a = change(base, device)
    kv_before, index_before = a["key_value"].clone(), a["index"].clone()
    base_kv_before, base_index_before = base["key_value"].clone(), base["index"].clone()
    if exc is None:  # control case: must succeed
        tlc.concatenate_to_cache(a["key_value"], a["index"], a["key"], a["value"], **a["kw"])
        return
    with pytest.raises(exc, match=regex):
        tlc.concatenate_to_cache(a["key_value"], a["index"], a["key"], a["value"], **a["kw"])
    assert torch.equal(a["key_value"], kv_before) and torch.equal(a["index"], index_before)
    assert torch.equal(base["key_value"], base_kv_before) and torch.equal(base["index"], base_index_before)


def test_overflow_in_one_row_writes_nothing_anywhere(device, gen):
    """Row 0 fits, row 1 does not: the call fails before row 0 is written either."""
    key_value = randn((3, 4, 1, 4), gen, device=device)
    index = torch.tensor([0, 3, 1], device=device)
    key, value = make_inputs("fused", 3, 2, 1, (2, 2), gen, device=device)
    before = key_value.clone()
    with pytest.raises(IndexError, match=r"row 1: position 3 \+ 2 new tokens exceeds max_length 4"):
        tlc.concatenate_to_cache(key_value, index, key, value, is_causal=True)
    assert torch.equal(key_value, before) and index.tolist() == [0, 3, 1]


@pytest.mark.skipif(not HAS_CUDA, reason="device mismatch needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("which", ["index", "key", "value", "attention_mask", "causal_mask", "token_type_ids"])
def test_device_mismatch_cuda(gen, which):
    a = _base("cuda", gen)
    a["kw"] = dict(attention_mask=torch.ones(2, 6, dtype=torch.bool, device="cuda"),
                   causal_mask=torch.ones(6, 6, dtype=torch.bool, device="cuda"),
                   token_type_ids=torch.ones(2, 2, dtype=torch.int64, device="cuda"))
    if which in a:
        a[which] = a[which].cpu()
    else:
        a["kw"][which] = a["kw"][which].cpu()
    kv_before, index_before = a["key_value"].clone(), a["index"].clone()
    with pytest.raises(ValueError, match=rf"{which} must be on the same device as key_value"):
        tlc.concatenate_to_cache(a["key_value"], a["index"], a["key"], a["value"], **a["kw"])
    assert torch.equal(a["key_value"], kv_before) and torch.equal(a["index"].cpu(), index_before.cpu())


@pytest.mark.parametrize("which", ["index", "key", "value", "attention_mask"])
def test_meta_tensor_mixed_in_is_rejected(gen, which):
    """A meta tensor among CPU tensors is a device mismatch, as it is for ATen ops
    (``torch.zeros(3).index_copy_(0, meta_index, ...)`` raises). It must not run
    a fake kernel that writes nothing and returns an uninitialised mask."""
    a = _base("cpu", gen)
    a["kw"] = dict(attention_mask=torch.ones(2, 6, dtype=torch.bool))
    if which in a:
        a[which] = a[which].to("meta")
    else:
        a["kw"][which] = a["kw"][which].to("meta")
    with pytest.raises((ValueError, RuntimeError), match=r"device"):
        ops.concatenate_to_cache(a["key_value"], a["index"], a["key"], a["value"], **a["kw"])


# --------------------------------------------------------------------------- check_bounds=False


@pytest.mark.parametrize("ring", [False, True])
def test_check_bounds_false_skips_invalid_rows(device, gen, ring):
    """Documented fallback: a row whose write would overflow (no ring) or whose
    position is negative is skipped whole: nothing written, index kept, mask
    row all false; the other rows proceed."""
    B, L, H, Dk, Dv, q = 5, 6, 2, 2, 3, 3
    key_value = randn((B, L, H, Dk + Dv), gen, torch.bfloat16, device)
    starts = [0, 4, -1, 3, -7] if not ring else [0, 10, -1, 3, -7]
    index = torch.tensor(starts, device=device)
    key, value = make_inputs("fused", B, q, H, (Dk, Dv), gen, torch.float32, device)
    kwargs = dict(attention_mask=random_mask((B, L), gen, device=device), is_causal=True, ring=ring)
    before = key_value.clone()
    exp_kv, exp_index, exp_mask = ref_concatenate_to_cache(key_value, index, key, value, check_bounds=False, **kwargs)
    _, _, mask = tlc.concatenate_to_cache(key_value, index, key, value, check_bounds=False, **kwargs)
    assert torch.equal(key_value, exp_kv) and torch.equal(index, exp_index) and torch.equal(mask, exp_mask)
    skipped = [1, 2, 4] if not ring else [2, 4]
    for b in range(B):
        if b in skipped:
            assert torch.equal(key_value[b], before[b]) and index[b].item() == starts[b]
            assert not mask[b].any()
        else:
            assert index[b].item() == starts[b] + q
            assert mask[b].any()
    # With checks on, the same call is rejected and changes nothing.
    with pytest.raises(IndexError):
        tlc.concatenate_to_cache(key_value, index, key, value, **kwargs)


def test_check_bounds_false_row_beyond_causal_T_is_skipped(device, gen):
    """Ring with an explicit causal mask too small for a row's positions, checks off
    (SPEC 6): that row is skipped whole (nothing written, index kept, mask row all
    false); the other rows proceed, and no causal entry outside [T, T] is read.

    The [T, T] mask is a view of a [T, T + 1] tensor whose extra column is all
    true, so a kernel that read causal[p, held] for held >= T would pick up
    those true values (instead of reading past the allocation) and fail.
    """
    B, L, H, Dk, Dv, q = 2, 8, 1, 2, 2, 3
    key_value = randn((B, L, H, Dk + Dv), gen, device=device)
    index = torch.tensor([0, 6], device=device)
    backing = torch.ones(L, L + 1, dtype=torch.bool, device=device).tril()
    backing[:, L] = True
    causal = backing[:, :L]  # [T, T] = [8, 8] lower triangular, row stride 9
    key, value = make_inputs("contiguous", B, q, H, (Dk, Dv), gen, device=device)
    before = key_value.clone()
    with pytest.raises(IndexError, match="causal_mask covers T = 8 positions but row 1 starts at position 6"):
        tlc.concatenate_to_cache(key_value, index, key, value, causal_mask=causal, ring=True)
    assert torch.equal(key_value, before) and index.tolist() == [0, 6]
    exp_kv, exp_index, exp_mask = ref_concatenate_to_cache(key_value, index, key, value, causal_mask=causal,
                                                           ring=True, check_bounds=False)
    _, _, mask = tlc.concatenate_to_cache(key_value, index, key, value, causal_mask=causal, ring=True,
                                          check_bounds=False)
    assert torch.equal(key_value, exp_kv) and torch.equal(index, exp_index) and torch.equal(mask, exp_mask)
    assert index.tolist() == [3, 6]
    assert torch.equal(key_value[1], before[1]) and not mask[1].any()
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]


@settings(max_examples=60, **HYPOTHESIS)
@given(cfg=concat_configs(), shift=st.lists(st.integers(-12, 12), min_size=4, max_size=4))
def test_check_bounds_false_matches_reference_on_any_positions(device, cfg, shift):
    """Random (possibly invalid) positions with check_bounds=False: bit-exact with the oracle's fallback."""
    cfg = dict(cfg, starts=[s + shift[b] for b, s in enumerate(cfg["starts"])])
    if cfg["causal"] not in (None, "flag"):
        cfg["causal"] = "flag"  # keep T independent of the shifted positions
    key_value, index, key, value, kwargs = build_case(cfg, device)
    exp_kv, exp_index, exp_mask = ref_concatenate_to_cache(key_value, index, key, value, check_bounds=False, **kwargs)
    _, _, mask = tlc.concatenate_to_cache(key_value, index, key, value, check_bounds=False, **kwargs)
    assert torch.equal(key_value, exp_kv) and torch.equal(index, exp_index) and torch.equal(mask, exp_mask)


# --------------------------------------------------------------------------- CUDA vs CPU


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@settings(max_examples=80, **HYPOTHESIS)
@given(cfg=concat_configs())
def test_cuda_matches_cpu(cfg):
    cpu = build_case(cfg, "cpu")
    gpu = build_case(cfg, "cuda")
    _, _, mask_cpu = tlc.concatenate_to_cache(*cpu[:4], **cpu[4])
    _, _, mask_gpu = tlc.concatenate_to_cache(*gpu[:4], **gpu[4])
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    assert torch.equal(mask_gpu.cpu(), mask_cpu)
