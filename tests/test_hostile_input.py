"""Hostile input (SPEC 6): every rule, on every device, against ``reference.py``.

* positions and slot ids at every boundary (0, +-1 around each limit, +-2^31,
  +-2^62, int64 min and max), with and without host checks, ring on and off:
  the documented result, and not one bit changed outside the buffers (the cache,
  the positions and the state are narrowed views of larger buffers whose guard
  regions are compared bit for bit afterwards);
* zero-size calls; repeated slot ids; ring with a too-small causal mask;
* non-finite values (selection, not multiplication by 0);
* typed Python arguments; view/metadata head dims; slopes without num_layers;
* prefill accuracy independent of TF32 / matmul-precision switches;
* ``write_to_cache`` (the K/V part of ``concatenate_to_cache``).
"""

from __future__ import annotations

import math

import pytest
import torch

import torch_lightning_cache as tlc
from conftest import lightning_inputs, make_inputs, randn, rel_err
from reference import ref_concatenate_to_cache, ref_lightning, ref_write_to_cache

ops = torch.ops.lightning_cache

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
GUARD = 37  # elements of guard region on each side of every buffer


def _extremes(limits):
    """0, +-1 and +-2 around every limit, +-2^31, +-2^62, int64 min and max (deduplicated, in int64)."""
    values = {0, 1, -1, -2, 2**31, -(2**31), 2**31 - 1, -(2**31) + 1, 2**62, -(2**62), 2**62 + 1, 2**62 - 1,
              I64_MIN, I64_MIN + 1, I64_MAX, I64_MAX - 1, I64_MAX - 2}
    for limit in limits:
        values.update(limit + d for d in (-2, -1, 0, 1, 2))
    return sorted(v for v in values if I64_MIN <= v <= I64_MAX)


class Guarded:
    """A contiguous tensor of ``shape`` living in the middle of a larger flat buffer."""

    def __init__(self, values: torch.Tensor):
        n = values.numel()
        fill = torch.full((), -7, dtype=values.dtype) if values.dtype == torch.int64 else torch.tensor(
            float("nan"), dtype=values.dtype)
        self.base = torch.empty(GUARD + n + GUARD, dtype=values.dtype, device=values.device)
        self.base[:GUARD] = fill
        self.base[GUARD + n:] = fill
        self.tensor = self.base[GUARD:GUARD + n].view(values.shape)
        self.tensor.copy_(values)
        self.guards = self._guards().clone()

    def _guards(self):
        n = self.tensor.numel()
        return torch.cat([self.base[:GUARD], self.base[GUARD + n:]])

    def guards_intact(self) -> bool:
        # Bit for bit (NaN guards compare as raw bits).
        a, b = self._guards(), self.guards
        if a.is_floating_point():
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            a, b = a.view(bits), b.view(bits)
        return torch.equal(a, b)


# --------------------------------------------------------------------------- positions


B_L_H_DK_DV = (1, 6, 2, 3, 2)


def _one_row_write(device, start, q, ring, check_bounds, op, gen, causal_T=None):
    """One row at ``start``: returns (raised, kv_ok, index_ok, mask_ok, guards_ok)."""
    B, L, H, Dk, Dv = B_L_H_DK_DV
    kv = Guarded(randn((B, L, H, Dk + Dv), gen, device=device))
    index = Guarded(torch.tensor([start], device=device))
    key, value = make_inputs("fused", B, q, H, (Dk, Dv), gen, device=device)
    kwargs = {}
    if causal_T is not None:
        kwargs["causal_mask"] = torch.ones(causal_T, causal_T, dtype=torch.bool, device=device).tril()
    kv_before, index_before = kv.tensor.clone(), index.tensor.clone()
    exp = None
    try:
        exp = ref_concatenate_to_cache(kv.tensor, index.tensor, key, value, ring=ring, check_bounds=check_bounds,
                                       **kwargs)
    except IndexError:
        pass
    raised = False
    try:
        if op == "concatenate":
            _, _, mask = tlc.concatenate_to_cache(kv.tensor, index.tensor, key, value, ring=ring,
                                                  check_bounds=check_bounds, **kwargs)
        else:
            tlc.write_to_cache(kv.tensor, index.tensor, key, value, ring=ring, check_bounds=check_bounds)
            mask = None
    except IndexError:
        raised = True
    guards = kv.guards_intact() and index.guards_intact()
    if raised:
        # Rejected: nothing changed, and the oracle rejects it too.
        assert exp is None, f"start={start}: the op raised but the reference accepts it"
        assert torch.equal(kv.tensor, kv_before) and torch.equal(index.tensor, index_before)
    else:
        assert exp is not None, f"start={start}: the reference raises but the op accepted it"
        exp_kv, exp_index, exp_mask = exp
        assert torch.equal(kv.tensor, exp_kv), f"start={start}: cache differs"
        assert torch.equal(index.tensor, exp_index), f"start={start}: index {index.tensor} != {exp_index}"
        if mask is not None:
            assert torch.equal(mask, exp_mask), f"start={start}: mask differs"
        assert index.tensor.item() >= 0 or index.tensor.item() == start, "a position wrapped negative"
    assert guards, f"start={start}: a write left the buffer"
    return raised


