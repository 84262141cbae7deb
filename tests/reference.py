"""Pure-PyTorch reference implementations (the test oracle).

Everything here is written for obviousness, not speed: explicit Python loops
over rows, tokens and cache columns, straight from the wording of
``/work/shared/SPEC.md`` (sections 2 and 3) and of the seed
(``/work/shared/seed/easydel_lightning_cache.txt``). Nothing here calls the
package under test, and no function mutates its inputs.

* ``ref_concatenate_to_cache``   - SPEC section 2, per-row positions, ring mode.
* ``seed_concatenate_to_cache``  - literal transcription of the seed's JAX code
  (``index[0]`` for every row, ``dynamic_slice`` of the causal mask, the
  token-type logic on absolute columns, the pad mask).
* ``ref_lightning``              - float64 sequential lightning recurrence.
* ``ref_lightning_slopes``       - MiniMax slopes (SPEC section 3), float64.
* ``ref_cached_attention``       - SPEC section 8: SDPA over the dequantized cache, float64.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "held_position",
    "ref_concatenate_to_cache",
    "ref_write_to_cache",
    "ref_pool_rows",
    "seed_concatenate_to_cache",
    "ref_lightning",
    "ref_lightning_slopes",
    "ref_cached_attention",
]


# --------------------------------------------------------------------------- sequence cache


def held_position(j: int, end: int, capacity: int, ring: bool) -> int | None:
    """Absolute position of the token cache column ``j`` holds once positions ``[0, end)`` are written.

    Without a ring column ``j`` holds position ``j`` (if written). With a ring it
    holds the newest position ``a < end`` with ``a % capacity == j``. ``None``
    means the column is still empty.
    """
    if not ring:
        return j if j < end else None
    candidates = [a for a in range(max(0, end - capacity), end) if a % capacity == j]
    return max(candidates) if candidates else None


INT64_MAX = 2**63 - 1


def row_writable(start: int, q: int, capacity: int, ring: bool, T: int | None = None) -> bool:
    """SPEC 6: a row is written iff every position ``start .. start + q - 1`` is valid:
    ``start >= 0``, ``start + q`` fits the cache (unless ring), the explicit causal
    mask's ``T`` and int64 (Python ints do not overflow, so this is the plain rule)."""
    end = start + q
    return start >= 0 and end <= INT64_MAX and (ring or end <= capacity) and (T is None or end <= T)


def ref_pool_rows(slot_ids, batch: int, pool: int, check_bounds: bool) -> list[int | None]:
    """SPEC 6/7: the pool row each batch row writes, or ``None`` (skipped).

    Without ``slot_ids`` row ``b`` is pool row ``b``. ``-1`` skips. An id outside
    ``[-1, pool)`` or one an earlier batch row already took raises ``IndexError``
    with ``check_bounds``, else that batch row is skipped (first occurrence wins).
    """
    if slot_ids is None:
        return list(range(batch))
    rows, seen = [], set()
    for b, s in enumerate(int(x) for x in slot_ids.cpu()):
        bad = not -1 <= s < pool or (s >= 0 and s in seen)
        if bad and check_bounds:
            raise IndexError(f"slot_ids[{b}] = {s} is out of range or repeated")
        rows.append(None if bad or s == -1 else s)
        if s >= 0:
            seen.add(s)
    return rows


def ref_write_to_cache(key_value, index, key, value, ring=False, check_bounds=True, slot_ids=None):
    """``write_to_cache``: the K/V part of :func:`ref_concatenate_to_cache` (no mask).

    Returns ``(new_key_value, new_index)``.
    """
    new_kv, new_index, _ = ref_concatenate_to_cache(key_value, index, key, value, ring=ring,
                                                    check_bounds=check_bounds, slot_ids=slot_ids)
    return new_kv, new_index


def _nonzero(x: torch.Tensor) -> bool:
    return bool((x != 0).item())


