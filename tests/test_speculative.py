"""Speculative decoding (SPEC section 7): ``rewind_cache``, ``lightning_accept`` and
``lightning_decode(..., step_states=...)``.

Oracles: ``reference.ref_rewind_cache`` / ``ref_lightning_accept`` (plain Python loops,
first occurrence of a slot wins, bad rows skipped), ``write_to_cache`` itself (a
rewound cache rewritten equals one that never saw the rejected tokens) and
``ref_lightning`` (float64 sequential recurrence that sees only the accepted tokens;
``rel_err`` within ``F32_TOL``).
"""

from __future__ import annotations

import pytest
import torch

import torch_lightning_cache as tlc
from conftest import F32_TOL, lightning_inputs, randn, rel_err
from reference import ref_lightning, ref_lightning_accept, ref_rewind_cache

ops = torch.ops.lightning_cache


def _long(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------- rewind_cache


def test_rewind_without_slots_clamps_at_zero(device):
    index = _long([5, 2, 0, 7], device)
    num = _long([2, 3, 1, 0], device)
    tlc.rewind_cache(index, num)
    assert index.cpu().tolist() == [3, 0, 0, 7]


@pytest.mark.parametrize("check_bounds", [True, False])
def test_rewind_with_slots(device, check_bounds):
    index = _long([10, 20, 30, 40, 50], device)
    slots = _long([3, -1, 0], device)
    num = _long([4, 100, 60], device)
    expected = ref_rewind_cache(index, num, slots)
    tlc.rewind_cache(index, num, slot_ids=slots, check_bounds=check_bounds)
    assert index.cpu().tolist() == expected.tolist() == [0, 20, 30, 36, 50]


def test_rewind_checks_off_skips_bad_rows(device):
    index = _long([10, 20, 30, 40], device)
    slots = _long([1, 7, 1, -5, 2, 3, 0], device)  # out of range, repeat, negative count, huge count
    num = _long([1, 1, 5, 1, -3, 2**63 - 1, 4], device)
    expected = ref_rewind_cache(index, num, slots)
    tlc.rewind_cache(index, num, slot_ids=slots, check_bounds=False)
    assert index.cpu().tolist() == expected.tolist() == [6, 19, 30, 0]


def test_rewind_refuses_ring_and_bad_inputs(device):
    index = _long([4, 4, 4], device)
    before = index.clone()
    with pytest.raises(ValueError, match="ring"):
        tlc.rewind_cache(index, _long([1, 1, 1], device), ring=True)
    with pytest.raises(IndexError, match="num_tokens"):
        tlc.rewind_cache(index, _long([1, -1, 1], device))
    with pytest.raises(IndexError, match="slot_ids"):
        tlc.rewind_cache(index, _long([1, 1], device), slot_ids=_long([0, 3], device))
    with pytest.raises(IndexError, match="slot_ids"):
        tlc.rewind_cache(index, _long([1, 1], device), slot_ids=_long([2, 2], device))
    with pytest.raises(ValueError, match="num_tokens"):
        tlc.rewind_cache(index, _long([1, 1], device))
    with pytest.raises(TypeError, match="num_tokens"):
        tlc.rewind_cache(index, num_tokens=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="ring"):
        tlc.rewind_cache(index, _long([1, 1, 1], device), ring="False")
    assert torch.equal(index, before)


def test_rewind_then_rewrite_equals_never_written(device, gen):
    B, L, H, Dk, Dv, n = 3, 12, 2, 4, 3, 5
    kv, index = tlc.init_kv_cache(B, L, H, Dk, Dv, device=device)
    kv_ref, index_ref = tlc.init_kv_cache(B, L, H, Dk, Dv, device=device)
    prompt_k, prompt_v = randn((B, 3, H, Dk), gen, device=device), randn((B, 3, H, Dv), gen, device=device)
    for c, i in ((kv, index), (kv_ref, index_ref)):
        tlc.write_to_cache(c, i, prompt_k, prompt_v)
    draft_k, draft_v = randn((B, n, H, Dk), gen, device=device), randn((B, n, H, Dv), gen, device=device)
    tlc.write_to_cache(kv, index, draft_k, draft_v)
    accepted = [0, 3, 5]
    tlc.rewind_cache(index, _long([n - a for a in accepted], device))
    fix_k, fix_v = randn((B, 1, H, Dk), gen, device=device), randn((B, 1, H, Dv), gen, device=device)
    tlc.write_to_cache(kv, index, fix_k, fix_v)
    # The reference writes only the accepted tokens, then the correction.
    for b, a in enumerate(accepted):
        row = slice(b, b + 1)
        tlc.write_to_cache(kv_ref[row], index_ref[row], draft_k[row, :a], draft_v[row, :a])
        tlc.write_to_cache(kv_ref[row], index_ref[row], fix_k[row], fix_v[row])
    assert torch.equal(index, index_ref)
    for b in range(B):  # columns past each row's position are stale drafts, never read
        p = int(index[b])
        assert torch.equal(kv[b, :p], kv_ref[b, :p])


def test_opcheck_rewind_cache(device):
    index = _long([5, 2, 9], device)
    torch.library.opcheck(ops.rewind_cache.default, (index, _long([1, 4, 2], device)), {})
    torch.library.opcheck(ops.rewind_cache.default, (index, _long([1, 4], device)),
                          {"slot_ids": _long([2, -1], device), "check_bounds": False})


# --------------------------------------------------------------------------- lightning_accept


def _accept_case(gen, device, B=4, P=5, n=3, H=2, Dk=3, Dv=2, dtype=torch.float32):
    state = randn((P, H, Dk, Dv), gen, device=device).to(dtype)
    steps = randn((B, n + 1, H, Dk, Dv), gen, device=device).to(dtype)
    return state, steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accept_without_slots(device, gen, dtype):
    state, steps = _accept_case(gen, device, B=4, P=4, dtype=dtype)
    num = _long([0, 3, 1, 2], device)
    expected = ref_lightning_accept(state, steps, num)
    tlc.lightning_accept(state, steps, num)
    assert torch.equal(state.cpu(), expected)


@pytest.mark.parametrize("check_bounds", [True, False])
def test_accept_with_slots(device, gen, check_bounds):
    state, steps = _accept_case(gen, device, B=4, P=5)
    slots = _long([4, -1, 0, 2], device)
    num = _long([1, 3, 0, 3], device)
    expected = ref_lightning_accept(state, steps, num, slots)
    tlc.lightning_accept(state, steps, num, slot_ids=slots, check_bounds=check_bounds)
    assert torch.equal(state.cpu(), expected)


def test_accept_checks_off_skips_bad_rows(device, gen):
    state, steps = _accept_case(gen, device, B=6, P=4)
    steps[1].fill_(float("nan"))  # a skipped row's values must never reach the state
    slots = _long([2, 2, 9, 1, 0, 3], device)
    num = _long([1, 0, 2, 4, -1, 2], device)  # 4 > n and -1 skip rows 3 and 4
    expected = ref_lightning_accept(state, steps, num, slots)
    tlc.lightning_accept(state, steps, num, slot_ids=slots, check_bounds=False)
    assert torch.equal(state.cpu(), expected)
    assert torch.isfinite(state).all()


def test_accept_bad_inputs_leave_state(device, gen):
    state, steps = _accept_case(gen, device, B=4, P=4)
    before = state.clone()
    with pytest.raises(IndexError, match="num_accepted"):
        tlc.lightning_accept(state, steps, _long([0, 4, 1, 1], device))
    with pytest.raises(IndexError, match="num_accepted"):
        tlc.lightning_accept(state, steps, _long([0, -1, 1, 1], device))
    with pytest.raises(IndexError, match="slot_ids"):
        tlc.lightning_accept(state, steps, _long([0, 0, 1, 1], device), slot_ids=_long([0, 1, 1, 2], device))
    with pytest.raises(ValueError, match="step_states"):
        tlc.lightning_accept(state, steps[..., :1], _long([0, 0, 1, 1], device))
    with pytest.raises(TypeError, match="step_states"):
        tlc.lightning_accept(state, steps.double(), _long([0, 0, 1, 1], device))
    with pytest.raises(TypeError, match="num_accepted"):
        tlc.lightning_accept(state, steps, [0, 0, 1, 1])
    assert torch.equal(state, before)


def test_opcheck_lightning_accept(device, gen):
    state, steps = _accept_case(gen, device, B=3, P=4)
    torch.library.opcheck(ops.lightning_accept.default, (state, steps, _long([0, 3, 1], device)),
                          {"slot_ids": _long([3, 0, -1], device)})
    state, steps = _accept_case(gen, device, B=2, P=2)
    torch.library.opcheck(ops.lightning_accept.default, (state, steps, _long([2, 1], device)), {})


def test_compile_rewind_and_accept_fullgraph(device, gen):
    state, steps = _accept_case(gen, device, B=3, P=3)
    index = _long([4, 5, 6], device)

    @torch.compile(fullgraph=True)
    def step(state, steps, num, index):
        tlc.lightning_accept(state, steps, num, check_bounds=False)
        tlc.rewind_cache(index, 3 - num, check_bounds=False)

    num = _long([3, 0, 2], device)
    expected = ref_lightning_accept(state, steps, num)
    step(state, steps, num, index)
    assert torch.equal(state.cpu(), expected)
    assert index.cpu().tolist() == [4, 2, 5]


# --------------------------------------------------------------------------- lightning_decode(step_states=...)


def _decode_inputs(gen, device, B, n, H, Dk, Dv):
    return lightning_inputs("fused", B, n, H, Dk, Dv, gen, device=device)


@pytest.mark.parametrize("use_slots", [False, True])
def test_draft_accept_continue_equals_reference(device, gen, use_slots):
    B, n, m, H, Dk, Dv = 4, 5, 3, 3, 8, 6
    P = 6 if use_slots else B
    slots = _long([4, 0, -1, 2], device) if use_slots else None
    slopes = tlc.lightning_slopes(H, layer_index=1, num_layers=4, device=device)
    state = randn((P, H, Dk, Dv), gen, device=device)
    start = state.clone()
    q, k, v = _decode_inputs(gen, device, B, n, H, Dk, Dv)
    steps = torch.full((B, n + 1, H, Dk, Dv), 7.0, device=device)
    draft_out = tlc.lightning_decode(state, q, k, v, slopes, slot_ids=slots, step_states=steps)
    accepted = torch.randint(0, n + 1, (B,), generator=gen).tolist()
    tlc.lightning_accept(state, steps, _long(accepted, device), slot_ids=slots)
    q2, k2, v2 = _decode_inputs(gen, device, B, m, H, Dk, Dv)
    next_out = tlc.lightning_decode(state, q2, k2, v2, slopes, slot_ids=slots)

    expected_state = start.double().cpu().clone()
    for b in range(B):
        row = int(slots[b]) if use_slots else b
        if row < 0:  # skipped: step_states untouched, outputs zero
            assert torch.equal(steps[b].cpu(), torch.full_like(steps[b].cpu(), 7.0))
            assert not draft_out[b].any() and not next_out[b].any()
            continue
        a = accepted[b]
        # The reference sees only the accepted draft tokens, then the continuation.
        seq = [torch.cat([x[b:b + 1, :a], y[b:b + 1]], dim=1) for x, y in ((q, q2), (k, k2), (v, v2))]
        ref_state, ref_out = ref_lightning(start[row:row + 1], *seq, slopes)
        expected_state[row] = ref_state[0]
        if a > 0:
            assert rel_err(draft_out[b, :a], ref_out[0, :a]) <= F32_TOL
        assert rel_err(next_out[b], ref_out[0, a:]) <= F32_TOL
        for t in range(n + 1):  # every step state against the reference after t tokens
            ref_t, _ = ref_lightning(start[row:row + 1], q[b:b + 1, :t], k[b:b + 1, :t], v[b:b + 1, :t], slopes)
            assert rel_err(steps[b, t], ref_t[0]) <= F32_TOL
    assert rel_err(state, expected_state) <= F32_TOL


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_step_states_last_equals_final_state(device, gen, state_dtype):
    B, n, H, Dk, Dv = 2, 4, 2, 4, 3
    slopes = tlc.lightning_slopes(H, device=device)
    state = randn((B, H, Dk, Dv), gen, device=device).to(state_dtype)
    before = state.clone()
    q, k, v = _decode_inputs(gen, device, B, n, H, Dk, Dv)
    steps = torch.zeros((B, n + 1, H, Dk, Dv), dtype=state_dtype, device=device)
    out = tlc.lightning_decode(state, q, k, v, slopes, step_states=steps)
    assert torch.equal(steps[:, 0], before) and torch.equal(steps[:, n], state)
    # The same call without step_states gives the same results.
    again = before.clone()
    assert torch.equal(tlc.lightning_decode(again, q, k, v, slopes), out) and torch.equal(again, state)


def test_step_states_zero_tokens_and_bad_shapes(device, gen):
    B, H, Dk, Dv = 3, 2, 4, 3
    slopes = tlc.lightning_slopes(H, device=device)
    state = randn((B, H, Dk, Dv), gen, device=device)
    q, k, v = _decode_inputs(gen, device, B, 0, H, Dk, Dv)
    steps = torch.zeros((B, 1, H, Dk, Dv), device=device)
    tlc.lightning_decode(state, q, k, v, slopes, step_states=steps)
    assert torch.equal(steps[:, 0], state)
    q, k, v = _decode_inputs(gen, device, B, 2, H, Dk, Dv)
    before = state.clone()
    for bad, err in ((torch.zeros((B, 2, H, Dk, Dv), device=device), ValueError),
                     (torch.zeros((B, 3, H, Dk, Dv), dtype=torch.bfloat16, device=device), TypeError),
                     (torch.zeros((B, 3, H, Dv, Dk), device=device), ValueError),
                     (torch.zeros((B, 3, H, Dk, 2 * Dv), device=device)[..., ::2], ValueError)):
        with pytest.raises(err, match="step_states"):
            tlc.lightning_decode(state, q, k, v, slopes, step_states=bad)
    assert torch.equal(state, before)


def test_opcheck_lightning_decode_step_states(device, gen):
    B, n, H, Dk, Dv = 2, 3, 2, 4, 3
    slopes = tlc.lightning_slopes(H, device=device)
    q, k, v = _decode_inputs(gen, device, B, n, H, Dk, Dv)
    state = randn((3, H, Dk, Dv), gen, device=device)
    steps = torch.zeros((B, n + 1, H, Dk, Dv), device=device)
    torch.library.opcheck(ops.lightning_decode.default, (state, q, k, v, slopes),
                          {"slot_ids": _long([2, 0], device), "step_states": steps})


def test_compile_decode_accept_fullgraph(device, gen):
    B, n, H, Dk, Dv = 2, 3, 2, 4, 3
    slopes = tlc.lightning_slopes(H, device=device)
    state = randn((B, H, Dk, Dv), gen, device=device)
    steps = torch.zeros((B, n + 1, H, Dk, Dv), device=device)
    index = _long([9, 9], device)

    @torch.compile(fullgraph=True)
    def speculate(state, steps, index, q, k, v, num):
        out = tlc.lightning_decode(state, q, k, v, slopes, check_bounds=False, step_states=steps)
        tlc.lightning_accept(state, steps, num, check_bounds=False)
        tlc.rewind_cache(index, n - num, check_bounds=False)
        return out

    eager_state, eager_steps, eager_index = state.clone(), steps.clone(), index.clone()
    for _ in range(2):  # a second step reuses the compiled graph
        q, k, v = _decode_inputs(gen, device, B, n, H, Dk, Dv)
        num = _long(torch.randint(0, n + 1, (B,), generator=gen).tolist(), device)
        out = speculate(state, steps, index, q, k, v, num)
        ref = tlc.lightning_decode(eager_state, q, k, v, slopes, step_states=eager_steps)
        tlc.lightning_accept(eager_state, eager_steps, num)
        tlc.rewind_cache(eager_index, n - num)
        assert torch.equal(out, ref) and torch.equal(state, eager_state) and torch.equal(index, eager_index)
