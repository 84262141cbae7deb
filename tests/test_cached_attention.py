"""cached_attention (SPEC 8): attention of new queries straight from the unified cache.

Every result is checked against ``reference.ref_cached_attention`` (float64
``scaled_dot_product_attention`` over the dequantized cache, ``enable_gqa=True``,
fully masked rows -> zeros). int8 / float8_e4m3fn caches are made here with a
small pure-PyTorch quantizer (per token-head scales, as SPEC 8 stores them).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torch_lightning_cache as tlc
from conftest import randn, rel_err
from reference import ref_cached_attention

_ops = torch.ops.lightning_cache

STORAGES = ["float32", "bfloat16", "float16", "int8", "fp8_e4m3"]
_FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize(dense: torch.Tensor, key_dim: int, storage: str):
    """``(codes, scales)`` of a dense ``[B, L, H, Dk + Dv]`` cache: one scale per token, head and K/V.

    int8: ``scale = amax / 127``, round to nearest; fp8: ``scale = amax / 448``. An
    all-zero token-head gets scale 0 and codes 0.
    """
    dense = dense.to(torch.float32)
    parts, scales = [], []
    for part in (dense[..., :key_dim], dense[..., key_dim:]):
        amax = part.abs().amax(dim=-1, keepdim=True)
        scale = amax / (127.0 if storage == "int8" else 448.0)
        scaled = part / torch.where(scale > 0, scale, torch.ones_like(scale))
        if storage == "int8":
            parts.append(scaled.round().clamp(-127, 127).to(torch.int8))
        else:
            parts.append(scaled.to(torch.float8_e4m3fn))
        scales.append(scale)
    return torch.cat(parts, dim=-1), torch.cat(scales, dim=-1).contiguous()


def build(storage, B, L, H, Dk, Dv, q, group, gen, device="cpu", query_dtype=torch.float32, positions=None):
    """A cache with history at different positions per row, ``q`` new tokens written with
    ``concatenate_to_cache(is_causal=True)``; returns (query, key_value, scales, mask)."""
    dense = randn((B, L, H, Dk + Dv), gen)  # columns past each row's end hold garbage: masked out
    index = torch.tensor(positions if positions is not None else
                         [int(torch.randint(0, L - q + 1, (1,), generator=gen)) for _ in range(B)])
    new_k, new_v = randn((B, q, H, Dk), gen), randn((B, q, H, Dv), gen)
    mask = _ops.concatenate_to_cache(dense, index, new_k, new_v, None, None, None, True, False, True)
    if storage in _FLOAT:
        key_value, scales = dense.to(_FLOAT[storage]), None
    else:
        key_value, scales = quantize(dense, Dk, storage)
    query = randn((B, q, H * group, Dk), gen, query_dtype)
    return query.to(device), key_value.to(device), None if scales is None else scales.to(device), mask.to(device)


def tolerance(storage, query_dtype):
    if storage in ("bfloat16", "float16") or query_dtype != torch.float32:
        return 2e-2
    return 1e-5


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("q,group,dims", [(1, 1, (16, 16)), (1, 4, (128, 128)), (1, 8, (24, 20)),
                                          (3, 4, (24, 20)), (5, 1, (32, 40)), (2, 8, (16, 16))])
def test_matches_sdpa_over_dequantized_cache(device, storage, q, group, dims, gen):
    Dk, Dv = dims
    query, key_value, scales, mask = build(storage, 3, 150, 2, Dk, Dv, q, group, gen, device)
    out = tlc.cached_attention(query, key_value, mask, Dk, scales=scales)
    assert out.shape == (3, q, 2 * group, Dv) and out.dtype == query.dtype and out.device.type == device
    want = ref_cached_attention(query, key_value, mask, Dk, scales)
    assert rel_err(out, want) <= tolerance(storage, query.dtype), rel_err(out, want)


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_bfloat16_query(device, storage, gen):
    query, key_value, scales, mask = build(storage, 2, 200, 2, 64, 64, 1, 4, gen, device, torch.bfloat16)
    out = tlc.cached_attention(query, key_value, mask, 64, scales=scales)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref_cached_attention(query, key_value, mask, 64, scales)) <= 2e-2


@pytest.mark.parametrize("storage", ["float32", "int8", "fp8_e4m3"])
def test_column_splits_of_one_long_row(device, storage, gen):
    """B = H = 1: the columns are split across threads (flash-decoding) and combined."""
    query, key_value, scales, mask = build(storage, 1, 700, 1, 32, 32, 1, 4, gen, device, positions=[650])
    out = tlc.cached_attention(query, key_value, mask, 32, scales=scales)
    assert rel_err(out, ref_cached_attention(query, key_value, mask, 32, scales)) <= 1e-5


@pytest.mark.parametrize("storage", ["float32", "int8", "fp8_e4m3"])
def test_random_masks_and_fully_masked_rows(device, storage, gen):
    """Masks of any shape (not only prefixes), different per query; all-false rows give zeros."""
    B, L, H, Dk, Dv, q, group = 3, 140, 2, 24, 24, 4, 2
    query, key_value, scales, _ = build(storage, B, L, H, Dk, Dv, q, group, gen, device)
    mask = torch.rand(B, 1, q, L, generator=gen) < 0.3
    mask[0, 0, 1] = False  # one query sees nothing
    mask[2] = False  # a whole row sees nothing
    mask[1, 0, 2, 70:] = True
    mask = mask.to(device)
    out = tlc.cached_attention(query, key_value, mask, Dk, scales=scales)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1].cpu(), torch.zeros(H * group, Dv)) and torch.equal(out[2].cpu(), torch.zeros(q, H * group, Dv))
    assert rel_err(out, ref_cached_attention(query, key_value, mask, Dk, scales)) <= 1e-5


def test_empty_cache_and_empty_calls(device):
    kv = torch.zeros(2, 0, 2, 16, device=device)
    out = tlc.cached_attention(torch.ones(2, 1, 4, 8, device=device), kv, torch.zeros(2, 1, 1, 0, dtype=torch.bool,
                                                                                       device=device), 8)
    assert torch.equal(out.cpu(), torch.zeros(2, 1, 4, 8))
    kv = torch.zeros(2, 5, 2, 16, device=device)
    for B, q, Hq in ((0, 1, 4), (2, 0, 4), (2, 1, 0)):
        out = tlc.cached_attention(torch.ones(B, q, Hq, 8, device=device), kv[:B],
                                   torch.ones(B, 1, q, 5, dtype=torch.bool, device=device), 8)
        assert out.shape == (B, q, Hq, 8)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8", "fp8_e4m3"])
def test_non_finite_values_in_hidden_columns_never_reach_outputs(device, storage, gen):
    """SPEC 6: NaN/Inf (values, codes or scales) in masked columns are dropped by selection."""
    B, L, H, Dk, Dv, q, group = 2, 130, 2, 16, 16, 3, 2
    query, key_value, scales, mask = build(storage, B, L, H, Dk, Dv, q, group, gen, device)
    want = ref_cached_attention(query, key_value, mask, Dk, scales)
    hidden = ~mask[:, 0].any(dim=1)  # [B, L]: columns no query of the row sees
    poisoned = key_value.clone()
    if storage == "int8":
        scales = scales.clone()
        scales[hidden] = float("nan")
    elif storage == "fp8_e4m3":
        poisoned.view(torch.uint8)[hidden] = 0x7F  # float8_e4m3fn's NaN code
    else:
        poisoned[hidden] = float("nan")
        if scales is not None:
            scales = scales.clone()
            scales[hidden] = float("inf")
    out = tlc.cached_attention(query, poisoned, mask, Dk, scales=scales)
    assert torch.isfinite(out).all()
    assert rel_err(out, want) <= tolerance(storage, query.dtype)


def test_partly_visible_column_with_nan_reaches_only_its_queries(device, gen):
    """A column one query sees and another does not: a NaN there reaches only the first."""
    B, L, H, Dk, Dv = 1, 70, 1, 16, 16
    kv = randn((B, L, H, Dk + Dv), gen).to(device)
    mask = torch.zeros(B, 1, 2, L, dtype=torch.bool, device=device)
    mask[0, 0, 0, :60] = True
    mask[0, 0, 1, :61] = True  # column 60 seen only by query 1
    kv[0, 60, 0, Dk:] = float("inf")
    query = randn((B, 2, 2, Dk), gen).to(device)
    out = tlc.cached_attention(query, kv, mask, Dk)
    assert torch.isfinite(out[0, 0]).all() and not torch.isfinite(out[0, 1]).all()
    clean = kv.clone()
    clean[0, 60] = 0
    assert rel_err(out[0, 0], ref_cached_attention(query, clean, mask, Dk)[0, 0]) <= 1e-5


def test_minus_infinite_score_before_any_finite_one_has_weight_zero(device, gen):
    """A visible column whose score is -inf (here a -inf key element) gets weight 0, as in SDPA, also when it is
    the first column a query sees (the online softmax's running max is still -inf there: no -inf - -inf)."""
    B, L, H, Dk, Dv = 1, 300, 1, 8, 8
    kv = randn((B, L, H, Dk + Dv), gen).to(device)
    kv[0, 0, 0, :Dk] = 0
    kv[0, 0, 0, 0] = -float("inf")
    query = torch.ones(B, 1, H, Dk, device=device)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
    out = tlc.cached_attention(query, kv, mask, Dk)
    assert torch.isfinite(out).all()
    clean_mask = mask.clone()
    clean_mask[..., 0] = False
    assert rel_err(out, ref_cached_attention(query, kv, clean_mask, Dk)) <= 1e-5


@pytest.mark.parametrize("column", [0, 47, 48, 200, 299])
@pytest.mark.parametrize("where", ["key", "value", "key_scale"])
def test_visible_nan_reaches_the_output_as_in_sdpa(device, gen, column, where):
    """A NaN in a visible key (or key scale) makes that query's output NaN, and a NaN in a visible value makes its
    element NaN, as SDPA does, wherever the column sits: first in a block or split, alone in a block, after
    masked columns. (A running max that keeps or drops NaN by operand order gave finite outputs for some.)"""
    B, L, H, Dk, Dv = 1, 300, 1, 8, 8
    kv = randn((B, L, H, Dk + Dv), gen)
    scales = None
    if where == "key_scale":
        kv, scales = quantize(kv, Dk, "int8")
        scales[0, column, 0, 0] = float("nan")
    else:
        kv[0, column, 0, 3 if where == "key" else Dk + 3] = float("nan")
    mask = torch.zeros(B, 1, 2, L, dtype=torch.bool)
    mask[0, 0, 0] = True
    mask[0, 0, 1, column:] = True  # the NaN column is the first this query sees
    mask[0, 0, 1, :column] = column % 2 == 1  # ...or comes after visible ones
    query = randn((B, 2, H, Dk), gen)
    want = ref_cached_attention(query, kv, mask, Dk, scales=scales)
    got = tlc.cached_attention(query.to(device), kv.to(device), mask.to(device), Dk,
                               scales=None if scales is None else scales.to(device)).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).any()
    hidden = mask.clone()
    hidden[..., column] = False  # the query that does not see the column is untouched
    assert torch.isfinite(tlc.cached_attention(query.to(device), kv.to(device), hidden.to(device), Dk,
                                               scales=None if scales is None else scales.to(device))).all()


