"""Hugging Face transformers' MiniMaxForCausalLM on this package's ops (SPEC section 10).

A tiny random MiniMax (built from a config, no downloads), in both layer orders. The reference is Hugging Face's
own model run without a cache (``use_cache=False``: the whole sequence recomputed every step), which is exact for
every decoding mode; Hugging Face's own cache is also run where the tests say where it fails. Experts: all of them
are used per token (``num_experts_per_tok == num_local_experts``), so routing is continuous and float rounding
cannot flip a discrete expert choice.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MiniMaxConfig, MiniMaxForCausalLM  # noqa: E402
from transformers.models.minimax.modeling_minimax import MiniMaxCache  # noqa: E402

from torch_lightning_cache.integrations.transformers import LightningMiniMaxCache, patch_minimax  # noqa: E402

ORDERS = {
    "softmax_first": ["full_attention", "linear_attention"] * 2,  # Hugging Face's default
    "lightning_first": ["linear_attention", "full_attention"] * 2,  # minimax_layer_kinds' order
}
VOCAB = 128
LOGITS_TOL = 1e-4


def make_config(order: str) -> MiniMaxConfig:
    return MiniMaxConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                         num_experts_per_tok=2, block_size=8, max_position_embeddings=256,
                         layer_types=ORDERS[order], pad_token_id=0, bos_token_id=1, eos_token_id=None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(ORDERS))
def models(request):
    """(order, Hugging Face's model, a patched copy with the same weights, memo of reference runs)."""
    torch.manual_seed(0)
    hf = MiniMaxForCausalLM(make_config(request.param)).eval()
    ours = patch_minimax(copy.deepcopy(hf))
    return request.param, hf, ours, {}


def reference(models, name, ids, mask, **kwargs):
    """Hugging Face's model without a cache (every step recomputes the whole sequence), memoized per model."""
    _, hf, _, memo = models
    if name not in memo:
        with torch.no_grad():
            memo[name] = hf.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    return memo[name]


def prompts(padded: bool, rows: int = 2, length: int = 11, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    if padded:  # left padding of different lengths
        for row in range(1, rows):
            mask[row, :2 + 2 * row] = 0
    return ids.masked_fill(mask == 0, 0), mask


GREEDY = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
BEAM = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2)


def logits_error(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("padded", [False, True], ids=["equal", "left_padded"])
@pytest.mark.parametrize("chunk", [None, 4], ids=["prefill", "chunked_prefill"])
def test_greedy_generate_gives_hf_tokens_and_logits(models, padded, chunk):
    order, hf, ours, _ = models
    ids, mask = prompts(padded)
    expected = reference(models, f"greedy padded={padded}", ids, mask, **GREEDY)
    with torch.no_grad():
        cache = LightningMiniMaxCache(ours.config, batch_size=2, max_length=32)
        got = ours.generate(ids, attention_mask=mask, past_key_values=cache, prefill_chunk_size=chunk, **GREEDY)
    assert torch.equal(got.sequences, expected.sequences)
    assert logits_error(got, expected) <= LOGITS_TOL
    assert cache.get_seq_length() == ids.shape[1] + GREEDY["max_new_tokens"] - 1


def test_where_hf_own_cache_fails(models, capsys):
    """Hugging Face's MiniMaxCache (transformers 5.23): the failures this integration fixes, measured."""
    order, hf, ours, _ = models
    ids, mask = prompts(padded=True)
    expected = reference(models, "greedy padded=True", ids, mask, **GREEDY)
    beam_reference = reference(models, "beam", ids, mask, **BEAM)
    with torch.no_grad():
        own = hf.generate(ids, attention_mask=mask, **GREEDY)
        beam_own = hf.generate(ids, attention_mask=mask, **BEAM)
        with pytest.raises((RuntimeError, ValueError), match="does not support `crop`|cache that can be cropped"):
            hf.generate(ids[:1], max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=2,
                        past_key_values=MiniMaxCache())
    error = logits_error(own, expected)
    with capsys.disabled():
        print(f"\n[{order}] HF's own cache, left-padded greedy: tokens equal "
              f"{torch.equal(own.sequences, expected.sequences)}, max logits error {error:.3g}; "
              f"beam search (3 beams) tokens equal to the cache-free run: {torch.equal(beam_own, beam_reference)}")
    # Its beam search reorders the attention rows but not the recurrent states.
    assert not torch.equal(beam_own, beam_reference)
    if order == "lightning_first":  # get_seq_length() reads layer 0, a linear layer: 0
        assert error > 1e-2


def test_beam_search_matches_cache_free_reference(models):
    order, hf, ours, _ = models
    ids, mask = prompts(padded=True)
    expected = reference(models, "beam", ids, mask, **BEAM)
    with torch.no_grad():
        cache = LightningMiniMaxCache(ours.config, batch_size=2, max_length=32)
        got = ours.generate(ids, attention_mask=mask, past_key_values=cache, **BEAM)
    assert torch.equal(got, expected)
    assert cache.batch_size == 6  # 3 beams per prompt


def test_assisted_and_prompt_lookup_decoding_give_greedy_tokens(models):
    order, hf, ours, _ = models
    ids, _ = prompts(padded=False, rows=1, seed=2)
    draft = copy.deepcopy(ours)  # a perturbed copy: it agrees with the target on some tokens, not all
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1.0 * p.std())
        greedy = hf.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
        cache = LightningMiniMaxCache(ours.config, batch_size=1, max_length=64)
        removed = []
        crop = cache.crop
        cache.crop = lambda n: (removed.append(-n), crop(n))
        assisted = ours.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft,
                                 past_key_values=cache)
        lookup = ours.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, greedy)
    assert torch.equal(lookup, greedy)
    assert any(r > 0 for r in removed), f"no draft token was ever rejected ({removed}): crop untested"


