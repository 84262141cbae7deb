"""Tests of ``init_state``, ``lightning_decode``, ``lightning_prefill`` and ``lightning_slopes`` (SPEC section 3).

Oracle: ``reference.ref_lightning``, the sequential recurrence in float64
(per token ``S = lam S + k^T v``, ``o = scale * q S``, ``lam = exp(-slope)``).

Error metric: ``rel_err(a, b) = max|a - b| / max|b|`` over the whole tensor
(all rows, tokens, heads), computed in float64, ``b`` the reference.

Inputs are of size ~1 (q, k, v standard normal / sqrt(D); a non-zero standard
normal starting state; MiniMax slopes for 8..64 heads, including a last layer,
where lam ~ 1 and nothing decays), so decay errors cannot hide.

Tolerances, ``rel_err`` bound per (state dtype, input dtype). "Measured" is
the worst value over the split/prefill/decode cases of this file run with 6
different seeds on CPU (2 threads):

==========  ==========  =======  =======  ==============================================
state       inputs      output   state    measured (worst of 6 seeds, CPU)
==========  ==========  =======  =======  ==============================================
float32     float32     3e-5     3e-5     out 7.0e-6, state 1.1e-5 (token by token,
                                          last layer: lam ~ 1); chunked prefill ~5e-7
float32     float16     6e-4     3e-5     out 4.8e-4 (float16 output rounding, bound
                                          2^-11 = 4.9e-4), state 1.0e-5
float32     bfloat16    5e-3     3e-5     out 3.7e-3 (bfloat16 output rounding, bound
                                          2^-8 = 3.9e-3), state 1.1e-5
bfloat16    any         1e-2     3e-2     out 4.9e-3, state 1.35e-2 (vs the reference
                                          rounding its state at the same call ends)
==========  ==========  =======  =======  ==============================================

Comparisons of two kernel runs with each other (split vs token by token, CUDA
vs CPU) use twice the bound.

With a bfloat16 state the stored state is rounded to bfloat16 at the end of
every call (accumulation inside a call is float32), so results depend on where
calls start and end; each run is compared with a float64 reference that rounds
its state to bfloat16 at the same call boundaries. Against the unrounded
reference, per-token decoding with a bfloat16 state drifts by several percent
(rounding 2^-9 per call, compounded) - a property of bfloat16 storage, not
checked here.
"""

from __future__ import annotations

import pytest
import torch

import torch_lightning_cache as tlc
from conftest import F32_TOL, HAS_CUDA, TOLERANCES, lightning_inputs, random_mask, randn, rel_err
from reference import ref_lightning, ref_lightning_slopes

ops = torch.ops.lightning_cache

INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATE_DTYPES = [torch.float32, torch.bfloat16]


def ref_calls(state, calls, slopes, scale=1.0):
    """Float64 reference over a sequence of calls ``(q, k, v, attention_mask, slot_ids)``.

    With a bfloat16 state the reference state is rounded to bfloat16 after each
    call, as the stored state is. Returns ``(final_state, [outputs per call])``.
    """
    S = state.detach().cpu().to(torch.float64)
    outputs = []
    for q, k, v, mask, slots in calls:
        S, out = ref_lightning(S, q, k, v, slopes, attention_mask=mask, slot_ids=slots, scale=scale)
        if state.dtype == torch.bfloat16:
            S = S.to(torch.bfloat16).to(torch.float64)
        outputs.append(out)
    return S, outputs


def assert_close_rel(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e}"
    return err


# --------------------------------------------------------------------------- prefill / decode vs reference