@pytest.mark.parametrize("op", ["concatenate", "write"])
@pytest.mark.parametrize("ring", [False, True], ids=["no-ring", "ring"])
@pytest.mark.parametrize("check_bounds", [True, False], ids=["checks", "no-checks"])
def test_position_sweep(device, gen, op, ring, check_bounds):
    L = B_L_H_DK_DV[1]
    q = 2
    for start in _extremes([L - q, L, I64_MAX - q]):
        raised = _one_row_write(device, start, q, ring, check_bounds, op, gen)
        valid = start >= 0 and start <= I64_MAX - q and (ring or start <= L - q)
        assert raised == (check_bounds and not valid), f"start={start}"


@pytest.mark.parametrize("ring", [False, True], ids=["no-ring", "ring"])
@pytest.mark.parametrize("check_bounds", [True, False], ids=["checks", "no-checks"])
def test_position_sweep_with_causal_mask(device, gen, ring, check_bounds):
    """An explicit causal mask of T rows limits positions to start + q <= T (issue: ring + small T)."""
    L, q, T = B_L_H_DK_DV[1], 2, 9
    for start in _extremes([L - q, T - q, T]):
        raised = _one_row_write(device, start, q, ring, check_bounds, "concatenate", gen, causal_T=T)
        valid = start >= 0 and start <= T - q and (ring or start <= L - q)
        assert raised == (check_bounds and not valid), f"start={start}"


@pytest.mark.parametrize("op", ["concatenate", "write"])
def test_mixed_rows_checks_off_one_call(device, gen, op):
    """Every extreme position as one row of a single call: each row follows the rule on its own."""
    L, H, Dk, Dv, q = 5, 1, 2, 3, 3
    for ring in (False, True):
        starts = _extremes([L - q, I64_MAX - q])
        B = len(starts)
        kv = Guarded(randn((B, L, H, Dk + Dv), gen, torch.bfloat16, device))
        index = Guarded(torch.tensor(starts, device=device))
        key, value = make_inputs("step", B, q, H, (Dk, Dv), gen, device=device)
        exp_kv, exp_index, exp_mask = ref_concatenate_to_cache(kv.tensor, index.tensor, key, value, ring=ring,
                                                               is_causal=True, check_bounds=False)
        if op == "concatenate":
            _, _, mask = tlc.concatenate_to_cache(kv.tensor, index.tensor, key, value, ring=ring, is_causal=True,
                                                  check_bounds=False)
            assert torch.equal(mask, exp_mask)
        else:
            tlc.write_to_cache(kv.tensor, index.tensor, key, value, ring=ring, check_bounds=False)
        assert torch.equal(kv.tensor, exp_kv) and torch.equal(index.tensor, exp_index)
        assert kv.guards_intact() and index.guards_intact()
        assert all(after >= 0 or after == before for after, before in zip(index.tensor.tolist(), starts))


def test_ring_near_int64_max_never_wraps(device, gen):
    """Ring mode up to the last representable position: the index reaches int64 max and then the row is
    skipped (checks off) or rejected (checks on); it never wraps negative."""
    L, H, Dk, Dv, q = 4, 1, 2, 2, 3
    kv = Guarded(randn((1, L, H, Dk + Dv), gen, device=device))
    index = Guarded(torch.tensor([I64_MAX - 2 * q], device=device))
    for step in range(3):
        key, value = make_inputs("contiguous", 1, q, H, (Dk, Dv), gen, device=device)
        exp_kv, exp_index, _ = ref_concatenate_to_cache(kv.tensor, index.tensor, key, value, ring=True,
                                                        check_bounds=False)
        tlc.concatenate_to_cache(kv.tensor, index.tensor, key, value, ring=True, is_causal=True, check_bounds=False)
        assert torch.equal(kv.tensor, exp_kv) and torch.equal(index.tensor, exp_index)
        assert index.tensor.item() == min(I64_MAX - 2 * q + (step + 1) * q, I64_MAX)
    assert index.tensor.item() == I64_MAX
    with pytest.raises(IndexError, match="overflows int64"):
        tlc.concatenate_to_cache(kv.tensor, index.tensor, key, value, ring=True)
    assert kv.guards_intact() and index.guards_intact()