def test_crop_restores_states_and_positions(models):
    """Step by step with recording, crop r tokens, continue: the logits of a run that never saw them."""
    order, hf, ours, _ = models
    ids, _ = prompts(padded=False, rows=2, length=14, seed=4)
    with torch.no_grad():
        cache = LightningMiniMaxCache(ours.config, batch_size=2, max_length=32, max_rewind=6)
        ours(ids[:, :6], past_key_values=cache)  # 6 tokens: not recorded
        cache.activate_past_recording()
        ours(ids[:, 6:9], past_key_values=cache)
        ours(ids[:, 9:10], past_key_values=cache)
        ours(ids[:, 10:12], past_key_values=cache)
        with pytest.raises(ValueError, match="only the last 6"):
            cache.crop(-7)
        cache.crop(-4)  # back into the 3-token forward: 8 tokens kept
        assert cache.get_seq_length() == 8
        tail = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(5))
        got = ours(tail, past_key_values=cache).logits
        cache.crop(6)  # keep 6 (= remove 5, across two forwards): the state before the 3-token forward
        assert cache.get_seq_length() == 6
        again = ours(tail, past_key_values=cache).logits
        full = hf(torch.cat([ids[:, :8], tail], 1), use_cache=False).logits[:, -3:]
        full6 = hf(torch.cat([ids[:, :6], tail], 1), use_cache=False).logits[:, -3:]
    torch.testing.assert_close(got, full, rtol=0, atol=LOGITS_TOL)
    torch.testing.assert_close(again, full6, rtol=0, atol=LOGITS_TOL)


def test_bfloat16_is_closer_to_float32_than_hf(capsys):
    """Prefill 8 + 56 decode steps, teacher-forced: max |logits - float32 logits| of each bfloat16 run.

    Weights drawn with std 0.1 (not 0.02) so the lightning layers' outputs matter to the logits."""
    torch.manual_seed(0)
    config = make_config("softmax_first")  # the order in which Hugging Face's own cache is right
    config.initializer_range = 0.1
    hf32 = MiniMaxForCausalLM(config).eval()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ours16 = patch_minimax(copy.deepcopy(hf32).to(torch.bfloat16))
    ids, _ = prompts(padded=False, rows=2, length=64, seed=6)
    with torch.no_grad():
        reference = hf32(ids, use_cache=False).logits[:, 7:]
        caches = {"hf": MiniMaxCache(), "ours": LightningMiniMaxCache(config, batch_size=2, max_length=64)}
        errors = {}
        for name, model in (("hf", hf16), ("ours", ours16)):
            cache = caches[name]
            logits = [model(ids[:, :8], past_key_values=cache).logits[:, -1:]]
            logits += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(8, 64)]
            errors[name] = (torch.cat(logits, 1).float() - reference).abs().max().item()
    with capsys.disabled():
        print(f"\nbfloat16 decode, max |logits - float32|: Hugging Face {errors['hf']:.4f}, "
              f"patched {errors['ours']:.4f}")
    assert errors["ours"] < errors["hf"]