# (id, heads, key_dim, value_dim, tokens, layer, num_layers, block sizes, layout)
SPLIT_CASES = [
    ("h8-d64", 8, 64, 64, 130, 0, 1, (64, 13), "fused"),  # 64 does not divide 130, 13 does
    ("h64-d16", 64, 16, 16, 256, 0, 2, (64, 48), "transposed"),  # 64 divides 256, 48 does not
    ("h16-d32-lastlayer", 16, 32, 32, 200, 3, 4, (50, 33), "step"),  # lam ~ 1: no decay at all
    ("h32-dk32-dv16", 32, 32, 16, 160, 1, 4, (1, 500), "contiguous"),  # block 1, block > n
]


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_split_prefill_and_decode_match_reference(gen, case, state_dtype, input_dtype):
    _, H, Dk, Dv, n, layer, num_layers, blocks, layout = case
    B = 2
    out_tol, state_tol = TOLERANCES[(state_dtype, input_dtype)]
    slopes = tlc.lightning_slopes(H, layer, num_layers)
    q, k, v = lightning_inputs(layout, B, n, H, Dk, Dv, gen, input_dtype)
    S0 = randn((B, H, Dk, Dv), gen, state_dtype)

    def check(outputs, state, calls, what):
        exp_state, exp_outputs = ref_calls(S0, calls, slopes)
        out = torch.cat(outputs, dim=1)
        assert out.dtype == input_dtype and out.shape == (B, n, H, Dv)
        assert_close_rel(out, torch.cat(exp_outputs, dim=1), out_tol, f"{what} output")
        assert_close_rel(state, exp_state, state_tol, f"{what} state")
        return out

    # 1. One prefill of all n tokens, per block size.
    for block in blocks:
        state = S0.clone()
        out = tlc.lightning_prefill(state, q, k, v, slopes, block_size=block)
        check([out], state, [(q, k, v, None, None)], f"prefill(block={block})")

    # 2. The same tokens split at random points into prefills (both block sizes) and multi-token decodes.
    cuts = sorted(torch.randperm(n - 1, generator=gen)[:5].add(1).tolist())
    bounds = list(zip([0] + cuts, cuts + [n]))
    state, outputs, calls = S0.clone(), [], []
    for s, (a, b) in enumerate(bounds):
        qs, ks, vs = q[:, a:b], k[:, a:b], v[:, a:b]
        if s % 2 == 1:
            outputs.append(tlc.lightning_decode(state, qs, ks, vs, slopes))
        else:
            outputs.append(tlc.lightning_prefill(state, qs, ks, vs, slopes, block_size=blocks[(s // 2) % 2]))
        calls.append((qs, ks, vs, None, None))
    split_out = check(outputs, state, calls, f"split at {cuts}")
    split_state = state

    # 3. n single-token decodes.
    state, outputs, calls = S0.clone(), [], []
    for t in range(n):
        outputs.append(tlc.lightning_decode(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], slopes))
        calls.append((q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], None, None))
    if state_dtype == torch.float32:
        # Cheap path: the float64 reference is the same for any split; compare to it and to the split run.
        exp_state, exp_outputs = ref_calls(S0, [(q, k, v, None, None)], slopes)
        token_out = torch.cat(outputs, dim=1)
        assert_close_rel(token_out, exp_outputs[0], out_tol, "token-by-token output")
        assert_close_rel(state, exp_state, state_tol, "token-by-token state")
        assert_close_rel(split_out, token_out, 2 * out_tol, "split vs token-by-token output")
        assert_close_rel(split_state, state, 2 * state_tol, "split vs token-by-token state")
    else:
        check(outputs, state, calls, "token-by-token")


def test_decode_one_call_equals_prefill_equals_steps_float32(gen):
    """Same float32 inputs: one multi-token decode call, a prefill and per-token
    decodes agree closely with each other (not only with the reference)."""
    B, n, H, Dk, Dv = 3, 40, 8, 16, 24
    slopes = tlc.lightning_slopes(H, 2, 6)
    q, k, v = lightning_inputs("fused", B, n, H, Dk, Dv, gen)
    S0 = randn((B, H, Dk, Dv), gen)
    s1, s2, s3 = S0.clone(), S0.clone(), S0.clone()
    o1 = tlc.lightning_decode(s1, q, k, v, slopes)
    o2 = tlc.lightning_prefill(s2, q, k, v, slopes, block_size=7)
    o3 = torch.cat([tlc.lightning_decode(s3, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], slopes)
                    for t in range(n)], dim=1)
    for out, state, what in ((o1, s1, "one decode call"), (o2, s2, "prefill(block=7)")):
        assert_close_rel(out, o3, F32_TOL, f"{what} vs per-token decodes, output")
        assert_close_rel(state, s3, F32_TOL, f"{what} vs per-token decodes, state")


def test_reference_matches_closed_form():
    """Guards the oracle: the SPEC closed form of n decode steps from S0."""
    g = torch.Generator().manual_seed(5)
    B, n, H, Dk, Dv = 1, 9, 3, 4, 5
    q, k, v = (torch.randn(B, n, H, d, generator=g, dtype=torch.float64) for d in (Dk, Dk, Dv))
    S0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
    slopes = ref_lightning_slopes(H)
    S, out = ref_lightning(S0, q, k, v, slopes)
    lam = torch.exp(-slopes)
    for h in range(H):
        for j in range(n):
            expected = lam[h] ** (j + 1) * (q[0, j, h] @ S0[0, h])
            for i in range(j + 1):
                expected = expected + lam[h] ** (j - i) * (q[0, j, h] @ k[0, i, h]) * v[0, i, h]
            torch.testing.assert_close(out[0, j, h], expected, rtol=1e-12, atol=1e-12)
        expected_state = lam[h] ** n * S0[0, h]
        for i in range(n):
            expected_state = expected_state + lam[h] ** (n - 1 - i) * torch.outer(k[0, i, h], v[0, i, h])
        torch.testing.assert_close(S[0, h], expected_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_scale(gen, op):
    B, n, H, Dk, Dv, scale = 2, 20, 4, 8, 8, 0.125
    slopes = tlc.lightning_slopes(H)
    q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, gen)
    S0 = randn((B, H, Dk, Dv), gen)
    state = S0.clone()
    if op == "decode":
        out = tlc.lightning_decode(state, q, k, v, slopes, scale=scale)
    else:
        out = tlc.lightning_prefill(state, q, k, v, slopes, block_size=8, scale=scale)
    exp_state, exp_out = ref_lightning(S0, q, k, v, slopes, scale=scale)
    assert_close_rel(out, exp_out, F32_TOL, "output")
    assert_close_rel(state, exp_state, F32_TOL, "state")  # the scale applies to outputs only
    unscaled = ref_lightning(S0, q, k, v, slopes)[1]
    assert rel_err(out, unscaled) > 0.5  # the scale is really applied


def test_slopes_any_tensor_and_dtype(gen):
    """Any positive [H] slopes are accepted, float64 and strided included."""
    B, n, H, Dk, Dv = 2, 12, 3, 4, 4
    slopes = torch.tensor([0.9, 0.05, 2.5, 0.0, 0.3, 0.7], dtype=torch.float64)[::2]
    q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, gen)
    S0 = randn((B, H, Dk, Dv), gen)
    for op in ("decode", "prefill"):
        state = S0.clone()
        out = (tlc.lightning_decode(state, q, k, v, slopes) if op == "decode"
               else tlc.lightning_prefill(state, q, k, v, slopes, block_size=5))
        exp_state, exp_out = ref_lightning(S0, q, k, v, slopes)
        assert_close_rel(out, exp_out, F32_TOL, f"{op} output")
        assert_close_rel(state, exp_state, F32_TOL, f"{op} state")


