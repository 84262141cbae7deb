"""Quantized sequence-cache storage (SPEC 8, storage half): int8 and fp8 e4m3 codes with per-token scales.

The oracle is ``reference.ref_quantized_write`` / ``ref_quantize_kv_tokens`` / ``ref_dequantize_kv``:
codes and scales must agree bit for bit; the error of the dequantized cache is checked against
each format's rounding bound; masks must equal the unquantized path's.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

import torch_lightning_cache as tlc
from conftest import make_inputs, randn
from reference import (KV_CODE_DTYPES, KV_MAX_SCALE, ref_cached_attention, ref_dequantize_kv, ref_quantize_kv_tokens,
                       ref_quantized_write)

ops = torch.ops.lightning_cache
FORMATS = ["int8", "fp8_e4m3"]
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Codes as raw bytes (fp8 tensors have no torch.equal on every backend)."""
    t = t.detach().cpu()
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def pool(fmt, device, P=4, L=6, H=2, Dk=8, Dv=5, starts=(0, 3, 1, 2)):
    key_value, index, scales = tlc.init_quantized_kv_cache(P, L, H, Dk, Dv, fmt, device=device)
    # Non-zero old content, so "only the new tokens change" is a real check.
    key_value.copy_(torch.randint(-100, 100, key_value.shape, generator=torch.Generator().manual_seed(1))
                    .to(key_value.dtype))
    scales.copy_(torch.rand(scales.shape, generator=torch.Generator().manual_seed(2)))
    index.copy_(torch.tensor(starts))
    return key_value, index, scales


def spread_inputs(layout, B, q, H, Dk, Dv, gen, dtype, device):
    """Keys/values whose token-heads span several binades (and a few large outliers)."""
    key, value = make_inputs(layout, B, q, H, (Dk, Dv), gen, dtype, device)
    with torch.no_grad():
        for t in (key, value):
            base = t.clone()
            mag = torch.exp2(torch.randint(-6, 7, base.shape, generator=gen).to(torch.float32)).to(device)
            t.copy_((base.float() * mag).to(dtype))  # in place: the layout (strides) is kept
    return key, value


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("layout,ring,slots", [("contiguous", False, None), ("fused", True, [2, -1, 0]),
                                               ("step", False, [3, 1, 9]), ("transposed", True, [1, 1, 0])])
def test_quantized_write_matches_reference(device, gen, fmt, dtype, layout, ring, slots):
    P, L, H, Dk, Dv, q = 4, 6, 2, 8, 5, 2
    key_value, index, scales = pool(fmt, device)
    assert key_value.shape == (P, L, H, Dk + Dv)  # the pool these sizes describe
    B = P if slots is None else len(slots)
    key, value = spread_inputs(layout, B, q, H, Dk, Dv, gen, dtype, device)
    slot_ids = None if slots is None else torch.tensor(slots, device=device)
    named = [s for s in (slots or []) if s >= 0]
    check = len(set(named)) == len(named) and all(s < P for s in named)  # bad ids: checks off, skipped
    if slots is None:
        index.copy_(torch.tensor([0, 3, 1, 4]))
    exp_kv, exp_scales, exp_index = ref_quantized_write(key_value, scales, index, key, value, fmt, ring=ring,
                                                        check_bounds=check, slot_ids=slot_ids)
    # The unquantized path on a float pool at the same positions gives the mask to expect.
    dense_kv, dense_index = torch.zeros(key_value.shape, device=device), index.clone()
    _, _, exp_mask = tlc.concatenate_to_cache(dense_kv, dense_index, key, value, is_causal=True, ring=ring,
                                              check_bounds=check, slot_ids=slot_ids)
    _, _, mask = tlc.concatenate_to_cache(key_value, index, key, value, is_causal=True, ring=ring,
                                          check_bounds=check, slot_ids=slot_ids, scales=scales)
    assert torch.equal(bits(key_value), bits(exp_kv)), "codes differ from the reference"
    assert torch.equal(scales.cpu(), exp_scales), "scales differ from the reference"
    assert torch.equal(index, dense_index) and torch.equal(index.cpu(), exp_index)
    assert torch.equal(mask, exp_mask)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_write_to_cache_quantizes_like_concatenate(device, gen, fmt, dtype):
    key_value, index, scales = pool(fmt, device)
    key, value = spread_inputs("contiguous", 4, 2, 2, 8, 5, gen, dtype, device)
    index.copy_(torch.tensor([0, 3, 1, 4]))
    exp_kv, exp_scales, exp_index = ref_quantized_write(key_value, scales, index, key, value, fmt)
    tlc.write_to_cache(key_value, index, key, value, scales=scales)
    assert torch.equal(bits(key_value), bits(exp_kv)) and torch.equal(scales.cpu(), exp_scales)
    assert torch.equal(index.cpu(), exp_index)