def test_generate_without_a_cache_and_argument_errors(models):
    order, hf, ours, _ = models
    ids, mask = prompts(padded=True)
    expected = reference(models, "greedy padded=True", ids, mask, **GREEDY)
    with torch.no_grad():
        got = ours.generate(ids, attention_mask=mask, prefill_chunk_size=5, **GREEDY)  # generate makes one
        assert torch.equal(got.sequences, expected.sequences)
        assert isinstance(got.past_key_values, LightningMiniMaxCache)
        assert patch_minimax(ours) is ours  # idempotent
        with pytest.raises(RuntimeError, match="patch_minimax"):
            hf(ids, past_key_values=LightningMiniMaxCache(hf.config, batch_size=2, max_length=16))
        # Hugging Face's own cache: Hugging Face's own path, its result
        torch.testing.assert_close(ours(ids, attention_mask=mask, past_key_values=MiniMaxCache()).logits,
                                   hf(ids, attention_mask=mask, past_key_values=MiniMaxCache()).logits)
        cache = LightningMiniMaxCache(ours.config, batch_size=2, max_length=12)
        with pytest.raises(ValueError, match="attention_mask"):
            ours(ids, attention_mask=mask[:, :5], past_key_values=cache)
        ours(ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="exceed max_length=12"):
            ours(ids[:, :2], past_key_values=cache)
        assert cache.get_seq_length() == 11  # the refused forward changed nothing
        with pytest.raises(ValueError, match="cannot remove 1 tokens"):  # not recording
            cache.crop(-1)
        with pytest.raises(ValueError, match="multiple of batch_size"):
            ours(ids, past_key_values=LightningMiniMaxCache(ours.config, batch_size=3, max_length=16))
        with pytest.raises(TypeError, match="max_length"):
            LightningMiniMaxCache(ours.config, batch_size=2, max_length="16")


@pytest.mark.parametrize("padded", [False, True], ids=["equal", "left_padded"])
def test_assisted_and_prompt_lookup_with_long_and_padded_prompts(models, padded):
    """Prompts longer than max_rewind (70 tokens, recorded since before the prefill), also left-padded."""
    order, hf, ours, _ = models
    ids, mask = prompts(padded, rows=2, length=70, seed=7)
    ids, mask = ids[1:], mask[1:]  # assisted decoding takes one row; row 1 has 4 tokens of left padding
    ids[:, 40:50] = ids[:, 20:30]  # a repeat, so prompt lookup proposes drafts
    draft = copy.deepcopy(ours)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std())
        greedy = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=False)
        for extra in (dict(assistant_model=draft), dict(prompt_lookup_num_tokens=3)):
            cache = LightningMiniMaxCache(ours.config, batch_size=ids.shape[0], max_length=96)
            got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=cache,
                                **extra)
            assert torch.equal(got, greedy), extra


def test_sliding_window_matches_hf_cache_free():
    torch.manual_seed(0)
    config = make_config("lightning_first")
    config.sliding_window = 3
    hf = MiniMaxForCausalLM(config).eval()
    ours = patch_minimax(copy.deepcopy(hf))
    ids, mask = prompts(padded=True)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, use_cache=False, **GREEDY)
        got = ours.generate(ids, attention_mask=mask, **GREEDY)
        full = ours(ids, attention_mask=mask, use_cache=False).logits  # Hugging Face's path, window applied
    assert isinstance(got.past_key_values, LightningMiniMaxCache)
    assert torch.equal(got.sequences, expected.sequences)
    assert logits_error(got, expected) <= LOGITS_TOL
    assert not torch.allclose(full, hf(ids, attention_mask=mask, use_cache=False).logits * 0 + full.mean())