# --------------------------------------------------------------------------- attention mask


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.bfloat16], ids=str)
def test_prefill_attention_mask(gen, mask_dtype):
    """A masked token is skipped whole: no k^T v, no decay, output 0 (SPEC 3)."""
    B, n, H, Dk, Dv = 3, 45, 8, 16, 16
    slopes = tlc.lightning_slopes(H, 1, 3)
    q, k, v = lightning_inputs("fused", B, n, H, Dk, Dv, gen)
    S0 = randn((B, H, Dk, Dv), gen)
    mask = random_mask((B, n), gen, mask_dtype, p_true=0.6)
    mask[2] = 0  # a fully masked row
    state = S0.clone()
    out = tlc.lightning_prefill(state, q, k, v, slopes, attention_mask=mask, block_size=16)
    exp_state, exp_out = ref_lightning(S0, q, k, v, slopes, attention_mask=mask)
    assert_close_rel(out, exp_out, F32_TOL, "output")
    assert_close_rel(state, exp_state, F32_TOL, "state")

    # Independent of the oracle: a fully masked row keeps its state bit for bit and outputs zeros,
    # and every masked token outputs exact zeros.
    assert torch.equal(state[2], S0[2]) and not out[2].any()
    assert not out[mask == 0].any()

    # Masking really changes the result, and an all-true mask is the same as no mask.
    assert rel_err(out, ref_lightning(S0, q, k, v, slopes)[1]) > 1e-2
    s_none, s_ones = S0.clone(), S0.clone()
    o_none = tlc.lightning_prefill(s_none, q, k, v, slopes, block_size=16)
    o_ones = tlc.lightning_prefill(s_ones, q, k, v, slopes, attention_mask=torch.ones(B, n, dtype=mask_dtype),
                                   block_size=16)
    assert torch.equal(o_none, o_ones) and torch.equal(s_none, s_ones)


