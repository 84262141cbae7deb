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

import torch

from . import _C  # noqa: F401  (loading it registers the operators)

_ops = torch.ops.lightning_cache


def build_info() -> dict:
    """How the loaded operator library was built: ``{"cuda": bool, "cuda_version": str | None, ...}``."""
    return _C.build_info()


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


@torch.library.register_fake("lightning_cache::init_state")
def _init_state_fake(batch_size, num_heads, key_dim, value_dim, dtype=None, device=None):
    return torch.empty(batch_size, num_heads, key_dim, value_dim, dtype=dtype or torch.float32, device=device)


@torch.library.register_fake("lightning_cache::concatenate_to_cache")
def _concatenate_to_cache_fake(key_value, index, key, value, attention_mask=None, causal_mask=None,
                               token_type_ids=None, is_causal=False, ring=False, check_bounds=True):
    _check_one_device("concatenate_to_cache", key_value=key_value, index=index, key=key, value=value,
                      attention_mask=attention_mask, causal_mask=causal_mask, token_type_ids=token_type_ids)
    torch._check(key_value.dim() == 4 and key.dim() == 4, lambda: "key_value and key must be 4-D")
    return key_value.new_empty((key_value.shape[0], 1, key.shape[1], key_value.shape[1]), dtype=torch.bool)


def _lightning_fake(op, state, query, key, value, slopes, attention_mask=None, slot_ids=None):
    _check_one_device(op, state=state, query=query, key=key, value=value, slopes=slopes,
                      attention_mask=attention_mask, slot_ids=slot_ids)
    torch._check(state.dim() == 4 and query.dim() == 4, lambda: "state and query must be 4-D")
    return query.new_empty((query.shape[0], query.shape[1], query.shape[2], state.shape[3]))


@torch.library.register_fake("lightning_cache::lightning_decode")
def _lightning_decode_fake(state, query, key, value, slopes, slot_ids=None, scale=1.0, check_bounds=True):
    return _lightning_fake("lightning_decode", state, query, key, value, slopes, slot_ids=slot_ids)


@torch.library.register_fake("lightning_cache::lightning_prefill")
def _lightning_prefill_fake(state, query, key, value, slopes, attention_mask=None, slot_ids=None, block_size=256,
                            scale=1.0, check_bounds=True):
    return _lightning_fake("lightning_prefill", state, query, key, value, slopes, attention_mask, slot_ids)


# --------------------------------------------------------------------------- wrappers


def init_kv_cache(batch_size: int, max_length: int, num_heads: int, key_dim: int, value_dim: int,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """Zeroed unified cache ``key_value [B, L, H, Dk + Dv]`` and positions ``index [B]`` (int64)."""
    device = torch.device(device) if device is not None else None
    return _ops.init_kv_cache(batch_size, max_length, num_heads, key_dim, value_dim, dtype=dtype, device=device)


def split_key_value(key_value: torch.Tensor, key_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``key [B, L, H, Dk]`` and ``value [B, L, H, Dv]`` of a unified cache (no copy)."""
    return key_value[..., :key_dim], key_value[..., key_dim:]


def concatenate_to_cache(key_value: torch.Tensor, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, causal_mask: torch.Tensor | None = None,
                         token_type_ids: torch.Tensor | None = None, is_causal: bool = False, ring: bool = False,
                         check_bounds: bool = True):
    """Writes ``key``/``value`` ``[B, q, H, D*]`` at each row's position and advances ``index``.

    Returns ``(key_cache, value_cache, mask)``: views into ``key_value`` and the
    ``[B, 1, q, L]`` boolean attention mask for the new queries.
    """
    mask = _ops.concatenate_to_cache(key_value, index, key, value, attention_mask, causal_mask, token_type_ids,
                                     is_causal, ring, check_bounds)
    key_cache, value_cache = split_key_value(key_value, key.shape[-1])
    return key_cache, value_cache, mask


def init_state(batch_size: int, num_heads: int, key_dim: int, value_dim: int, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Zeroed recurrent state ``[B, H, Dk, Dv]`` (float32 unless ``dtype`` says bfloat16)."""
    device = torch.device(device) if device is not None else None
    return _ops.init_state(batch_size, num_heads, key_dim, value_dim, dtype=dtype, device=device)


def lightning_decode(state: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     slopes: torch.Tensor, slot_ids: torch.Tensor | None = None, scale: float = 1.0,
                     check_bounds: bool = True) -> torch.Tensor:
    """Applies each of the ``n`` tokens in order: ``S = exp(-slope) S + k^T v``, ``o = scale * q S``."""
    return _ops.lightning_decode(state, query, key, value, slopes, slot_ids, scale, check_bounds)


def lightning_prefill(state: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      slopes: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      slot_ids: torch.Tensor | None = None, block_size: int = 256, scale: float = 1.0,
                      check_bounds: bool = True) -> torch.Tensor:
    """Chunked equivalent of ``n`` decode steps from the current state; masked tokens only decay the state."""
    return _ops.lightning_prefill(state, query, key, value, slopes, attention_mask, slot_ids, block_size, scale,
                                  check_bounds)


def lightning_slopes(num_heads: int, layer_index: int = 0, num_layers: int = 1,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Per-head decay rates as MiniMax-Text-01 builds them, float32 ``[H]``.

    ``s_h = base^(h + 1) * (1 - layer_index / (num_layers - 1 + 1e-5) + 1e-5)`` with ``base = 2^(-8 / H)``.
    """
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
