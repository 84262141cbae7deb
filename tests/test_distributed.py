"""SPEC section 9 on real processes: gloo on the CPU, 2 and 4 ranks, a 1-D head mesh and a 2x2 (batch x head) mesh.

Each test spawns its ranks once and runs several checks in them (process start and ``import torch`` dominate):

* every op on DTensors equals the op on the full tensors (outputs and written caches, gathered), with each
  rank holding only its shard; a mismatched placement raises a ``ValueError`` naming the argument and its
  placement, before anything is written;
* ``LightningCache.init_cache(..., mesh=mesh)`` allocates local shards; the views return DTensors equal to
  the plain views' results; ``kv_sharding`` restating the placements works and a mismatch raises;
* ``HybridLM`` split over heads (and rows): prefill + 8 decode steps give the single-process logits
  (float32, 1e-5) and the same greedy tokens; every rank's caches hold only its shard;
* ``torch.compile(fullgraph=True)`` (inductor) of the tensor-parallel decode step and of DTensor op calls.

Observed on the 2-core development machine, shared (load ~8): 2 ranks ~90 s (inductor compile ~40 s of it),
4 ranks ~140 s.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")

B, L, H, DK, DV = 4, 16, 4, 8, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: str) -> None:
    # A crash by signal then prints every thread's Python stack, not only the signal's name.
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        SCENARIOS[scenario](world)
    except BaseException:
        dist.destroy_process_group()
        raise  # mp.spawn reports it to the test
    # Passed. No rank tears gloo down while another is still in a collective (the barrier), and the
    # interpreter's own teardown is skipped: gloo's worker threads can outlive it and abort the process
    # (SIGABRT, "terminate called without an active exception": seen once in CI, never reproduced locally).
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(world: int, scenario: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(_worker, args=(world, _free_port(), scenario), nprocs=world, join=True)
    except mp.ProcessRaisedException as error:
        # The port was free when picked but another process may take it before rank 0 binds it: retry that
        # (and only that) once on a fresh port. Any other failure is the test's.
        if "address already in use" not in str(error).lower():
            raise
        mp.spawn(_worker, args=(world, _free_port(), scenario), nprocs=world, join=True)


# --------------------------------------------------------------------------- helpers run on every rank


def _mesh(shape):
    from torch.distributed.device_mesh import init_device_mesh

    from torch_lightning_cache import PartitionAxis

    if len(shape) == 1:
        return init_device_mesh("cpu", shape, mesh_dim_names=("tp",)), PartitionAxis(head_axis="tp")
    return init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp")), PartitionAxis(batch_axis="dp", head_axis="tp")


def _shard(full, mesh, axis, name):
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.clone(), mesh, axis.placements(mesh, name), src_data_rank=None)


def _batch_parts(mesh, axis) -> int:
    dim = axis.mesh_dim(mesh, "batch")
    return 1 if dim is None else mesh.size(dim)


def _global_slot_ids(local_ids: torch.Tensor, parts: int) -> torch.Tensor:
    """Slot ids are rows of the rank's own shard of the pool: the same ids on the full pool are offset."""
    rows = local_ids.shape[0] // parts
    offset = torch.arange(local_ids.shape[0]) // rows * rows
    return torch.where(local_ids >= 0, local_ids + offset, local_ids)


