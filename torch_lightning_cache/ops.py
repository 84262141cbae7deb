"""The operators: loading the compiled library, fake kernels, thin wrappers.

Every op is defined once in C++ (``csrc/ops.cpp``) under the
``lightning_cache`` namespace and reachable as ``torch.ops.lightning_cache.*``.
The fake kernels here only compute output shapes for the compiler; the real
kernels validate every argument before writing anything.

Ops that write (``concatenate_to_cache``, ``lightning_decode``,
``lightning_prefill``) mutate their cache/state arguments in place and return
only fresh tensors; the wrappers add the views a caller wants.
"""

from __future__ import annotations

import math
import numbers
import sys

import torch

from . import _C  # noqa: F401  (loading it registers the operators)

_ops = torch.ops.lightning_cache


def build_info() -> dict:
    """How the loaded operator library was built: ``{"cuda": bool, "cuda_version": str | None, ...}``."""
    return _C.build_info()


# --------------------------------------------------------------------------- argument types

_INT64_MAX = 2**63 - 1

_KINDS = {
    "bool": "a bool",
    "int": "an int",
    "float": "a float",
    "float?": "a float or None",
    "tensor": "a torch.Tensor",
    "tensor?": "a torch.Tensor or None",
    "dtype?": "a torch.dtype or None",
    "device?": "a torch.device, a str or None",
}


def _is_kind(value, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":  # SymInt: sizes traced by torch.compile
        return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(value, bool)
    if kind == "float?":
        return value is None or _is_kind(value, "float")
    if kind == "tensor":
        return isinstance(value, torch.Tensor)
    if kind == "tensor?":
        return value is None or isinstance(value, torch.Tensor)
    if kind == "dtype?":
        return value is None or isinstance(value, torch.dtype)
    if kind == "device?":
        return value is None or isinstance(value, (torch.device, str, int)) and not isinstance(value, bool)
    raise AssertionError(kind)


# Exact types that are of a kind for sure (a subset of _is_kind, which decides every other value); "int" has none,
# since its range is checked too.
_NONE = type(None)
_EXACT_TYPES = {
    "bool": frozenset({bool}),
    "int": frozenset(),
    "float": frozenset({float, int}),
    "float?": frozenset({float, int, _NONE}),
    "tensor": frozenset({torch.Tensor, torch.nn.Parameter}),
    "tensor?": frozenset({torch.Tensor, torch.nn.Parameter, _NONE}),
    "dtype?": frozenset({torch.dtype, _NONE}),
    "device?": frozenset({torch.device, str, _NONE}),
}


def check_types(op: str, **args) -> None:
    """Checks Python-level argument types: ``name=(value, kind)`` with a kind of ``_KINDS``.

    A string, ``None`` or float where a bool, int or tensor is expected (``ring="False"``,
    ``check_bounds=None``, ``causal_mask="causal"``) is a ``TypeError`` naming the argument,
    never a silent coercion; an int outside int64 is a ``ValueError``. Every wrapper and
    cache class goes through here, so the rule lives in one place.
    """
    for name, (value, kind) in args.items():
        if type(value) in _EXACT_TYPES[kind]:  # the common case, in a set lookup (every wrapper call pays this)
            continue
        if not _is_kind(value, kind):
            raise TypeError(f"{op}: {name} must be {_KINDS[kind]}, got {type(value).__name__} {value!r}")
        if kind == "int" and isinstance(value, numbers.Integral) and not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            raise ValueError(f"{op}: {name} = {value} does not fit in int64")
    # DTensor arguments (only possible once torch.distributed.tensor is imported): the sharding module's check
    # registers the ops' strategies on first use (not at import, which would cost every user the import of
    # torch.distributed.tensor) and checks the placements here, so a mismatch is a ValueError. Traced code
    # skips this (is_compiling first: dynamo folds it); the strategies check again at trace time.
    if (_dtensor_argument_check is not None and "torch.distributed.tensor" in sys.modules
            and not torch.compiler.is_compiling()):
        _dtensor_argument_check(op, {name: value for name, (value, kind) in args.items() if kind.startswith("tensor")})


# Set by torch_lightning_cache.sharding (which sits above this module): (op name, {argument: tensor or None}).
_dtensor_argument_check = None


def set_dtensor_argument_check(check) -> None:
    """Installs the DTensor placement check that :func:`check_types` runs on eager calls with DTensors."""
    global _dtensor_argument_check
    _dtensor_argument_check = check


# --------------------------------------------------------------------------- fake kernels


def _check_one_device(op: str, **tensors) -> None:
    # The real kernels reject mixed devices; a meta tensor among real ones would
    # otherwise route the call here and silently skip the write.
    given = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(given.items()))
    for name, device in given.items():
        torch._check_value(device == first,
                           lambda: f"{op}: {name} must be on the same device as {first_name} ({first}), got {device}")