# --------------------------------------------------------------------------- slot ids


def _lightning_call(op, state, q, k, v, slopes, **kw):
    if op == "decode":
        kw.pop("attention_mask", None)
        kw.pop("block_size", None)
        return tlc.lightning_decode(state, q, k, v, slopes, **kw)
    return tlc.lightning_prefill(state, q, k, v, slopes, **kw)


@pytest.mark.parametrize("op", ["decode", "prefill"])
@pytest.mark.parametrize("check_bounds", [True, False], ids=["checks", "no-checks"])
def test_slot_id_sweep(device, gen, op, check_bounds):
    P, H, Dk, Dv, n = 3, 2, 3, 4, 3
    slopes = tlc.lightning_slopes(H, device=device)
    for slot in _extremes([P, 0]):
        ids = [slot, 1]
        state = Guarded(randn((P, H, Dk, Dv), gen, device=device))
        q, k, v = lightning_inputs("contiguous", 2, n, H, Dk, Dv, gen, device=device)
        before = state.tensor.clone()
        valid = -1 <= slot < P and slot != 1
        if check_bounds and not valid:
            with pytest.raises(IndexError, match=r"slot_ids\[\d\]"):
                _lightning_call(op, state.tensor, q, k, v, slopes, slot_ids=torch.tensor(ids, device=device),
                                block_size=2)
            assert torch.equal(state.tensor, before)
        else:
            out = _lightning_call(op, state.tensor, q, k, v, slopes, slot_ids=torch.tensor(ids, device=device),
                                  block_size=2, check_bounds=check_bounds)
            exp_state, exp_out = ref_lightning(before, q, k, v, slopes, slot_ids=torch.tensor(ids))
            assert rel_err(out, exp_out) < 1e-5 and rel_err(state.tensor, exp_state) < 1e-5, f"slot {slot}"
            skipped = [b for b, s in enumerate(ids) if not 0 <= s < P or s in ids[:b]]
            for b in skipped:
                assert not out[b].any(), f"slot {slot}: skipped row {b} must output zeros"
            untouched = set(range(P)) - {s for s in ids if 0 <= s < P}
            for row in untouched:
                assert torch.equal(state.tensor[row], before[row]), f"slot {slot}: row {row} changed"
        assert state.guards_intact(), f"slot {slot}: a write left the state"


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_repeated_slot_ids_first_occurrence_wins(device, gen, op):
    """Checks off: the first batch row with an id updates that state row; later ones are skipped
    (state untouched by them, output zeros). Checks on: IndexError, nothing written."""
    P, H, Dk, Dv, n = 4, 2, 4, 3, 5
    ids = [2, 2, 0, -1, 2, 9, 0, 3, -5, 3]
    B = len(ids)
    slopes = tlc.lightning_slopes(H, device=device)
    state = Guarded(randn((P, H, Dk, Dv), gen, device=device))
    before = state.tensor.clone()
    q, k, v = lightning_inputs("transposed", B, n, H, Dk, Dv, gen, device=device)
    slot_ids = torch.tensor(ids, device=device)
    with pytest.raises(IndexError):
        _lightning_call(op, state.tensor, q, k, v, slopes, slot_ids=slot_ids, block_size=2)
    assert torch.equal(state.tensor, before)
    for _ in range(2):  # deterministic: the same result twice
        state.tensor.copy_(before)
        out = _lightning_call(op, state.tensor, q, k, v, slopes, slot_ids=slot_ids, block_size=2,
                              check_bounds=False)
        exp_state, exp_out = ref_lightning(before, q, k, v, slopes, slot_ids=torch.tensor(ids))
        assert rel_err(out, exp_out) < 1e-5 and rel_err(state.tensor, exp_state) < 1e-5
        for b in (1, 3, 4, 5, 6, 8, 9):
            assert not out[b].any(), f"row {b} is skipped and must output zeros"
        assert state.guards_intact()
    assert torch.equal(slot_ids.cpu(), torch.tensor(ids)), "the caller's slot ids must not be modified"


