"""A small MiniMax-style hybrid decoder that uses the cache operators.

Softmax-attention layers keep a sequence cache (``concatenate_to_cache`` with
the on-the-fly causal mask, then ``scaled_dot_product_attention`` over the
cache); lightning layers keep a recurrent state (``lightning_prefill`` for
prompts, ``lightning_decode`` for single tokens). The caches are module
buffers, so the model can be compiled (decode steps do not recompile: the
positions live in the ``index`` buffers), captured in CUDA graphs (the buffers
have static addresses), scripted with TorchScript and exported.

``forward_packed`` is the serving engine's step (``cli/engine.py``): the tokens of many
requests packed into ``[1, T]`` with ``cu_seqlens`` (:class:`PackedBatch`), attention
K|V in page pools (``init_pages``) read and written through block tables, lightning
states in one row per request.

``forward_uncached`` recomputes the same function over a whole sequence
without any cache or custom op (causal SDPA and the quadratic form of the
lightning recurrence): the demo and the tests check the cached path against it.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..cache import ATTENTION, minimax_layer_kinds


@dataclasses.dataclass
class HybridConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 256
    attention_every: int = 2  # every k-th layer is softmax attention (MiniMax-Text-01 uses 8)
    max_length: int = 256  # capacity of the attention layers' caches
    block_size: int = 64  # prefill chunk length of the lightning layers
    kv_quantization: str | None = None  # attention layers' storage: None, "int8" or "fp8_e4m3"

    @property
    def layer_kinds(self) -> list[str]:
        return minimax_layer_kinds(self.num_layers, self.attention_every)


def _op_takes(op, *names: str) -> bool:
    # Read from the registered schema (the built library), not the Python wrapper, so a stale build says no.
    arguments = {argument.name for argument in op.default._schema.arguments}
    return all(name in arguments for name in names)


# Whether the operator library has section 11's paged / packed arguments. Without them the packed forward runs
# the same computation with the older ops (one batched call for the decodes, one call per prefill chunk, and a
# gather of the pages for attention); with them, one call per layer through the block tables.
PAGED_PACKED_OPS = (_op_takes(torch.ops.lightning_cache.write_to_cache, "block_tables", "cu_seqlens")
                    and _op_takes(torch.ops.lightning_cache.cached_attention, "block_tables", "cu_seqlens",
                                  "cache_seqlens")
                    and _op_takes(torch.ops.lightning_cache.lightning_prefill, "cu_seqlens"))


def _paged_packed_ops_run_on(device: torch.device) -> bool:
    """Whether the paged / packed arguments have kernels on ``device`` (a backend still without them raises
    NotImplementedError): one tiny call of each op."""
    pages = ops.init_paged_kv_cache(1, 1, 1, 1, 1, dtype=torch.float32, device=device)
    one = torch.zeros(1, 1, 1, 1, device=device)
    cu_seqlens = torch.tensor([0, 1], device=device)
    table = torch.zeros(1, 1, dtype=torch.int64, device=device)
    try:
        ops.write_to_cache(pages, torch.zeros(1, dtype=torch.int64, device=device), one, one, block_tables=table,
                           cu_seqlens=cu_seqlens)
        ops.cached_attention(one, pages, None, 1, block_tables=table, cu_seqlens=cu_seqlens,
                             cache_seqlens=torch.ones(1, dtype=torch.int64, device=device))
        ops.lightning_prefill(ops.init_state(1, 1, 1, 1, device=device), one, one, one,
                              torch.ones(1, device=device), cu_seqlens=cu_seqlens)
    except NotImplementedError:
        return False
    return True


@dataclasses.dataclass
class PackedBatch:
    """One engine step: ``S`` sequences packed into ``[1, T]`` tokens (no padding).

    Sequence ``s`` is tokens ``cu_seqlens[s] .. cu_seqlens[s + 1] - 1``, sits at positions
    ``start_positions[s] ..`` of its request, reads and writes its K|V through
    ``block_tables[s]`` (page ids, ``page_size`` tokens each) and its lightning state in
    row ``slot_ids[s]``. The first ``num_decodes`` sequences are single tokens (decodes).
    Build it with :meth:`build`.
    """

    cu_seqlens: torch.Tensor  # [S + 1] int64
    slot_ids: torch.Tensor  # [S] int64, lightning-state rows
    block_tables: torch.Tensor  # [S, max_pages] int64 (-1 past a sequence's pages: never read)
    start_positions: torch.Tensor  # [S] int64, tokens of each sequence already in the cache
    cache_seqlens: torch.Tensor  # [S] int64, tokens in the cache after this step
    page_size: int
    lengths: list  # host copies, for the path without packed ops
    num_decodes: int
    write_rows: torch.Tensor  # [T] int64: page * page_size + slot of each token (path without paged ops)
    # > 0: each lightning layer keeps the state after each of every sequence's first checkpoint_tokens tokens
    # in its ``checkpoints`` [S, checkpoint_tokens, H, D, D] (speculative decoding rolls back to them).
    checkpoint_tokens: int = 0

    @staticmethod
    def build(lengths: list[int], start_positions: list[int], slot_ids: list[int], block_tables: list[list[int]],
              page_size: int, device: torch.device | str = "cpu", checkpoint_tokens: int = 0) -> "PackedBatch":
        if not (len(lengths) == len(start_positions) == len(slot_ids) == len(block_tables)):
            raise ValueError("PackedBatch.build: lengths, start_positions, slot_ids and block_tables must have "
                             "one entry per sequence")
        ends = [start + n for start, n in zip(start_positions, lengths)]
        width = max([-(-end // page_size) for end in ends] + [1])
        table = torch.full((len(lengths), width), -1, dtype=torch.int64)
        write_rows = []
        for s, (pages, start, n) in enumerate(zip(block_tables, start_positions, lengths)):
            needed = -(-ends[s] // page_size)
            if len(pages) < needed:
                raise ValueError(f"PackedBatch.build: sequence {s} reaches position {ends[s] - 1} but its block "
                                 f"table has {len(pages)} pages of {page_size}")
            table[s, :needed] = torch.tensor(pages[:needed], dtype=torch.int64)
            write_rows += [pages[p // page_size] * page_size + p % page_size for p in range(start, start + n)]
        num_decodes = 0
        while num_decodes < len(lengths) and lengths[num_decodes] == 1:
            num_decodes += 1
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)

        def ids(values):
            return torch.tensor(values, dtype=torch.int64, device=device)

        return PackedBatch(ids(cu), ids(slot_ids), table.to(device), ids(start_positions), ids(ends), page_size,
                           list(lengths), num_decodes, ids(write_rows), checkpoint_tokens)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def _split_qkv(fused: torch.Tensor, heads: int, head_dim: int):
    # q, k, v as strided views of one fused projection: no copies before the ops.
    b, n = fused.shape[0], fused.shape[1]
    qkv = fused.view(b, n, 3, heads, head_dim)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


class CachedAttention(nn.Module):
    """Softmax attention over a unified K|V cache ``[B, L, H, 2D]``."""

    def __init__(self, config: HybridConfig, batch_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.heads = config.num_heads
        self.head_dim = config.head_dim
        self.check_bounds = True
        inner = config.num_heads * config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * inner, bias=False, device=device, dtype=dtype)
        self.out = nn.Linear(inner, config.hidden_size, bias=False, device=device, dtype=dtype)
        # Quantized storage: int8 / fp8 codes plus per-token scales, read directly by cached_attention.
        self.quantized = config.kv_quantization is not None
        if self.quantized:
            key_value, index, scales = ops.init_quantized_kv_cache(batch_size, config.max_length, config.num_heads,
                                                                   config.head_dim, config.head_dim,
                                                                   config.kv_quantization, device=device)
        else:
            key_value, index = ops.init_kv_cache(batch_size, config.max_length, config.num_heads, config.head_dim,
                                                 config.head_dim, dtype=dtype, device=device)
            scales = torch.zeros(0, device=device)  # unused (a tensor either way, for TorchScript)
        self.paged_ops = False  # set by HybridLM.init_pages: one op call per layer through the block tables
        self.register_buffer("key_value", key_value, persistent=False)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    def forward(self, x: torch.Tensor, row_start: int = 0, slot_ids: Optional[torch.Tensor] = None,
                checkpoints: Optional[torch.Tensor] = None, checkpoint_every: int = 0,
                step_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        # checkpoints, checkpoint_every and step_states are the lightning layers' (one signature for both mixers).
        key_value, index, scales = self.key_value, self.index, self.scales
        b = x.shape[0]
        if slot_ids is None and b != key_value.shape[0]:  # a slice of the batch rows (ragged prefill)
            key_value, index = key_value.narrow(0, row_start, b), index.narrow(0, row_start, b)
            if self.quantized:
                scales = scales.narrow(0, row_start, b)
        return self.attend(x, key_value, index, slot_ids, scales)

    def attend(self, x: torch.Tensor, key_value: torch.Tensor, index: torch.Tensor,
               slot_ids: Optional[torch.Tensor] = None, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``forward`` on the given cache tensors (``[B or P, L, H, 2D]``, ``[B or P]`` and, when quantized,
        ``scales [B or P, L, H, 2]``) instead of the buffers."""
        b, n = x.shape[0], x.shape[1]
        q, k, v = _split_qkv(self.qkv(x), self.heads, self.head_dim)
        if self.quantized:
            assert scales is not None, "quantized storage needs its scales"
            # The write quantizes only the new tokens; attention reads the codes directly (no dense copy).
            mask = torch.ops.lightning_cache.concatenate_to_cache(key_value, index, k, v, None, None, None, True,
                                                                  False, self.check_bounds, slot_ids, scales)
            if slot_ids is not None:
                rows = slot_ids.clamp_min(0)  # a skipped row's mask is all false
                key_value, scales = key_value.index_select(0, rows), scales.index_select(0, rows)
            o = torch.ops.lightning_cache.cached_attention(q, key_value, mask, self.head_dim, scales, None)
            return self.out(o.reshape(b, n, self.heads * self.head_dim))
        else:
            mask = torch.ops.lightning_cache.concatenate_to_cache(key_value, index, k, v, None, None, None, True,
                                                                  False, self.check_bounds, slot_ids)
            if slot_ids is not None:  # batch row i is pool row slot_ids[i]; attention reads that row
                key_value = key_value.index_select(0, slot_ids.clamp_min(0))  # a skipped row's mask is all false
            keys = key_value[..., : self.head_dim].transpose(1, 2)
            values = key_value[..., self.head_dim:].transpose(1, 2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    @torch.jit.unused
    def attend_packed(self, x: torch.Tensor, pages: torch.Tensor, batch,
                      page_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``forward`` on packed tokens ``x [1, T, hidden]``, K|V in the page pool ``pages [N, page_size, H, 2D]``
        (int8 / fp8 codes with ``page_scales [N, page_size, H, 2]`` when quantized)."""
        # batch: a PackedBatch, left unannotated (here and below) so that scripting the model does not compile it.
        t = x.shape[1]
        q, k, v = _split_qkv(self.qkv(x), self.heads, self.head_dim)
        if self.paged_ops:
            index = batch.start_positions.clone()  # advanced by the write
            # Quantized: the write quantizes only the new tokens; attention reads the codes (no dense copy).
            ops.write_to_cache(pages, index, k, v, check_bounds=self.check_bounds, scales=page_scales,
                               block_tables=batch.block_tables, cu_seqlens=batch.cu_seqlens)
            o = ops.cached_attention(q, pages, None, self.head_dim, page_scales, block_tables=batch.block_tables,
                                     cu_seqlens=batch.cu_seqlens, cache_seqlens=batch.cache_seqlens,
                                     check_bounds=self.check_bounds)
        else:
            assert page_scales is None, "quantized pages need the paged ops"
            o = self._attend_pages_gathered(q, k, v, pages, batch)
        return self.out(o.reshape(1, t, self.heads * self.head_dim))

    @torch.jit.unused
    def _attend_pages_gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
                               batch) -> torch.Tensor:
        # Without the paged ops: write every token into its page slot, gather each sequence's pages into a
        # contiguous [S, width * page_size] row and attend with a causal-by-position mask (decodes in one call).
        flat = pages.view(-1, pages.shape[2], pages.shape[3])
        flat.index_copy_(0, batch.write_rows, torch.cat([k[0], v[0]], -1).to(pages.dtype))
        s, width = batch.block_tables.shape
        rows = pages.index_select(0, batch.block_tables.reshape(-1).clamp_min(0))
        rows = rows.view(s, width * batch.page_size, pages.shape[2], pages.shape[3])
        columns = torch.arange(rows.shape[1], device=rows.device)
        outputs = []
        nd = batch.num_decodes
        if nd:
            mask = (columns[None, :] < batch.cache_seqlens[:nd, None]).view(nd, 1, 1, -1)
            o = torch.ops.lightning_cache.cached_attention(q[:, :nd].transpose(0, 1), rows[:nd], mask,
                                                           self.head_dim, None, None)
            outputs.append(o.transpose(0, 1))
        start = nd
        for i in range(nd, s):
            n = batch.lengths[i]
            if n == 0:
                continue
            first = int(batch.start_positions[i])  # host copy of a host-built tensor (CPU) or one sync (CUDA)
            positions = torch.arange(first, first + n, device=rows.device)
            mask = (columns[None, :] <= positions[:, None]).view(1, 1, n, -1)
            outputs.append(torch.ops.lightning_cache.cached_attention(q[:, start:start + n], rows[i:i + 1], mask,
                                                                      self.head_dim, None, None))
            start += n
        return torch.cat(outputs, 1)

    def forward_uncached(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        q, k, v = _split_qkv(self.qkv(x), self.heads, self.head_dim)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class LightningAttention(nn.Module):
    """Linear attention with per-head exponential decay over a recurrent state ``[B, H, D, D]``."""

    def __init__(self, config: HybridConfig, layer_index: int, batch_size: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.heads = config.num_heads
        self.head_dim = config.head_dim
        self.block_size = config.block_size
        self.check_bounds = True
        inner = config.num_heads * config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * inner, bias=False, device=device, dtype=dtype)
        self.gate = nn.Linear(config.hidden_size, inner, bias=False, device=device, dtype=dtype)
        self.norm = RMSNorm(inner).to(device=device, dtype=dtype)
        self.out = nn.Linear(inner, config.hidden_size, bias=False, device=device, dtype=dtype)
        self.paged_ops = False  # set by HybridLM.init_pages: one packed lightning_prefill per layer
        self.register_buffer("state", ops.init_state(batch_size, config.num_heads, config.head_dim, config.head_dim,
                                                     device=device), persistent=False)
        self.register_buffer("slopes", ops.lightning_slopes(config.num_heads, layer_index, config.num_layers,
                                                            device=device), persistent=False)

    def _finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        o = self.norm(o.reshape(b, n, self.heads * self.head_dim)) * torch.sigmoid(self.gate(x))
        return self.out(o)

    def forward(self, x: torch.Tensor, row_start: int = 0, slot_ids: Optional[torch.Tensor] = None,
                checkpoints: Optional[torch.Tensor] = None, checkpoint_every: int = 0,
                step_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        state = self.state
        if slot_ids is None and x.shape[0] != state.shape[0]:
            state = state.narrow(0, row_start, x.shape[0])
        return self.recur(x, state, slot_ids, checkpoints, checkpoint_every, step_states)

    def recur(self, x: torch.Tensor, state: torch.Tensor, slot_ids: Optional[torch.Tensor] = None,
              checkpoints: Optional[torch.Tensor] = None, checkpoint_every: int = 0,
              step_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``forward`` on the given state ``[B or P, H, D, D]`` instead of the buffer."""
        n = x.shape[1]
        q, k, v = _split_qkv(F.silu(self.qkv(x)), self.heads, self.head_dim)
        if step_states is not None or (n == 1 and checkpoints is None):
            # Decode (token by token), storing the state after each token if asked (speculative decoding).
            o = torch.ops.lightning_cache.lightning_decode(state, q, k, v, self.slopes, slot_ids, 1.0,
                                                           self.check_bounds, step_states)
        else:
            o = torch.ops.lightning_cache.lightning_prefill(state, q, k, v, self.slopes, None, slot_ids,
                                                           self.block_size, 1.0, self.check_bounds, checkpoints,
                                                           checkpoint_every)
        return self._finish(x, o)

    @torch.jit.unused
    def recur_packed(self, x: torch.Tensor, batch) -> torch.Tensor:
        """``forward`` on packed tokens ``x [1, T, hidden]``: sequence ``s`` runs from state row ``slot_ids[s]``."""
        q, k, v = _split_qkv(F.silu(self.qkv(x)), self.heads, self.head_dim)
        if self.paged_ops:
            checkpoints = None
            if batch.checkpoint_tokens > 0:
                checkpoints = self.state.new_empty((len(batch.lengths), batch.checkpoint_tokens,
                                                    *self.state.shape[1:]))
            o = ops.lightning_prefill(self.state, q, k, v, self.slopes, slot_ids=batch.slot_ids,
                                      block_size=self.block_size, check_bounds=self.check_bounds,
                                      checkpoints=checkpoints, checkpoint_every=1 if checkpoints is not None else 0,
                                      cu_seqlens=batch.cu_seqlens)
            self.checkpoints = checkpoints
            return self._finish(x, o)
        if batch.checkpoint_tokens > 0:
            raise ValueError("recur_packed: per-token checkpoints need the packed lightning_prefill (cu_seqlens=)")
        outputs = []
        nd = batch.num_decodes
        if nd:  # the decodes: one batched call, token s of the packed batch is row s
            o = torch.ops.lightning_cache.lightning_decode(self.state, q[:, :nd].transpose(0, 1),
                                                           k[:, :nd].transpose(0, 1), v[:, :nd].transpose(0, 1),
                                                           self.slopes, batch.slot_ids[:nd], 1.0, self.check_bounds,
                                                           None)
            outputs.append(o.transpose(0, 1))
        start = nd
        for i in range(nd, len(batch.lengths)):
            n = batch.lengths[i]
            if n == 0:
                continue
            chunk = slice(start, start + n)
            outputs.append(torch.ops.lightning_cache.lightning_prefill(
                self.state, q[:, chunk], k[:, chunk], v[:, chunk], self.slopes, None, batch.slot_ids[i:i + 1],
                self.block_size, 1.0, self.check_bounds, None, 0))
            start += n
        return self._finish(x, torch.cat(outputs, 1))

    def forward_uncached(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        q, k, v = _split_qkv(F.silu(self.qkv(x)), self.heads, self.head_dim)
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, n, D]
        # o_j = sum_{i<=j} lam^(j-i) (q_j . k_i) v_i: the recurrence from a zero state, in closed form.
        pos = torch.arange(n, device=x.device, dtype=torch.float32)
        distance = (pos[:, None] - pos[None, :]).clamp_min(0)
        decay = torch.exp(-self.slopes.float()[:, None, None] * distance).tril()
        o = ((q @ k.transpose(-1, -2)) * decay) @ v
        return self._finish(x, o.transpose(1, 2).to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, config: HybridConfig, layer_index: int, kind: str, batch_size: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.kind = kind
        self.input_norm = RMSNorm(config.hidden_size).to(device=device, dtype=dtype)
        self.mixer = (CachedAttention(config, batch_size, dtype, device) if kind == ATTENTION
                      else LightningAttention(config, layer_index, batch_size, dtype, device))
        self.mlp_norm = RMSNorm(config.hidden_size).to(device=device, dtype=dtype)
        self.mlp_in = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False, device=device,
                                dtype=dtype)
        self.mlp_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=False, device=device, dtype=dtype)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.mlp_in(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.mlp_out(F.silu(gate) * up)

    def forward(self, x: torch.Tensor, row_start: int = 0, slot_ids: Optional[torch.Tensor] = None,
                checkpoints: Optional[torch.Tensor] = None, checkpoint_every: int = 0,
                step_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.mixer(self.input_norm(x), row_start, slot_ids, checkpoints, checkpoint_every, step_states)
        return self._mlp(x + h)

    @torch.jit.unused
    def forward_packed(self, x: torch.Tensor, batch, pages: Optional[torch.Tensor],
                       page_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.input_norm(x)
        if self.kind == ATTENTION:
            assert pages is not None
            h = self.mixer.attend_packed(h, pages, batch, page_scales)
        else:
            h = self.mixer.recur_packed(h, batch)
        return self._mlp(x + h)

    def forward_uncached(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp(x + self.mixer.forward_uncached(self.input_norm(x)))


class HybridLM(nn.Module):
    """Decoder-only LM of attention and lightning layers with its caches as buffers.

    ``forward(input_ids [B, n], row_start=0)`` appends ``n`` tokens to the
    cache of every row and returns float32 logits ``[B, n, vocab]``. A batch
    smaller than the cache's selects rows ``row_start ..`` (to prefill prompts
    of different lengths row by row, then decode all rows together, each at its
    own position).

    Serving (``torch_lightning_cache.serve``): with ``slot_ids [B]`` the caches
    are a pool and batch row ``b`` is pool row ``slot_ids[b]`` in every layer.
    ``checkpoints`` (one ``[B, C, H, D, D]`` tensor per lightning layer, in
    layer order) receive those layers' states every ``checkpoint_every`` tokens
    (prefix caching); ``step_states`` (one ``[B, n + 1, H, D, D]`` per lightning
    layer) make the lightning layers decode the ``n`` tokens one by one and keep
    the state after each, for ``lightning_accept`` (speculative decoding).
    """

    def __init__(self, config: HybridConfig, batch_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", seed: int = 0):
        super().__init__()
        device = torch.device(device)
        self.config = config
        self.batch_size = batch_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size, device="cpu", dtype=dtype)
            layers = [DecoderLayer(config, i, kind, batch_size, dtype, torch.device("cpu"))
                      for i, kind in enumerate(config.layer_kinds)]
            self.layers = nn.ModuleList(layers)
            self.final_norm = RMSNorm(config.hidden_size).to(dtype=dtype)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.to(device)  # weights drawn on the CPU, so a seed gives the same model on every device

    def forward(self, input_ids: torch.Tensor, row_start: int = 0, slot_ids: Optional[torch.Tensor] = None,
                checkpoints: Optional[List[torch.Tensor]] = None, checkpoint_every: int = 0,
                step_states: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        x = self.embed(input_ids)
        j = 0  # index of the next lightning layer in checkpoints / step_states
        for layer in self.layers:
            layer_checkpoints: Optional[torch.Tensor] = None
            layer_steps: Optional[torch.Tensor] = None
            if layer.kind != "attention":
                if checkpoints is not None:
                    layer_checkpoints = checkpoints[j]
                if step_states is not None:
                    layer_steps = step_states[j]
                j += 1
            x = layer(x, row_start, slot_ids, layer_checkpoints, checkpoint_every, layer_steps)
        return self.lm_head(self.final_norm(x)).float()

    @torch.jit.unused
    def init_pages(self, num_pages: int, page_size: int) -> list[torch.Tensor]:
        """Gives every attention layer a paged K|V pool ``[num_pages, page_size, H, 2D]`` (zeros) for
        :meth:`forward_packed`, and returns them in layer order. Page ids are the caller's (one block table serves
        every layer). The lightning states stay the ``[batch_size, H, D, D]`` buffers: one row per running request.

        With ``config.kv_quantization`` the pools hold int8 / fp8 codes and :attr:`page_scales` their per-token
        scales ``[num_pages, page_size, H, 2]`` (else it holds None per pool)."""
        device = self.lm_head.weight.device
        paged_ops = PAGED_PACKED_OPS and _paged_packed_ops_run_on(device)
        quantization = self.config.kv_quantization
        if quantization is not None and not paged_ops:
            raise ValueError(f"init_pages: quantized pages (kv_quantization={quantization!r}) need the paged "
                             f"and packed ops, which have no kernels on {device.type}")
        self.pages, self.page_scales = [], []
        for layer in self.layers:
            layer.mixer.paged_ops = paged_ops  # else the same computation on the older ops
            if layer.kind == ATTENTION:
                c = self.config
                pool = ops.init_paged_kv_cache(num_pages, page_size, c.num_heads, c.head_dim, c.head_dim,
                                               dtype=None if quantization else layer.mixer.key_value.dtype,
                                               device=device, kv_quantization=quantization)
                pool, scales = pool if quantization else (pool, None)
                self.pages.append(pool)
                self.page_scales.append(scales)
        self.page_size = page_size
        return self.pages

    @torch.jit.unused
    def forward_packed(self, input_ids: torch.Tensor, batch, all_logits: bool = False) -> torch.Tensor:
        """One engine step over packed tokens ``input_ids [1, T]`` (see :class:`PackedBatch`): appends each
        sequence's tokens to its pages and state row and returns float32 logits ``[S, vocab]`` of each
        sequence's LAST token (a zero-length sequence's row is meaningless), or with ``all_logits`` those of every
        token, ``[T, vocab]``. Needs :meth:`init_pages`."""
        if batch.page_size != self.page_size:
            raise ValueError(f"forward_packed: batch.page_size is {batch.page_size} but the pages hold "
                             f"{self.page_size} tokens")
        x = self.embed(input_ids)
        pools = iter(zip(self.pages, self.page_scales))
        for layer in self.layers:
            x = layer.forward_packed(x, batch, *(next(pools) if layer.kind == ATTENTION else (None, None)))
        if all_logits:
            return self.lm_head(self.final_norm(x[0])).float()
        last = (batch.cu_seqlens[1:] - 1).clamp_min(0)
        return self.lm_head(self.final_norm(x[0].index_select(0, last))).float()

    @torch.jit.unused
    def forward_with_caches(self, input_ids: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        """``forward`` on caller-owned caches, ordered as :meth:`cache_buffers` orders them (for each attention
        layer ``key_value`` then ``index``, for each lightning layer its state), updated in place.

        The form ``torch.export`` / AOTInductor compile: the caches are inputs, so a program keeps them alive
        across calls (and several compiled programs, prefill and decode, can share them).
        """
        x = self.embed(input_ids)
        i = 0
        for layer in self.layers:
            h = layer.input_norm(x)
            if layer.kind == ATTENTION:
                h = layer.mixer.attend(h, caches[i], caches[i + 1], None, caches[i + 2])
                i += 3
            else:
                h = layer.mixer.recur(h, caches[i])
                i += 1
            x = layer._mlp(x + h)
        return self.lm_head(self.final_norm(x)).float()

    @torch.jit.unused
    def forward_uncached(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the whole sequence recomputed from scratch, without caches or custom ops."""
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer.forward_uncached(x)
        return self.lm_head(self.final_norm(x)).float()

    @staticmethod
    def _layer_cache(layer: DecoderLayer) -> list[torch.Tensor]:
        mixer = layer.mixer
        return [mixer.key_value, mixer.index, mixer.scales] if layer.kind == ATTENTION else [mixer.state]

    @torch.jit.unused
    def cache_buffers(self) -> list[torch.Tensor]:
        """Every cache tensor (K|V buffers, positions, states), in layer order."""
        return [t for layer in self.layers for t in self._layer_cache(layer)]

    @torch.jit.unused
    def reset_cache(self) -> None:
        for buffer in self.cache_buffers():
            buffer.zero_()

    @torch.jit.unused
    def set_check_bounds(self, enabled: bool) -> None:
        """Host-side position/slot checks of the ops (a device sync on CUDA; off for captured graphs)."""
        for layer in self.layers:
            layer.mixer.check_bounds = enabled

    @torch.jit.unused
    def mark_static_cache(self) -> None:
        """Tells the compiler the cache buffers keep their addresses, so CUDA graphs can capture their updates."""
        for buffer in self.cache_buffers():
            torch._dynamo.mark_static_address(buffer)

    @torch.jit.unused
    def cache_bytes(self) -> dict[str, int]:
        """Cache memory per layer, by layer kind."""
        return {layer.kind: sum(t.numel() * t.element_size() for t in self._layer_cache(layer))
                for layer in self.layers}