def ref_concatenate_to_cache(key_value, index, key, value, attention_mask=None, causal_mask=None,
                             token_type_ids=None, is_causal=False, ring=False, check_bounds=True, slot_ids=None):
    """SPEC section 2 on a unified cache ``key_value [B, L, H, Dk + Dv]``.

    Returns ``(new_key_value, new_index, mask)`` with ``mask [B, 1, q, L]`` bool.
    For row ``b``, query ``i`` (absolute position ``p = index[b] + i``) and
    column ``j`` holding absolute position ``held``:

        mask = held is not None AND attn(b, i, j) AND (causal(p, held) OR same_type(i, held))

    With ``check_bounds=True`` invalid positions raise (as eager mode must);
    with ``check_bounds=False`` they follow the documented fallback: a row
    that cannot be written whole is skipped whole (nothing written, index
    kept, mask row all false). A row can be written when its position is
    ``>= 0``, ``index + q`` fits the cache (unless ring), the explicit causal
    mask (``index + q <= T``) and int64.

    ``slot_ids [B]`` (SPEC 7): ``key_value [P, L, ...]`` / ``index [P]`` are a pool;
    batch row ``b`` writes pool row ``slot_ids[b]`` (:func:`ref_pool_rows`), its
    mask row ``b`` follows that row's position; masks and token types are read at
    batch row ``b``. Every check runs before any write.
    """
    P, L, H, W = key_value.shape
    B = key.shape[0]
    q = key.shape[1]
    Dk = key.shape[3]
    assert Dk + value.shape[3] == W
    new_kv = key_value.clone()
    new_index = index.clone()
    mask = torch.zeros(B, 1, q, L, dtype=torch.bool)

    causal = None
    if causal_mask is not None:
        causal = causal_mask[0, 0] if causal_mask.dim() == 4 else causal_mask
        causal = causal.cpu()
    T = causal.shape[0] if causal is not None else None
    attn = attention_mask.cpu() if attention_mask is not None else None
    types = token_type_ids.cpu() if token_type_ids is not None else None
    use_types = types is not None and q > 1 and (is_causal or causal is not None)
    key_c = key.cpu()
    value_c = value.cpu()

    rows = ref_pool_rows(slot_ids, B, P, check_bounds)
    if check_bounds:  # every row is checked before anything is written
        for b, r in enumerate(rows):
            if r is not None and not row_writable(int(index[r]), q, L, ring, T):
                raise IndexError(f"row {r} cannot be written at position {int(index[r])}")
    for b, r in enumerate(rows):
        if r is None:
            continue  # slot -1 or a bad/repeated id with checks off: mask row stays all false
        start = int(index[r])
        end = start + q
        if not row_writable(start, q, L, ring, T):
            continue  # row skipped whole: mask row stays all false, index kept

        # The write: new token t goes to column (start + t) (mod L with a ring).
        for t in range(q):
            column = (start + t) % L if ring else start + t
            new_kv[r, column, :, :Dk] = key_c[b, t].to(key_value.dtype)
            new_kv[r, column, :, Dk:] = value_c[b, t].to(key_value.dtype)
        new_index[r] = end

        # The mask.
        for i in range(q):
            p = start + i
            for j in range(L):
                held = held_position(j, end, L, ring)
                if held is None:
                    continue
                if attn is not None:
                    allowed = _nonzero(attn[b, j]) if attn.dim() == 2 else _nonzero(attn[b, 0, i, j])
                    if not allowed:
                        continue
                if is_causal:
                    visible = held <= p
                elif causal is not None:
                    # Outside the [T, T] mask (only reachable with check_bounds=False) reads as false.
                    visible = p < T and held < T and _nonzero(causal[p, held])
                else:
                    visible = True  # the seed applies no causal term without a causal mask
                if not visible and use_types and held >= start:
                    type_i = int(types[b, i])
                    type_j = int(types[b, held - start])  # new token held - start, relative to the block
                    visible = type_i != 0 and type_i == type_j
                mask[b, 0, i, j] = visible
    return new_kv, new_index, mask.to(key_value.device)


