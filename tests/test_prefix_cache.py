"""Prefix caching of the recurrent state (SPEC section 7):
``lightning_prefill(..., checkpoints=..., checkpoint_every=...)``.

Oracles: ``reference.ref_lightning_checkpoints`` (the float64 sequential recurrence run on
each prefix; ``rel_err`` within ``F32_TOL``), and the op itself: prefilling from
checkpoint ``c`` the tokens after it gives the whole prefill's outputs and final state
(float32, ``rel <= 1e-5``). Checkpoints the call must not write (past the end, skipped
rows, rejected calls) are checked bit-identical against a sentinel fill.
"""

from __future__ import annotations

import pytest
import torch

import torch_lightning_cache as tlc
from conftest import F32_TOL, lightning_inputs, randn, random_mask, rel_err
from reference import ref_lightning, ref_lightning_checkpoints

ops = torch.ops.lightning_cache
RESUME_TOL = 1e-5


def _setup(gen, device, B=3, n=37, H=2, Dk=8, Dv=12, slots=None, state_dtype=torch.float32, layout="contiguous"):
    """Inputs of size ~1 and a state pool whose rows are at different histories (non-zero, distinct)."""
    q, k, v = lightning_inputs(layout, B, n, H, Dk, Dv, gen, device=device)
    state = randn((slots or B, H, Dk, Dv), gen, device=device, scale=0.5).to(state_dtype)
    slopes = tlc.lightning_slopes(H, 1, 3, device=device)
    return state, q, k, v, slopes


def _sentinel(shape, device, dtype=torch.float32):
    """Values no checkpoint can equal by accident (NaN included, compared bitwise)."""
    fill = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(shape) * 1e3 + 7.25
    fill.view(-1)[::5] = float("nan")
    return fill.to(dtype=dtype, device=device)


def _bits(t):
    return t.detach().cpu().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _check_checkpoints(cps, before, expected, tol):
    """Written entries match the reference; every other [b, c] entry is bit-identical to before."""
    B, C = cps.shape[:2]
    for b in range(B):
        for c in range(C):
            if (b, c) in expected:
                assert rel_err(cps[b, c], expected[(b, c)]) <= tol, (b, c)
            else:
                assert torch.equal(_bits(cps[b, c]), _bits(before[b, c])), f"checkpoint [{b}, {c}] was written"


# (n, checkpoint_every, num_checkpoints, block_size): every a multiple of the block, not a
# multiple, larger than the block, a checkpoint exactly at the end, and more checkpoints
# than fit (those past the end stay untouched).
CASES = [
    (37, 8, 6, 8),     # multiple of block_size, 4 written, 2 past the end
    (37, 5, 8, 8),     # not a multiple: blocks split at 5, 10, 15, ...; 7 written
    (36, 12, 3, 8),    # last checkpoint exactly at the end
    (40, 13, 4, 16),   # checkpoints inside blocks, larger than a CPU inner block too
    (9, 1, 12, 4),     # every token
    (70, 24, 2, 256),  # block larger than the call
]