# --------------------------------------------------------------------------- slot ids


def test_slot_ids_pool_across_calls(gen):
    """A pool of 6 state rows served by a batch of 3 over several calls, with -1 (skip) rows."""
    P, B, H, Dk, Dv = 6, 3, 4, 8, 12
    slopes = tlc.lightning_slopes(H, 0, 2)
    state = randn((P, H, Dk, Dv), gen)
    expected = state.double()
    schedule = [
        ("decode", [4, -1, 0], 1, None),
        ("prefill", [1, 4, 5], 7, 3),
        ("decode", [-1, 2, 4], 3, None),
        ("prefill", [0, -1, 1], 5, 2),
        ("prefill", [5, 3, 2], 9, 4),
        ("decode", [-1, -1, 3], 2, None),
    ]
    for op, slots, n, block in schedule:
        slot_ids = torch.tensor(slots)
        q, k, v = lightning_inputs("transposed", B, n, H, Dk, Dv, gen)
        mask = random_mask((B, n), gen) if op == "prefill" else None
        before = state.clone()
        if op == "decode":
            out = tlc.lightning_decode(state, q, k, v, slopes, slot_ids=slot_ids)
        else:
            out = tlc.lightning_prefill(state, q, k, v, slopes, attention_mask=mask, slot_ids=slot_ids,
                                        block_size=block)
        expected, exp_out = ref_lightning(expected, q, k, v, slopes, attention_mask=mask, slot_ids=slot_ids)
        assert out.shape == (B, n, H, Dv)
        for b, slot in enumerate(slots):
            if slot == -1:
                assert not out[b].any(), "a skipped row must output zeros"
        for row in set(range(P)) - set(slots):
            assert torch.equal(state[row], before[row]), f"state row {row} was not addressed but changed"
        assert_close_rel(out, exp_out, F32_TOL, f"{op} {slots} output")
        assert_close_rel(state, expected, F32_TOL, f"{op} {slots} state")


@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_skipped_rows_ignore_their_inputs(op, state_dtype):
    """A skipped row (slot -1) reads nothing: even non-finite inputs there give
    exact zeros, and no state row changes because of it."""
    g = torch.Generator().manual_seed(11)
    B, n, H, Dk, Dv = 2, 4, 2, 3, 5
    slopes = tlc.lightning_slopes(H)
    q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, g)
    for t, bad in ((q, float("nan")), (k, float("inf")), (v, float("nan"))):
        t[0] = bad  # batch row 0 is skipped
    state = randn((3, H, Dk, Dv), g, state_dtype)
    before = state.clone()
    slot_ids = torch.tensor([-1, 2])
    if op == "decode":
        out = tlc.lightning_decode(state, q, k, v, slopes, slot_ids=slot_ids)
    else:
        out = tlc.lightning_prefill(state, q, k, v, slopes, slot_ids=slot_ids, block_size=2)
    assert torch.equal(out[0], torch.zeros_like(out[0])), f"skipped row output: {out[0].flatten()[:6]}"
    assert torch.equal(state[:2], before[:2])
    assert torch.isfinite(state).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_check_bounds_false_skips_out_of_range_slots(gen, op):
    """With check_bounds=False a slot id outside [-1, slots) is skipped like -1:
    state untouched, output zero; valid rows proceed."""
    P, B, n, H, Dk, Dv = 4, 4, 6, 2, 4, 4
    slopes = tlc.lightning_slopes(H)
    q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, gen)
    state = randn((P, H, Dk, Dv), gen)
    before = state.clone()
    slot_ids = torch.tensor([7, 0, -3, 2])
    call = (lambda **kw: tlc.lightning_decode(state, q, k, v, slopes, slot_ids=slot_ids, **kw)) if op == "decode" \
        else (lambda **kw: tlc.lightning_prefill(state, q, k, v, slopes, slot_ids=slot_ids, block_size=4, **kw))
    with pytest.raises(IndexError, match=r"slot_ids\[0\] = 7 is out of range \[-1, 4\)"):
        call()
    assert torch.equal(state, before)
    out = call(check_bounds=False)
    exp_state, exp_out = ref_lightning(before, q, k, v, slopes, slot_ids=slot_ids)
    assert not out[0].any() and not out[2].any()
    assert torch.equal(state[1], before[1]) and torch.equal(state[3], before[3])
    assert_close_rel(out, exp_out, F32_TOL, "output")
    assert_close_rel(state, exp_state, F32_TOL, "state")