def seed_concatenate_to_cache(key_cache, value_cache, index, key, value, attention_mask,
                              causal_mask=None, token_type_ids=None):
    """Line-by-line PyTorch transcription of the seed's JAX ``concatenate_to_cache``.

    Works on separate caches ``key_cache [B, L, H, Dk]`` / ``value_cache [B, L, H, Dv]``
    (what the seed's ``self.key`` / ``self.value`` would have been) and returns
    ``(new_key_cache, new_value_cache, mask, new_index)``. As in the seed:
    ``end_index = index[0]`` for every row; ``jax.lax.dynamic_slice`` and
    ``dynamic_update_slice`` clamp their start so the slice fits; the token-type
    mask compares absolute columns ``0..q-1``; without a causal mask there is
    no causal term; the quantizer is the identity.
    """
    num_updated_cache_vectors = key.shape[1]  # query.shape[1]
    end_index = int(index[0])
    *batch_dims, max_length, _num_heads, _depth_per_head = value_cache.shape
    attention_mask = attention_mask != 0  # jnp.logical_and treats nonzero as True
    if attention_mask.dim() == 2:
        attention_mask = attention_mask[:, None, None, :]  # jnp.expand_dims(axis=(-3, -2))

    if token_type_ids is not None and num_updated_cache_vectors != 1 and causal_mask is None:
        raise ValueError("the seed's token-type branch indexes causal_mask, which must be given")
    if causal_mask is not None:
        causal_mask = causal_mask != 0
        # jax.lax.dynamic_slice(causal_mask, (0, 0, end_index, 0), (1, 1, q, max_length)), start clamped.
        row0 = min(max(end_index, 0), causal_mask.shape[2] - num_updated_cache_vectors)
        causal_mask = causal_mask[0:1, 0:1, row0:row0 + num_updated_cache_vectors, 0:max_length]
        if token_type_ids is not None and num_updated_cache_vectors != 1:
            token_type_mask = token_type_ids.unsqueeze(2) == token_type_ids.unsqueeze(1)
            token_type_mask = torch.where(token_type_ids == 0, False, token_type_mask)
            token_type_mask = token_type_mask.unsqueeze(1)
            sequence_length = token_type_ids.shape[1]
            masked_portion = torch.logical_or(
                token_type_mask[:, :, :num_updated_cache_vectors, :],
                causal_mask[:, :, :, :sequence_length],
            )
            causal_mask = causal_mask.clone()
            causal_mask[:, :, :, :sequence_length] = masked_portion  # .at[...].set(...)
        causal_mask = causal_mask.expand(key.shape[0], *causal_mask.shape[1:])
        attention_mask = attention_mask.expand(causal_mask.shape)
        attention_mask = torch.logical_and(attention_mask, causal_mask)

    # jax.lax.dynamic_update_slice(cache, new, (0, end_index % L, 0, 0)), start clamped.
    column0 = min(max(end_index % value_cache.shape[1], 0), value_cache.shape[1] - num_updated_cache_vectors)
    new_value_cache = value_cache.clone()
    new_value_cache[:, column0:column0 + num_updated_cache_vectors] = value.to(value_cache.dtype)
    new_key_cache = key_cache.clone()
    new_key_cache[:, column0:column0 + num_updated_cache_vectors] = key.to(key_cache.dtype)

    pad_mask = (torch.arange(max_length, device=key_cache.device) < end_index + num_updated_cache_vectors).expand(
        *batch_dims, 1, num_updated_cache_vectors, max_length)
    attention_mask = torch.logical_and(pad_mask, attention_mask)
    new_index = index + num_updated_cache_vectors
    return new_key_cache, new_value_cache, attention_mask, new_index


# --------------------------------------------------------------------------- lightning recurrence


