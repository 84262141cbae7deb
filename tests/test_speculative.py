"""Speculative decoding (SPEC section 7): ``rewind_cache`` and ``lightning_accept``.

Oracles: ``reference.ref_rewind_cache`` / ``ref_lightning_accept`` (plain Python loops,
first occurrence of a slot wins, bad rows skipped) and ``write_to_cache`` itself (a
rewound cache rewritten equals one that never saw the rejected tokens).
"""

from __future__ import annotations

import pytest
import torch

import torch_lightning_cache as tlc
from conftest import randn
from reference import ref_lightning_accept, ref_rewind_cache

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