def _assert_equal(dtensor, full, what):
    from torch.distributed.tensor import DTensor

    assert isinstance(dtensor, DTensor), f"{what} is {type(dtensor).__name__}, not a DTensor"
    torch.testing.assert_close(dtensor.full_tensor(), full, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def _assert_local_shape(dtensor, mesh, axis, name):
    """The rank holds exactly its shard: the global shape divided along the sharded dims."""
    expected = list(dtensor.shape)
    for mesh_dim, placement in enumerate(axis.placements(mesh, name)):
        if placement.is_shard():
            expected[placement.dim] //= mesh.size(mesh_dim)
    assert list(dtensor.to_local().shape) == expected, (name, dtensor.to_local().shape, expected)
    assert tuple(dtensor.placements) == axis.placements(mesh, name), (name, dtensor.placements)


def _check_ops(mesh, axis) -> None:
    """Each op on DTensors equals the op on the full tensors; caches hold only their shards."""
    import torch_lightning_cache as tlc

    g = torch.Generator().manual_seed(7)
    parts = _batch_parts(mesh, axis)
    S = lambda full, name: _shard(full, mesh, axis, name)  # noqa: E731

    # concatenate_to_cache / write_to_cache: rows at different positions, every mask kind.
    q = 3
    key_value = torch.randn(B, L, H, DK + DV, generator=g)
    index = torch.tensor([0, 5, 2, 9])[:B]
    key, value = torch.randn(B, q, H, DK, generator=g), torch.randn(B, q, H, DV, generator=g)
    attention_mask = torch.rand(B, L, generator=g) > 0.2
    causal_mask = torch.ones(L, L, dtype=torch.bool).tril()
    token_type_ids = torch.randint(0, 2, (B, q), generator=g)
    full_kv, full_index = key_value.clone(), index.clone()
    expected = tlc.concatenate_to_cache(full_kv, full_index, key, value, attention_mask, causal_mask, token_type_ids)
    d_kv, d_index = S(key_value, "key_value"), S(index, "index")
    got = tlc.concatenate_to_cache(d_kv, d_index, S(key, "key"), S(value, "value"), S(attention_mask, "attention_mask"),
                                   S(causal_mask, "causal_mask"), S(token_type_ids, "token_type_ids"))
    for name, a, b in zip(("key_cache", "value_cache", "mask"), got, expected):
        _assert_equal(a, b, f"concatenate_to_cache {name}")
    assert tuple(got[2].placements) == axis.placements(mesh, "mask")
    _assert_equal(d_kv, full_kv, "concatenate_to_cache key_value")
    _assert_equal(d_index, full_index, "concatenate_to_cache index")
    _assert_local_shape(d_kv, mesh, axis, "key_value")
    _assert_local_shape(d_index, mesh, axis, "index")
    tlc.write_to_cache(full_kv, full_index, key, value)
    tlc.write_to_cache(d_kv, d_index, S(key, "key"), S(value, "value"), check_bounds=False)
    _assert_equal(d_kv, full_kv, "write_to_cache key_value")
    _assert_equal(d_index, full_index, "write_to_cache index")

    # rewind_cache with local slot ids (-1 skips a row).
    local_ids = torch.tensor([1, -1, 0, 1])[:B] if B // parts == 2 else torch.tensor([3, -1, 0, 2])
    num_tokens = torch.tensor([2, 1, 3, 1])
    tlc.rewind_cache(full_index, num_tokens, _global_slot_ids(local_ids, parts))
    tlc.rewind_cache(d_index, S(num_tokens, "num_tokens"), S(local_ids, "slot_ids"))
    _assert_equal(d_index, full_index, "rewind_cache index")

    # lightning_prefill (masked tokens, slot ids), lightning_decode with step_states, lightning_accept.
    n = 5
    state = torch.randn(B, H, DK, DV, generator=g)
    slopes = tlc.lightning_slopes(H, 1, 3)
    qkv = [torch.randn(B, n, H, d, generator=g) for d in (DK, DK, DV)]
    token_mask = torch.rand(B, n, generator=g) > 0.3
    full_state = state.clone()
    out = tlc.lightning_prefill(full_state, *qkv, slopes, token_mask, _global_slot_ids(local_ids, parts), block_size=2)
    d_state, d_slopes = S(state, "state"), S(slopes, "slopes")
    d_qkv = [S(t, name) for t, name in zip(qkv, ("query", "key", "value"))]
    d_out = tlc.lightning_prefill(d_state, *d_qkv, d_slopes, S(token_mask, "attention_mask"),
                                  S(local_ids, "slot_ids"), block_size=2)
    _assert_equal(d_out, out, "lightning_prefill output")
    assert tuple(d_out.placements) == axis.placements(mesh, "output")
    _assert_equal(d_state, full_state, "lightning_prefill state")
    _assert_local_shape(d_state, mesh, axis, "state")
    _assert_local_shape(d_slopes, mesh, axis, "slopes")

    steps = torch.zeros(B, n + 1, H, DK, DV)
    out = tlc.lightning_decode(full_state, *qkv, slopes, step_states=steps, scale=0.5)
    d_steps = S(torch.zeros_like(steps), "step_states")
    d_out = tlc.lightning_decode(d_state, *d_qkv, d_slopes, scale=0.5, step_states=d_steps)
    _assert_equal(d_out, out, "lightning_decode output")
    _assert_equal(d_state, full_state, "lightning_decode state")
    _assert_equal(d_steps, steps, "lightning_decode step_states")
    accepted = torch.tensor([0, 5, 2, 3])
    tlc.lightning_accept(full_state, steps, accepted, _global_slot_ids(local_ids, parts))
    tlc.lightning_accept(d_state, d_steps, S(accepted, "num_accepted"), S(local_ids, "slot_ids"))
    _assert_equal(d_state, full_state, "lightning_accept state")


def _check_paged_ops(mesh, axis, write: bool) -> None:
    """Block tables on a mesh (SPEC 11): the page pool is replicated over the batch axis and sharded over heads,
    the tables and cache_seqlens are per batch row; each op equals the call on the full tensors. Writes are
    checked on head-only meshes: over a batch axis each rank writes its own rows' pages into its replica."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    import torch_lightning_cache as tlc

    g = torch.Generator().manual_seed(11)
    batch_dim = axis.mesh_dim(mesh, "batch")
    paged = tuple(Replicate() if d == batch_dim else p for d, p in enumerate(axis.placements(mesh, "key_value")))
    S = lambda full, name: _shard(full, mesh, axis, name)  # noqa: E731
    page_size, max_pages = 4, 4
    N = B * max_pages + 2
    pages = torch.randn(N, page_size, H, DK + DV, generator=g)
    tables = torch.randperm(N, generator=g)[:B * max_pages].view(B, max_pages)
    index = torch.tensor([0, 3, 5, 9])
    d_pages = distribute_tensor(pages.clone(), mesh, paged, src_data_rank=None)
    d_tables, d_index = S(tables, "block_tables"), S(index.clone(), "index")
    if write:
        k, v = torch.randn(B, 2, H, DK, generator=g), torch.randn(B, 2, H, DV, generator=g)
        _, _, mask = tlc.concatenate_to_cache(pages, index, k, v, is_causal=True, block_tables=tables)
        _, _, d_mask = tlc.concatenate_to_cache(d_pages, d_index, S(k, "key"), S(v, "value"), is_causal=True,
                                                block_tables=d_tables)
        _assert_equal(d_pages, pages, "paged concatenate_to_cache pages")
        _assert_equal(d_mask, mask, "paged concatenate_to_cache mask")
        _assert_equal(d_index, index, "paged concatenate_to_cache index")
    query = torch.randn(B, 2, 2 * H, DK, generator=g)
    valid = index + 2
    out = tlc.cached_attention(query, pages, key_dim=DK, block_tables=tables, cache_seqlens=valid)
    d_out = tlc.cached_attention(S(query, "query"), d_pages, key_dim=DK, block_tables=d_tables,
                                 cache_seqlens=S(valid, "cache_seqlens"))
    _assert_equal(d_out, out, "paged cached_attention output")
    assert tuple(d_out.placements) == axis.placements(mesh, "output")
    if batch_dim is not None:  # a batch-sharded pool is refused: pages are shared by every row
        with pytest.raises(ValueError, match="key_value"):
            tlc.cached_attention(S(query, "query"), S(pages, "key_value"), key_dim=DK, block_tables=d_tables,
                                 cache_seqlens=S(valid, "cache_seqlens"))


def _check_mismatches(mesh, axis) -> None:
    """Inconsistent placements: a ValueError naming the argument and its placement; nothing written."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    import torch_lightning_cache as tlc

    g = torch.Generator().manual_seed(3)
    S = lambda full, name: _shard(full, mesh, axis, name)  # noqa: E731
    head_dim = axis.mesh_dim(mesh, "head")
    key_value, index = S(torch.randn(B, L, H, DK + DV, generator=g), "key_value"), S(torch.zeros(B, dtype=torch.long),
                                                                                    "index")
    key, value = S(torch.randn(B, 1, H, DK, generator=g), "key"), S(torch.randn(B, 1, H, DV, generator=g), "value")
    before = key_value.to_local().clone(), index.to_local().clone()

    def replace(placements, mesh_dim, placement):
        return tuple(placement if i == mesh_dim else p for i, p in enumerate(placements))

    replicated_key = key.redistribute(mesh, replace(key.placements, head_dim, Replicate()))
    with pytest.raises(ValueError, match=r"concatenate_to_cache: key has placement \(.*Replicate\(\).*key_value"):
        tlc.concatenate_to_cache(key_value, index, replicated_key, value)
    with pytest.raises(RuntimeError, match=r"key has placement \(.*Replicate\(\)"):  # the raw op: DTensor's wrapping
        torch.ops.lightning_cache.concatenate_to_cache(key_value, index, replicated_key, value)
    with pytest.raises(ValueError, match="value is a plain torch.Tensor but key_value is a DTensor"):
        tlc.concatenate_to_cache(key_value, index, key, value.full_tensor())
    # index sharded over the head axis: names index (the cache, first, decides the role of the mesh dim).
    bad_index = torch.distributed.tensor.DTensor.from_local(
        index.to_local(), mesh, replace(index.placements, head_dim, Shard(0)), run_check=False)
    with pytest.raises(ValueError, match=r"write_to_cache: index has placement \(.*Shard\(dim=0\)"):
        tlc.write_to_cache(key_value, bad_index, key, value)
    partial_value = torch.distributed.tensor.DTensor.from_local(
        value.to_local(), mesh, replace(value.placements, head_dim, Partial()), run_check=False)
    with pytest.raises(ValueError, match=r"value has placement \(.*Partial"):
        tlc.concatenate_to_cache(key_value, index, key, partial_value)
    assert torch.equal(key_value.to_local(), before[0]) and torch.equal(index.to_local(), before[1])

    state = S(torch.randn(B, H, DK, DK, generator=g), "state")
    state_before = state.to_local().clone()
    q = S(torch.randn(B, 1, H, DK, generator=g), "query")
    slopes = tlc.lightning_slopes(H)
    replicated_slopes = torch.distributed.tensor.distribute_tensor(slopes, mesh, [Replicate()] * mesh.ndim,
                                                                   src_data_rank=None)
    with pytest.raises(ValueError, match=r"lightning_decode: slopes has placement \(.*Replicate\(\)"):
        tlc.lightning_decode(state, q, q, q, replicated_slopes)
    with pytest.raises(ValueError, match=r"lightning_prefill: query has placement \(.*Shard\(dim=1\)"):
        tlc.lightning_prefill(state, q.redistribute(mesh, replace(q.placements, head_dim, Shard(1))), q, q,
                              S(slopes, "slopes"))
    assert torch.equal(state.to_local(), state_before)


def _check_cache_classes(mesh, axis) -> None:
    """init_cache(mesh=...) allocates local shards; the views return DTensors equal to the plain views'."""
    from torch.distributed.tensor import Replicate, Shard

    from torch_lightning_cache import LightningCache, LightningCacheMetaData, PartitionAxis

    g = torch.Generator().manual_seed(11)
    kinds = ["lightning", "attention"]
    meta = LightningCacheMetaData.create(partition_axis=axis, batch_size=B, num_heads=H, key_dim=DK, value_dim=DV,
                                         max_length=L, dtype=torch.float32)
    cache = LightningCache.init_cache(2, meta, layer_kinds=kinds, mesh=mesh)
    plain = LightningCache.init_cache(2, LightningCacheMetaData.create(batch_size=B, num_heads=H, key_dim=DK,
                                                                        value_dim=DV, max_length=L,
                                                                        dtype=torch.float32, device="cpu"),
                                      layer_kinds=kinds)
    with pytest.raises(ValueError, match=r"head_axis='heads' is not a dimension of the mesh"):
        LightningCache.init_cache(1, LightningCacheMetaData.create(PartitionAxis(head_axis="heads"), num_heads=H,
                                                                   head_dim=DK), mesh=mesh)
    with pytest.raises(ValueError, match=r"key_value dim 2 has size 3, which mesh dim \d \(2 ranks\) cannot split"):
        LightningCache.init_cache(1, LightningCacheMetaData.create(axis, batch_size=B, num_heads=3, head_dim=DK,
                                                                   max_length=L, dtype=torch.float32), mesh=mesh)
    _assert_local_shape(cache[0].key_value, mesh, axis, "state")
    _assert_local_shape(cache[1].key_value, mesh, axis, "key_value")
    _assert_local_shape(cache[1].index, mesh, axis, "index")
    assert "placements" in repr(cache)
    S = lambda full, name: _shard(full, mesh, axis, name)  # noqa: E731
    for n in (4, 1):  # prefill, then decode
        q, k = torch.randn(B, n, H, DK, generator=g), torch.randn(B, n, H, DK, generator=g)
        v = torch.randn(B, n, H, DV, generator=g)
        expected = plain[0].recurrent_update(q, k, v)
        got = cache[0].recurrent_update(S(q, "query"), S(k, "key"), S(v, "value"))
        _assert_equal(got, expected, f"recurrent_update n={n}")
        _assert_local_shape(cache[0].slopes, mesh, axis, "slopes")
        expected = plain[1].concatenate_to_cache(q, k, v, None, causal_mask=True)
        restated = [("dp" if axis.batch_axis else None), None, "tp", None]
        got = cache[1].concatenate_to_cache(S(q, "query"), S(k, "key"), S(v, "value"), None, causal_mask=True,
                                            kv_sharding=restated if n == 4 else axis.placements(mesh, "key_value"))
        for name, a, b in zip(("key_cache", "value_cache", "mask"), got, expected):
            _assert_equal(a, b, f"view.concatenate_to_cache {name}")
    _assert_equal(cache[0].key_value, plain[0].key_value, "view state")
    _assert_equal(cache[1].index, plain[1].index, "view index")
    # Beam search / forking on a mesh: ids are rows of each rank's shard (every rank passes its own).
    parts = _batch_parts(mesh, axis)
    rows = B // parts
    on_full = lambda ids: torch.cat([ids + p * rows for p in range(parts)])  # noqa: E731
    beam = torch.arange(rows).flip(0)
    cache.reorder_cache(beam)
    plain.reorder_cache(on_full(beam))
    src, dst = torch.tensor([0]), torch.tensor([rows - 1])
    cache.copy_slots(src, dst)
    plain.copy_slots(on_full(src), on_full(dst))
    for view, plain_view in zip(cache, plain):
        _assert_equal(view.key_value, plain_view.key_value, f"reorder_cache/copy_slots {view.layer_kind}")
    _assert_equal(cache[1].index, plain[1].index, "reorder_cache/copy_slots index")
    index_before = cache[1].index.to_local().clone()
    wrong = [Replicate()] * mesh.ndim
    with pytest.raises(ValueError, match="kv_sharding says key_value is .*Replicate.* but the cache is .*Shard"):
        cache[1].concatenate_to_cache(S(q, "query"), S(k, "key"), S(v, "value"), None, kv_sharding=wrong)
    with pytest.raises(ValueError, match="kv_sharding says"):
        cache[1].concatenate_to_cache(S(q, "query"), S(k, "key"), S(v, "value"), None,
                                      kv_sharding=PartitionAxis(head_axis="tp", batch_axis=None)
                                      if axis.batch_axis else PartitionAxis())
    assert torch.equal(cache[1].index.to_local(), index_before)
    assert wrong != [Shard(0)]  # (placements are compared, not identities)


def _models(mesh, axis, num_layers: int):
    """The single-process model, the same model split over ``mesh``, and this rank's batch rows."""
    from torch_lightning_cache.models.tensor_parallel import parallelize_hybrid_lm
    from torch_lightning_cache.models.hybrid import HybridConfig, HybridLM

    config = HybridConfig(vocab_size=96, hidden_size=32, num_layers=num_layers, num_heads=4, head_dim=8,
                          intermediate_size=64, max_length=32, block_size=4)
    reference = HybridLM(config, batch_size=B, seed=5).eval()
    model = parallelize_hybrid_lm(HybridLM(config, batch_size=B, seed=5).eval(), mesh, axis)
    parts = _batch_parts(mesh, axis)
    batch_dim = axis.mesh_dim(mesh, "batch")
    start = (mesh.get_coordinate()[batch_dim] if batch_dim is not None else 0) * (B // parts)
    return reference, model, slice(start, start + B // parts)


def _check_model(mesh, axis) -> None:
    """HybridLM over heads (and rows): prefill + 8 decode steps equal one process; caches hold their shards."""
    from torch_lightning_cache.models.tensor_parallel import model_caches

    reference, model, rows = _models(mesh, axis, num_layers=4)
    config = model.config
    ids = torch.randint(0, config.vocab_size, (B, 11), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.inference_mode():
        expected, got = reference(ids), model(ids[rows])
        for step in range(9):
            worst = max(worst, (got - expected[rows]).abs().max().item())
            tokens, local_tokens = expected[:, -1].argmax(-1), got[:, -1].argmax(-1)
            assert torch.equal(local_tokens, tokens[rows]), f"greedy tokens differ at step {step}"
            if step < 8:
                expected, got = reference(tokens[:, None]), model(local_tokens[:, None])
    assert worst <= 1e-5, f"max |logits tensor parallel - one process| = {worst}"
    for layer, cache in zip([n for layer in model.layers for n in (("key_value", "index") if layer.kind == "attention"
                                                                   else ("state",))], model_caches(model)):
        _assert_local_shape(cache, mesh, axis, layer)


def _check_compiled(mesh, axis) -> None:
    """torch.compile(fullgraph=True) (inductor) of the tensor-parallel decode step: no graph break, same logits,
    no recompilation across steps. Two layers (one of each kind) keep inductor's compile time down."""
    import torch._dynamo.testing

    reference, model, rows = _models(mesh, axis, num_layers=2)
    with torch.inference_mode():  # a prompt first, so the decode steps read history
        prompt = torch.randint(0, model.config.vocab_size, (B, 5), generator=torch.Generator().manual_seed(4))
        reference(prompt), model(prompt[rows])
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    step = torch.compile(model, backend=counter, fullgraph=True)
    with torch.inference_mode():  # every step's input an inference tensor: one set of guards
        tokens = torch.randint(0, model.config.vocab_size, (B, 1), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            expected, got = reference(tokens), step(tokens[rows])
            assert (got - expected[rows]).abs().max().item() <= 1e-5
            tokens = expected[:, -1:].argmax(-1)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"


def _check_compiled_ops(mesh, axis) -> None:
    """The ops on DTensors inside torch.compile(fullgraph=True): same results as eager."""
    import torch_lightning_cache as tlc

    g = torch.Generator().manual_seed(2)
    S = lambda full, name: _shard(full, mesh, axis, name)  # noqa: E731

    def step(key_value, index, state, q, k, v, slopes):
        mask = torch.ops.lightning_cache.concatenate_to_cache(key_value, index, k, v, None, None, None, True, False,
                                                              False)
        out = torch.ops.lightning_cache.lightning_decode(state, q, k, v, slopes, None, 1.0, False)
        return mask, out

    compiled = torch.compile(step, fullgraph=True)
    full = [torch.randn(B, L, H, 2 * DK, generator=g), torch.tensor([0, 3, 1, 7]), torch.randn(B, H, DK, DK, generator=g)]
    eager_args = [S(t, name) for t, name in zip(full, ("key_value", "index", "state"))]
    compiled_args = [S(t, name) for t, name in zip(full, ("key_value", "index", "state"))]
    for _ in range(2):
        qkv = [S(torch.randn(B, 1, H, DK, generator=g), name) for name in ("query", "key", "value")]
        slopes = S(tlc.lightning_slopes(H), "slopes")
        for a, b in zip(compiled(*compiled_args, *qkv, slopes), step(*eager_args, *qkv, slopes)):
            _assert_equal(a, b.full_tensor(), "compiled op output")
    for a, b in zip(compiled_args, eager_args):
        _assert_equal(a, b.full_tensor(), "compiled op cache")


def _check_quantized_cache_classes(mesh, axis) -> None:
    """kv_quantization on a mesh: codes and scales are local shards; the views' dense K/V and mask, the codes
    (bytes) and the scales equal a plain quantized cache's; reorder_cache and copy_slots move both."""
    from torch_lightning_cache import LightningCache, LightningCacheMetaData

    g = torch.Generator().manual_seed(13)
    S = lambda full, name: _shard(full, mesh, axis, name)  # noqa: E731
    parts = _batch_parts(mesh, axis)
    rows = B // parts
    on_full = lambda ids: torch.cat([ids + p * rows for p in range(parts)])  # noqa: E731
    for fmt in ("int8", "fp8_e4m3"):
        def meta(**where):
            return LightningCacheMetaData.create(batch_size=B, num_heads=H, key_dim=DK, value_dim=DV, max_length=L,
                                                 dtype=torch.float32, kv_quantization=fmt, **where)

        cache = LightningCache.init_cache(1, meta(partition_axis=axis), layer_kinds=["attention"], mesh=mesh)
        plain = LightningCache.init_cache(1, meta(device="cpu"), layer_kinds=["attention"])
        _assert_local_shape(cache[0].key_value, mesh, axis, "key_value")
        _assert_local_shape(cache[0].scales, mesh, axis, "scales")

        def same_storage(what):
            codes = S(plain[0].key_value.view(torch.uint8), "key_value").to_local()
            assert torch.equal(cache[0].key_value.to_local().view(torch.uint8), codes), f"{fmt} codes {what}"
            _assert_equal(cache[0].scales, plain[0].scales, f"{fmt} scales {what}")
            _assert_equal(cache[0].index, plain[0].index, f"{fmt} index {what}")

        for n in (4, 1):  # prefill, then decode
            q, k = torch.randn(B, n, H, DK, generator=g), torch.randn(B, n, H, DK, generator=g)
            v = torch.randn(B, n, H, DV, generator=g)
            expected = plain[0].concatenate_to_cache(q, k, v, None, causal_mask=True)
            got = cache[0].concatenate_to_cache(S(q, "query"), S(k, "key"), S(v, "value"), None, causal_mask=True)
            for name, a, b in zip(("key_cache", "value_cache", "mask"), got, expected):
                _assert_equal(a, b, f"quantized {fmt} view.concatenate_to_cache {name}")
            same_storage(f"after {n} tokens")
        beam = torch.arange(rows).flip(0)
        cache.reorder_cache(beam)
        plain.reorder_cache(on_full(beam))
        cache.copy_slots(torch.tensor([0]), torch.tensor([rows - 1]))
        plain.copy_slots(on_full(torch.tensor([0])), on_full(torch.tensor([rows - 1])))
        same_storage("after reorder_cache and copy_slots")


def _scenario_tp2(world):
    mesh, axis = _mesh((world,))
    _check_ops(mesh, axis)
    _check_paged_ops(mesh, axis, write=True)
    _check_mismatches(mesh, axis)
    _check_cache_classes(mesh, axis)
    _check_quantized_cache_classes(mesh, axis)
    _check_model(mesh, axis)
    _check_compiled(mesh, axis)
    _check_compiled_ops(mesh, axis)


def _scenario_four_ranks(world):
    mesh, axis = _mesh((world,))  # tensor parallel over 4 ranks
    _check_ops(mesh, axis)
    _check_model(mesh, axis)
    mesh, axis = _mesh((2, world // 2))  # 2 (batch) x 2 (heads)
    _check_ops(mesh, axis)
    _check_paged_ops(mesh, axis, write=False)
    _check_mismatches(mesh, axis)
    _check_cache_classes(mesh, axis)
    _check_quantized_cache_classes(mesh, axis)
    _check_model(mesh, axis)


SCENARIOS = {"tp2": _scenario_tp2, "four_ranks": _scenario_four_ranks}


# --------------------------------------------------------------------------- tests


def test_tensor_parallel_2_ranks():
    """Ops, mismatches, cache classes, the model and the compiled decode step on a 2-rank head mesh."""
    _spawn(2, "tp2")


def test_four_ranks_tensor_parallel_and_2x2_mesh():
    """One spawn of 4 ranks (process start dominates): tensor parallel over 4, then a 2 (batch) x 2 (head) mesh."""
    _spawn(4, "four_ranks")


def test_every_tensor_argument_has_a_rule():
    """A new tensor argument of a sharded op needs one row in ARGUMENT_DIMS (else the strategy refuses it)."""
    from torch_lightning_cache import sharding

    for name in sharding.SHARDED_OPS:
        schema = getattr(torch.ops.lightning_cache, name).default._schema
        for arg in list(schema.arguments) + list(schema.returns):
            if "Tensor" in str(arg.type):
                assert sharding._argument_dims(name, arg.name) is not None, (name, arg.name)


def test_partition_axis_and_metadata():
    from torch_lightning_cache import LightningCacheMetaData, PartitionAxis

    axis = PartitionAxis(batch_axis="dp", head_axis="tp")
    assert LightningCacheMetaData.create(axis, batch_size=2, num_heads=2, head_dim=4).partition_axis is axis
    with pytest.raises(ValueError, match="same mesh dimension"):
        PartitionAxis(batch_axis="tp", head_axis="tp")
    with pytest.raises(TypeError, match="head_axis must be"):
        PartitionAxis(head_axis=1.0)


def test_kv_sharding_on_a_plain_cache_is_an_error():
    from torch_lightning_cache import LightningCache, LightningCacheMetaData

    cache = LightningCache.init_cache(1, LightningCacheMetaData.create(num_heads=2, head_dim=4, max_length=8))
    k = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="kv_sharding=.* but the cache is not a DTensor"):
        cache[0].concatenate_to_cache(k, k, k, None, kv_sharding=("dp", None, "tp", None))
    assert cache[0].key_value is None  # nothing allocated


def test_demo_tp_needs_torchrun(capsys):
    from torch_lightning_cache.__main__ import main

    assert main(["demo", "--tp", "2", "--tokens", "2", "--prompt-length", "2", "--layers", "2"]) == 2
    assert "--tp 2 needs 2 processes" in capsys.readouterr().err


def test_demo_tensor_parallel_under_torchrun():
    """``torchrun --nproc-per-node 2 -m torch_lightning_cache demo --tp 2``: the single-process demo's self-check
    line, the comparison with one process and memory per rank, printed once (rank 0)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           f"--master-port={_free_port()}", "-m", "torch_lightning_cache", "demo", "--tp", "2",
                           "--tokens", "4", "--prompt-length", "6", "--batch", "2", "--ragged", "--layers", "2",
                           "--hidden", "32", "--heads", "2", "--max-length", "16"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("self-check: max |logits with cache - recomputed without cache|") == 1
    assert "greedy tokens identical without cache: True" in done.stdout
    assert "tensor parallel check: max |logits with 2 ranks - one process|" in done.stdout
    assert "(tolerance 1e-05) PASS; greedy tokens identical: True" in done.stdout
    assert "memory per rank (weights + caches): rank 0" in done.stdout and "rank 1" in done.stdout
