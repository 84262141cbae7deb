"""Pure-PyTorch versions of the operators: what a user writes without this package.

They follow the same semantics as ``torch.ops.lightning_cache.*`` (SPEC sections
2 and 3, the mask rule in ``csrc/mask_rule.h``) and serve as the benchmark's
peers and as reference implementations in the tests. Each one

- is vectorized over rows and heads (the only Python loops are over the ``n``
  tokens of a decode call and over the blocks of a chunked prefill),
- does no host synchronization (positions, slot ids and masks stay device
  tensors), so it runs eagerly and under ``torch.compile(fullgraph=True)``
  without graph breaks,
- mutates its cache/state arguments in place, like the op.

What they leave out, on purpose:

- ``concatenate_to_cache_eager`` has no capacity check. Without ``ring`` a row
  whose ``index + q`` exceeds the capacity makes ``index_put_`` fail (an index
  error on the CPU, a device-side assert on CUDA) or, under compilation, is
  whatever the generated indexing does; the op instead rejects it before
  writing (``check_bounds=True``) or skips the row (``check_bounds=False``).
  With an explicit ``causal_mask``, positions past its size ``T`` read as
  "not visible" (the op raises in eager mode).
- ``lightning_decode_eager`` and ``lightning_prefill_chunked_eager`` do not
  validate shapes, dtypes or slot ids beyond what PyTorch itself checks.
"""

from __future__ import annotations

import torch

__all__ = ["concatenate_to_cache_eager", "write_to_cache_eager", "lightning_decode_eager",
           "lightning_prefill_chunked_eager", "dequantize_kv_eager", "cached_attention_eager"]


# --------------------------------------------------------------------------- sequence cache


def _column_positions(end: torch.Tensor, capacity: int, ring: bool) -> torch.Tensor:
    """Absolute position held by each cache column once ``[0, end)`` is written, -1 if empty.

    ``end`` is ``[B, 1, 1, 1]``; the result is ``[B, 1, 1, L]``.
    """
    j = torch.arange(capacity, device=end.device)
    filled = j < end
    if not ring:
        return torch.where(filled, j, -1)
    # Newest a < end with a % L == j; only read where j < end, so the operand is non-negative.
    return torch.where(filled, j + torch.div(end - 1 - j, capacity, rounding_mode="floor") * capacity, -1)


def concatenate_to_cache_eager(key_value: torch.Tensor, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None = None, causal_mask: torch.Tensor | None = None,
                               token_type_ids: torch.Tensor | None = None, is_causal: bool = False,
                               ring: bool = False) -> torch.Tensor:
    """Writes ``key``/``value`` ``[B, q, H, D*]`` into ``key_value [B, L, H, Dk + Dv]`` at ``index`` and advances it.

    Returns the ``[B, 1, q, L]`` boolean mask, bit-for-bit what
    ``torch.ops.lightning_cache.concatenate_to_cache`` returns for in-range
    positions. No capacity check (see the module docstring).
    """
    batch, capacity = key_value.shape[0], key_value.shape[1]
    new_tokens = key.shape[1]
    device = key_value.device

    # Scatter indices: row b, token t goes to column index[b] + t (mod L with a ring).
    positions = index.unsqueeze(1) + torch.arange(new_tokens, device=device)  # [B, q], before the increment
    columns = positions % capacity if ring else positions
    rows = torch.arange(batch, device=device).unsqueeze(1).expand(batch, new_tokens)
    # Cast through the cache dtype exactly as the op does; k and v land side by side in one row.
    key_value.index_put_((rows, columns), torch.cat([key, value], dim=-1).to(key_value.dtype))

    # The mask rule of csrc/mask_rule.h, broadcast over [B, 1, q, L].
    start = index.view(batch, 1, 1, 1)
    position = positions.view(batch, 1, new_tokens, 1)
    held = _column_positions(start + new_tokens, capacity, ring)  # [B, 1, 1, L]
    mask = held >= 0
    if attention_mask is not None:
        allowed = attention_mask != 0
        mask = mask & (allowed.view(batch, 1, 1, capacity) if attention_mask.dim() == 2 else allowed)

    visible = None
    if is_causal:
        visible = held <= position
    elif causal_mask is not None:
        causal = causal_mask.reshape(causal_mask.shape[-2], causal_mask.shape[-1])
        horizon = causal.shape[0]
        entry = causal[position.clamp(max=horizon - 1), held.clamp(0, horizon - 1)] != 0
        visible = (position < horizon) & (held < horizon) & entry
    if visible is not None and token_type_ids is not None and new_tokens > 1:
        # Query i also sees new token i' = held - start when both share a non-zero type.
        relative = (held - start).clamp(0, new_tokens - 1).view(batch, capacity)
        type_i = token_type_ids.view(batch, 1, new_tokens, 1)
        type_j = torch.gather(token_type_ids, 1, relative).view(batch, 1, 1, capacity)
        visible = visible | ((held >= start) & (type_i != 0) & (type_i == type_j))
    if visible is not None:
        mask = mask & visible

    index.add_(new_tokens)
    return mask.expand(batch, 1, new_tokens, capacity).contiguous()