# --------------------------------------------------------------------------- lightning_slopes


@pytest.mark.parametrize("H,layer,num_layers", [(8, 0, 1), (8, 0, 80), (16, 5, 12), (64, 79, 80), (7, 2, 3),
                                                (1, 0, 1), (48, 1, 2)])
def test_lightning_slopes(device, H, layer, num_layers):
    slopes = tlc.lightning_slopes(H, layer, num_layers, device=device)
    assert slopes.shape == (H,) and slopes.dtype == torch.float32 and slopes.device.type == device
    expected = ref_lightning_slopes(H, layer, num_layers)
    torch.testing.assert_close(slopes.cpu().double(), expected, rtol=1e-7, atol=0)
    assert (slopes > 0).all() and (slopes[1:] < slopes[:-1]).all()


def test_lightning_slopes_values():
    """Spot values, independent of the reference: H = 8 gives base 1/2."""
    torch.testing.assert_close(tlc.lightning_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)]) * (1 + 1e-5))
    assert tlc.lightning_slopes(8, 0, 1).tolist() == tlc.lightning_slopes(8).tolist()


@pytest.mark.parametrize("args", [(0,), (-4,), (8, -1, 4), (8, 4, 4), (8, 5, 4), (8, 0, 0), (8, 0, -2)])
def test_lightning_slopes_bad_args(args):
    with pytest.raises(ValueError, match=r"num_heads|layer_index"):
        tlc.lightning_slopes(*args)


# --------------------------------------------------------------------------- init_state


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16], ids=str)
def test_init_state(device, dtype):
    state = tlc.init_state(3, 4, 5, 6, dtype=dtype, device=device)
    assert state.shape == (3, 4, 5, 6) and state.is_contiguous() and state.device.type == device
    assert state.dtype == (dtype or torch.float32)
    assert not state.any()


def test_init_state_default_is_float32_whatever_the_default_dtype():
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert tlc.init_state(1, 1, 1, 1).dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("bad", [0, -1])
def test_init_state_bad_sizes(position, bad):
    names = ["batch_size", "num_heads", "key_dim", "value_dim"]
    sizes = [2, 2, 3, 3]
    sizes[position] = bad
    with pytest.raises(ValueError, match=rf"init_state: {names[position]} must be positive, got {bad}"):
        tlc.init_state(*sizes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32], ids=str)
def test_init_state_bad_dtype(dtype):
    with pytest.raises(TypeError, match=r"state dtype must be float32 or bfloat16"):
        tlc.init_state(1, 1, 1, 1, dtype=dtype)


# --------------------------------------------------------------------------- opcheck


def test_opcheck_init_state(device):
    for dtype in (None, torch.float32, torch.bfloat16):
        torch.library.opcheck(ops.init_state.default, (2, 3, 4, 5), {"dtype": dtype, "device": torch.device(device)})


def _lightning_opcheck_cases(device):
    g = torch.Generator().manual_seed(1)
    B, n, H, Dk, Dv = 2, 5, 2, 4, 3
    slopes = tlc.lightning_slopes(H, device=device)
    q, k, v = lightning_inputs("fused", B, n, H, Dk, Dv, g, device=device)
    yield (randn((B, H, Dk, Dv), g, device=device), q, k, v, slopes), {}
    q, k, v = lightning_inputs("transposed", B, n, H, Dk, Dv, g, torch.bfloat16, device)
    yield (randn((3, H, Dk, Dv), g, torch.bfloat16, device), q, k, v, slopes), dict(
        slot_ids=torch.tensor([2, -1], device=device), scale=0.5)
    q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, g, torch.float16, device)
    yield (randn((4, H, Dk, Dv), g, device=device), q, k, v, slopes), dict(slot_ids=torch.tensor([3, 0], device=device))