def test_strided_inputs(device, gen):
    """Query slices of a fused projection, a transposed query, a cache slice, an expanded mask, strided scales."""
    B, L, H, Dk, Dv, group = 2, 90, 2, 32, 32, 4
    fused = randn((B, 1, H * group, 3 * Dk + 5), gen).to(device)
    query = fused[..., 3:3 + Dk]
    big = randn((B, L + 7, H, Dk + Dv), gen).to(device)
    key_value = big[:, 7:]  # not contiguous in the batch dimension
    mask = (torch.arange(L, device=device) < 50).view(1, 1, 1, L).expand(B, 1, 1, L)
    out = tlc.cached_attention(query, key_value, mask, Dk)
    assert rel_err(out, ref_cached_attention(query, key_value, mask, Dk)) <= 1e-5
    transposed = randn((B, H * group, 1, Dk), gen).to(device).transpose(1, 2)
    out = tlc.cached_attention(transposed, key_value, mask, Dk)
    assert rel_err(out, ref_cached_attention(transposed, key_value, mask, Dk)) <= 1e-5
    codes, scales = quantize(key_value.cpu(), Dk, "int8")
    wide = torch.zeros(B, L, H, 4)
    wide[..., ::2] = scales
    strided_scales = wide[..., ::2].to(device)
    out = tlc.cached_attention(query, codes.to(device), mask, Dk, scales=strided_scales)
    assert rel_err(out, ref_cached_attention(query, codes, mask, Dk, scales)) <= 1e-5
    # last-dim-strided cache: copied once, same result
    step = torch.stack([key_value, key_value], dim=-1).flatten(-2)[..., ::2]
    out = tlc.cached_attention(query, step, mask, Dk)
    assert rel_err(out, ref_cached_attention(query, key_value, mask, Dk)) <= 1e-5