@torch.library.register_fake("lightning_cache::init_kv_cache")
def _init_kv_cache_fake(batch_size, max_length, num_heads, key_dim, value_dim, dtype=None, device=None):
    dtype = dtype or torch.get_default_dtype()
    key_value = torch.empty(batch_size, max_length, num_heads, key_dim + value_dim, dtype=dtype, device=device)
    return key_value, torch.empty(batch_size, dtype=torch.int64, device=device)


@torch.library.register_fake("lightning_cache::write_to_cache")
def _write_to_cache_fake(key_value, index, key, value, ring=False, check_bounds=True, slot_ids=None, scales=None,
                         block_tables=None, cu_seqlens=None):
    _check_one_device("write_to_cache", key_value=key_value, index=index, key=key, value=value, slot_ids=slot_ids,
                      scales=scales, block_tables=block_tables, cu_seqlens=cu_seqlens)
    torch._check(key_value.dim() == 4 and key.dim() == 4, lambda: "key_value and key must be 4-D")


@torch.library.register_fake("lightning_cache::dequantize_kv")
def _dequantize_kv_fake(key_value, scales, key_dim, dtype):
    _check_one_device("dequantize_kv", key_value=key_value, scales=scales)
    torch._check(key_value.dim() == 4 and 0 < key_dim < key_value.shape[3],
                 lambda: "dequantize_kv: key_value must be 4-D and key_dim inside its last dimension")
    P, L, H, W = key_value.shape
    return key_value.new_empty((P, L, H, key_dim), dtype=dtype), key_value.new_empty((P, L, H, W - key_dim),
                                                                                      dtype=dtype)


@torch.library.register_fake("lightning_cache::init_state")
def _init_state_fake(batch_size, num_heads, key_dim, value_dim, dtype=None, device=None):
    return torch.empty(batch_size, num_heads, key_dim, value_dim, dtype=dtype or torch.float32, device=device)


@torch.library.register_fake("lightning_cache::concatenate_to_cache")
def _concatenate_to_cache_fake(key_value, index, key, value, attention_mask=None, causal_mask=None,
                               token_type_ids=None, is_causal=False, ring=False, check_bounds=True, slot_ids=None,
                               scales=None, block_tables=None):
    _check_one_device("concatenate_to_cache", key_value=key_value, index=index, key=key, value=value,
                      attention_mask=attention_mask, causal_mask=causal_mask, token_type_ids=token_type_ids,
                      slot_ids=slot_ids, scales=scales, block_tables=block_tables)
    torch._check(key_value.dim() == 4 and key.dim() == 4, lambda: "key_value and key must be 4-D")
    # The mask has one row per batch row (key's batch; the pool's rows without slot_ids, where they are equal),
    # over the logical columns: max_pages * page_size through block tables.
    capacity = key_value.shape[1] if block_tables is None else block_tables.shape[1] * key_value.shape[1]
    return key_value.new_empty((key.shape[0], 1, key.shape[1], capacity), dtype=torch.bool)


def _lightning_fake(op, state, query, key, value, slopes, attention_mask=None, slot_ids=None, cu_seqlens=None):
    _check_one_device(op, state=state, query=query, key=key, value=value, slopes=slopes,
                      attention_mask=attention_mask, slot_ids=slot_ids, cu_seqlens=cu_seqlens)
    torch._check(state.dim() == 4 and query.dim() == 4, lambda: "state and query must be 4-D")
    return query.new_empty((query.shape[0], query.shape[1], query.shape[2], state.shape[3]))