def test_training_with_gradient_checkpointing_equals_unpatched():
    torch.manual_seed(0)
    hf = MiniMaxForCausalLM(make_config("lightning_first"))
    ours = patch_minimax(copy.deepcopy(hf))
    ids, mask = prompts(padded=True)
    grads = []
    for model in (hf, ours):
        model.train()
        model.gradient_checkpointing_enable()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    ours.eval()
    with pytest.raises(ValueError, match="no autograd"):  # our cache cannot carry gradients
        ours(ids, past_key_values=LightningMiniMaxCache(ours.config, batch_size=2, max_length=16))


def test_output_attentions_equal_hf(models):
    order, hf, ours, _ = models
    ids, _ = prompts(padded=False, length=9, seed=9)
    with torch.no_grad():
        cache = LightningMiniMaxCache(ours.config, batch_size=2, max_length=16)
        got = [ours(ids[:, :8], past_key_values=cache, output_attentions=True).attentions,
               ours(ids[:, 8:], past_key_values=cache, output_attentions=True).attentions]
        hf_eager = copy.deepcopy(hf)
        hf_eager.config._attn_implementation = "eager"
        own = MiniMaxCache()
        expected = [hf_eager(ids[:, :8], past_key_values=own, output_attentions=True).attentions,
                    hf_eager(ids[:, 8:], past_key_values=own, output_attentions=True).attentions]
    for got_step, expected_step in zip(got, expected):
        assert len(got_step) == len(expected_step) == 4
        for a, e in zip(got_step, expected_step):
            assert a.shape == e.shape
            if order == "softmax_first":  # lightning first: HF's cache reports length 0, its decode step is wrong
                torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


def test_deepcopy_and_state_dict_follow_the_weights(models):
    order, hf, ours, _ = models
    ids, _ = prompts(padded=False)
    copied = copy.deepcopy(ours)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(1.5)
        reloaded = patch_minimax(MiniMaxForCausalLM(ours.config)).eval()
        reloaded.load_state_dict(copied.state_dict())
        changed = hf.__class__(hf.config).eval()
        changed.load_state_dict(copied.state_dict())
        expected = changed(ids, use_cache=False).logits
        for model in (copied, reloaded, copied.to(torch.float32)):
            cache = LightningMiniMaxCache(ours.config, batch_size=2, max_length=16)
            torch.testing.assert_close(model(ids, past_key_values=cache).logits, expected, rtol=0, atol=LOGITS_TOL)
        assert not torch.allclose(ours(ids, use_cache=False).logits, expected)
    assert type(copied).__name__ == "MiniMaxForCausalLM"


def test_cache_exposes_hf_layers_and_linear_cache_views(models):
    """Code written against Hugging Face's MiniMaxCache (its own test suite among it) reads
    ``cache.layers[i].keys / .values`` and ``cache.linear_cache[i]``: views of this cache's buffers, equal to
    what Hugging Face's cache holds after the same generate (attention K/V, and the recurrent states)."""
    order, hf, ours, _ = models
    ids, mask = prompts(padded=False)
    with torch.no_grad():
        got = ours.generate(ids, attention_mask=mask, **GREEDY).past_key_values
        own = hf.generate(ids, attention_mask=mask, **GREEDY).past_key_values
    config = ours.config
    kinds = config.layer_types
    tokens = ids.shape[1] + GREEDY["max_new_tokens"] - 1
    assert isinstance(got, MiniMaxCache) and len(got.layers) == len(got.linear_cache) == len(kinds)
    for i, kind in enumerate(kinds):
        if kind == "full_attention":
            layer = got.layers[i]
            assert layer.keys.shape == layer.values.shape == (2, config.num_key_value_heads, tokens, config.head_dim)
            assert got.linear_cache[i] == []
            if order == "softmax_first":  # HF's cache holds the same K/V (lightning first: its decode is wrong)
                torch.testing.assert_close(layer.keys, own.layers[i].keys, rtol=0, atol=1e-5)
                torch.testing.assert_close(layer.values, own.layers[i].values, rtol=0, atol=1e-5)
        else:
            state = got.linear_cache[i]
            assert state.shape == (2, config.num_attention_heads, config.head_dim, config.head_dim)
            if order == "softmax_first":
                torch.testing.assert_close(state, own.linear_cache[i].float(), rtol=1e-4, atol=1e-5)
    # The views are the storage: the next forward reads what they hold.
    attention = kinds.index("full_attention")
    got.layers[attention].keys.zero_()
    assert not got.layers[attention].keys.any()
    assert LightningMiniMaxCache(config, batch_size=1, max_length=4).layers == []