def test_softmax_scale_and_grouping(device, gen):
    """softmax_scale is used as given; query head hq reads cache head hq // (Hq // H)."""
    query, key_value, _, mask = build("float32", 2, 40, 2, 16, 16, 1, 4, gen, device)
    out = tlc.cached_attention(query, key_value, mask, 16, softmax_scale=0.05)
    assert rel_err(out, ref_cached_attention(query, key_value, mask, 16, softmax_scale=0.05)) <= 1e-5
    # the same heads one at a time
    for hq in range(8):
        alone = tlc.cached_attention(query[:, :, hq:hq + 1], key_value[:, :, hq // 4:hq // 4 + 1], mask, 16,
                                     softmax_scale=0.05)
        torch.testing.assert_close(alone[:, :, 0], out[:, :, hq], rtol=1e-6, atol=1e-6)


def test_all_zero_token_head_and_large_values(device, gen):
    """Scale 0 (an all-zero token-head) and inputs far from 1 stay finite and exact."""
    B, L, H, Dk, Dv = 1, 40, 1, 16, 16
    dense = randn((B, L, H, Dk + Dv), gen, scale=30.0)
    dense[0, :10] = 0
    codes, scales = quantize(dense, Dk, "int8")
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    query = randn((B, 1, 2, Dk), gen, scale=3.0)
    out = tlc.cached_attention(query.to(device), codes.to(device), mask.to(device), Dk, scales=scales.to(device))
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_cached_attention(query, codes, mask, Dk, scales)) <= 1e-5