def test_opcheck_lightning_decode(device):
    for args, kwargs in _lightning_opcheck_cases(device):
        before = args[0].clone()
        torch.library.opcheck(ops.lightning_decode.default, args, kwargs)
        assert torch.equal(args[0], before)


def test_opcheck_lightning_prefill(device):
    g = torch.Generator().manual_seed(2)
    for i, (args, kwargs) in enumerate(_lightning_opcheck_cases(device)):
        kwargs = dict(kwargs, block_size=[2, 5, 64][i])
        if i == 1:
            kwargs["attention_mask"] = random_mask((2, 5), g, torch.int32, device=device)
        torch.library.opcheck(ops.lightning_prefill.default, args, kwargs)


# --------------------------------------------------------------------------- bad inputs


def _lightning_base(gen, device="cpu"):
    P, B, n, H, Dk, Dv = 3, 2, 4, 2, 3, 5
    state = randn((P, H, Dk, Dv), gen, device=device)
    q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, gen, device=device)
    return dict(state=state, query=q, key=k, value=v, slopes=tlc.lightning_slopes(H, device=device),
                kw=dict(slot_ids=torch.tensor([2, 0], device=device)))


def _set(**changes):
    def apply(a):
        a = dict(a, kw=dict(a["kw"]))
        for name, fn in changes.items():
            target = a if name in ("state", "query", "key", "value", "slopes") else a["kw"]
            result = fn(a)
            if result is _DROP:
                target.pop(name, None)
            else:
                target[name] = result
        return a
    return apply


_DROP = object()