def ref_lightning(state, q, k, v, slopes, attention_mask=None, slot_ids=None, scale=1.0):
    """Sequential lightning recurrence in float64.

    ``state [slots, H, Dk, Dv]``; ``q, k [B, n, H, Dk]``; ``v [B, n, H, Dv]``;
    ``slopes [H]``. Batch row ``b`` uses state row ``slot_ids[b]`` (or ``b``);
    a slot outside ``[0, slots)`` (``-1``), or one an earlier batch row already
    took (first occurrence wins), skips the row: state untouched, output zero.
    For each token in order, per head with ``lam = exp(-slope)``:

        S = lam * S + k^T v,  o = scale * q S      (attention_mask != 0 or no mask)
        S unchanged,          o = 0                (attention_mask == 0: skipped whole)

    Returns ``(new_state, output)``, both float64 (``output [B, n, H, Dv]``).
    """
    S = state.detach().cpu().to(torch.float64).clone()
    qd = q.detach().cpu().to(torch.float64)
    kd = k.detach().cpu().to(torch.float64)
    vd = v.detach().cpu().to(torch.float64)
    lam = torch.exp(-slopes.detach().cpu().to(torch.float64))
    B, n, H, _ = qd.shape
    slots = S.shape[0]
    out = torch.zeros(B, n, H, vd.shape[3], dtype=torch.float64)
    taken = set()
    for b in range(B):
        row = int(slot_ids[b]) if slot_ids is not None else b
        if not 0 <= row < slots or row in taken:
            continue
        taken.add(row)
        for t in range(n):
            if attention_mask is not None and not bool(attention_mask[b, t] != 0):
                continue  # a masked token is skipped whole: no decay, no k^T v, output 0
            # All heads at once: S[h] = lam[h] S[h] + outer(k[h], v[h]); o[h] = scale * q[h] S[h].
            S[row] = lam.view(H, 1, 1) * S[row] + kd[b, t].unsqueeze(-1) * vd[b, t].unsqueeze(-2)
            out[b, t] = scale * (qd[b, t].unsqueeze(-1) * S[row]).sum(dim=-2)
    return S, out


def ref_lightning_slopes(num_heads: int, layer_index: int = 0, num_layers: int = 1) -> torch.Tensor:
    """``s_h = base^(h+1) * (1 - l/(N-1+1e-5) + 1e-5)``, ``base = 2^(-8/H)``, float64 ``[H]``."""
    base = 2.0 ** (-8.0 / num_heads)
    factor = 1.0 - layer_index / (num_layers - 1 + 1e-5) + 1e-5
    return torch.tensor([math.pow(base, h + 1) * factor for h in range(num_heads)], dtype=torch.float64)


def _first_valid_rows(slot_ids, batch, pool, ok):
    """Batch row -> pool row for the serving ops: ``slot_ids[b]`` (or ``b``) when it is in
    ``[0, pool)``, ``ok(b)`` holds and no earlier kept row took it (first occurrence wins)."""
    rows, taken = {}, set()
    for b in range(batch):
        row = int(slot_ids[b]) if slot_ids is not None else b
        if 0 <= row < pool and row not in taken and ok(b):
            taken.add(row)
            rows[b] = row
    return rows


def ref_rewind_cache(index, num_tokens, slot_ids=None):
    """Pool row ``slot_ids[b]`` (or ``b``) moves back by ``num_tokens[b]``, never below 0.

    Rows with a bad slot, a repeated slot or a negative count are skipped; a negative
    position is left as it is. Returns the new ``index`` (int64, CPU)."""
    out = index.detach().cpu().clone()
    n = num_tokens.detach().cpu()
    for b, row in _first_valid_rows(slot_ids, n.shape[0], out.shape[0], lambda b: int(n[b]) >= 0).items():
        if int(out[row]) >= 0:
            out[row] = max(int(out[row]) - int(n[b]), 0)
    return out


def ref_lightning_accept(state, step_states, num_accepted, slot_ids=None):
    """State row ``slot_ids[b]`` (or ``b``) becomes ``step_states[b, num_accepted[b]]``.

    Rows with a bad slot, a repeated slot or a count outside ``[0, n]`` keep their state."""
    out = state.detach().cpu().clone()
    steps = step_states.shape[1]
    n = num_accepted.detach().cpu()
    for b, row in _first_valid_rows(slot_ids, n.shape[0], out.shape[0], lambda b: 0 <= int(n[b]) < steps).items():
        out[row] = step_states[b, int(n[b])].detach().cpu()
    return out


def ref_lightning_checkpoints(state, q, k, v, slopes, checkpoint_every, num_checkpoints, attention_mask=None,
                              slot_ids=None, scale=1.0):
    """The checkpoints ``lightning_prefill(..., checkpoints, checkpoint_every)`` writes, in float64.

    Returns ``{(b, c): S [H, Dk, Dv]}``: for every batch row ``b`` that is not skipped (same rule
    as :func:`ref_lightning`) and every ``c < num_checkpoints`` with ``(c + 1) * checkpoint_every <= n``,
    the state of row ``b`` after the first ``(c + 1) * checkpoint_every`` tokens of the call,
    masked ones counted (they leave the state as it is). Entries not in the dict are not written.
    """
    n = q.shape[1]
    rows = _first_valid_rows(slot_ids, q.shape[0], state.shape[0], lambda b: True)
    out = {}
    for c in range(num_checkpoints):
        end = (c + 1) * checkpoint_every
        if end > n:
            break
        mask = attention_mask[:, :end] if attention_mask is not None else None
        S, _ = ref_lightning(state, q[:, :end], k[:, :end], v[:, :end], slopes, mask, slot_ids, scale)
        for b, row in rows.items():
            out[(b, c)] = S[row]
    return out


