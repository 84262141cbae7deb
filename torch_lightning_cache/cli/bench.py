"""``python -m torch_lightning_cache bench``: the ops against pure PyTorch, eager and compiled.

Cases (``--cases`` picks a subset by name or prefix: ``cache``, ``decode``, ``prefill-...``):

- ``cache-1tok``: ``concatenate_to_cache`` of 1 new token per row (a decode step),
  with a 2-D attention mask and the on-the-fly causal term;
- ``cache-<T>tok``: the same with a block of ``--tokens`` new tokens (a prefill chunk);
- ``write-<T>tok``: ``write_to_cache`` of the same block (no mask: for attention kernels that take lengths);
- ``write-paged``: ``write_to_cache`` of 1 token per row through block tables (page 16, pages scattered over
  the pool): a paged decode step's write. With ``check_bounds=False`` on CUDA it is planned on the device
  (no sync); with checks, on the host;
- ``decode-b<N>``: ``lightning_decode`` of 1 token at each batch size of ``--decode-batches``;
- ``prefill-<n>tok``: ``lightning_prefill`` of ``--prefill-tokens`` tokens from a non-zero state;
- ``attn-paged<16|64>``: the ``attn`` case through block tables (pages scattered over a pool), with the
  same call on the contiguous cache as the compared peer ``contiguous op``;
- ``prefill-packed``: ``lightning_prefill`` with ``cu_seqlens`` of 32 ragged sequences (1..512 tokens),
  against the padded ``[32, 512]`` call with a mask (baseline) and one unpadded call of the same total length;
- ``attn-<storage>``: ``cached_attention`` of 1 query token (``--attn-query-heads`` heads) over a full
  cache of ``--attn-capacity`` columns stored as ``--dtype``, int8 or float8_e4m3fn. The baseline is
  ``scaled_dot_product_attention`` (``enable_gqa=True``) over the cache's views for the float cache
  and over a dequantized copy (``dequantize + SDPA``) for the quantized ones; quantized cases also time
  SDPA over the float cache's views as a peer (other storage: timed, not compared).

Contenders: the op through ``torch.ops.lightning_cache`` with ``check_bounds=True``
(the default; on CUDA the check reads the positions on the host) and with
``check_bounds=False``; the pure-PyTorch baseline of ``baselines.py`` run eagerly;
and that baseline under ``torch.compile(fullgraph=True, dynamic=False)`` (plus
``mode="reduce-overhead"`` on CUDA). Every contender first runs once from the same
inputs and must agree with the op (bit-for-bit for the cache, within a tolerance
for the lightning ops) before it is timed. Peers that do other work of the same
size are timed in the same run: ``copy_`` of a buffer moving the same number
of bytes (the bandwidth ceiling), for decode an in-place pass over a state of
the same size (``mul_``), and on CUDA, where ``fla-core`` is installed, the
flash-linear-attention Triton kernels at matched shapes (``fused_recurrent_simple_gla``
for decode, ``chunk_simple_gla`` for prefill; their output is checked against the
op's, their state is returned, not written in place).

Timing: each sample runs ``inner`` back-to-back calls between two device
synchronizations; the figure is the median over ``--repeats`` samples of the
time per call, after warmup samples. Between samples, outside the timed region
and identically for every contender, the cache's positions are restored with a
``copy_`` so that every sample writes the same columns (the start position
leaves room for ``inner`` calls). Lightning states are not restored: with
decays below 1 they stay bounded.

Effective GB/s is bytes moved (read plus written) per second (for attention: the
cache's codes and scales, the query and the output; its copy peer reads that many bytes): for the cache, the
new K/V read and written and the mask written (plus the 2-D attention mask
read); for decode, the state read and written plus q/k/v and the output; for
prefill the same over all tokens. ``x copy`` is the contender's time over the
``copy_`` peer's: 1.0 means copy bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import baselines
from ..ops import init_kv_cache, init_paged_kv_cache, lightning_slopes

_ops = torch.ops.lightning_cache

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Sizes by device: the CUDA defaults are the reference configuration; the CPU
# ones are scaled so that the whole run takes a minute or two on two cores.
_DEFAULTS = {
    "cuda": dict(batch=8, heads=8, head_dim=128, capacity=8192, tokens=2048, decode_heads=64,
                 decode_batches="1,8,64", prefill_tokens=4096, repeats=50, warmup=5, target_ms=2.0,
                 attn_batch=4, attn_heads=8, attn_query_heads=32, attn_capacity=8192, attn_repeats=50),
    "cpu": dict(batch=8, heads=8, head_dim=128, capacity=2048, tokens=256, decode_heads=16,
                decode_batches="1,8,64", prefill_tokens=512, repeats=15, warmup=2, target_ms=2.0,
                attn_batch=4, attn_heads=8, attn_query_heads=32, attn_capacity=8192, attn_repeats=5),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES),
                        help="cache and q/k/v dtype (lightning states are float32)")
    parser.add_argument("--batch", type=int, default=None, help="cache rows (default 8)")
    parser.add_argument("--heads", type=int, default=None, help="cache heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=None, help="key and value dim, cache and lightning (128)")
    parser.add_argument("--capacity", type=int, default=None, help="cache max_length (CUDA 8192, CPU 2048)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens of the long cache write (CUDA 2048, CPU 256)")
    parser.add_argument("--decode-heads", type=int, default=None, help="lightning heads (CUDA 64, CPU 16)")
    parser.add_argument("--decode-batches", default=None, help="comma-separated decode batch sizes (1,8,64)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="prefill length (CUDA 4096, CPU 512)")
    parser.add_argument("--prefill-batch", type=int, default=1, help="prefill rows (1)")
    parser.add_argument("--block-size", type=int, default=256, help="prefill block size (256)")
    parser.add_argument("--attn-batch", type=int, default=None, help="cached_attention rows (4)")
    parser.add_argument("--attn-heads", type=int, default=None, help="cached_attention cache heads (8)")
    parser.add_argument("--attn-query-heads", type=int, default=None, help="cached_attention query heads (32)")
    parser.add_argument("--attn-capacity", type=int, default=None, help="cached_attention cache length (8192)")
    parser.add_argument("--attn-repeats", type=int, default=None,
                        help="timed samples per attention contender (CUDA 50, CPU 5: CPU SDPA takes seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per contender (CUDA 50, CPU 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed samples per contender (CUDA 5, CPU 2)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names or prefixes (cache, decode, prefill); default all")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    parser.add_argument("--csv", default=None, help="results CSV (default bench_results/bench_<device>.csv)")
    parser.add_argument("--plot", default=None,
                        help="PNG bar chart of the times (default: the CSV path with .png; needs matplotlib)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One benchmark case: live tensors, how each kind of contender calls into them, how results compare."""

    name: str
    kind: str  # "cache" or "lightning"
    describe: str
    nbytes: int  # bytes for the effective GB/s
    mutables: list[torch.Tensor]  # tensors the calls write (snapshotted for the agreement check)
    call_op: Callable[[bool], torch.Tensor]  # check_bounds -> output
    call_baseline: Callable[[Callable], torch.Tensor]  # baseline function (eager or compiled) -> output
    baseline: Callable  # the eager baseline, to compile
    max_inner: int = 1 << 30  # calls a sample may make (cache positions)
    reset: Callable[[int], None] = field(default=lambda inner: None)  # restores state before a sample of `inner` calls
    # Other work of the same size: (label, fn, compared). `compared` peers return the op's
    # output (checked, within the lightning tolerance); the others only move the same bytes.
    peers: list[tuple[str, Callable, bool]] = field(default_factory=list)
    peer_notes: dict[str, str] = field(default_factory=dict)  # check-column text of uncompared peers
    repeats: int | None = None  # timed samples, when not the run's --repeats