def test_prepared_slot_ids_need_no_host_sync(device):
    """With checks off the slot ids are sanitized by device ops, inside a compiled graph too."""
    P, H, D = 3, 1, 2
    state = torch.zeros(P, H, D, D, device=device)
    x = torch.ones(4, 1, H, D, device=device)
    slopes = torch.ones(H, device=device)

    @torch.compile(fullgraph=True, backend="eager")
    def step(state, slot_ids):
        return ops.lightning_decode(state, x, x, x, slopes, slot_ids, 1.0, False)

    out = step(state, torch.tensor([1, 1, 5, 1], device=device))
    assert out[0].abs().sum() > 0 and not out[1:].any()
    assert state[1].abs().sum() > 0 and not state[0].any() and not state[2].any()


# --------------------------------------------------------------------------- zero sizes


@pytest.mark.parametrize("op", ["concatenate", "write"])
@pytest.mark.parametrize("B,q", [(0, 2), (2, 0), (0, 0)])
def test_empty_cache_calls_return_empty_results(device, gen, op, B, q):
    L, H, Dk, Dv = 4, 2, 3, 2
    key_value = randn((B, L, H, Dk + Dv), gen, device=device)
    index = torch.tensor([1] * B, dtype=torch.int64, device=device)
    key, value = make_inputs("contiguous", B, q, H, (Dk, Dv), gen, device=device)
    kv_before = key_value.clone()
    for check_bounds in (True, False):
        if op == "concatenate":
            k_cache, v_cache, mask = tlc.concatenate_to_cache(key_value, index, key, value, is_causal=True,
                                                              attention_mask=torch.ones(B, L, device=device),
                                                              check_bounds=check_bounds)
            assert mask.shape == (B, 1, q, L) and mask.dtype == torch.bool
        else:
            k_cache, v_cache = tlc.write_to_cache(key_value, index, key, value, check_bounds=check_bounds)
        assert k_cache.shape == (B, L, H, Dk) and v_cache.shape == (B, L, H, Dv)
        assert torch.equal(key_value, kv_before) and index.tolist() == [1] * B