def error_bound(fmt, x, scale):
    """Largest |x - dequantized| a correct rounding allows (plus float32 slack)."""
    x, scale = x.double(), scale.double()
    if fmt == "int8":
        bound = scale / 2
    else:
        y = (x / scale).abs()
        binade = torch.exp2(torch.floor(torch.log2(y.clamp_min(2.0 ** -6))))  # subnormals: spacing 2^-9
        bound = 2.0 ** -4 * binade * scale
    return bound * (1 + 1e-5) + x.abs() * 2.0 ** -22


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_dequantized_error_within_format_bound(device, gen, fmt, dtype):
    P, L, H, Dk, Dv = 3, 16, 4, 32, 16
    key_value, index, scales = tlc.init_quantized_kv_cache(P, L, H, Dk, Dv, fmt, device=device)
    key, value = spread_inputs("contiguous", P, L, H, Dk, Dv, gen, dtype, device)
    tlc.concatenate_to_cache(key_value, index, key, value, scales=scales)
    for compute in (torch.float32, torch.float64):
        dk, dv = tlc.dequantize_kv(key_value, scales, Dk, compute)
        ek, ev = ref_dequantize_kv(key_value, scales, Dk, compute)
        assert torch.equal(dk.cpu(), ek) and torch.equal(dv.cpu(), ev)
    dk, dv = tlc.dequantize_kv(key_value, scales, Dk, torch.float64)
    for x, deq, s in ((key, dk, scales[..., 0]), (value, dv, scales[..., 1])):
        x = x.double().cpu()
        err = (deq.cpu() - x).abs()
        bound = error_bound(fmt, x, s.cpu()[..., None].expand_as(x))
        assert (err <= bound).all(), f"max error/bound {(err / bound).max().item():.3f}"
        # The bound is not vacuous: the largest element of every token-head is (nearly) exact.
        assert err.max() > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_and_non_finite_token_heads(device, fmt):
    key_value, index, scales = tlc.init_quantized_kv_cache(1, 4, 2, 3, 2, fmt, device=device)
    key = torch.tensor([[[[0.0, -0.0, 0.0], [1.0, -2.0, 0.5]]], [[[1.0, math.nan, 2.0], [3.0, 0.0, -1.0]]]],
                       device=device).transpose(0, 1).contiguous()  # [1, 2, 2, 3]
    value = torch.tensor([[[[0.0, 0.0], [math.inf, 1.0]], [[4.0, -4.0], [0.0, 0.0]]]], device=device)
    tlc.concatenate_to_cache(key_value, index, key, value, scales=scales)
    dk, dv = tlc.dequantize_kv(key_value, scales, 3, torch.float32)
    assert scales[0, 0, 0, 0] == 0 and torch.equal(dk[0, 0, 0].cpu(), torch.zeros(3))  # all-zero: exact zeros
    assert torch.equal(dv[0, 0, 0].cpu(), torch.zeros(2)) and torch.equal(dv[0, 1, 1].cpu(), torch.zeros(2))
    assert dk[0, 1, 0].isnan().all() and dv[0, 0, 1].isnan().all()  # a non-finite element: that token-head only
    assert not dk[0, 0, 1].isnan().any() and not dk[0, 1, 1].isnan().any() and not dv[0, 1, 0].isnan().any()
    codes, s = ref_quantize_kv_tokens(key, fmt)
    assert torch.equal(bits(key_value[..., :3]), bits(torch.cat([codes, torch.zeros_like(codes[:, :2])], 1)))