def test_patched_model_keeps_hf_checkpoint_conversions(models):
    """Hugging Face skips the weight conversions of custom-code models; the patched classes are its own code."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    _, hf, ours, _ = models
    assert len(get_model_conversion_mapping(ours, add_legacy=False)) == len(
        get_model_conversion_mapping(hf, add_legacy=False)) > 0
    assert not type(ours).is_custom_code() and not type(ours.model).is_custom_code()


@pytest.mark.parametrize("kv_quantization", ["int8", "fp8_e4m3"])
def test_quantized_kv_cache_equals_a_float_cache_of_the_dequantized_kv(models, kv_quantization, monkeypatch):
    """``LightningMiniMaxCache(kv_quantization=)``: attention layers hold codes and scales and attend over the codes.
    The reference: the float cache with every written key/value replaced by its quantize-dequantize round trip
    (tests/reference.py's quantizer); greedy (left-padded) and beam search give its tokens and logits, the HF
    views hold its K/V, and both differ from the unquantized run (quantization is really on)."""
    from reference import ref_quantize_kv_tokens

    from torch_lightning_cache import ops

    _, _, ours, _ = models
    config = ours.config
    ids, mask = prompts(padded=True)

    def generate(cache, **kwargs):
        with torch.no_grad():
            return ours.generate(ids, attention_mask=mask, past_key_values=cache, **kwargs)

    quantized = LightningMiniMaxCache(config, batch_size=2, max_length=64, kv_quantization=kv_quantization)
    got = generate(quantized, **GREEDY)
    grown = LightningMiniMaxCache(config, batch_size=2, max_length=12, kv_quantization=kv_quantization, growable=True)
    assert torch.equal(generate(grown, **GREEDY).sequences, got.sequences) and grown.max_length > 12
    got_beam = generate(LightningMiniMaxCache(config, batch_size=2, max_length=64, kv_quantization=kv_quantization),
                        **BEAM)
    plain = generate(LightningMiniMaxCache(config, batch_size=2, max_length=64), **GREEDY)
    write = ops.concatenate_to_cache

    def write_round_trip(key_value, index, key, value, *args, **kwargs):
        def round_trip(x):
            codes, scales = ref_quantize_kv_tokens(x, kv_quantization)
            return (codes.float() * scales[..., None]).to(x.dtype)
        return write(key_value, index, round_trip(key), round_trip(value), *args, **kwargs)

    monkeypatch.setattr(ops, "concatenate_to_cache", write_round_trip)
    round_tripped = LightningMiniMaxCache(config, batch_size=2, max_length=64)
    want = generate(round_tripped, **GREEDY)
    want_beam = generate(LightningMiniMaxCache(config, batch_size=2, max_length=64), **BEAM)
    assert torch.equal(got.sequences, want.sequences) and logits_error(got, want) < 1e-5
    assert torch.equal(got_beam, want_beam)
    print(f"{kv_quantization}: max |logits - dequantized reference| {logits_error(got, want):.2e}, "
          f"- unquantized {logits_error(got, plain):.2e}")
    assert logits_error(got, plain) > 10 * max(logits_error(got, want), 1e-7)  # quantization is really on
    for i, kind in enumerate(config.layer_types):
        if kind == "full_attention":
            view = quantized.lightning[i]
            assert view.key_value.dtype == ops.KV_QUANTIZATION[kv_quantization] and view.scales is not None
            torch.testing.assert_close(quantized.layers[i].keys, round_tripped.layers[i].keys, rtol=0, atol=1e-6)
            torch.testing.assert_close(quantized.layers[i].values, round_tripped.layers[i].values, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="kv_quantization must be None or one of"):
        LightningMiniMaxCache(config, batch_size=1, max_length=4, kv_quantization="int4")
    with pytest.raises(TypeError, match="kv_quantization must be a str or None, got list"):
        LightningMiniMaxCache(config, batch_size=1, max_length=4, kv_quantization=["int8"])