@pytest.mark.parametrize("shape,name", [((2, 4, 0, 4), "heads"), ((2, 4, 2, 0), "key_dim")])
def test_zero_heads_or_dims_raise(device, shape, name):
    """The issue's crash cases (SIGFPE in the grain division): a ValueError naming the size."""
    B, L, H, W = shape
    key_value = torch.zeros(shape, device=device)
    index = torch.zeros(B, dtype=torch.int64, device=device)
    key = torch.zeros(B, 1, H, W // 2, device=device)
    value = torch.zeros(B, 1, H, W - W // 2, device=device)
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        tlc.concatenate_to_cache(key_value, index, key, value)
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        tlc.write_to_cache(key_value, index, key, value)


@pytest.mark.parametrize("op", ["decode", "prefill"])
@pytest.mark.parametrize("B,n", [(0, 3), (2, 0), (0, 0)])
def test_empty_lightning_calls_return_empty_results(device, gen, op, B, n):
    H, Dk, Dv = 2, 3, 4
    slopes = tlc.lightning_slopes(H, device=device)
    for slot_ids in (None, torch.tensor([1, 0][:B], dtype=torch.int64, device=device)):
        state = randn((B if slot_ids is None else 2, H, Dk, Dv), gen, device=device)
        before = state.clone()
        q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, gen, device=device)
        mask = torch.ones(B, n, device=device)
        for check_bounds in (True, False):
            out = _lightning_call(op, state, q, k, v, slopes, slot_ids=slot_ids, attention_mask=mask,
                                  check_bounds=check_bounds)
            assert out.shape == (B, n, H, Dv) and out.dtype == q.dtype
            assert torch.equal(state, before)


@pytest.mark.parametrize("op", ["decode", "prefill"])
@pytest.mark.parametrize("which", ["heads", "key_dim", "value_dim"])
def test_lightning_zero_heads_or_dims_raise(device, op, which):
    H, Dk, Dv = {"heads": (0, 2, 2), "key_dim": (2, 0, 2), "value_dim": (2, 2, 0)}[which]
    state = torch.zeros(1, H, Dk, Dv, device=device)
    q = torch.zeros(1, 2, H, Dk, device=device)
    v = torch.zeros(1, 2, H, Dv, device=device)
    with pytest.raises(ValueError, match=f"{which} must be positive"):
        _lightning_call(op, state, q, q, v, torch.ones(H, device=device))


# --------------------------------------------------------------------------- masked tokens, non-finite values


@pytest.mark.parametrize("block_size", [1, 3, 8, 64])
def test_masked_token_is_skipped_whole(device, gen, block_size):
    """Left padding after history, right padding, holes: the same as prefilling only the unmasked tokens."""
    B, n, H, Dk, Dv = 3, 13, 2, 4, 5
    slopes = tlc.lightning_slopes(H, 1, 4, device=device)
    q, k, v = lightning_inputs("fused", B, n, H, Dk, Dv, gen, device=device)
    S0 = randn((B, H, Dk, Dv), gen, device=device)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, :5] = False  # left padding
    mask[1, 9:] = False  # right padding
    mask[2, 1::3] = False  # holes
    state = S0.clone()
    out = tlc.lightning_prefill(state, q, k, v, slopes, attention_mask=mask.to(device), block_size=block_size)
    exp_state, exp_out = ref_lightning(S0, q, k, v, slopes, attention_mask=mask)
    assert rel_err(out, exp_out) < 1e-5 and rel_err(state, exp_state) < 1e-5
    for b in range(B):
        keep = mask[b].nonzero().flatten().to(device)
        s = S0[b:b + 1].clone()
        o = tlc.lightning_prefill(s, q[b:b + 1, keep], k[b:b + 1, keep], v[b:b + 1, keep], slopes,
                                  block_size=block_size)
        assert rel_err(out[b:b + 1, keep], o) < 1e-5 and rel_err(state[b:b + 1], s) < 1e-5
        assert not out[b, ~mask[b].to(device)].any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_in_masked_tokens_reaches_nothing(device, gen, bad):
    B, n, H, Dk, Dv = 2, 11, 2, 4, 3
    slopes = tlc.lightning_slopes(H, device=device)
    q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, gen, device=device)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, [0, 4, 10]] = False
    mask[1, 5:] = False
    for t in (q, k, v):
        t[~mask.to(device)] = bad
    S0 = randn((B, H, Dk, Dv), gen, device=device)
    exp_state, exp_out = ref_lightning(S0, q, k, v, slopes, attention_mask=mask)
    for block_size in (1, 4, 16):
        state = S0.clone()
        out = tlc.lightning_prefill(state, q, k, v, slopes, attention_mask=mask.to(device), block_size=block_size)
        assert torch.isfinite(out).all() and torch.isfinite(state).all()
        assert rel_err(out, exp_out) < 1e-5 and rel_err(state, exp_state) < 1e-5


def _assert_same_nonfinite(actual, expected, what):
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(e)), f"{what}: non-finite entries differ"
    fin = torch.isfinite(e)
    if fin.any():
        assert rel_err(a[fin], e[fin]) < 1e-5, f"{what}: finite entries differ"


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_never_reaches_earlier_tokens(device, gen, where, bad):
    """A non-finite value in token t (unmasked) leaves every output before t exact; from t on, prefill is
    non-finite exactly where sequential decode is."""
    B, n, H, Dk, Dv, t = 1, 12, 2, 4, 3, 6
    slopes = tlc.lightning_slopes(H, device=device)
    q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, gen, device=device)
    {"q": q, "k": k, "v": v}[where][0, t, 1, 2] = bad
    S0 = randn((B, H, Dk, Dv), gen, device=device)
    exp_state, exp_out = ref_lightning(S0, q, k, v, slopes)
    for block_size in (1, 4, 8, 16):
        state = S0.clone()
        out = tlc.lightning_prefill(state, q, k, v, slopes, block_size=block_size)
        assert torch.isfinite(out[:, :t]).all(), f"block {block_size}: token {t}'s value reached earlier outputs"
        assert rel_err(out[:, :t], exp_out[:, :t]) < 1e-5
        _assert_same_nonfinite(out, exp_out, f"block {block_size} output")
        _assert_same_nonfinite(state, exp_state, f"block {block_size} state")
    state = S0.clone()
    out = tlc.lightning_decode(state, q, k, v, slopes)
    assert torch.isfinite(out[:, :t]).all() and rel_err(out[:, :t], exp_out[:, :t]) < 1e-5
    _assert_same_nonfinite(out, exp_out, "decode output")