FLOAT32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op", ["concatenate", "write"])
def test_float32_extremes_dequantize_finite(device, gen, fmt, op):
    """Finite input up to +-3.4028235e38 never dequantizes to inf: the scale is capped (issue 24)."""
    P, L, H, Dk, Dv = 2, 5, 2, 4, 3
    top = [FLOAT32_MAX, -FLOAT32_MAX, torch.nextafter(torch.tensor(FLOAT32_MAX), torch.tensor(0.0)).item(),
           FLOAT32_MAX / 2, 1.7e38, 3.0e38]
    key_value, index, scales = tlc.init_quantized_kv_cache(P, L, H, Dk, Dv, fmt, device=device)
    key = randn((P, L, H, Dk), gen, device=device)
    value = randn((P, L, H, Dv), gen, device=device)
    pick = torch.tensor(top)[torch.randint(0, len(top), (P, L, H), generator=gen)].to(device)
    key[..., 0] = pick  # every token-head's amax at the top of the range, the rest ordinary
    value[..., -1] = -pick
    key[0, 0, 0] = torch.tensor([FLOAT32_MAX, -FLOAT32_MAX, FLOAT32_MAX, 3.0e38])  # all at the top
    exp_kv, exp_scales, _ = ref_quantized_write(key_value, scales, index, key, value, fmt)
    if op == "concatenate":
        mask = ops.concatenate_to_cache(key_value, index, key, value, is_causal=True, scales=scales)
    else:
        tlc.write_to_cache(key_value, index, key, value, scales=scales)
    assert torch.equal(bits(key_value), bits(exp_kv)) and torch.equal(scales.cpu(), exp_scales)
    assert (scales <= KV_MAX_SCALE[fmt]).all() and (scales == KV_MAX_SCALE[fmt]).any()  # the cap is reached
    for dtype in (torch.float32, torch.float64):
        dk, dv = tlc.dequantize_kv(key_value, scales, Dk, dtype)
        assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
        # Within the format's rounding bound of the input (the cap moves the top by one ulp at most).
        for x, deq, sc in ((key, dk, scales[..., 0]), (value, dv, scales[..., 1])):
            x = x.double().cpu()
            err = (deq.double().cpu() - x).abs()
            bound = error_bound(fmt, x, sc.cpu().double()[..., None].expand_as(x))
            assert (err <= bound).all()
    assert torch.equal(tlc.dequantize_kv(key_value, scales, Dk, torch.float32)[0].cpu(),
                       ref_dequantize_kv(key_value, scales, Dk)[0])
    # Attention over the extreme cache: each query sees one column (a float32 sum of several values
    # near 3.4e38 would overflow in any float32 kernel), and a tiny query keeps the scores finite.
    query = randn((P, 1, H, Dk), gen, device=device, scale=1e-36)
    one = torch.zeros(P, 1, 1, L, dtype=torch.bool, device=device)
    one[0, ..., 2] = True
    one[1, ..., 4] = True
    out = tlc.cached_attention(query, key_value, one, Dk, scales=scales)
    assert torch.isfinite(out).all()
    expected = ref_cached_attention(query, key_value, one, Dk, scales=scales)
    assert torch.allclose(out.double().cpu(), expected, rtol=1e-6, atol=0)
    if op == "concatenate":  # the mask the write returned, its first query (causal: sees column 0 only)
        first = mask[:, :, :1]
        assert first.sum() == P and torch.isfinite(tlc.cached_attention(query, key_value, first, Dk,
                                                                        scales=scales)).all()


BAD_SCALES = [
    ("missing", lambda s: None, ValueError, r"holds .* codes, so scales \[pool, max_length, heads, 2\] \(float32\) "
                                           r"are required"),
    ("float64", lambda s: s.double(), TypeError, r"scales must be float32, got Double"),
    ("shape", lambda s: s[:, :5].contiguous(), ValueError, r"scales must be \[pool, max_length, heads, 2\] = "
                                                           r"\[4, 6, 2, 2\], got shape \[4, 5, 2, 2\]"),
    ("last-dim", lambda s: torch.cat([s, s], -1), ValueError, r"scales must be \[pool, max_length, heads, 2\]"),
    ("strided", lambda s: torch.cat([s, s], 0)[::2], ValueError, r"scales must be contiguous"),
    ("meta", lambda s: s.to("meta"), ValueError, r"scales must be on the same device"),
]


@pytest.mark.parametrize("write_only", [False, True])
@pytest.mark.parametrize("case", BAD_SCALES, ids=[c[0] for c in BAD_SCALES])
def test_bad_scales_raise_and_leave_pool_untouched(device, gen, case, write_only):
    _, change, exc, regex = case
    key_value, index, scales = pool("int8", device)
    before = (key_value.clone(), index.clone(), scales.clone())
    key, value = make_inputs("contiguous", 4, 1, 2, (8, 5), gen, device=device)
    with pytest.raises(exc, match=regex):
        if write_only:
            tlc.write_to_cache(key_value, index, key, value, scales=change(scales))
        else:
            tlc.concatenate_to_cache(key_value, index, key, value, scales=change(scales))
    assert torch.equal(key_value, before[0]) and torch.equal(index, before[1]) and torch.equal(scales, before[2])