@pytest.mark.parametrize("n,every,C,block_size", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_checkpoints_equal_sequential_reference(device, gen, n, every, C, block_size, masked):
    state, q, k, v, slopes = _setup(gen, device, n=n)
    mask = random_mask((3, n), gen, dtype=torch.float32, device=device) if masked else None
    if masked:
        mask[1, : every + 2] = 0  # row 1: its first checkpoint is its initial state
    cps = _sentinel((3, C, *state.shape[1:]), device)
    before = cps.clone()
    expected = ref_lightning_checkpoints(state, q, k, v, slopes, every, C, mask, scale=0.5)
    want_state, want_out = ref_lightning(state, q, k, v, slopes, mask, scale=0.5)
    out = tlc.lightning_prefill(state, q, k, v, slopes, attention_mask=mask, block_size=block_size, scale=0.5,
                                checkpoints=cps, checkpoint_every=every)
    assert len(expected) == 3 * min(C, n // every)
    _check_checkpoints(cps, before, expected, F32_TOL)
    assert rel_err(out, want_out) <= F32_TOL
    assert rel_err(state, want_state) <= F32_TOL


@pytest.mark.parametrize("n,every,C,block_size", CASES[:4])
@pytest.mark.parametrize("masked", [False, True])
def test_resume_from_checkpoint_equals_whole_prefill(device, gen, n, every, C, block_size, masked):
    """Prefill from checkpoint c plus the remaining tokens = the whole prefill (outputs and state)."""
    state0, q, k, v, slopes = _setup(gen, device, n=n, layout="fused")
    mask = random_mask((3, n), gen, device=device) if masked else None
    whole = state0.clone()
    cps = torch.zeros(3, C, *state0.shape[1:], device=device)
    out = tlc.lightning_prefill(whole, q, k, v, slopes, attention_mask=mask, block_size=block_size,
                                checkpoints=cps, checkpoint_every=every)
    for c in range(min(C, n // every)):
        start = (c + 1) * every
        resumed = cps[:, c].clone()
        rest = tlc.lightning_prefill(resumed, q[:, start:], k[:, start:], v[:, start:], slopes,
                                     attention_mask=mask[:, start:] if masked else None, block_size=block_size)
        if start < n:
            assert rel_err(rest, out[:, start:]) <= RESUME_TOL, c
        assert rel_err(resumed, whole) <= RESUME_TOL, c


def test_checkpoints_do_not_change_outputs(device, gen):
    """Splitting blocks at checkpoints changes only rounding: outputs and state as without checkpoints."""
    state, q, k, v, slopes = _setup(gen, device, n=50)
    plain = state.clone()
    out_plain = tlc.lightning_prefill(plain, q, k, v, slopes, block_size=16)
    cps = torch.empty(3, 7, *state.shape[1:], device=device)
    out = tlc.lightning_prefill(state, q, k, v, slopes, block_size=16, checkpoints=cps, checkpoint_every=7)
    assert rel_err(out, out_plain) <= RESUME_TOL
    assert rel_err(state, plain) <= RESUME_TOL


@pytest.mark.parametrize("check_bounds", [True, False])
def test_slot_ids_rows_at_different_history(device, gen, check_bounds):
    """Batch row b checkpoints pool row slot_ids[b]'s state; skipped rows leave their checkpoints alone."""
    pool, n, every, C = 6, 30, 7, 5
    state, q, k, v, slopes = _setup(gen, device, B=4, n=n, slots=pool)
    # Row 0 -> slot 4, row 1 skipped (-1), row 2 -> slot 0, row 3 -> slot 4 again (checks off:
    # skipped, first occurrence wins); with checks on the batch uses slot 2 instead.
    slots = torch.tensor([4, -1, 0, 4 if not check_bounds else 2], device=device)
    mask = random_mask((4, n), gen, dtype=torch.int32, device=device)
    cps = _sentinel((4, C, *state.shape[1:]), device)
    before_cps, before_state = cps.clone(), state.clone()
    expected = ref_lightning_checkpoints(state, q, k, v, slopes, every, C, mask, slots)
    want_state, want_out = ref_lightning(state, q, k, v, slopes, mask, slots)
    out = tlc.lightning_prefill(state, q, k, v, slopes, attention_mask=mask, slot_ids=slots, block_size=8,
                                check_bounds=check_bounds, checkpoints=cps, checkpoint_every=every)
    assert {b for b, _ in expected} == ({0, 2} if not check_bounds else {0, 2, 3})
    _check_checkpoints(cps, before_cps, expected, F32_TOL)
    assert rel_err(out, want_out) <= F32_TOL
    assert rel_err(state, want_state) <= F32_TOL
    for untouched in (1, 2, 3, 5) if not check_bounds else (1, 3, 5):
        assert torch.equal(state[untouched], before_state[untouched])


def test_bfloat16_state_checkpoints(device, gen):
    state, q, k, v, slopes = _setup(gen, device, n=24, state_dtype=torch.bfloat16)
    cps = _sentinel((3, 4, *state.shape[1:]), device, torch.bfloat16)
    before = cps.clone()
    expected = ref_lightning_checkpoints(state, q, k, v, slopes, 9, 4)
    tlc.lightning_prefill(state, q, k, v, slopes, block_size=8, checkpoints=cps, checkpoint_every=9)
    _check_checkpoints(cps, before, expected, 1e-2)


def test_non_finite_token_reaches_no_earlier_checkpoint(device, gen):
    """NaN/Inf in token t: checkpoints before t stay finite and exact; a masked one reaches nothing."""
    state, q, k, v, slopes = _setup(gen, device, n=20)
    k[0, 13, 0, 2] = float("inf")
    v[0, 13, 1, 3] = float("nan")
    v[1, 5, :, :] = float("nan")
    mask = torch.ones(3, 20, device=device)
    mask[1, 5] = 0  # row 1's NaN token is masked: nothing it touches may see it
    cps = torch.zeros(3, 5, *state.shape[1:], device=device)
    expected = ref_lightning_checkpoints(state, q, k, v, slopes, 4, 5, mask)
    tlc.lightning_prefill(state, q, k, v, slopes, attention_mask=mask, block_size=8, checkpoints=cps,
                          checkpoint_every=4)
    for c in range(3):  # positions 4, 8, 12: before token 13
        assert rel_err(cps[0, c], expected[(0, c)]) <= F32_TOL
    assert torch.isfinite(cps[1]).all()
    assert rel_err(cps[1], torch.stack([expected[(1, c)] for c in range(5)])) <= F32_TOL


def test_empty_calls_write_no_checkpoint(device, gen):
    state, q, k, v, slopes = _setup(gen, device, n=5)
    cps = _sentinel((3, 2, *state.shape[1:]), device)
    before = cps.clone()
    tlc.lightning_prefill(state, q[:, :0], k[:, :0], v[:, :0], slopes, checkpoints=cps, checkpoint_every=1)
    tlc.lightning_prefill(state, q, k, v, slopes, checkpoints=cps, checkpoint_every=6)  # first one past the end
    tlc.lightning_prefill(state, q, k, v, slopes, checkpoints=cps, checkpoint_every=2**63 - 1)
    tlc.lightning_prefill(state, q, k, v, slopes, checkpoints=cps[:, :0], checkpoint_every=1)  # C = 0
    assert torch.equal(_bits(cps), _bits(before))
    empty = torch.empty(0, 2, *state.shape[1:], device=device)
    tlc.lightning_prefill(state[:0], q[:0], k[:0], v[:0], slopes, checkpoints=empty, checkpoint_every=1)
    # checkpoint_every without checkpoints stores nothing and is not an error
    tlc.lightning_prefill(state, q, k, v, slopes, checkpoint_every=3)


def _bad_checkpoint_calls(state, q, k, v, slopes, device):
    cp = torch.zeros(3, 2, *state.shape[1:], device=device)
    yield ValueError, "non-negative", dict(checkpoints=cp, checkpoint_every=-1)
    yield ValueError, "non-negative", dict(checkpoint_every=-(2**63))
    yield ValueError, "checkpoint_every is 0", dict(checkpoints=cp, checkpoint_every=0)
    yield ValueError, "checkpoints must be", dict(checkpoints=cp[:2], checkpoint_every=2)
    yield ValueError, "checkpoints must be", dict(checkpoints=cp[0], checkpoint_every=2)
    yield ValueError, "checkpoints must be", dict(checkpoints=cp.transpose(3, 4), checkpoint_every=2)
    yield TypeError, "dtype", dict(checkpoints=cp.to(torch.bfloat16), checkpoint_every=2)
    yield TypeError, "dtype", dict(checkpoints=cp.double(), checkpoint_every=2)
    yield ValueError, "contiguous", dict(checkpoints=torch.zeros(2, 3, *state.shape[1:], device=device)
                                         .transpose(0, 1), checkpoint_every=2)
    yield ValueError, "device", dict(checkpoints=cp.to("meta"), checkpoint_every=2)
    yield (ValueError, r"state \(written\) shares memory with checkpoints",
           dict(checkpoints=state.unsqueeze(1), checkpoint_every=2))
    yield IndexError, "slot_ids", dict(checkpoints=cp, checkpoint_every=2,
                                       slot_ids=torch.tensor([0, 7, 1], device=device))
    yield TypeError, "checkpoint_every", dict(checkpoints=cp, checkpoint_every=2.0)
    yield TypeError, "checkpoint_every", dict(checkpoints=cp, checkpoint_every="2")
    yield TypeError, "checkpoint_every", dict(checkpoints=cp, checkpoint_every=None)
    yield TypeError, "checkpoints", dict(checkpoints="all", checkpoint_every=2)
    yield ValueError, "int64", dict(checkpoints=cp, checkpoint_every=2**64)


def test_hostile_arguments_leave_everything_untouched(device, gen):
    state, q, k, v, slopes = _setup(gen, device, n=6, slots=4)
    state = state[:3].clone()
    for error, match, kwargs in _bad_checkpoint_calls(state, q, k, v, slopes, device):
        before_state = state.clone()
        cps = kwargs.get("checkpoints")
        before = cps.clone() if isinstance(cps, torch.Tensor) and cps.device.type != "meta" else None
        with pytest.raises(error, match=match):
            tlc.lightning_prefill(state, q, k, v, slopes, block_size=2, **kwargs)
        assert torch.equal(state, before_state), kwargs
        if before is not None:
            assert torch.equal(_bits(cps), _bits(before)), kwargs


def test_opcheck(device, gen):
    state, q, k, v, slopes = _setup(gen, device, n=11)
    mask = random_mask((3, 11), gen, device=device)
    for slots, every in ((None, 4), (torch.tensor([2, -1, 0], device=device), 3)):
        cps = torch.zeros(3, 3, *state.shape[1:], device=device)
        torch.library.opcheck(ops.lightning_prefill.default, (state.clone(), q, k, v, slopes),
                              dict(attention_mask=mask, slot_ids=slots, block_size=4, checkpoints=cps,
                                   checkpoint_every=every))


def test_compile_fullgraph(device, gen):
    state, q, k, v, slopes = _setup(gen, device, n=19)

    def prefill(state, q, k, v, cps):
        return tlc.lightning_prefill(state, q, k, v, slopes, block_size=8, checkpoints=cps, checkpoint_every=6)

    compiled = torch.compile(prefill, fullgraph=True, dynamic=False)
    eager_state, eager_cps = state.clone(), torch.zeros(3, 4, *state.shape[1:], device=device)
    eager_out = prefill(eager_state, q, k, v, eager_cps)
    got_cps = torch.zeros_like(eager_cps)
    got_out = compiled(state, q, k, v, got_cps)
    assert torch.equal(got_out, eager_out)
    assert torch.equal(state, eager_state)
    assert torch.equal(got_cps, eager_cps)
    assert got_cps[:, :3].abs().sum() > 0 and torch.equal(got_cps[:, 3], torch.zeros_like(got_cps[:, 3]))