# --------------------------------------------------------------------------- matmul precision switches


@pytest.fixture
def restore_precision():
    legacy = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.set_float32_matmul_precision(legacy)
    torch.backends.cuda.matmul.allow_tf32 = tf32


def test_prefill_ignores_matmul_precision_switches(device, gen, restore_precision):
    """Full float32 whatever ``allow_tf32`` / ``set_float32_matmul_precision`` say, and the switches are
    restored afterwards. On the CPU the results are bit-identical; on a GPU they must match float64."""
    B, n, H, Dk, Dv = 2, 96, 4, 64, 64
    slopes = tlc.lightning_slopes(H, device=device)
    q, k, v = lightning_inputs("contiguous", B, n, H, Dk, Dv, gen, device=device)
    S0 = randn((B, H, Dk, Dv), gen, device=device)
    mask = (torch.arange(n) % 5 != 0).expand(B, n).to(device)
    exp_state, exp_out = ref_lightning(S0, q, k, v, slopes, attention_mask=mask)

    def run():
        state = S0.clone()
        out = tlc.lightning_prefill(state, q, k, v, slopes, attention_mask=mask, block_size=32)
        return out, state

    def settings():
        return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)

    baseline = run()
    switches = {
        "high": lambda: torch.set_float32_matmul_precision("high"),
        "medium": lambda: torch.set_float32_matmul_precision("medium"),
        "allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    }
    for name, switch in switches.items():
        torch.set_float32_matmul_precision("highest")
        switch()
        before = settings()
        out, state = run()
        assert settings() == before, f"{name}: the prefill must restore the caller's precision settings"
        assert rel_err(out, exp_out) < 2e-5 and rel_err(state, exp_state) < 2e-5, name
        if device == "cpu":
            assert torch.equal(out, baseline[0]) and torch.equal(state, baseline[1]), name


# --------------------------------------------------------------------------- typed Python arguments


def _cache_args():
    kv, index = tlc.init_kv_cache(1, 4, 1, 2, 2)
    x = torch.zeros(1, 1, 1, 2)
    return kv, index, x


def _state_args():
    state = tlc.init_state(1, 1, 2, 2)
    x = torch.zeros(1, 1, 1, 2)
    return state, x, torch.ones(1)


TYPED_CASES = [
    ("concat-ring-str", lambda: tlc.concatenate_to_cache(*_cache_args(), _cache_args()[2], ring="False"), "ring"),
    ("concat-causal-str", lambda: tlc.concatenate_to_cache(*_cache_args(), _cache_args()[2], causal_mask="causal"),
     "causal_mask"),
    ("concat-check-none", lambda: tlc.concatenate_to_cache(*_cache_args(), _cache_args()[2], check_bounds=None),
     "check_bounds"),
    ("concat-is-causal-int", lambda: tlc.concatenate_to_cache(*_cache_args(), _cache_args()[2], is_causal=1),
     "is_causal"),
    ("concat-index-list", lambda: tlc.concatenate_to_cache(_cache_args()[0], [0], *_cache_args()[2:],
                                                           _cache_args()[2]), "index"),
    ("write-ring-str", lambda: tlc.write_to_cache(*_cache_args(), _cache_args()[2], ring="True"), "ring"),
    ("write-check-float", lambda: tlc.write_to_cache(*_cache_args(), _cache_args()[2], check_bounds=0.0),
     "check_bounds"),
    ("decode-check-str", lambda: tlc.lightning_decode(*_state_args()[:2], _state_args()[1], _state_args()[1],
                                                      _state_args()[2], check_bounds="no"), "check_bounds"),
    ("decode-scale-str", lambda: tlc.lightning_decode(*_state_args()[:2], _state_args()[1], _state_args()[1],
                                                      _state_args()[2], scale="1"), "scale"),
    ("prefill-block-float", lambda: tlc.lightning_prefill(*_state_args()[:2], _state_args()[1], _state_args()[1],
                                                          _state_args()[2], block_size=4.0), "block_size"),
    ("prefill-slots-list", lambda: tlc.lightning_prefill(*_state_args()[:2], _state_args()[1], _state_args()[1],
                                                         _state_args()[2], slot_ids=[0]), "slot_ids"),
    ("slopes-float", lambda: tlc.lightning_slopes(4.0), "num_heads"),
    ("slopes-str", lambda: tlc.lightning_slopes("4"), "num_heads"),
    ("slopes-layers-none", lambda: tlc.lightning_slopes(4, 0, None), "num_layers"),
    ("init-kv-str", lambda: tlc.init_kv_cache(1, "4", 1, 2, 2), "max_length"),
    ("init-kv-bool", lambda: tlc.init_kv_cache(True, 4, 1, 2, 2), "batch_size"),
    ("init-state-float", lambda: tlc.init_state(1, 1, 2.0, 2), "key_dim"),
    ("init-cache-metadata", lambda: tlc.LightningCache.init_cache(2, "x"), "metadata"),
    ("init-cache-layers", lambda: tlc.LightningCache.init_cache(2.0, tlc.LightningCacheMetaData.create(
        num_heads=1, head_dim=2)), "num_hidden_layers"),
    ("view-metadata", lambda: tlc.LightningCacheView.init({"num_heads": 1}), "metadata"),
    ("meta-ring-str", lambda: tlc.LightningCacheMetaData.create(num_heads=1, head_dim=2, ring="False"), "ring"),
    ("meta-heads-float", lambda: tlc.LightningCacheMetaData.create(num_heads=2.5, head_dim=4), "num_heads"),
    ("meta-dtype-str", lambda: tlc.LightningCacheMetaData.create(num_heads=1, head_dim=2, dtype="float32"), "dtype"),
    ("view-causal-str", lambda: tlc.LightningCacheView.init(tlc.LightningCacheMetaData.create(
        num_heads=1, head_dim=2, max_length=4)).concatenate_to_cache(None, torch.zeros(1, 1, 1, 2),
                                                                    torch.zeros(1, 1, 1, 2), None,
                                                                    causal_mask="causal"), "causal_mask"),
]


@pytest.mark.parametrize("call,name", [c[1:] for c in TYPED_CASES], ids=[c[0] for c in TYPED_CASES])
def test_python_arguments_are_typed(call, name):
    with pytest.raises(TypeError, match=name):
        call()


def test_init_kv_cache_width_overflow_is_a_value_error():
    with pytest.raises(ValueError, match=r"key_dim \+ value_dim .* overflows int64"):
        tlc.init_kv_cache(1, 1, 1, 2**62, 2**62)
    with pytest.raises(ValueError, match=r"key_dim \+ value_dim .* overflows int64"):
        ops.init_kv_cache(1, 1, 1, I64_MAX, 1)
    with pytest.raises(ValueError, match="does not fit in int64"):
        tlc.init_kv_cache(1, 1, 1, 2**64, 1)


def test_view_rejects_head_dims_that_differ_from_the_metadata():
    meta = tlc.LightningCacheMetaData.create(batch_size=1, num_heads=2, key_dim=4, value_dim=3, max_length=8)
    view = tlc.LightningCacheView.init(meta)
    key, value = torch.zeros(1, 1, 2, 5), torch.zeros(1, 1, 2, 2)  # 5 + 2 == 4 + 3: the op alone would accept it
    with pytest.raises(ValueError, match=r"key has shape \(1, 1, 2, 5\).*head dim=4"):
        view.concatenate_to_cache(None, key, value, None)
    assert view.key_value is None
    with pytest.raises(ValueError, match=r"value has shape .*head dim=3"):
        view.concatenate_to_cache(None, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 2), None)
    lightning = tlc.LightningCacheView.init(meta, layer_index=0, layer_kind="lightning", num_layers=2)
    with pytest.raises(ValueError, match=r"query has shape"):
        lightning.recurrent_update(torch.zeros(1, 2, 2, 5), torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 3))