@torch.library.register_fake("lightning_cache::lightning_decode")
def _lightning_decode_fake(state, query, key, value, slopes, slot_ids=None, scale=1.0, check_bounds=True,
                           step_states=None):
    if step_states is not None:
        _check_one_device("lightning_decode", state=state, step_states=step_states)
    return _lightning_fake("lightning_decode", state, query, key, value, slopes, slot_ids=slot_ids)


@torch.library.register_fake("lightning_cache::lightning_prefill")
def _lightning_prefill_fake(state, query, key, value, slopes, attention_mask=None, slot_ids=None, block_size=256,
                            scale=1.0, check_bounds=True, checkpoints=None, checkpoint_every=0, cu_seqlens=None):
    if checkpoints is not None:
        _check_one_device("lightning_prefill", state=state, checkpoints=checkpoints)
        torch._check(checkpoints.dim() == 5, lambda: "lightning_prefill: checkpoints must be 5-D")
    torch._check_value(cu_seqlens is None or attention_mask is None,
                       lambda: "lightning_prefill: attention_mask cannot be used with cu_seqlens")
    return _lightning_fake("lightning_prefill", state, query, key, value, slopes, attention_mask, slot_ids, cu_seqlens)


@torch.library.register_fake("lightning_cache::rewind_cache")
def _rewind_cache_fake(index, num_tokens, slot_ids=None, ring=False, check_bounds=True):
    _check_one_device("rewind_cache", index=index, num_tokens=num_tokens, slot_ids=slot_ids)
    torch._check_value(not ring, lambda: "rewind_cache: ring=True is not supported")
    torch._check(index.dim() == 1 and num_tokens.dim() == 1, lambda: "index and num_tokens must be 1-D")


@torch.library.register_fake("lightning_cache::lightning_accept")
def _lightning_accept_fake(state, step_states, num_accepted, slot_ids=None, check_bounds=True):
    _check_one_device("lightning_accept", state=state, step_states=step_states, num_accepted=num_accepted,
                      slot_ids=slot_ids)
    torch._check(state.dim() == 4 and step_states.dim() == 5, lambda: "state must be 4-D and step_states 5-D")


@torch.library.register_fake("lightning_cache::cached_attention")
def _cached_attention_fake(query, key_value, mask, key_dim, scales=None, softmax_scale=None, block_tables=None,
                           cu_seqlens=None, cache_seqlens=None, slot_ids=None, check_bounds=True):
    _check_one_device("cached_attention", query=query, key_value=key_value, mask=mask, scales=scales,
                      block_tables=block_tables, cu_seqlens=cu_seqlens, cache_seqlens=cache_seqlens,
                      slot_ids=slot_ids)
    torch._check_value((mask is None) != (cache_seqlens is None),
                       lambda: "cached_attention: pass exactly one of mask and cache_seqlens")
    torch._check(query.dim() == 4 and key_value.dim() == 4, lambda: "cached_attention: query and key_value must be 4-D")
    torch._check_value(1 <= key_dim < key_value.shape[3],
                       lambda: f"cached_attention: key_dim must be in [1, {key_value.shape[3]}), got {key_dim}")
    return query.new_empty((query.shape[0], query.shape[1], query.shape[2], key_value.shape[3] - key_dim))


# --------------------------------------------------------------------------- wrappers