# --------------------------------------------------------------------------- quantized storage (SPEC 8)

KV_CODE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
KV_CODE_MAX = {"int8": 127.0, "fp8_e4m3": 448.0}


def _largest_finite_scale(code_max: float) -> float:
    """The largest float32 ``s`` whose float32 product with ``code_max`` is finite."""
    top = torch.tensor(torch.finfo(torch.float32).max, dtype=torch.float32)
    s = top / code_max
    while torch.isinf(s * code_max):
        s = torch.nextafter(s, torch.zeros_like(s))
    while torch.isfinite(torch.nextafter(s, top) * code_max):
        s = torch.nextafter(s, top)
    return s.item()


# Scales are capped there, so a finite input never dequantizes to +-inf (float32's top ulps only).
KV_MAX_SCALE = {fmt: _largest_finite_scale(code_max) for fmt, code_max in KV_CODE_MAX.items()}


def ref_quantize_kv_tokens(x: torch.Tensor, kv_quantization: str):
    """Quantizes each vector along the last dim of ``x``: returns ``(codes, scales)``, ``scales`` float32
    of shape ``x.shape[:-1]``; an element means ``code * scale``.

    ``scale = amax / 127`` (int8, codes rounded to nearest even, in [-127, 127]) or ``amax / 448``
    (fp8 e4m3, codes = e4m3(x / scale) after clamping to +-448), the scale capped at
    :data:`KV_MAX_SCALE` so that ``code * scale`` stays finite. All-zero vector: scale 0, codes 0.
    A non-finite element: scale NaN, codes 0 (the vector dequantizes to NaN, nothing else does).
    """
    x = x.detach().cpu().float()
    finite = torch.isfinite(x).all(-1, keepdim=True)
    amax = torch.where(finite, x.abs().amax(-1, keepdim=True) if x.shape[-1] else torch.zeros_like(x[..., :1]),
                       torch.full_like(x[..., :1], math.inf))
    scale = amax / torch.full_like(amax, KV_CODE_MAX[kv_quantization])  # a tensor divisor: IEEE division
    scale = scale.clamp_max(KV_MAX_SCALE[kv_quantization])
    scale = torch.where(torch.isinf(amax), torch.full_like(scale, math.nan), scale)
    usable = (scale > 0) & (scale <= torch.finfo(torch.float32).max)
    y = x / torch.where(usable, scale, torch.ones_like(scale))
    if kv_quantization == "int8":
        codes = torch.where(usable, y.round().clamp(-127, 127), torch.zeros_like(y)).to(torch.int8)
    else:
        codes = torch.where(usable, y.clamp(-448, 448), torch.zeros_like(y)).to(torch.float8_e4m3fn)
    return codes, scale.squeeze(-1)


def ref_dequantize_kv(key_value: torch.Tensor, scales: torch.Tensor, key_dim: int, dtype=torch.float32):
    """``(key, value)``: ``code * scale`` in float32, cast to ``dtype``."""
    codes = key_value.cpu().float()
    s = scales.cpu()
    key = (codes[..., :key_dim] * s[..., 0:1]).to(dtype)
    value = (codes[..., key_dim:] * s[..., 1:2]).to(dtype)
    return key, value