def test_lightning_view_needs_num_layers():
    meta = tlc.LightningCacheMetaData.create(batch_size=1, num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="num_layers"):
        tlc.LightningCacheView.init(meta, layer_index=3, layer_kind="lightning")
    with pytest.raises(ValueError, match="layer_index must be in"):
        tlc.LightningCacheView.init(meta, layer_index=3, layer_kind="lightning", num_layers=3)
    view = tlc.LightningCacheView.init(meta, layer_kind="lightning")  # no index at all: slopes must be passed
    x = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="num_layers"):
        view.recurrent_update(x, x, x)
    assert view.recurrent_update(x, x, x, slopes=torch.ones(2)).shape == (1, 1, 2, 4)


# --------------------------------------------------------------------------- write_to_cache


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float64), (torch.float16, torch.bfloat16)], ids=str)
def test_write_to_cache_matches_reference(device, gen, ring, dtypes):
    cache_dtype, input_dtype = dtypes
    B, L, H, Dk, Dv = 3, 7, 2, 3, 5
    kv = Guarded(randn((B, L, H, Dk + Dv), gen, cache_dtype, device))
    index = Guarded(torch.tensor([0, 2, 4], device=device))
    for q in (3, 1, 2, 4):
        key, value = make_inputs("transposed", B, q, H, (Dk, Dv), gen, input_dtype, device)
        if not ring and (index.tensor + q > L).any():
            with pytest.raises(IndexError, match="cache overflow"):
                tlc.write_to_cache(kv.tensor, index.tensor, key, value)
        exp_kv, exp_index = ref_write_to_cache(kv.tensor, index.tensor, key, value, ring=ring, check_bounds=False)
        k_cache, v_cache = tlc.write_to_cache(kv.tensor, index.tensor, key, value, ring=ring, check_bounds=False)
        assert torch.equal(kv.tensor, exp_kv) and torch.equal(index.tensor, exp_index)
        assert k_cache.data_ptr() == kv.tensor.data_ptr() and torch.equal(v_cache, kv.tensor[..., Dk:])
    assert kv.guards_intact() and index.guards_intact()