# (id, change, exception, regex, ops it applies to)
LIGHTNING_BAD_INPUTS = [
    ("state-3d", _set(state=lambda a: a["state"][0]), ValueError, r"state must be \[slots, heads, key_dim, value_dim\]",
     "both"),
    ("state-float16", _set(state=lambda a: a["state"].half()), TypeError, r"state dtype must be float32 or bfloat16",
     "both"),
    ("state-float64", _set(state=lambda a: a["state"].double()), TypeError, r"state dtype must be float32 or bfloat16",
     "both"),
    ("state-noncontiguous", _set(state=lambda a: a["state"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     r"state must be contiguous", "both"),
    ("query-3d", _set(query=lambda a: a["query"][0]), ValueError, r"query must be \[batch, tokens, heads, key_dim\]",
     "both"),
    ("query-dim", _set(query=lambda a: a["query"][..., :2]), ValueError,
     r"query must be \[batch, tokens, heads, key_dim\] = \[2, 4, 2, 3\] to match query and state, got shape "
     r"\[2, 4, 2, 2\]", "both"),
    ("query-heads", _set(query=lambda a: a["query"][:, :, :1]),
     ValueError, r"query must be \[batch, tokens, heads, key_dim\]",
     "both"),
    ("key-dim", _set(key=lambda a: torch.ones(2, 4, 2, 4)), ValueError,
     r"key must be \[batch, tokens, heads, key_dim\] = \[2, 4, 2, 3\]", "both"),
    ("key-tokens", _set(key=lambda a: a["key"][:, :3]), ValueError, r"key must be \[batch, tokens, heads, key_dim\]",
     "both"),
    ("key-batch", _set(key=lambda a: a["key"][:1]), ValueError, r"key must be \[batch, tokens", "both"),
    ("value-dim", _set(value=lambda a: a["value"][..., :4]), ValueError,
     r"value must be \[batch, tokens, heads, value_dim\] = \[2, 4, 2, 5\]", "both"),
    ("value-heads", _set(value=lambda a: torch.ones(2, 4, 3, 5)), ValueError, r"value must be \[batch, tokens, heads",
     "both"),
    ("query-float64", _set(query=lambda a: a["query"].double(), key=lambda a: a["key"].double(),
                           value=lambda a: a["value"].double()), TypeError,
     r"query must be float32, float16 or bfloat16, got Double", "both"),
    ("query-int", _set(query=lambda a: a["query"].int()), TypeError, r"query must be float32, float16 or bfloat16",
     "both"),
    ("mixed-dtypes", _set(key=lambda a: a["key"].half()), TypeError, r"query, key and value must share one dtype",
     "both"),
    ("zero-heads", _set(state=lambda a: a["state"][:, :0], query=lambda a: a["query"][:, :, :0],
                        key=lambda a: a["key"][:, :, :0], value=lambda a: a["value"][:, :, :0],
                        slopes=lambda a: a["slopes"][:0]), ValueError, r"heads must be positive", "both"),
    ("zero-key-dim", _set(state=lambda a: a["state"][:, :, :0], query=lambda a: a["query"][..., :0],
                          key=lambda a: a["key"][..., :0]), ValueError, r"key_dim must be positive", "both"),
    ("zero-value-dim", _set(state=lambda a: a["state"][..., :0], value=lambda a: a["value"][..., :0]), ValueError,
     r"value_dim must be positive", "both"),
    ("slopes-length", _set(slopes=lambda a: a["slopes"][:1]),
     ValueError, r"slopes must be \[heads\] = \[2\], got shape \[1\]",
     "both"),
    ("slopes-2d", _set(slopes=lambda a: a["slopes"][None]), ValueError, r"slopes must be \[heads\]", "both"),
    ("slopes-int", _set(slopes=lambda a: torch.ones(2, dtype=torch.int64)), TypeError, r"slopes must be floating point",
     "both"),
    ("slot-ids-shape", _set(slot_ids=lambda a: torch.tensor([2, 0, 1])), ValueError,
     r"slot_ids must be \[batch\] = \[2\], got shape \[3\]", "both"),
    ("slot-ids-int32", _set(slot_ids=lambda a: torch.tensor([2, 0], dtype=torch.int32)), TypeError,
     r"slot_ids must be int64, got Int", "both"),
    ("slot-ids-too-big", _set(slot_ids=lambda a: torch.tensor([0, 3])), IndexError,
     r"slot_ids\[1\] = 3 is out of range \[-1, 3\) for a state with 3 rows", "both"),
    ("slot-ids-below-minus-one", _set(slot_ids=lambda a: torch.tensor([-2, 0])), IndexError,
     r"slot_ids\[0\] = -2 is out of range", "both"),
    ("slot-ids-duplicate", _set(slot_ids=lambda a: torch.tensor([1, 1])), IndexError,
     r"slot_ids\[1\] = 1 repeats an earlier row's slot", "both"),
    ("no-slot-ids-batch-mismatch", _set(slot_ids=lambda a: _DROP), ValueError,
     r"without slot_ids the batch \(2\) must equal the number of state rows \(3\)", "both"),
    ("block-size-zero", _set(block_size=lambda a: 0), ValueError, r"block_size must be at least 1, got 0", "prefill"),
    ("block-size-negative", _set(block_size=lambda a: -5), ValueError, r"block_size must be at least 1", "prefill"),
    ("mask-shape", _set(attention_mask=lambda a: torch.ones(2, 5, dtype=torch.bool)), ValueError,
     r"attention_mask must be \[batch, tokens\] = \[2, 4\], got shape \[2, 5\]", "prefill"),
    ("mask-4d", _set(attention_mask=lambda a: torch.ones(2, 1, 4, 4, dtype=torch.bool)), ValueError,
     r"attention_mask must be \[batch, tokens\]", "prefill"),
    ("mask-complex", _set(attention_mask=lambda a: torch.ones(2, 4, dtype=torch.complex64)), TypeError,
     r"attention_mask must be bool, integer or floating point", "prefill"),
]
_BAD_PARAMS = [
    pytest.param(op, case, id=f"{op}-{case[0]}")
    for case in LIGHTNING_BAD_INPUTS
    for op in ("decode", "prefill")
    if case[4] in ("both", op)
]


def _call_lightning(op, a):
    fn = tlc.lightning_decode if op == "decode" else tlc.lightning_prefill
    return fn(a["state"], a["query"], a["key"], a["value"], a["slopes"], **a["kw"])


@pytest.mark.parametrize("op,case", _BAD_PARAMS)
def test_lightning_bad_inputs_raise_and_leave_state_untouched(gen, op, case):
    _, change, exc, regex, _ = case
    base = _lightning_base(gen)
    a = change(base)
    before, base_before = a["state"].clone(), base["state"].clone()
    with pytest.raises(exc, match=regex):
        _call_lightning(op, a)
    assert torch.equal(a["state"], before) and torch.equal(base["state"], base_before)
    # The unmodified call is valid: each case isolates one defect.
    _call_lightning(op, base)


@pytest.mark.skipif(not HAS_CUDA, reason="device mismatch needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("op", ["decode", "prefill"])
@pytest.mark.parametrize("which", ["query", "key", "value", "slopes", "slot_ids", "attention_mask"])
def test_lightning_device_mismatch_cuda(gen, op, which):
    if op == "decode" and which == "attention_mask":
        pytest.skip("decode takes no attention mask")
    a = _lightning_base(gen, "cuda")
    if op == "prefill":
        a["kw"]["attention_mask"] = torch.ones(2, 4, dtype=torch.bool, device="cuda")
    if which in a:
        a[which] = a[which].cpu()
    else:
        a["kw"][which] = a["kw"][which].cpu()
    before = a["state"].clone()
    with pytest.raises(ValueError, match=rf"{which} must be on the same device as state"):
        _call_lightning(op, a)
    assert torch.equal(a["state"], before)


@pytest.mark.parametrize("op", ["decode", "prefill"])
@pytest.mark.parametrize("which", ["query", "slopes", "slot_ids"])
def test_lightning_meta_tensor_mixed_in_is_rejected(gen, op, which):
    """A meta tensor among CPU tensors is a device mismatch (as for ATen ops), not a silent no-op."""
    a = _lightning_base(gen)
    if which in a:
        a[which] = a[which].to("meta")
    else:
        a["kw"][which] = a["kw"][which].to("meta")
    before = a["state"].clone()
    with pytest.raises((ValueError, RuntimeError), match=r"device"):
        _call_lightning(op, a)
    assert torch.equal(a["state"], before)


# --------------------------------------------------------------------------- CUDA vs CPU


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
def test_cuda_matches_cpu_and_reference(gen, state_dtype, input_dtype):
    P, B, n, H, Dk, Dv = 5, 3, 150, 16, 32, 32
    out_tol, state_tol = TOLERANCES[(state_dtype, input_dtype)]
    slopes = tlc.lightning_slopes(H, 1, 4)
    q, k, v = lightning_inputs("fused", B, n, H, Dk, Dv, gen, input_dtype)
    S0 = randn((P, H, Dk, Dv), gen, state_dtype)
    slot_ids = torch.tensor([4, -1, 1])
    mask = random_mask((B, n), gen, p_true=0.8)
    cut = 97
    calls = [(q[:, :cut], k[:, :cut], v[:, :cut], mask[:, :cut], slot_ids),
             (q[:, cut:], k[:, cut:], v[:, cut:], None, slot_ids)]
    exp_state, exp_outputs = ref_calls(S0, calls, slopes)
    exp_out = torch.cat(exp_outputs, dim=1)
    results = {}
    for device in ("cpu", "cuda"):
        state = S0.to(device)
        to = lambda t: t.to(device) if t is not None else None  # noqa: E731
        o1 = tlc.lightning_prefill(state, *(to(t) for t in calls[0][:3]), to(slopes), attention_mask=to(mask[:, :cut]),
                                   slot_ids=to(slot_ids), block_size=32)
        o2 = tlc.lightning_decode(state, *(to(t) for t in calls[1][:3]), to(slopes), slot_ids=to(slot_ids))
        results[device] = (torch.cat([o1, o2], dim=1).cpu(), state.cpu())
        assert_close_rel(results[device][0], exp_out, out_tol, f"{device} output")
        assert_close_rel(results[device][1], exp_state, state_tol, f"{device} state")
        assert not results[device][0][1].any()
    assert_close_rel(results["cuda"][0], results["cpu"][0], 2 * out_tol, "cuda vs cpu output")
    assert_close_rel(results["cuda"][1], results["cpu"][1], 2 * state_tol, "cuda vs cpu state")