def ref_quantized_write(key_value, scales, index, key, value, kv_quantization, ring=False, check_bounds=True,
                        slot_ids=None, causal_limit=None):
    """The K/V write of ``concatenate_to_cache`` into quantized storage: returns ``(codes, scales, index)``.

    Rows, positions and skips as :func:`ref_concatenate_to_cache`; each new token's key and value
    heads are quantized with :func:`ref_quantize_kv_tokens` into the columns it is written to. Only
    those columns' codes and scales change.
    """
    P, L, H, W = key_value.shape
    B, q = key.shape[0], key.shape[1]
    Dk = key.shape[3]
    new_kv, new_scales, new_index = key_value.cpu().clone(), scales.cpu().clone(), index.cpu().clone()
    k_codes, k_scales = ref_quantize_kv_tokens(key, kv_quantization)
    v_codes, v_scales = ref_quantize_kv_tokens(value, kv_quantization)
    rows = ref_pool_rows(slot_ids, B, P, check_bounds)
    for b, r in enumerate(rows):
        if r is None:
            continue
        start = int(index[r])
        if not row_writable(start, q, L, ring, causal_limit):
            if check_bounds:
                raise IndexError(f"row {r} cannot be written at position {start}")
            continue
        for t in range(q):
            column = (start + t) % L if ring else start + t
            new_kv[r, column, :, :Dk] = k_codes[b, t]
            new_kv[r, column, :, Dk:] = v_codes[b, t]
            new_scales[r, column, :, 0] = k_scales[b, t]
            new_scales[r, column, :, 1] = v_scales[b, t]
        new_index[r] = start + q
    return new_kv, new_scales, new_index


# --------------------------------------------------------------------------- attention over the cache


def ref_cached_attention(query, key_value, mask, key_dim, scales=None, softmax_scale=None):
    """SPEC 8, in float64: ``scaled_dot_product_attention`` over the dequantized cache.

    ``key_value [B, L, H, Dk + Dv]`` (an element means ``code * scale`` with ``scales
    [B, L, H, 2]``: ``[..., 0]`` for the key, ``[..., 1]`` for the value), ``mask [B, 1,
    q, L]`` bool, ``enable_gqa=True``; a query whose mask row is all false gets zeros.
    Returns ``[B, q, Hq, Dv]`` float64 on the CPU.
    """
    kv = key_value.detach().cpu().to(torch.float64)
    key, value = kv[..., :key_dim], kv[..., key_dim:]
    if scales is not None:
        s = scales.detach().cpu().to(torch.float64)
        key, value = key * s[..., 0:1], value * s[..., 1:2]
    m = mask.detach().cpu()
    q = query.detach().cpu().to(torch.float64)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=m, scale=softmax_scale,
        enable_gqa=True).transpose(1, 2)
    seen = m.any(dim=-1).squeeze(1)  # [B, q]
    return torch.where(seen[:, :, None, None], out, torch.zeros((), dtype=torch.float64))


# --------------------------------------------------------------------------- packed batches and pages (SPEC 11)


def ref_packed_sequences(cu_seqlens, total_tokens: int, check_bounds: bool) -> list[tuple[int, int] | None]:
    """SPEC 11: ``(begin, length)`` of each packed sequence, or ``None`` (skipped).

    With checks ``cu_seqlens`` must start at 0, not decrease and end at ``T`` (``ValueError``).
    Without, sequence ``s`` is kept iff ``0 <= c_s <= c_{s+1} <= T`` and ``c_s`` is at least
    every earlier entry (the kept sequences' tokens are disjoint).
    """
    c = [int(x) for x in cu_seqlens.cpu()]
    if check_bounds:
        if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] != total_tokens:
            raise ValueError(f"bad cu_seqlens {c}")
    out, earlier = [], 0
    for begin, end in zip(c, c[1:]):
        out.append((begin, end - begin) if earlier <= begin <= end <= total_tokens else None)
        earlier = max(earlier, begin)
    return out


def ref_lightning_packed(state, q, k, v, slopes, cu_seqlens, slot_ids=None, scale=1.0, check_bounds=True):
    """``lightning_prefill(..., cu_seqlens=...)`` as ``S`` separate :func:`ref_lightning` calls (float64).

    Sequence ``s`` runs from state row ``slot_ids[s]`` (or ``s``); skipped sequences, rows taken by an
    earlier sequence and tokens of no sequence output zeros. Returns ``(new_state, output [1, T, H, Dv])``.
    """
    seqs = ref_packed_sequences(cu_seqlens, q.shape[1], check_bounds)
    S = state.detach().cpu().to(torch.float64).clone()
    out = torch.zeros(1, q.shape[1], q.shape[2], v.shape[3], dtype=torch.float64)
    rows = ref_pool_rows(slot_ids, len(seqs), state.shape[0], check_bounds)
    for seq, row in zip(seqs, rows):
        if seq is None or row is None or seq[1] == 0:
            continue
        begin, n = seq
        part = slice(begin, begin + n)
        S_row, o = ref_lightning(S[row:row + 1], q[:, part], k[:, part], v[:, part], slopes, scale=scale)
        S[row] = S_row[0]
        out[0, part] = o[0]
    return S, out