# --------------------------------------------------------------------------- hostile input


def _good(device="cpu", storage="int8"):
    g = torch.Generator().manual_seed(0)
    query, key_value, scales, mask = build(storage, 2, 20, 2, 8, 8, 1, 2, g, device)
    return dict(query=query, key_value=key_value, mask=mask, key_dim=8, scales=scales)


@pytest.mark.parametrize("change,error,words", [
    (dict(query=torch.zeros(2, 1, 4)), ValueError, "query must be"),
    (dict(query=torch.zeros(2, 1, 4, 8, dtype=torch.float64)), TypeError, "query must be float32"),
    (dict(query=torch.zeros(2, 1, 4, 8, dtype=torch.int32)), TypeError, "query must be float32"),
    (dict(query=torch.zeros(3, 1, 4, 8)), ValueError, "batch"),
    (dict(query=torch.zeros(2, 1, 3, 8)), ValueError, "multiple"),
    (dict(query=torch.zeros(2, 1, 4, 7)), ValueError, "key_dim"),
    (dict(key_dim=0), ValueError, "key_dim must be in"),
    (dict(key_dim=16), ValueError, "key_dim must be in"),
    (dict(key_dim=-3), ValueError, "key_dim must be in"),
    (dict(scales=None), ValueError, "scales"),
    (dict(scales=torch.ones(2, 20, 2, 2, dtype=torch.float64)), TypeError, "scales must be float32"),
    (dict(scales=torch.ones(2, 20, 2, 3)), ValueError, "scales must be"),
    (dict(scales=torch.ones(2, 19, 2, 2)), ValueError, "scales must be"),
    (dict(key_value=torch.zeros(2, 20, 2, 16, dtype=torch.float64)), TypeError, "key_value must be"),
    (dict(key_value=torch.zeros(2, 20, 2, 16, dtype=torch.uint8)), TypeError, "key_value must be"),
    (dict(key_value=torch.zeros(2, 20, 16)), ValueError, "key_value must be"),
    (dict(key_value=torch.zeros(2, 20, 0, 16, dtype=torch.int8)), ValueError, "heads must be positive"),
    (dict(key_value=torch.zeros(2, 20, 2, 16), scales=torch.ones(2, 20, 2, 2)), ValueError, "only for int8"),
    (dict(mask=torch.ones(2, 1, 1, 20, dtype=torch.uint8)), TypeError, "mask must be bool"),
    (dict(mask=torch.ones(2, 1, 1, 19, dtype=torch.bool)), ValueError, "mask must be"),
    (dict(mask=torch.ones(2, 20, dtype=torch.bool)), ValueError, "mask must be"),
    (dict(mask=torch.ones(2, 1, 2, 20, dtype=torch.bool)), ValueError, "mask must be"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(softmax_scale=1e300), ValueError, "softmax_scale"),
    (dict(mask="causal"), TypeError, "mask must be a torch.Tensor"),
    (dict(key_dim=8.0), TypeError, "key_dim must be an int"),
    (dict(key_dim=True), TypeError, "key_dim must be an int"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a float or None"),
    (dict(scales=[1.0]), TypeError, "scales must be a torch.Tensor or None"),
])
def test_hostile_arguments_raise_clear_errors(change, error, words):
    args = {**_good(), **change}
    with pytest.raises(error, match=words):
        tlc.cached_attention(**args)


def test_meta_tensor_among_real_ones_is_rejected():
    args = _good()
    args["mask"] = args["mask"].to("meta")
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        tlc.cached_attention(**args)


def test_portable_cpu_path_matches_reference():
    """LIGHTNING_CACHE_CPU_ISA=generic forces the portable kernels."""
    script = """
import torch, sys
sys.path.insert(0, "tests")
import torch_lightning_cache as tlc
from test_cached_attention import build
from reference import ref_cached_attention
from conftest import rel_err
g = torch.Generator().manual_seed(3)
for storage in ("float32", "bfloat16", "float16", "int8", "fp8_e4m3"):
    for q, group, L in ((1, 4, 150), (3, 2, 90), (1, 2, 700)):
        query, kv, scales, mask = build(storage, 1 if L == 700 else 2, L, 2, 24, 20, q, group, g)
        out = tlc.cached_attention(query, kv, mask, 24, scales=scales)
        tol = 2e-2 if storage in ("bfloat16", "float16") else 1e-5
        err = rel_err(out, ref_cached_attention(query, kv, mask, 24, scales))
        assert err <= tol, (storage, q, group, err)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LIGHTNING_CACHE_CPU_ISA="generic",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# --------------------------------------------------------------------------- compile, export, opcheck


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_opcheck(device, storage):
    args = _good(device, storage)
    torch.library.opcheck(_ops.cached_attention,
                          (args["query"], args["key_value"], args["mask"], 8, args["scales"], None))
    torch.library.opcheck(_ops.cached_attention,
                          (args["query"], args["key_value"], args["mask"], 8, args["scales"], 0.25))


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = _ops.cached_attention(torch.empty(3, 2, 8, 16, dtype=torch.bfloat16),
                                    torch.empty(3, 50, 2, 40, dtype=torch.int8),
                                    torch.empty(3, 1, 2, 50, dtype=torch.bool), 16, torch.empty(3, 50, 2, 2), None)
        assert out.shape == (3, 2, 8, 24) and out.dtype == torch.bfloat16


def test_compile_fullgraph_decode_step(device, gen):
    """concatenate_to_cache + cached_attention compiled as one graph, no recompile across steps."""
    B, L, H, D, group = 2, 64, 2, 16, 2
    key_value, index = tlc.init_kv_cache(B, L, H, D, D, device=device)

    def step(kv, idx, q, k, v):
        mask = _ops.concatenate_to_cache(kv, idx, k, v, None, None, None, True, False, False)
        return tlc.cached_attention(q, kv, mask, D)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    eager_kv, eager_index = key_value.clone(), index.clone()
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        q, k, v = (randn((B, 1, n, D), gen).to(device) for n in (H * group, H, H))
        got = compiled(key_value, index, q, k, v)
        want = step(eager_kv, eager_index, q, k, v)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(key_value, eager_kv) and torch.equal(index, eager_index)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


class _Attend(torch.nn.Module):
    def forward(self, query, key_value, mask, scales):
        return tlc.cached_attention(query, key_value, mask, 8, scales=scales)


def test_export(device):
    args = _good(device, "int8")
    exported = torch.export.export(_Attend(), (args["query"], args["key_value"], args["mask"], args["scales"]))
    assert "cached_attention" in str(exported.graph)
    got = exported.module()(args["query"], args["key_value"], args["mask"], args["scales"])
    torch.testing.assert_close(got, tlc.cached_attention(**args), rtol=0, atol=0)