def init_kv_cache(batch_size: int, max_length: int, num_heads: int, key_dim: int, value_dim: int,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """Zeroed unified cache ``key_value [B, L, H, Dk + Dv]`` and positions ``index [B]`` (int64)."""
    check_types("init_kv_cache", batch_size=(batch_size, "int"), max_length=(max_length, "int"),
                num_heads=(num_heads, "int"), key_dim=(key_dim, "int"), value_dim=(value_dim, "int"),
                dtype=(dtype, "dtype?"), device=(device, "device?"))
    if key_dim > 0 and value_dim > 0 and key_dim + value_dim > _INT64_MAX:
        raise ValueError(f"init_kv_cache: key_dim + value_dim ({key_dim} + {value_dim}) overflows int64")
    device = torch.device(device) if device is not None else None
    return _ops.init_kv_cache(batch_size, max_length, num_heads, key_dim, value_dim, dtype=dtype, device=device)


def split_key_value(key_value: torch.Tensor, key_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``key [B, L, H, Dk]`` and ``value [B, L, H, Dv]`` of a unified cache (no copy)."""
    check_types("split_key_value", key_value=(key_value, "tensor"), key_dim=(key_dim, "int"))
    return _key_value_views(key_value, key_dim)


def _key_value_views(key_value: torch.Tensor, key_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # For the wrappers, whose arguments are checked already.
    return key_value[..., :key_dim], key_value[..., key_dim:]


def concatenate_to_cache(key_value: torch.Tensor, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, causal_mask: torch.Tensor | None = None,
                         token_type_ids: torch.Tensor | None = None, is_causal: bool = False, ring: bool = False,
                         check_bounds: bool = True, slot_ids: torch.Tensor | None = None,
                         scales: torch.Tensor | None = None, block_tables: torch.Tensor | None = None):
    """Writes ``key``/``value`` ``[B, q, H, D*]`` at each row's position and advances ``index``.

    Returns ``(key_cache, value_cache, mask)``: views into ``key_value`` and the
    ``[B, 1, q, L]`` boolean attention mask for the new queries.

    ``slot_ids [B]`` (int64) makes ``key_value [P, L, H, Dk + Dv]`` / ``index [P]`` a pool:
    batch row ``b`` writes pool row ``slot_ids[b]`` at that row's position, and mask row ``b``
    is computed from it. ``attention_mask`` and ``token_type_ids`` stay per batch row
    (``[B, ...]``). ``-1`` skips the row (nothing written, mask row all false); out-of-range
    or repeated ids raise ``IndexError`` with ``check_bounds``, else are skipped (first
    occurrence wins). Pool rows no batch row names are untouched. The returned views
    are of the whole pool.

    Quantized storage (``key_value`` of int8 or ``torch.float8_e4m3fn`` codes, see
    :data:`KV_QUANTIZATION`) needs ``scales [P, L, H, 2]`` float32: the new tokens are
    quantized as they are written (one scale per token, head and K/V; only the new
    tokens' codes and scales change). The returned views are then of the codes; use
    :func:`dequantize_kv` for dense keys and values.

    Paged storage: with ``block_tables [B, max_pages]`` (int32/int64) ``key_value`` is the
    page pool ``[N, page_size, H, Dk + Dv]`` of :func:`init_paged_kv_cache` (``scales``
    ``[N, page_size, H, 2]``) and ``index [B]``; position ``p`` of row ``b`` is page
    ``block_tables[b, p // page_size]``, slot ``p % page_size``; the mask is over the
    ``L = max_pages * page_size`` logical columns. A needed entry outside ``[0, N)`` or a
    page slot two rows write: ``IndexError`` with ``check_bounds`` (nothing written), else
    that row is skipped whole (the first row keeps a contested slot). ``ring=True`` or
    ``slot_ids`` with ``block_tables``: ``ValueError``. The returned views are of the pages.
    """
    check_types("concatenate_to_cache", key_value=(key_value, "tensor"), index=(index, "tensor"), key=(key, "tensor"),
                value=(value, "tensor"), attention_mask=(attention_mask, "tensor?"),
                causal_mask=(causal_mask, "tensor?"), token_type_ids=(token_type_ids, "tensor?"),
                is_causal=(is_causal, "bool"), ring=(ring, "bool"), check_bounds=(check_bounds, "bool"),
                slot_ids=(slot_ids, "tensor?"), scales=(scales, "tensor?"), block_tables=(block_tables, "tensor?"))
    mask = _ops.concatenate_to_cache(key_value, index, key, value, attention_mask, causal_mask, token_type_ids,
                                     is_causal, ring, check_bounds, slot_ids, scales, block_tables)
    key_cache, value_cache = _key_value_views(key_value, key.shape[-1])
    return key_cache, value_cache, mask


def write_to_cache(key_value: torch.Tensor, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   ring: bool = False, check_bounds: bool = True, slot_ids: torch.Tensor | None = None,
                   scales: torch.Tensor | None = None, block_tables: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None):
    """``concatenate_to_cache`` without the mask, for attention kernels that take lengths.

    Writes ``key``/``value`` ``[B, q, H, D*]`` at each row's position and advances
    ``index``, with the same validation and the same skip rules (a row that cannot be
    written with ``check_bounds=False`` is skipped whole; ``slot_ids``, ``scales`` and
    ``block_tables`` as in :func:`concatenate_to_cache`). Returns ``(key_cache,
    value_cache)``, views into ``key_value``.

    Packed batch: with ``cu_seqlens [S + 1]`` (int32/int64, ``0 = c_0 <= ... <= c_S = T``)
    ``key``/``value`` are ``[1, T, H, D*]`` and sequence ``s`` (tokens ``c_s .. c_{s+1} - 1``)
    writes row ``slot_ids[s]`` (or ``s``, or through ``block_tables[s]``) at that row's
    position, which advances by its length. Bad ``cu_seqlens``: ``ValueError`` with
    ``check_bounds``, else the bad sequences are skipped.
    """
    check_types("write_to_cache", key_value=(key_value, "tensor"), index=(index, "tensor"), key=(key, "tensor"),
                value=(value, "tensor"), ring=(ring, "bool"), check_bounds=(check_bounds, "bool"),
                slot_ids=(slot_ids, "tensor?"), scales=(scales, "tensor?"), block_tables=(block_tables, "tensor?"),
                cu_seqlens=(cu_seqlens, "tensor?"))
    _ops.write_to_cache(key_value, index, key, value, ring, check_bounds, slot_ids, scales, block_tables, cu_seqlens)
    return _key_value_views(key_value, key.shape[-1])


def init_paged_kv_cache(num_pages: int, page_size: int, num_heads: int, key_dim: int, value_dim: int,
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        kv_quantization: str | None = None):
    """Zeroed page pool ``key_value [N, page_size, H, Dk + Dv]`` for block tables (SPEC 11).

    With ``kv_quantization`` ``"int8"`` / ``"fp8_e4m3"`` returns ``(key_value codes, scales
    [N, page_size, H, 2] float32)`` (``dtype`` must then be None). Positions live per row
    in the caller's ``index [B]``; pages are addressed by ``block_tables [B, max_pages]``.
    """
    check_types("init_paged_kv_cache", num_pages=(num_pages, "int"), page_size=(page_size, "int"),
                num_heads=(num_heads, "int"), key_dim=(key_dim, "int"), value_dim=(value_dim, "int"),
                dtype=(dtype, "dtype?"), device=(device, "device?"))
    for name, size in (("num_pages", num_pages), ("page_size", page_size), ("num_heads", num_heads),
                       ("key_dim", key_dim), ("value_dim", value_dim)):
        if size <= 0:
            raise ValueError(f"init_paged_kv_cache: {name} must be positive, got {size}")
    check_kv_quantization("init_paged_kv_cache", kv_quantization)
    if kv_quantization is None:
        key_value, _ = init_kv_cache(num_pages, page_size, num_heads, key_dim, value_dim, dtype=dtype, device=device)
        return key_value
    if dtype is not None:
        raise ValueError("init_paged_kv_cache: dtype is the codes' own with kv_quantization; pass dtype=None")
    key_value, _, scales = init_quantized_kv_cache(num_pages, page_size, num_heads, key_dim, value_dim,
                                                   kv_quantization, device=device)
    return key_value, scales


# Quantized sequence-cache storage: the metadata's kv_quantization string -> code dtype.
KV_QUANTIZATION = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def check_kv_quantization(op: str, kv_quantization) -> None:
    """``kv_quantization`` is None or a name of :data:`KV_QUANTIZATION`: else a ``TypeError`` (not a str) or a
    ``ValueError`` (another name), naming ``op``."""
    if kv_quantization is None:
        return
    if not isinstance(kv_quantization, str):
        raise TypeError(f"{op}: kv_quantization must be a str or None, got {type(kv_quantization).__name__} "
                        f"{kv_quantization!r}")
    if kv_quantization not in KV_QUANTIZATION:
        raise ValueError(f"{op}: kv_quantization must be None or one of {sorted(KV_QUANTIZATION)}, got "
                         f"{kv_quantization!r}")


def init_quantized_kv_cache(batch_size: int, max_length: int, num_heads: int, key_dim: int, value_dim: int,
                            kv_quantization: str, device: torch.device | str | None = None):
    """Zeroed quantized storage: ``(key_value [B, L, H, Dk + Dv] codes, index [B], scales [B, L, H, 2] float32)``."""
    if kv_quantization not in KV_QUANTIZATION:
        raise ValueError(f"kv_quantization must be one of {sorted(KV_QUANTIZATION)}, got {kv_quantization!r}")
    key_value, index = init_kv_cache(batch_size, max_length, num_heads, key_dim, value_dim, dtype=torch.float32,
                                     device=device)
    key_value = torch.zeros_like(key_value, dtype=KV_QUANTIZATION[kv_quantization])
    scales = torch.zeros(batch_size, max_length, num_heads, 2, dtype=torch.float32, device=key_value.device)
    return key_value, index, scales


def dequantize_kv(key_value: torch.Tensor, scales: torch.Tensor, key_dim: int,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``key [P, L, H, Dk]`` and ``value [P, L, H, Dv]`` in ``dtype`` from quantized storage.

    Each element is ``code * scale`` computed in float32 (``scales[..., 0]`` for keys,
    ``[..., 1]`` for values), then cast to ``dtype``. Fresh tensors, not views.
    """
    check_types("dequantize_kv", key_value=(key_value, "tensor"), scales=(scales, "tensor"),
                key_dim=(key_dim, "int"), dtype=(dtype, "dtype?"))
    if dtype is None:
        raise TypeError("dequantize_kv: dtype must be a torch.dtype, got None")
    return _ops.dequantize_kv(key_value, scales, key_dim, dtype)


def cached_attention(query: torch.Tensor, key_value: torch.Tensor, mask: torch.Tensor | None = None,
                     key_dim: int | None = None, scales: torch.Tensor | None = None,
                     softmax_scale: float | None = None, block_tables: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
                     slot_ids: torch.Tensor | None = None, check_bounds: bool = True) -> torch.Tensor:
    """Attention of ``query [B, q, Hq, Dk]`` over the unified cache, straight from its storage.

    ``key_value [B, L, H, Dk + Dv]`` is float32/float16/bfloat16, or int8 / float8_e4m3fn
    codes with ``scales [B, L, H, 2]`` float32 (``[..., 0]`` the key's, ``[..., 1]`` the
    value's; an element means ``code * scale``); ``mask [B, 1, q, L]`` bool is what
    ``concatenate_to_cache`` returned. ``Hq`` must be a multiple of ``H`` (grouped-query:
    query head ``hq`` reads cache head ``hq // (Hq // H)``). Equals
    ``scaled_dot_product_attention`` over the dequantized cache with that mask and
    ``enable_gqa=True`` (``softmax_scale`` defaults to ``1 / sqrt(Dk)``), accumulated in
    float32, without making a dequantized copy; a query whose mask row is all false gets
    zeros. Returns ``[B, q, Hq, Dv]`` in the query's dtype.

    Serving layouts (SPEC 11): without ``mask``, ``cache_seqlens [rows]`` (int32/int64, each
    row's valid tokens after the write) places row ``r``'s queries at its last positions,
    causally. ``cu_seqlens [S + 1]`` packs ``S`` sequences in ``query [1, T, Hq, Dk]``
    (query ``t`` of sequence ``s`` at position ``cache_seqlens[s] - len_s + (t - c_s)``).
    ``slot_ids [rows]`` (int64) reads pool rows of ``key_value [P, L, ...]`` (``-1``: zeros);
    ``block_tables [rows, max_pages]`` reads the page pool ``[N, page_size, ...]`` (``L =
    max_pages * page_size``). With ``check_bounds`` an out-of-range slot id, a
    ``cache_seqlens`` entry above ``L`` or below the row's query count, or a visible column
    whose page entry is outside ``[0, N)`` raise; without, such rows give zeros and such
    columns are hidden.
    """
    check_types("cached_attention", query=(query, "tensor"), key_value=(key_value, "tensor"), mask=(mask, "tensor?"),
                key_dim=(key_dim, "int"), scales=(scales, "tensor?"), softmax_scale=(softmax_scale, "float?"),
                block_tables=(block_tables, "tensor?"), cu_seqlens=(cu_seqlens, "tensor?"),
                cache_seqlens=(cache_seqlens, "tensor?"), slot_ids=(slot_ids, "tensor?"),
                check_bounds=(check_bounds, "bool"))
    return _ops.cached_attention(query, key_value, mask, key_dim, scales, softmax_scale, block_tables, cu_seqlens,
                                 cache_seqlens, slot_ids, check_bounds)


def init_state(batch_size: int, num_heads: int, key_dim: int, value_dim: int, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Zeroed recurrent state ``[B, H, Dk, Dv]`` (float32 unless ``dtype`` says bfloat16)."""
    check_types("init_state", batch_size=(batch_size, "int"), num_heads=(num_heads, "int"),
                key_dim=(key_dim, "int"), value_dim=(value_dim, "int"), dtype=(dtype, "dtype?"),
                device=(device, "device?"))
    device = torch.device(device) if device is not None else None
    return _ops.init_state(batch_size, num_heads, key_dim, value_dim, dtype=dtype, device=device)


def lightning_decode(state: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     slopes: torch.Tensor, slot_ids: torch.Tensor | None = None, scale: float = 1.0,
                     check_bounds: bool = True, step_states: torch.Tensor | None = None) -> torch.Tensor:
    """Applies each of the ``n`` tokens in order: ``S = exp(-slope) S + k^T v``, ``o = scale * q S``.

    ``step_states [B, n + 1, H, Dk, Dv]`` (state dtype, contiguous), if given, receives the
    state before the call (index 0) and after each token (``t + 1``), for ``lightning_accept``;
    skipped rows leave theirs untouched.
    """
    check_types("lightning_decode", state=(state, "tensor"), query=(query, "tensor"), key=(key, "tensor"),
                value=(value, "tensor"), slopes=(slopes, "tensor"), slot_ids=(slot_ids, "tensor?"),
                scale=(scale, "float"), check_bounds=(check_bounds, "bool"), step_states=(step_states, "tensor?"))
    return _ops.lightning_decode(state, query, key, value, slopes, slot_ids, scale, check_bounds, step_states)


def lightning_prefill(state: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      slopes: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      slot_ids: torch.Tensor | None = None, block_size: int = 256, scale: float = 1.0,
                      check_bounds: bool = True, checkpoints: torch.Tensor | None = None,
                      checkpoint_every: int = 0, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Chunked equivalent of ``n`` decode steps from the current state; a masked token is skipped whole.

    Prefix caching: ``checkpoints [B, C, H, Dk, Dv]`` (state dtype, contiguous), if given,
    receives in ``checkpoints[b, c]`` the state of row ``b`` after the first
    ``(c + 1) * checkpoint_every`` tokens of this call, for every ``c`` with
    ``(c + 1) * checkpoint_every <= n`` (one at exactly ``n`` is written; later ones and
    skipped rows are left untouched). Tokens are counted by position: a masked token
    counts and leaves the state as it is. Prefilling from ``checkpoints[:, c]`` the
    tokens after it gives the same outputs and final state. ``checkpoint_every`` must
    be positive when ``checkpoints`` is given (without, it stores nothing).

    Packed batch: with ``cu_seqlens [S + 1]`` (int32/int64) ``query``/``key``/``value`` are
    ``[1, T, H, D*]`` and sequence ``s`` runs from state row ``slot_ids[s]`` (or ``s``)
    exactly as ``S`` separate prefills would; output ``[1, T, H, Dv]``; ``checkpoints [S, C,
    H, Dk, Dv]`` count each sequence's own tokens. ``attention_mask`` with it is a
    ``ValueError``; bad ``cu_seqlens`` are a ``ValueError`` with ``check_bounds``, else the
    bad sequences are skipped (their tokens output zeros).
    """
    check_types("lightning_prefill", state=(state, "tensor"), query=(query, "tensor"), key=(key, "tensor"),
                value=(value, "tensor"), slopes=(slopes, "tensor"), attention_mask=(attention_mask, "tensor?"),
                slot_ids=(slot_ids, "tensor?"), block_size=(block_size, "int"), scale=(scale, "float"),
                check_bounds=(check_bounds, "bool"), checkpoints=(checkpoints, "tensor?"),
                checkpoint_every=(checkpoint_every, "int"), cu_seqlens=(cu_seqlens, "tensor?"))
    return _ops.lightning_prefill(state, query, key, value, slopes, attention_mask, slot_ids, block_size, scale,
                                  check_bounds, checkpoints, checkpoint_every, cu_seqlens)


def rewind_cache(index: torch.Tensor, num_tokens: torch.Tensor, slot_ids: torch.Tensor | None = None,
                 ring: bool = False, check_bounds: bool = True) -> torch.Tensor:
    """Moves sequence-cache positions back by ``num_tokens[b]`` (never below 0), in place.

    For speculative decoding: after writing ``n`` draft tokens, rewind by the rejected
    ones; the next write overwrites them. Batch row ``b`` rewinds pool row
    ``slot_ids[b]`` (or ``b``); ``-1`` skips it. Out-of-range or repeated ids and
    negative counts raise ``IndexError`` with ``check_bounds``, else the row is skipped
    (first occurrence wins). ``ring=True`` is a ``ValueError``: rewound ring columns
    already hold overwritten tokens. Returns ``index``.
    """
    check_types("rewind_cache", index=(index, "tensor"), num_tokens=(num_tokens, "tensor"),
                slot_ids=(slot_ids, "tensor?"), ring=(ring, "bool"), check_bounds=(check_bounds, "bool"))
    _ops.rewind_cache(index, num_tokens, slot_ids, ring, check_bounds)
    return index


def lightning_accept(state: torch.Tensor, step_states: torch.Tensor, num_accepted: torch.Tensor,
                     slot_ids: torch.Tensor | None = None, check_bounds: bool = True) -> torch.Tensor:
    """Sets each state row to ``step_states[b, num_accepted[b]]``, in place.

    ``step_states [B, n + 1, H, Dk, Dv]`` comes from ``lightning_decode(...,
    step_states=...)``; index ``t`` is the state after the first ``t`` tokens. Batch
    row ``b`` writes state row ``slot_ids[b]`` (or ``b``); ``-1`` skips it. A count
    outside ``[0, n]``, an out-of-range or repeated id raise ``IndexError`` with
    ``check_bounds``, else the row is skipped (first occurrence wins). Returns ``state``.
    """
    check_types("lightning_accept", state=(state, "tensor"), step_states=(step_states, "tensor"),
                num_accepted=(num_accepted, "tensor"), slot_ids=(slot_ids, "tensor?"),
                check_bounds=(check_bounds, "bool"))
    _ops.lightning_accept(state, step_states, num_accepted, slot_ids, check_bounds)
    return state


def lightning_slopes(num_heads: int, layer_index: int = 0, num_layers: int = 1,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Per-head decay rates as MiniMax-Text-01 builds them, float32 ``[H]``.

    ``s_h = base^(h + 1) * (1 - layer_index / (num_layers - 1 + 1e-5) + 1e-5)`` with ``base = 2^(-8 / H)``.
    """
    check_types("lightning_slopes", num_heads=(num_heads, "int"), layer_index=(layer_index, "int"),
                num_layers=(num_layers, "int"), device=(device, "device?"))
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if num_layers < 1 or not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index must be in [0, num_layers), got layer_index={layer_index}, "
                         f"num_layers={num_layers}")
    base = 2.0 ** (-8.0 / num_heads)
    layer_factor = 1.0 - layer_index / (num_layers - 1 + 1e-5) + 1e-5
    slopes = [base ** (h + 1) * layer_factor for h in range(num_heads)]
    assert all(s > 0 and math.isfinite(s) for s in slopes)
    return torch.tensor(slopes, dtype=torch.float32, device=device)