def ref_paged_to_dense(pages: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The dense ``[B, max_pages * page_size, ...]`` rows a page pool ``[N, page_size, ...]`` holds through
    ``block_tables [B, max_pages]`` (entries outside ``[0, N)`` read as zeros)."""
    N, page_size = pages.shape[0], pages.shape[1]
    B, max_pages = block_tables.shape
    dense = torch.zeros((B, max_pages * page_size) + tuple(pages.shape[2:]), dtype=pages.dtype)
    for b in range(B):
        for p in range(max_pages):
            page = int(block_tables[b, p])
            if 0 <= page < N:
                dense[b, p * page_size:(p + 1) * page_size] = pages[page].cpu()
    return dense


def ref_paged_write(pages, index, key, value, block_tables):
    """SPEC 11's paged write without checks, sequentially: rows in batch order; a row is written whole or
    skipped whole (position not writable, a position outside the pool, a page slot it meets twice, or one an
    earlier WRITTEN row took)."""
    pages, index = pages.clone(), index.clone()
    N, page_size = pages.shape[:2]
    B, q = key.shape[:2]
    L = block_tables.shape[1] * page_size
    claimed = set()
    for w in range(B):
        start = int(index[w])
        if not row_writable(start, q, L, ring=False):
            continue
        cells = []
        for t in range(q):
            page = int(block_tables[w, (start + t) // page_size])
            cell = page * page_size + (start + t) % page_size
            if not 0 <= page < N or cell in claimed or cell in cells:
                break
            cells.append(cell)
        if len(cells) < q:
            continue
        claimed.update(cells)
        for t, cell in enumerate(cells):
            pages.view(N * page_size, *pages.shape[2:])[cell] = torch.cat([key[w, t], value[w, t]], -1)
        index[w] = start + q
    return pages, index


def ref_cached_attention_rows(query, key_value, key_dim, cache_seqlens, cu_seqlens=None, slot_ids=None,
                              block_tables=None, scales=None, softmax_scale=None):
    """SPEC 11's ``cached_attention`` without a mask, as one :func:`ref_cached_attention` per row (float64).

    Row ``r`` (batch row, or packed sequence) reads cache row ``slot_ids[r]`` (or ``r``), or the pages
    ``block_tables[r]`` names; its ``n`` queries sit at positions ``cache_seqlens[r] - n ..``, causal.
    Rows whose ids or counts are bad give zeros (the checks-off rule).
    """
    if block_tables is not None:
        key_value = ref_paged_to_dense(key_value, block_tables)
        scales = ref_paged_to_dense(scales, block_tables) if scales is not None else None
    L = key_value.shape[1]
    if cu_seqlens is not None:
        seqs = ref_packed_sequences(cu_seqlens, query.shape[1], check_bounds=False)
        parts = [(0, s) if s is not None else None for s in seqs]
    else:
        parts = [(b, (0, query.shape[1])) for b in range(query.shape[0])]
    out = torch.zeros(query.shape[:3] + (key_value.shape[3] - key_dim,), dtype=torch.float64)
    for r, part in enumerate(parts):
        if part is None:
            continue
        src, (begin, n) = part
        row = int(slot_ids[r]) if slot_ids is not None else r
        valid = int(cache_seqlens[r])
        if n == 0 or not 0 <= row < key_value.shape[0] or not n <= valid <= L:
            continue
        positions = torch.arange(valid - n, valid)
        mask = (torch.arange(L)[None, :] <= positions[:, None]).view(1, 1, n, L)
        q = query[src:src + 1, begin:begin + n]
        sc = scales[row:row + 1] if scales is not None else None
        out[src, begin:begin + n] = ref_cached_attention(q, key_value[row:row + 1], mask, key_dim, sc,
                                                         softmax_scale)[0]
    return out