def test_scales_with_float_storage_and_bad_storage_dtypes(device, gen):
    key_value, index = tlc.init_kv_cache(2, 4, 1, 2, 2, device=device)
    key, value = make_inputs("contiguous", 2, 1, 1, (2, 2), gen, device=device)
    with pytest.raises(ValueError, match=r"scales are only for quantized storage .* but key_value is Float"):
        tlc.concatenate_to_cache(key_value, index, key, value, scales=torch.zeros(2, 4, 1, 2, device=device))
    with pytest.raises(TypeError, match=r"key_value must be float32, float16, bfloat16 or float64, got Byte"):
        tlc.concatenate_to_cache(key_value.to(torch.uint8), index, key, value,
                                 scales=torch.zeros(2, 4, 1, 2, device=device))
    assert index.tolist() == [0, 0] and not key_value.any()


def test_dequantize_kv_arguments(device):
    key_value, _, scales = tlc.init_quantized_kv_cache(2, 3, 1, 2, 2, "int8", device=device)
    with pytest.raises(ValueError, match=r"key_dim must be in \[1, 3\]"):
        tlc.dequantize_kv(key_value, scales, 4)
    with pytest.raises(TypeError, match=r"key_value must hold int8 or float8_e4m3fn codes, got Float"):
        tlc.dequantize_kv(key_value.float(), scales, 2)
    with pytest.raises(TypeError, match=r"dtype must be float32, float16, bfloat16 or float64, got Long"):
        tlc.dequantize_kv(key_value, scales, 2, torch.int64)
    with pytest.raises(ValueError, match=r"scales must be \[pool, max_length, heads, 2\]"):
        tlc.dequantize_kv(key_value, scales[:1].contiguous(), 2)
    with pytest.raises(TypeError, match=r"key_dim must be an int"):
        tlc.dequantize_kv(key_value, scales, 2.0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        k, v = tlc.dequantize_kv(key_value, scales, 2, dtype)
        assert k.dtype == v.dtype == dtype and k.shape == (2, 3, 1, 2) and v.is_contiguous()


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_quantized(device, gen, fmt):
    key_value, index, scales = pool(fmt, device)
    key, value = make_inputs("fused", 3, 2, 2, (8, 5), gen, torch.bfloat16, device)
    slot_ids = torch.tensor([2, -1, 0], device=device)
    # test_schema compares fp8 tensors with arithmetic torch does not implement for float8_e4m3fn
    # ("mul_cpu_reduced_float"); the int8 run covers it for the same kernels.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    utils = utils if fmt == "int8" else utils[1:]
    torch.library.opcheck(ops.concatenate_to_cache.default, (key_value, index, key, value),
                          dict(is_causal=True, slot_ids=slot_ids, scales=scales), test_utils=utils)
    torch.library.opcheck(ops.write_to_cache.default, (key_value, index, key, value),
                          dict(ring=True, slot_ids=slot_ids, scales=scales), test_utils=utils)
    torch.library.opcheck(ops.dequantize_kv.default, (key_value, scales, 8, torch.float16), test_utils=utils)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compile_fullgraph_quantized_decode(device, gen, fmt):
    key_value, index, scales = pool(fmt, device)
    eager = (key_value.clone(), index.clone(), scales.clone())

    def step(kv, idx, sc, k, v, ids):
        _, _, mask = tlc.concatenate_to_cache(kv, idx, k, v, is_causal=True, ring=True, check_bounds=False,
                                              slot_ids=ids, scales=sc)
        dk, dv = tlc.dequantize_kv(kv, sc, 8, torch.float32)
        return mask, dk, dv

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for ids in ([0, 1, 2], [3, -1, 3]):
        key, value = make_inputs("contiguous", 3, 1, 2, (8, 5), gen, device=device)
        ids = torch.tensor(ids, device=device)
        with torch._dynamo.config.patch(error_on_recompile=counter.frame_count > 0):
            got = compiled(key_value, index, scales, key, value, ids)
        want = step(*eager, key, value, ids)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(bits(key_value), bits(eager[0])) and torch.equal(scales, eager[2])
    assert counter.frame_count == 1


def test_metadata_and_view(device, gen):
    with pytest.raises(ValueError, match=r"kv_quantization must be None or one of \['fp8_e4m3', 'int8'\], got 'int4'"):
        tlc.LightningCacheMetaData.create(num_heads=2, head_dim=4, kv_quantization="int4")
    with pytest.raises(TypeError, match=r"kv_quantization must be a str or None, got int 8"):
        tlc.LightningCacheMetaData.create(num_heads=2, head_dim=4, kv_quantization=8)
    metadata = tlc.LightningCacheMetaData.create(batch_size=2, num_heads=2, head_dim=4, max_length=5,
                                                 dtype=torch.bfloat16, device=device, kv_quantization="int8")
    view = tlc.LightningCacheView.init(metadata, layer_index=0)
    assert view.key_value.dtype == torch.int8 and view.scales.shape == (2, 5, 2, 2)
    key, value = make_inputs("fused", 2, 3, 2, (4, 4), gen, torch.bfloat16, device)
    with pytest.raises(ValueError, match=r"quantizer='fp8_e4m3' does not match the cache storage"):
        view.concatenate_to_cache(None, key, value, None, quantizer="fp8_e4m3")
    with pytest.raises(TypeError, match=r"quantizer must be None or a str"):
        view.concatenate_to_cache(None, key, value, None, quantizer=object())
    assert view.index.tolist() == [0, 0]
    key_cache, value_cache, mask = view.concatenate_to_cache(None, key, value, None, quantizer="int8",
                                                             causal_mask=True)
    assert key_cache.dtype == torch.bfloat16 and key_cache.shape == (2, 5, 2, 4) and mask.shape == (2, 1, 3, 5)
    assert torch.equal(key_cache, view.key_cache) and torch.equal(value_cache, view.value_cache)
    ek, ev = ref_dequantize_kv(*ref_quantized_write(torch.zeros_like(view.key_value), torch.zeros_like(view.scales),
                                                    torch.zeros(2, dtype=torch.int64), key, value, "int8")[:2], 4,
                               torch.bfloat16)
    assert torch.equal(key_cache.cpu(), ek) and torch.equal(value_cache.cpu(), ev)
    # Unquantized views stay zero-copy.
    plain = tlc.LightningCacheView.init(tlc.LightningCacheMetaData.create(
        batch_size=2, num_heads=2, head_dim=4, max_length=5, dtype=torch.float32, device=device), layer_index=0)
    k, _, _ = plain.concatenate_to_cache(None, key, value, None)
    assert k.data_ptr() == plain.key_value.data_ptr()
    # Forking copies the scales with the codes.
    cache = tlc.LightningCache([view])
    cache.copy_slots(torch.tensor([0], device=device), torch.tensor([1], device=device))
    assert torch.equal(view.scales[1], view.scales[0]) and torch.equal(bits(view.key_value[1]),
                                                                       bits(view.key_value[0]))
    assert KV_CODE_DTYPES["fp8_e4m3"] == tlc.KV_QUANTIZATION["fp8_e4m3"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_model_on_quantized_storage_tracks_the_unquantized_model(device, fmt):
    """HybridLM with quantized attention storage: same weights, logits within a small distance of the
    unquantized model's over a ragged prefill and decode steps, and the attention cache is smaller."""
    from torch_lightning_cache.models.hybrid import HybridConfig, HybridLM

    config = HybridConfig(hidden_size=32, num_layers=2, num_heads=2, head_dim=16, intermediate_size=64,
                          max_length=16)
    quantized = dataclasses.replace(config, kv_quantization=fmt)
    models = [HybridLM(c, batch_size=2, device=device, seed=3).eval() for c in (config, quantized)]
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
    logits = []
    with torch.inference_mode():
        for model in models:
            model.reset_cache()
            out = [model(ids[:1, :6], row_start=0), model(ids[1:, :4], row_start=1)[:, -1:]]
            out += [model(ids[:, 4 + t:5 + t]) for t in range(2)]
            logits.append(torch.cat([out[0][:, -1:], out[1]], 0).squeeze(1))
            logits.append(torch.cat(out[2:], 1))
    assert all(torch.isfinite(t).all() for t in logits)
    for plain, quant in ((logits[0], logits[2]), (logits[1], logits[3])):
        difference = (plain - quant).abs().max().item()
        assert 0 < difference < 0.1 * plain.abs().max().item(), difference
    assert models[1].cache_bytes()["attention"] < models[0].cache_bytes()["attention"] / 2


def test_demo_reports_kv_quantization():
    done = subprocess.run([sys.executable, "-m", "torch_lightning_cache", "demo", "--tokens", "4", "--prompt-length",
                           "5", "--batch", "2", "--layers", "2", "--hidden", "32", "--heads", "2", "--max-length",
                           "12", "--kv-quantization", "int8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kv-quantization int8: cache memory per attention layer" in done.stdout
    assert "greedy tokens agreeing with the unquantized run" in done.stdout and "PASS" in done.stdout