def test_write_to_cache_equals_concatenate_without_mask(device, gen):
    B, L, H, Dk, Dv, q = 2, 6, 2, 2, 3, 2
    kv_a = randn((B, L, H, Dk + Dv), gen, device=device)
    kv_b = kv_a.clone()
    index_a = torch.tensor([1, 4], device=device)
    index_b = index_a.clone()
    key, value = make_inputs("fused", B, q, H, (Dk, Dv), gen, device=device)
    tlc.write_to_cache(kv_a, index_a, key, value)
    tlc.concatenate_to_cache(kv_b, index_b, key, value)
    assert torch.equal(kv_a, kv_b) and torch.equal(index_a, index_b)


def test_write_to_cache_bad_inputs_share_concatenates_checks(device):
    kv, index = tlc.init_kv_cache(2, 4, 2, 3, 2, device=device)
    key = torch.zeros(2, 1, 2, 3, device=device)
    with pytest.raises(ValueError, match=r"key_dim \+ value_dim \(3 \+ 3\) must equal"):
        tlc.write_to_cache(kv, index, key, torch.zeros(2, 1, 2, 3, device=device))
    with pytest.raises(TypeError, match="index must be int64"):
        tlc.write_to_cache(kv, index.int(), key, torch.zeros(2, 1, 2, 2, device=device))
    with pytest.raises(IndexError, match=r"index\[1\] = -1 is negative"):
        tlc.write_to_cache(kv, torch.tensor([0, -1], device=device), key, torch.zeros(2, 1, 2, 2, device=device))
    assert not kv.any()


def test_opcheck_write_to_cache(device, gen):
    B, L, H, Dk, Dv, q = 2, 5, 2, 3, 2, 2
    key, value = make_inputs("fused", B, q, H, (Dk, Dv), gen, device=device)
    for ring, start in ((False, [0, 3]), (True, [4, 9])):
        kv = randn((B, L, H, Dk + Dv), gen, device=device)
        torch.library.opcheck(ops.write_to_cache.default,
                              (kv, torch.tensor(start, device=device), key, value), dict(ring=ring))


def test_write_to_cache_compiles_without_graph_break(device, gen):
    B, L, H, Dk, Dv = 2, 8, 1, 2, 2
    kv, index = tlc.init_kv_cache(B, L, H, Dk, Dv, device=device)
    expected_kv, expected_index = kv.clone(), index.clone()

    @torch.compile(fullgraph=True)
    def step(kv, index, key, value):
        k_cache, v_cache = tlc.write_to_cache(kv, index, key, value, check_bounds=False)
        return k_cache.sum() + v_cache.sum()

    for _ in range(3):
        key, value = make_inputs("contiguous", B, 1, H, (Dk, Dv), gen, device=device)
        step(kv, index, key, value)
        expected_kv, expected_index = ref_write_to_cache(expected_kv, expected_index, key, value)
    assert torch.equal(kv, expected_kv) and torch.equal(index, expected_index)
    assert math.isfinite(float(kv.sum()))