def _copy_peer(device, nbytes: int) -> tuple[str, Callable, bool]:
    """``dst.copy_(src)`` moving ``nbytes`` (half read, half written)."""
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return ("copy_ same bytes", lambda: dst.copy_(src), False)


def _cache_case(name, device, dtype, batch, heads, head_dim, capacity, new_tokens, gen, with_mask=True) -> Case:
    key_value, index = init_kv_cache(batch, capacity, heads, head_dim, head_dim, dtype=dtype, device=device)
    key = torch.randn(batch, new_tokens, heads, head_dim, generator=gen).to(device, dtype)
    value = torch.randn(batch, new_tokens, heads, head_dim, generator=gen).to(device, dtype)
    attention_mask = torch.ones(batch, capacity, dtype=torch.bool, device=device)
    # Every sample starts at the same position, leaving room for its calls in the upper half of the cache.
    max_inner = max(1, capacity // (2 * new_tokens))
    start = torch.empty_like(index)

    def reset(inner: int) -> None:
        index.copy_(start.fill_(capacity - inner * new_tokens))

    reset(1)
    kv_bytes = batch * new_tokens * heads * 2 * head_dim * key_value.element_size()
    dtype_name = str(dtype).removeprefix('torch.')
    if not with_mask:
        moved = 2 * kv_bytes
        return Case(
            name=name, kind="cache",
            describe=f"write_to_cache B={batch} H={heads} D={head_dim} L={capacity} q={new_tokens} {dtype_name}",
            nbytes=moved, mutables=[key_value, index],
            call_op=lambda check: _ops.write_to_cache(key_value, index, key, value, False, check),
            call_baseline=lambda fn: fn(key_value, index, key, value, False),
            baseline=baselines.write_to_cache_eager, max_inner=max_inner, reset=reset,
            peers=[_copy_peer(device, moved)])
    moved = 2 * kv_bytes + batch * new_tokens * capacity + batch * capacity  # K/V in and out, mask out, 2-D mask in
    return Case(
        name=name, kind="cache",
        describe=f"concatenate_to_cache B={batch} H={heads} D={head_dim} L={capacity} q={new_tokens} "
                 f"{dtype_name}, 2-D mask, is_causal",
        nbytes=moved, mutables=[key_value, index],
        call_op=lambda check: _ops.concatenate_to_cache(key_value, index, key, value, attention_mask, None, None,
                                                        True, False, check),
        call_baseline=lambda fn: fn(key_value, index, key, value, attention_mask, None, None, True, False),
        baseline=baselines.concatenate_to_cache_eager, max_inner=max_inner, reset=reset,
        peers=[_copy_peer(device, moved)])


def _paged_write_case(device, dtype, batch, heads, head_dim, capacity, gen, page_size=16) -> Case:
    """``write_to_cache`` of one token per row through block tables, against the eager paged scatter."""
    max_pages = max(1, capacity // page_size)
    L = max_pages * page_size
    pages = init_paged_kv_cache(batch * max_pages, page_size, heads, head_dim, head_dim, dtype=dtype, device=device)
    tables = torch.randperm(batch * max_pages, generator=gen).view(batch, max_pages).to(device)
    index = torch.zeros(batch, dtype=torch.int64, device=device)
    key = torch.randn(batch, 1, heads, head_dim, generator=gen).to(device, dtype)
    value = torch.randn(batch, 1, heads, head_dim, generator=gen).to(device, dtype)
    start = torch.empty_like(index)

    def reset(inner: int) -> None:
        index.copy_(start.fill_(L - inner))

    reset(1)
    moved = 2 * batch * heads * 2 * head_dim * pages.element_size()
    return Case(
        name="write-paged", kind="cache",
        describe=f"write_to_cache through block tables, page {page_size}, B={batch} H={heads} D={head_dim} L={L} "
                 f"q=1 {str(dtype).removeprefix('torch.')}",
        nbytes=moved, mutables=[pages, index],
        call_op=lambda check: _ops.write_to_cache(pages, index, key, value, False, check, None, None, tables, None),
        call_baseline=lambda fn: fn(pages, index, key, value, tables),
        baseline=baselines.write_to_cache_paged_eager, max_inner=max(1, L // 2), reset=reset,
        peers=[_copy_peer(device, moved)])


def _fla():
    """flash-linear-attention's simple-GLA kernels (Triton, CUDA only), or None where not installed."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except Exception:  # not installed, or no Triton/GPU: the peer is left out
        return None
    return chunk_simple_gla, fused_recurrent_simple_gla


def _lightning_inputs(device, dtype, batch, tokens, heads, head_dim, gen):
    state = (0.1 * torch.randn(batch, heads, head_dim, head_dim, generator=gen)).to(device)  # history, float32
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    return state, q, k, v, lightning_slopes(heads, device=device)


def _decode_case(device, dtype, batch, heads, head_dim, gen) -> Case:
    state, q, k, v, slopes = _lightning_inputs(device, dtype, batch, 1, heads, head_dim, gen)
    state_bytes = state.numel() * state.element_size()
    moved = 2 * state_bytes + 4 * q.numel() * q.element_size()
    scratch = state.clone()
    peers = [_copy_peer(device, moved), ("state pass (mul_)", lambda: scratch.mul_(1.0), False)]
    fla = _fla() if device.type == "cuda" else None
    if fla is not None:
        recurrent = fla[1]
        log_decay = -slopes.float()
        peers.append(("fla fused_recurrent", lambda: recurrent(q, k, v, g_gamma=log_decay, scale=1.0,
                                                             initial_state=state, output_final_state=True)[0], True))
    return Case(
        name=f"decode-b{batch}", kind="lightning",
        describe=f"lightning_decode B={batch} H={heads} D={head_dim} n=1 {str(dtype).removeprefix('torch.')} "
                 f"inputs, float32 state",
        nbytes=moved, mutables=[state],
        call_op=lambda check: _ops.lightning_decode(state, q, k, v, slopes, None, 1.0, check),
        call_baseline=lambda fn: fn(state, q, k, v, slopes),
        baseline=baselines.lightning_decode_eager, peers=peers)


def _prefill_case(device, dtype, batch, tokens, heads, head_dim, block_size, gen) -> Case:
    state, q, k, v, slopes = _lightning_inputs(device, dtype, batch, tokens, heads, head_dim, gen)
    moved = 2 * state.numel() * state.element_size() + 4 * q.numel() * q.element_size()
    peers = [_copy_peer(device, moved)]
    fla = _fla() if device.type == "cuda" else None
    if fla is not None:
        chunk = fla[0]
        log_decay = -slopes.float()
        peers.append(("fla chunk", lambda: chunk(q, k, v, g_gamma=log_decay, scale=1.0, initial_state=state,
                                                 output_final_state=True)[0], True))
    return Case(
        name=f"prefill-{tokens}tok", kind="lightning",
        describe=f"lightning_prefill B={batch} H={heads} D={head_dim} n={tokens} block={block_size} "
                 f"{str(dtype).removeprefix('torch.')} inputs, float32 state with history",
        nbytes=moved, mutables=[state],
        call_op=lambda check: _ops.lightning_prefill(state, q, k, v, slopes, None, None, block_size, 1.0, check),
        call_baseline=lambda fn: fn(state, q, k, v, slopes, None, block_size),
        baseline=baselines.lightning_prefill_chunked_eager, peers=peers)


def _attention_case(name, storage, device, dtype, sizes, gen) -> Case:
    """``cached_attention`` of one query token over a full cache in ``storage``."""
    B, H, Hq, L, D = (sizes["attn_batch"], sizes["attn_heads"], sizes["attn_query_heads"], sizes["attn_capacity"],
                      sizes["head_dim"])
    dense = torch.randn(B, L, H, 2 * D, generator=gen).to(device)
    query = torch.randn(B, 1, Hq, D, generator=gen).to(device, dtype)
    # The mask concatenate_to_cache returns for rows whose last token was just written.
    index = torch.full((B,), L - 1, dtype=torch.int64, device=device)
    mask = _ops.concatenate_to_cache(dense, index, dense[:, :1, :, :D].clone(), dense[:, :1, :, D:].clone(), None,
                                     None, None, True, False, True)
    float_cache = dense.to(dtype)
    scales = None
    if storage == "int8" or storage == "fp8":
        parts, scale_parts = [], []
        for part in (dense[..., :D], dense[..., D:]):
            scale = part.abs().amax(dim=-1, keepdim=True) / (127.0 if storage == "int8" else 448.0)
            scaled = part / torch.where(scale > 0, scale, torch.ones_like(scale))
            parts.append(scaled.round().clamp(-127, 127).to(torch.int8) if storage == "int8"
                         else scaled.to(torch.float8_e4m3fn))
            scale_parts.append(scale)
        key_value, scales = torch.cat(parts, dim=-1), torch.cat(scale_parts, dim=-1).contiguous()
        storage_name = "int8" if storage == "int8" else "float8_e4m3fn"
    else:
        key_value, storage_name = float_cache, str(dtype).removeprefix("torch.")
    del dense
    read = key_value.numel() * key_value.element_size() + (0 if scales is None else scales.numel() * 4)
    moved = read + 2 * query.numel() * query.element_size()  # + output of the same size (Dv = Dk)
    peers = [_copy_peer(device, 2 * moved)]  # a copy reading the same bytes
    notes = {}
    if scales is not None:
        label = f"SDPA {str(dtype).removeprefix('torch.')} views"
        peers.insert(0, (label, lambda: baselines.cached_attention_eager(query, float_cache, mask, D), False))
        notes[label] = "peer: the float cache's views (other storage, not compared)"
    return Case(
        name=name, kind="attention",
        describe=f"cached_attention B={B} H={H} Hq={Hq} D={D} L={L} q=1, {storage_name} cache, "
                 f"{str(dtype).removeprefix('torch.')} query",
        nbytes=moved, mutables=[],
        call_op=lambda check: _ops.cached_attention(query, key_value, mask, D, scales, None),
        call_baseline=lambda fn: fn(query, key_value, mask, D, scales),
        baseline=baselines.cached_attention_eager, peers=peers, peer_notes=notes, repeats=sizes["attn_repeats"])


def _paged_attention_case(page_size, device, dtype, sizes, gen) -> Case:
    """``cached_attention`` of one query token per row through block tables (SPEC 11), against the same call
    on a contiguous cache holding the same tokens (the compared peer ``contiguous op``)."""
    B, H, Hq, L, D = (sizes["attn_batch"], sizes["attn_heads"], sizes["attn_query_heads"], sizes["attn_capacity"],
                      sizes["head_dim"])
    max_pages = max(1, L // page_size)
    L = max_pages * page_size  # whole pages
    dense = torch.randn(B, L, H, 2 * D, generator=gen).to(device, dtype)
    # Pages scattered over a pool: row b's page p is pool page order[b * max_pages + p].
    order = torch.randperm(B * max_pages, generator=gen)
    tables = order.view(B, max_pages).to(device)
    pages = torch.empty(B * max_pages, page_size, H, 2 * D, dtype=dtype, device=device)
    pages[order.to(device)] = dense.view(B * max_pages, page_size, H, 2 * D)
    query = torch.randn(B, 1, Hq, D, generator=gen).to(device, dtype)
    valid = torch.full((B,), L, dtype=torch.int64, device=device)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
    moved = pages.numel() * pages.element_size() + 2 * query.numel() * query.element_size()
    peers = [("contiguous op", lambda: _ops.cached_attention(query, dense, mask, D), True),
             _copy_peer(device, 2 * moved)]
    return Case(
        name=f"attn-paged{page_size}", kind="attention",
        describe=f"cached_attention through block tables, page {page_size}, B={B} H={H} Hq={Hq} D={D} L={L} q=1, "
                 f"{str(dtype).removeprefix('torch.')}; 'contiguous op' is the same call on a dense cache",
        nbytes=moved, mutables=[],
        call_op=lambda check: _ops.cached_attention(query, pages, None, D, None, None, tables, None, valid, None,
                                                    check),
        call_baseline=lambda fn: fn(query, dense, mask, D, None),
        baseline=baselines.cached_attention_eager, peers=peers, repeats=sizes["attn_repeats"])


def _packed_prefill_case(device, dtype, heads, head_dim, block_size, gen) -> Case:
    """Packed ``lightning_prefill`` (cu_seqlens) of a ragged batch: 32 sequences of 1..512 tokens, mean ~128.
    The baseline is the padded [32, max_len] call with a mask (outputs gathered back to the packed layout);
    the peer ``one unpadded call`` is one sequence of the same total length (the useful work, timed only)."""
    lengths = torch.randint(1, 256, (32,), generator=gen)
    lengths[0], lengths[1] = 1, 512  # the range's ends; the rest averages ~128
    S, T, longest = len(lengths), int(lengths.sum()), int(lengths.max())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
    state, q, k, v, slopes = _lightning_inputs(device, dtype, 1, T, heads, head_dim, gen)
    state = state.expand(S, -1, -1, -1).contiguous()
    positions = torch.arange(longest)
    keep = (positions[None, :] < lengths[:, None]).to(device)  # [S, max_len]
    flat = (torch.arange(S)[:, None] * longest + positions[None, :])[keep.cpu()].to(device)  # packed -> padded row

    def pad(x):
        out = x.new_zeros(S * longest, *x.shape[2:])
        out[flat] = x[0]
        return out.view(S, longest, *x.shape[2:])

    q_pad, k_pad, v_pad = pad(q), pad(k), pad(v)

    def padded(state, q_pad, k_pad, v_pad, slopes, keep, flat):
        out = torch.ops.lightning_cache.lightning_prefill(state, q_pad, k_pad, v_pad, slopes, keep, None, block_size)
        return out.flatten(0, 1).index_select(0, flat).unsqueeze(0)

    one_state = state[:1].clone()
    peers = [("one unpadded call", lambda: _ops.lightning_prefill(one_state, q, k, v, slopes, None, None, block_size),
              False)]
    moved = 2 * state.numel() * state.element_size() + 4 * q.numel() * q.element_size()
    peers.append(_copy_peer(device, moved))
    return Case(
        name="prefill-packed", kind="lightning",
        describe=f"packed lightning_prefill S={S} T={T} (lengths 1..{longest}, mean {T / S:.0f}) H={heads} "
                 f"D={head_dim}; baseline: padded [{S}, {longest}] with a mask",
        nbytes=moved, mutables=[state],
        call_op=lambda check: _ops.lightning_prefill(state, q, k, v, slopes, None, None, block_size, 1.0, check, None,
                                                     0, cu),
        call_baseline=lambda fn: fn(state, q_pad, k_pad, v_pad, slopes, keep, flat),
        baseline=padded, peers=peers, peer_notes={"one unpadded call": "peer: one sequence of T tokens"})


def _case_builders(args, device, dtype, sizes):
    """(name, builder) pairs in run order; builders allocate only when the case is selected."""
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for new_tokens in (1, sizes["tokens"]):
        out.append((f"cache-{new_tokens}tok", lambda q=new_tokens: _cache_case(
            f"cache-{q}tok", device, dtype, sizes["batch"], sizes["heads"], sizes["head_dim"], sizes["capacity"], q,
            gen)))
    for new_tokens in (1, sizes["tokens"]):
        out.append((f"write-{new_tokens}tok", lambda q=new_tokens: _cache_case(
            f"write-{q}tok", device, dtype, sizes["batch"], sizes["heads"], sizes["head_dim"], sizes["capacity"], q,
            gen, with_mask=False)))
    out.append(("write-paged", lambda: _paged_write_case(device, dtype, sizes["batch"], sizes["heads"],
                                                          sizes["head_dim"], sizes["capacity"], gen)))
    for batch in (int(b) for b in str(sizes["decode_batches"]).split(",") if b.strip()):
        out.append((f"decode-b{batch}", lambda b=batch: _decode_case(
            device, dtype, b, sizes["decode_heads"], sizes["head_dim"], gen)))
    tokens = sizes["prefill_tokens"]
    out.append((f"prefill-{tokens}tok", lambda: _prefill_case(
        device, dtype, args.prefill_batch, tokens, sizes["decode_heads"], sizes["head_dim"], args.block_size, gen)))
    for storage in ("float", "int8", "fp8"):
        name = f"attn-{args.dtype if storage == 'float' else storage}"
        out.append((name, lambda n=name, s=storage: _attention_case(n, s, device, dtype, sizes, gen)))
    for page_size in (16, 64):
        out.append((f"attn-paged{page_size}", lambda p=page_size: _paged_attention_case(p, device, dtype, sizes, gen)))
    out.append(("prefill-packed", lambda: _packed_prefill_case(device, dtype, sizes["decode_heads"],
                                                                sizes["head_dim"], args.block_size, gen)))
    return out


def _selected(name: str, selectors: list[str] | None) -> bool:
    return selectors is None or any(name == s or name.split("-")[0] == s for s in selectors)


# --------------------------------------------------------------------------- contenders


_COMPILED: dict[tuple[str, str], Callable] = {}


def _compiled(fn: Callable, mode: str) -> Callable:
    """One torch.compile wrapper per (baseline, mode); dynamo specializes it per case's shapes."""
    key = (fn.__name__, mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, fullgraph=True, dynamic=False,
                                       mode=None if mode == "default" else mode)
    return _COMPILED[key]


def _contenders(case: Case, compile_modes: list[str]) -> list[tuple[str, Callable]]:
    out = [("op", lambda: case.call_op(True))]
    if case.kind != "attention":  # cached_attention has no bounds to check
        out.append(("op check_bounds=False", lambda: case.call_op(False)))
    out.append(("eager baseline", lambda: case.call_baseline(case.baseline)))
    for mode in compile_modes:
        fn = _compiled(case.baseline, mode)
        if mode == "reduce-overhead":
            def call(fn=fn):
                torch.compiler.cudagraph_mark_step_begin()
                return case.call_baseline(fn)
        else:
            def call(fn=fn):
                return case.call_baseline(fn)
        out.append((f"compile {mode}", call))
    return out + [(label, fn) for label, fn, _ in case.peers]


def _agree(case: Case, got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
    """None when `got` matches `want`, else what differs."""
    for i, (g, w) in enumerate(zip(got, want)):
        label = "output" if i == 0 else f"written tensor {i}"
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{label}: shape/dtype {tuple(g.shape)} {g.dtype} vs {tuple(w.shape)} {w.dtype}"
        if case.kind == "cache":
            if not torch.equal(g, w):
                return f"{label}: not bit-for-bit equal ({int((g != w).sum())} elements differ)"
        else:
            tol = 1e-4 if w.dtype == torch.float32 else 2e-2
            err = (g.float() - w.float()).abs().max().item()
            bound = tol * max(1.0, w.float().abs().max().item())
            if not err <= bound:
                return f"{label}: max abs error {err:.3g} > {bound:.3g}"
    return None


def _timed(fn: Callable, case: Case, sync: Callable, inner: int, warmup: int, repeats: int) -> float:
    """Median seconds per call over `repeats` samples of `inner` calls each."""
    samples = []
    for sample in range(warmup + repeats):
        case.reset(inner)
        sync()
        begin = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        if sample >= warmup:
            samples.append((time.perf_counter() - begin) / inner)
    return statistics.median(samples)


# --------------------------------------------------------------------------- driver


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: CUDA is not available")
        return 2
    sizes = dict(_DEFAULTS["cuda" if device.type == "cuda" else "cpu"])
    for key in sizes:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    dtype = _DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    compile_modes = [] if args.no_compile else (["default", "reduce-overhead"] if device.type == "cuda"
                                               else ["default"])
    selectors = [s.strip() for s in args.cases.split(",") if s.strip()] if args.cases else None
    builders = [(n, b) for n, b in _case_builders(args, device, dtype, sizes) if _selected(n, selectors)]
    if not builders:
        print(f"bench: --cases {args.cases!r} selects nothing; cases are "
              f"{', '.join(n for n, _ in _case_builders(args, device, dtype, sizes))}")
        return 2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _report_load("start")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)")
          + f", dtype {args.dtype}, repeats {sizes['repeats']}, warmup {sizes['warmup']}")
    rows, failures = [], 0
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        for name, build in builders:
            case = build()
            print(f"\n[{case.name}] {case.describe}")
            case_rows, case_failures = _run_case(case, compile_modes, sync, sizes)
            rows.extend(case_rows)
            failures += case_failures
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()

    _print_table(rows)
    _report_load("end")
    path = args.csv or os.path.join("bench_results", f"bench_{device.type}.csv")
    _write_csv(path, rows, device, args.dtype)
    print(f"\nwrote {path}")
    _plot(args.plot or os.path.splitext(path)[0] + ".png", rows, device)
    return 1 if failures else 0


def _run_case(case: Case, compile_modes: list[str], sync: Callable, sizes: dict) -> tuple[list[dict], int]:
    """Checks every contender against the reference, then times those that agree: (table rows, failures)."""
    contenders = _contenders(case, compile_modes)
    if "reduce-overhead" in compile_modes:
        # As a static KV cache does (Hugging Face's StaticCache): the written tensors keep their
        # addresses, so CUDA graphs may mutate them instead of being skipped for mutated inputs.
        for t in case.mutables:
            torch._dynamo.mark_static_address(t)
    snapshot = [t.clone() for t in case.mutables]

    def restore():
        for t, s in zip(case.mutables, snapshot):
            t.copy_(s)

    # Agreement: every contender runs once from the same inputs; the op (or, when it
    # has no kernel for this device, the eager baseline) is the reference.
    reference, usable, notes, failures = None, [], {}, 0
    peer_compared = {label: compared for label, _, compared in case.peers}
    for label, fn in contenders:
        restore()
        is_peer = label in peer_compared
        if is_peer and not peer_compared[label]:
            notes[label] = case.peer_notes.get(label, "peer: same bytes, other work")
            usable.append((label, fn))
            continue
        begin = time.perf_counter()
        try:
            out = fn()
            out = torch.empty(0) if out is None else out.clone()  # write_to_cache returns nothing
            result = [out] + ([] if is_peer else [t.clone() for t in case.mutables])
        except NotImplementedError as error:
            notes[label] = f"n/a: {str(error).splitlines()[0][:80]}"
            continue
        except Exception as error:  # a contender that crashes is reported, the others still run
            notes[label] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
            failures += 0 if is_peer else 1
            continue
        sync()
        first_call = time.perf_counter() - begin
        if reference is None:
            reference = result
            notes[label] = "reference"
        else:
            diff = _agree(case, result, reference[:len(result)])
            if diff is not None:
                notes[label] = f"MISMATCH: {diff}"
                failures += 0 if is_peer else 1
                continue
            notes[label] = "agrees (output)" if is_peer else "agrees"
        if label.startswith("compile"):
            notes[label] += f" (first call {first_call:.1f} s)"
        usable.append((label, fn))
    restore()
    snapshot.clear()  # frees the copies; restore() is not called again

    # Calls per sample: enough for ~target_ms per sample, capped by the cache's free positions.
    inner = 1
    if usable:
        probe = usable[0][1]
        probe_time = _timed(probe, case, sync, 1, 1, 3)
        inner = int(min(case.max_inner, max(1, round(sizes["target_ms"] * 1e-3 / max(probe_time, 1e-7)))))

    times = {}
    repeats = case.repeats or sizes["repeats"]
    warmup = min(sizes["warmup"], 1) if case.repeats else sizes["warmup"]
    for label, fn in usable:
        times[label] = _timed(fn, case, sync, inner, warmup, repeats)
        print(f"  {label:<28} {times[label] * 1e6:12.1f} us   {notes[label]}")
    for label, _ in contenders:
        if label not in times:
            print(f"  {label:<28} {'-':>12}      {notes[label]}")

    op_time, copy_time = times.get("op"), times.get("copy_ same bytes")
    rows = []
    for label, _ in contenders:
        t = times.get(label)
        rows.append(dict(case=case.name, contender=label, us_per_call=None if t is None else t * 1e6,
                         ratio_to_op=None if t is None or op_time is None else t / op_time,
                         ratio_to_copy=None if t is None or copy_time is None else t / copy_time,
                         mbytes=case.nbytes / 1e6,
                         gbps=None if t is None else case.nbytes / t / 1e9,
                         inner=inner, check=notes[label], describe=case.describe))
    return rows, failures


def _report_load(when: str) -> None:
    """CPU timings mean little on a busy machine: say how busy it was."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cores = os.cpu_count() or 1
    busy = "  (busier than its cores: CPU timings are unreliable)" if load > 0.75 * cores else ""
    print(f"load average at {when}: {load:.2f} on {cores} cores{busy}")


def _print_table(rows) -> None:
    print(f"\n{'case':<16} {'contender':<28} {'us/call':>12} {'x op':>8} {'x copy':>8} {'MB moved':>9} "
          f"{'GB/s':>9}  check")
    last = None
    for r in rows:
        if last is not None and r["case"] != last:
            print()
        last = r["case"]
        print(f"{r['case']:<16} {r['contender']:<28} {_fmt(r['us_per_call'], '12.1f'):>12} "
              f"{_fmt(r['ratio_to_op'], '8.2f'):>8} {_fmt(r['ratio_to_copy'], '8.2f'):>8} "
              f"{_fmt(r['mbytes'], '9.2f'):>9} {_fmt(r['gbps'], '9.2f'):>9}  {r['check']}")
    print("\nx op: contender time / op time (check_bounds=True); above 1 means the op is faster.\n"
          "x copy: contender time / time of copy_ moving the same bytes (1.0 = copy bandwidth).\n"
          "MB moved, GB/s: bytes read plus written by the op's work, and that over the contender's time.")


def _write_csv(path: str, rows, device, dtype: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = ["device", "dtype", "case", "contender", "us_per_call", "ratio_to_op", "ratio_to_copy", "mbytes", "gbps",
              "inner", "check", "describe"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": str(device), "dtype": dtype, **{k: ("" if r[k] is None else r[k])
                                                                      for k in fields[2:]}})


def _plot(path: str, rows, device) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot written (pip install matplotlib)")
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    labels = list(dict.fromkeys(r["contender"] for r in rows))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4.5))
    for n, label in enumerate(labels):
        values = [next((r["us_per_call"] for r in rows if r["case"] == c and r["contender"] == label), None)
                  for c in cases]
        xs = [i + n * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("microseconds per call (log)")
    ax.set_title(f"torch_lightning_cache ops vs pure PyTorch on {device}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
