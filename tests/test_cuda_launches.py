"""Kernel launches per op call on CUDA, counted with the CUDA profiler (skipped without a GPU).

The cache writes are on every decode step's critical path, where launch
latency, not bandwidth, is the cost: each must be one kernel, index advance
included, with no host work that launches anything else.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import torch_lightning_cache as tlc

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ops = torch.ops.lightning_cache


def _kernels(fn) -> list[str]:
    fn()  # warm up: first-call allocations and lazy module loading are not the op's steady state
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]


@pytest.mark.parametrize("new_tokens", [1, 37])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cache_writes_are_one_launch(new_tokens, dtype):
    key_value, index = tlc.init_kv_cache(4, 256, 2, 64, 64, dtype=dtype, device="cuda")
    key = torch.randn(4, new_tokens, 2, 64, device="cuda", dtype=dtype)
    value = torch.randn(4, new_tokens, 2, 64, device="cuda", dtype=dtype)
    attention_mask = torch.ones(4, 256, dtype=torch.bool, device="cuda")

    def concatenate():
        index.zero_()
        torch.cuda.synchronize()
        return ops.concatenate_to_cache(key_value, index, key, value, attention_mask, None, None, True, False, False)

    def write():
        index.zero_()
        torch.cuda.synchronize()
        return ops.write_to_cache(key_value, index, key, value, False, False)

    # index.zero_() is one fill kernel of its own; everything else is the op's.
    assert len(_kernels(concatenate)) == 2, _kernels(concatenate)
    assert len(_kernels(write)) == 2, _kernels(write)


def test_decode_is_one_launch():
    state = torch.zeros(2, 4, 64, 64, device="cuda")
    q, k, v = (torch.randn(2, 1, 4, 64, device="cuda") for _ in range(3))
    slopes = tlc.lightning_slopes(4, device="cuda")
    names = _kernels(lambda: ops.lightning_decode(state, q, k, v, slopes, None, 1.0, False))
    assert len(names) == 1, names
