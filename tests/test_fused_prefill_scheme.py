"""Numerical scheme of the fused CUDA prefill kernel (csrc/cuda/lightning_prefill_fused.cu),
emulated in PyTorch and measured against the float64 sequential recurrence.

The kernel walks chunks of 64 tokens with the state in float32. Per chunk, with c_i the
number of unmasked tokens among chunk tokens 0..i and n = c_63 (masked tokens' q, k, v
are zero by selection):

    o_i  = scale * ( sum_{j<=i} (q_i . k_j) lam^(c_i - c_j) v_j  +  lam^(c_i) q_i S )
    S   <- lam^n S + sum_j (lam^(n - c_j) k_j)^T v_j        (increment in a fresh accumulator)

Every product runs on tensor cores as bfloat16 x bfloat16 with float32 accumulation. q, k
and v are bfloat16 inputs (exact); the float32 operands (P = (q k^T) * decay, the state S
in q S, and the decayed keys of the update) are split into `terms` bfloat16 pieces
hi + lo [+ lo2], each product done per piece. A bfloat16 x bfloat16 product is exact in
float32, so a float32 matmul of bfloat16-valued operands emulates one mma term (up to the
accumulation order inside the tensor core).

The test picks the split count as the smallest whose error stays within 2x the error of
the current float32 ATen path (lightning_prefill.cpp: the same recurrence, float32
matmuls, 256-token blocks) and asserts that the kernel uses it
(FUSED_PREFILL_SPLIT_TERMS below mirrors kSplitTerms in the .cu file).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import torch_lightning_cache as tlc
from conftest import HAS_CUDA, rel_err
from reference import ref_lightning, ref_lightning_slopes

CHUNK = 64
# bfloat16 terms per float32 operand (P of the intra product, S of q S, the decayed keys of
# the update): kSplitTermsP/S/K of csrc/cuda/lightning_prefill_fused.cu (checked below).
FUSED_PREFILL_SPLIT_TERMS = (3, 3, 3)
# Candidate splits, and their cost in m16n8k16 mma per chunk and 64-column value tile
# (P v: 80 per term, q S: 256 per term, update: 256 per term).
CANDIDATES = [(1, 1, 1), (2, 2, 2), (2, 3, 2), (3, 3, 3)]


def mma_cost(terms) -> int:
    return 80 * terms[0] + 256 * terms[1] + 256 * terms[2]
KERNEL_SOURCE = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "lightning_prefill_fused.cu")


def split_bf16(x: torch.Tensor, terms: int) -> list[torch.Tensor]:
    """x (float32) as `terms` bfloat16-valued float32 tensors, largest first (0: x itself)."""
    if terms == 0:
        return [x]
    pieces, rest = [], x
    finite = torch.isfinite(x)  # a non-finite x is its own first piece (Inf - Inf would be NaN)
    for i in range(terms):
        piece = rest.to(torch.bfloat16).to(torch.float32)
        pieces.append(piece if i == 0 else torch.where(finite, piece, torch.zeros((), dtype=piece.dtype)))
        rest = rest - piece  # exact in float32
    return pieces


def split_matmul(a: torch.Tensor, b: torch.Tensor, terms: int, split: str) -> torch.Tensor:
    """a @ b with operand `split` ("a" or "b") cut into bfloat16 pieces, one float32-accumulated
    product per piece, added into one accumulator in order (hi first)."""
    pieces = split_bf16(a if split == "a" else b, terms)
    acc = None
    for piece in pieces:
        prod = piece @ b if split == "a" else a @ piece
        acc = prod if acc is None else acc + prod
    return acc


def emulate_prefill(state, q, k, v, slopes, attention_mask=None, scale=1.0, terms=FUSED_PREFILL_SPLIT_TERMS,
                    chunk=CHUNK, dtype=torch.float32):
    """The kernel's scheme (terms = (P, S, K) bfloat16 pieces) or plain float32 chunked matmuls
    (terms = 0, the ATen path's arithmetic when chunk = 256), in `dtype`.
    state [B, H, Dk, Dv]; q, k, v [B, T, H, D]."""
    B, T, H, _ = q.shape
    to = lambda x: x.detach().to(dtype).transpose(1, 2)  # noqa: E731  [B, H, T, D]
    qf, kf, vf = to(q), to(k), to(v)
    if attention_mask is not None:
        keep = (attention_mask != 0).view(B, 1, T, 1)
        qf, kf, vf = (torch.where(keep, x, torch.zeros((), dtype=dtype)) for x in (qf, kf, vf))
        count = (attention_mask != 0).to(dtype).view(B, 1, T)
    else:
        count = torch.ones(B, 1, T, dtype=dtype)
    S = state.detach().to(dtype).clone()
    s = slopes.detach().to(dtype).view(1, H, 1, 1)
    out = torch.empty(B, H, T, vf.shape[-1], dtype=dtype)
    tp, ts, tk = terms if dtype == torch.float32 and terms != 0 else (0, 0, 0)
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        c = end - start
        qb, kb, vb = qf[:, :, start:end], kf[:, :, start:end], vf[:, :, start:end]
        e = count[:, :, start:end].cumsum(-1).unsqueeze(-1)  # [B, 1, c, 1] c_i
        n = e[:, :, -1:, :]                                   # [B, 1, 1, 1]
        causal = torch.ones(c, c, dtype=torch.bool).tril()
        # Distance never negative on the causal part; the upper part is dropped by selection.
        decay = torch.exp(-s * (e - e.transpose(2, 3)).clamp_min(0))
        P = torch.where(causal, (qb @ kb.transpose(2, 3)) * decay, torch.zeros((), dtype=dtype))
        o = split_matmul(P, vb, tp, "a")
        o = o + torch.exp(-s * e) * split_matmul(qb, S, ts, "b")
        kd = kb * torch.exp(-s * (n - e))
        inc = split_matmul(kd.transpose(2, 3), vb, tk, "a")
        if tk == 0:
            S = torch.exp(-s * n) * S + inc  # the ATen path
        else:
            # lam^n S = S + (lam^n - 1) S with lam^n - 1 from expm1: for a flat head
            # (s ~ 1e-8) exp(-s n) rounds to a float32 next to 1 whose error is as large as
            # its distance from 1, and that error recurs every chunk.
            # An infinite S stays infinite (lam^n > 0), where Inf * (lam^n - 1) + Inf would be NaN.
            S = torch.where(torch.isfinite(S), torch.expm1(-s * n) * S + (S + inc), S + inc)
        out[:, :, start:end] = o * scale
    out = out.transpose(1, 2)
    if attention_mask is not None:
        out = torch.where((attention_mask != 0).view(B, T, 1, 1), out, torch.zeros((), dtype=dtype))
    return S, out


def per_head_err(actual, expected, head_dim):
    """Largest over heads of max|a - e| / max|e| (heads differ in scale by orders of magnitude)."""
    return max(rel_err(actual.select(head_dim, h), expected.select(head_dim, h)) for h in range(actual.shape[head_dim]))


def scheme_inputs(B, T, H, D, layer, num_layers, seed, masked, history):
    gen = torch.Generator().manual_seed(seed)
    # The steepest and the flattest head of a 64-head MiniMax layer (first layer: steep
    # decay; last layer: slopes ~1e-5 of that, a memory longer than the whole call).
    full = ref_lightning_slopes(64, layer, num_layers)
    slopes = torch.stack([full[i * 63 // max(H - 1, 1)] for i in range(H)]).to(torch.float32)
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).to(torch.bfloat16) for _ in range(3))
    S0 = torch.randn(B, H, D, D, generator=gen, dtype=torch.float64) * history
    S0 = S0.to(torch.float32)
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=gen) < 0.85
        mask[:, :37] = False  # left padding across a chunk boundary
    return S0, q, k, v, slopes, mask


def measure(S0, q, k, v, slopes, mask, scale, exact):
    """Errors (output, state) of each candidate split, and of the float32 ATen-path
    arithmetic, against `exact` = (state, output) in float64."""
    exp_state, exp_out = exact
    errors = {}
    for terms in CANDIDATES:
        S, o = emulate_prefill(S0, q, k, v, slopes, mask, scale, terms=terms)
        errors[terms] = (per_head_err(o, exp_out, 2), per_head_err(S, exp_state, 1))
    S, o = emulate_prefill(S0, q, k, v, slopes, mask, scale, terms=0, chunk=256)
    errors["aten"] = (per_head_err(o, exp_out, 2), per_head_err(S, exp_state, 1))
    return errors


def fits(errors, terms) -> bool:
    """Output and state errors within 2x the ATen path's."""
    return errors[terms][0] <= 2 * errors["aten"][0] and errors[terms][1] <= 2 * errors["aten"][1]


def test_kernel_source_uses_the_tested_split_count():
    source = open(KERNEL_SOURCE).read()
    found = tuple(int(re.search(rf"constexpr int kSplitTerms{name} = (\d+);", source).group(1)) for name in "PSK")
    assert found == FUSED_PREFILL_SPLIT_TERMS


def test_float64_scheme_equals_sequential_reference():
    # The chunked float64 scheme is the oracle of the long case (the Python token loop
    # is too slow for 64k tokens): here it must equal the sequential recurrence.
    S0, q, k, v, slopes, mask = scheme_inputs(2, 300, 2, 16, 0, 80, seed=1, masked=True, history=3.0)
    exp_state, exp_out = ref_lightning(S0, q, k, v, slopes, mask, scale=0.5)
    S, o = emulate_prefill(S0, q, k, v, slopes, mask, scale=0.5, dtype=torch.float64)
    assert rel_err(o, exp_out) < 1e-12 and rel_err(S, exp_state) < 1e-12


def test_split_terms_emulation_short_masked_from_history():
    # 4096 tokens from a nonzero state, masked, both layer ends, against the sequential float64 loop.
    for layer in (0, 79):
        S0, q, k, v, slopes, mask = scheme_inputs(1, 4096, 2, 32, layer, 80, seed=2 + layer, masked=True,
                                                  history=10.0)
        exact = ref_lightning(S0, q, k, v, slopes, mask, scale=0.25)
        exact = (exact[0], exact[1])
        errors = measure(S0, q, k, v, slopes, mask, 0.25, exact)
        print(f"layer {layer}, 4096 tokens, masked:", errors)
        assert fits(errors, FUSED_PREFILL_SPLIT_TERMS), errors
        # One term is a bfloat16 rounding of every float32 operand: it must be visibly worse
        # (otherwise this test could not tell the schemes apart).
        assert errors[(1, 1, 1)][0] > 4 * errors[(3, 3, 3)][0], errors


@pytest.mark.slow
def test_split_terms_emulation_64k_tokens():
    # 65536 tokens (1024 chunks) in one call: decay and rounding errors accumulate over a
    # long history. The oracle is the float64 chunked scheme (equal to the sequential
    # recurrence, test above). Measured (shared 2-core CPU, H=2 heads: steepest and flattest
    # of 64, D=16): first layer needs 3 terms for every operand (2 terms: 5e-6 output error
    # vs 2.6e-7 for the ATen path); the last layer would accept (2, 3, 2).
    fitting = set(CANDIDATES)
    for layer in (0, 79):
        errors = measure_64k(layer)
        print(f"layer {layer}, 65536 tokens:", errors)
        fitting &= {t for t in CANDIDATES if fits(errors, t)}
    assert fitting and min(fitting, key=mma_cost) == FUSED_PREFILL_SPLIT_TERMS, fitting


def measure_64k(layer):
    S0, q, k, v, slopes, mask = scheme_inputs(1, 65536, 2, 16, layer, 80, seed=10 + layer, masked=False,
                                              history=1.0)
    exact = emulate_prefill(S0, q, k, v, slopes, None, 1.0, dtype=torch.float64)
    # The steep head's decays reach float32 subnormals (lam^64 ~ 1e-26 times small pieces),
    # which are slow on CPUs; flushing them changes nothing at the errors measured here.
    flush = torch.set_flush_denormal(True)
    try:
        errors = measure(S0, q, k, v, slopes, None, 1.0, exact)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    state = S0.clone()
    cpu_out = tlc.lightning_prefill(state, q, k, v, slopes)
    errors["cpu_op"] = (per_head_err(cpu_out, exact[1], 2), per_head_err(state, exact[0], 1))
    return errors


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("layer", [0, 79], ids=["first_layer", "last_layer"])
def test_fused_kernel_matches_emulation_and_reference(monkeypatch, layer, masked):
    # The kernel is opt-in (LIGHTNING_CACHE_FUSED_PREFILL=1, read per call).
    monkeypatch.setenv("LIGHTNING_CACHE_FUSED_PREFILL", "1")
    T = 16384
    S0, q, k, v, slopes, mask = scheme_inputs(2, T, 2, 128, layer, 80, seed=20 + layer, masked=masked, history=1.0)
    exact = emulate_prefill(S0, q, k, v, slopes, mask, 0.5, dtype=torch.float64)
    emulated = emulate_prefill(S0, q, k, v, slopes, mask, 0.5, terms=FUSED_PREFILL_SPLIT_TERMS)
    aten = emulate_prefill(S0, q, k, v, slopes, mask, 0.5, terms=0, chunk=256)
    state = S0.cuda()
    out = tlc.lightning_prefill(state, q.cuda(), k.cuda(), v.cuda(), slopes.cuda(),
                                attention_mask=None if mask is None else mask.cuda(), scale=0.5)
    out_err, state_err = per_head_err(out.cpu().float(), exact[1], 2), per_head_err(state.cpu(), exact[0], 1)
    aten_out, aten_state = per_head_err(aten[1], exact[1], 2), per_head_err(aten[0], exact[0], 1)
    print(f"fused kernel: out {out_err:.3g} state {state_err:.3g}; aten scheme: out {aten_out:.3g} "
          f"state {aten_state:.3g}")
    # Output is rounded to bfloat16 (the input dtype): compare at that resolution.
    assert out_err <= max(2 * aten_out, 2 ** -8), (out_err, aten_out)
    assert state_err <= 2 * aten_state + 1e-6, (state_err, aten_state)
    # The kernel is the emulated scheme: its state is at least as close to that as to the exact one.
    assert per_head_err(state.cpu(), emulated[0], 1) <= 2 * state_err + 1e-6


def nonfinite_pattern(x):
    return torch.stack([torch.isposinf(x), torch.isneginf(x), torch.isnan(x)])


@pytest.mark.parametrize("where", ["emulation", "cpu", "cuda"])
def test_infinite_state_stays_infinite_as_in_sequential_decode(where, monkeypatch):
    """+-Inf in the state from history reaches the outputs and the new state as +-Inf, as sequential decode gives,
    not NaN: through the bfloat16 split of S (Inf - Inf) and the expm1 decay, also over a fully masked chunk."""
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("LIGHTNING_CACHE_FUSED_PREFILL", "1")
    S0, q, k, v, slopes, _ = scheme_inputs(2, 192, 2, 128, 0, 80, seed=7, masked=False, history=1.0)
    S0[0, 0, 3, 5], S0[1, 1, 7, 2] = float("inf"), -float("inf")
    q[:, :, :, 3] = q[:, :, :, 3].abs() + 0.25  # no query element 0 meets the Inf (0 * Inf is NaN in both)
    q[:, :, :, 7] = q[:, :, :, 7].abs() + 0.25
    mask = torch.ones(2, 192, dtype=torch.int64)
    mask[0, :64] = 0  # row 0's first chunk fully masked: its state must stay as it was
    want_state, want_out = ref_lightning(S0, q, k, v, slopes, attention_mask=mask)
    if where == "emulation":
        state, out = emulate_prefill(S0, q, k, v, slopes, mask)
    else:  # the CPU kernel, or on CUDA the fused kernel (opted in above)
        state = S0.to(where)
        out = tlc.lightning_prefill(state, q.to(where), k.to(where), v.to(where), slopes.float().to(where),
                                    attention_mask=mask.to(where))
    assert torch.isinf(want_out).any() and not torch.isnan(want_out).any()
    assert torch.equal(nonfinite_pattern(out.cpu()), nonfinite_pattern(want_out))
    assert torch.equal(nonfinite_pattern(state.cpu()), nonfinite_pattern(want_state))