def write_to_cache_eager(key_value: torch.Tensor, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         ring: bool = False) -> None:
    """``concatenate_to_cache_eager`` without the mask: the K/V scatter and the index advance."""
    batch, capacity, new_tokens = key_value.shape[0], key_value.shape[1], key.shape[1]
    positions = index.unsqueeze(1) + torch.arange(new_tokens, device=key_value.device)
    columns = positions % capacity if ring else positions
    rows = torch.arange(batch, device=key_value.device).unsqueeze(1).expand(batch, new_tokens)
    key_value.index_put_((rows, columns), torch.cat([key, value], dim=-1).to(key_value.dtype))
    index.add_(new_tokens)


def write_to_cache_paged_eager(pages: torch.Tensor, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               block_tables: torch.Tensor) -> None:
    """``write_to_cache(block_tables=)`` of in-range rows: position ``p`` of row ``b`` goes to page
    ``block_tables[b, p // page_size]``, slot ``p % page_size``; the index advances."""
    batch, new_tokens, page_size = key.shape[0], key.shape[1], pages.shape[1]
    positions = index.unsqueeze(1) + torch.arange(new_tokens, device=pages.device)  # [B, q]
    cells = block_tables.gather(1, positions // page_size) * page_size + positions % page_size
    rows = torch.cat([key, value], dim=-1).to(pages.dtype).reshape(batch * new_tokens, *pages.shape[2:])
    pages.view(-1, *pages.shape[2:]).index_copy_(0, cells.reshape(-1), rows)
    index.add_(new_tokens)


# --------------------------------------------------------------------------- lightning recurrent state


def lightning_decode_eager(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           slopes: torch.Tensor, slot_ids: torch.Tensor | None = None,
                           scale: float = 1.0) -> torch.Tensor:
    """For each of the ``n`` tokens in order: ``S = exp(-slope) S + k^T v``, then ``o = scale * q S``.

    ``state [S, H, Dk, Dv]`` (float32 or bfloat16) is updated in place; inputs
    ``[B, n, H, D]``; output ``[B, n, H, Dv]`` in the inputs' dtype. With
    ``slot_ids [B]`` row ``b`` uses ``state[slot_ids[b]]``; ``-1`` (or any id
    outside ``[0, S)``) skips the row: state untouched, output zeros, as the op.
    """
    batch, tokens, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    decay = torch.exp(-slopes.float()).view(1, heads, 1, 1)

    valid = None
    if slot_ids is None:
        # A float32 state is updated in place; a bfloat16 one through a float32 copy.
        s = state if state.dtype == torch.float32 else state.float()
    else:
        valid = (slot_ids >= 0) & (slot_ids < state.shape[0])
        slots = torch.where(valid, slot_ids, 0)
        s = state.index_select(0, slots).float()
    flat = s.view(batch * heads, key_dim, value_dim)

    outputs = []
    for t in range(tokens):
        s.mul_(decay)
        flat.baddbmm_(k[:, t].reshape(batch * heads, key_dim, 1).float(),
                      v[:, t].reshape(batch * heads, 1, value_dim).float())
        o = torch.matmul(q[:, t].float().unsqueeze(-2), s).squeeze(-2)  # [B, H, Dv]
        outputs.append(o * scale)
    out = torch.stack(outputs, dim=1)

    if valid is None:
        if s is not state:
            state.copy_(s)
        return out.to(q.dtype)

    # Write rows back without a data-dependent shape: skipped rows are sent to
    # slot 0 carrying exactly the value slot 0 ends with, so duplicate targets
    # of index_copy_ all write the same bits and the result is deterministic.
    new_rows = s.to(state.dtype)
    writes_zero = (valid & (slots == 0)).view(batch, 1, 1, 1)  # at most one row (slots are unique)
    final_zero = torch.where(writes_zero.any(), torch.where(writes_zero, new_rows, 0).sum(0, dtype=state.dtype),
                             state[0])
    state.index_copy_(0, slots, torch.where(valid.view(batch, 1, 1, 1), new_rows, final_zero))
    return torch.where(valid.view(batch, 1, 1, 1), out, 0).to(q.dtype)


def lightning_prefill_chunked_eager(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    slopes: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                    block_size: int = 256, scale: float = 1.0) -> torch.Tensor:
    """Chunked linear attention: ``n`` tokens from the current state, same result as ``n`` decode steps.

    Within a block of ``c`` tokens (``lam = exp(-slope)``, block-relative ``i, j``):
    ``o_j = sum_{i<=j} lam^(j-i) (q_j . k_i) v_i + lam^(j+1) q_j S`` and
    ``S <- lam^c S + sum_i lam^(c-1-i) k_i^T v_i``. A masked token (2-D
    ``attention_mask`` 0) is skipped whole (no decay, no ``k^T v``, output 0):
    distances then count unmasked tokens only, so the decays become per row.
    Accumulates in float32; ``state [B, H, Dk, Dv]`` is updated in place.
    """
    batch, tokens, heads, _ = q.shape
    qf = q.transpose(1, 2).float()  # [B, H, n, D]
    kf = k.transpose(1, 2).float()
    vf = v.transpose(1, 2).float()
    keep = None
    if attention_mask is not None:
        keep = (attention_mask != 0).view(batch, 1, tokens, 1)
        qf, kf, vf = (torch.where(keep, x, 0.0) for x in (qf, kf, vf))
        count = keep.view(batch, tokens).long().cumsum(1)  # unmasked tokens among 0..t

    block = min(block_size, tokens)
    s = slopes.float().view(heads, 1)
    pos = torch.arange(block, device=q.device, dtype=torch.float32)
    distance = (pos.view(block, 1) - pos.view(1, block)).clamp_min(0)
    intra_decay = torch.exp(-s.view(heads, 1, 1) * distance).tril()  # [H, c, c]
    query_decay = torch.exp(-s * (pos + 1)).unsqueeze(-1)  # [H, c, 1]
    key_decay = torch.exp(-s * (block - 1 - pos)).unsqueeze(-1)  # [H, c, 1]
    causal = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()

    # A fresh buffer, not an alias of the input: torch 2.11's Inductor (CPU) otherwise runs the
    # state.copy_ below before the first block's read of the input state.
    rows = state.float() * 1.0
    outputs = []
    for begin in range(0, tokens, block):
        c = min(block, tokens - begin)
        qb, kb, vb = qf[:, :, begin:begin + c], kf[:, :, begin:begin + c], vf[:, :, begin:begin + c]
        if keep is None:
            intra, qd, kd = intra_decay[:, :c, :c], query_decay[:, :c], key_decay[:, block - c:]
            sd = torch.exp(-s * c).view(heads, 1, 1)
        else:  # e: block-local count of unmasked tokens [B, 1, c, 1]; E = e[c-1]
            e = count[:, begin:begin + c] - (count[:, begin - 1:begin] if begin else 0)
            e = e.float().view(batch, 1, c, 1)
            sh, total = s.view(1, heads, 1, 1), e[:, :, -1:]
            intra = torch.where(causal[:c, :c], torch.exp(-sh * (e - e.transpose(-1, -2)).clamp_min(0)), 0.0)
            qd, kd, sd = torch.exp(-sh * e), torch.exp(-sh * (total - e)), torch.exp(-sh * total)
        scores = torch.matmul(qb, kb.transpose(-1, -2)) * intra
        outputs.append(torch.matmul(scores, vb) + torch.matmul(qb * qd, rows))
        # A partial last block uses the tail of the key decays: lam^(c-1-i).
        rows = rows * sd + torch.matmul((kb * kd).transpose(-1, -2), vb)
    state.copy_(rows)
    out = torch.cat(outputs, dim=2)
    if keep is not None:
        out = torch.where(keep, out, 0.0)
    if scale != 1.0:
        out = out * scale
    return out.transpose(1, 2).to(q.dtype)


# --------------------------------------------------------------------------- attention over the cache


def dequantize_kv_eager(key_value: torch.Tensor, scales: torch.Tensor, key_dim: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``key [B, L, H, Dk]`` and ``value [B, L, H, Dv]`` in ``dtype`` of an int8 / fp8 cache:
    ``code * scale`` with ``scales [B, L, H, 2]`` (``[..., 0]`` keys, ``[..., 1]`` values)."""
    key = (key_value[..., :key_dim].to(torch.float32) * scales[..., 0:1]).to(dtype)
    value = (key_value[..., key_dim:].to(torch.float32) * scales[..., 1:2]).to(dtype)
    return key, value


def cached_attention_eager(query: torch.Tensor, key_value: torch.Tensor, mask: torch.Tensor, key_dim: int,
                           scales: torch.Tensor | None = None, softmax_scale: float | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` over the cache's views (a float cache) or over a dequantized
    copy in the query's dtype (int8 / fp8 with ``scales``), ``enable_gqa=True``; ``[B, q, Hq, Dv]``.

    Unlike ``cached_attention``, a query whose mask row is all false is not zeroed
    (what SDPA gives there depends on the backend).
    """
    if scales is None:
        key, value = key_value[..., :key_dim], key_value[..., key_dim:]
    else:
        key, value = dequantize_kv_eager(key_value, scales, key_dim, query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=softmax_scale,
        enable_gqa=True)
    return out.transpose(1, 2)
