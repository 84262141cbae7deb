"""Cache operators for Lightning-attention (MiniMax-style hybrid) models.

Operators live under ``torch.ops.lightning_cache``; this package adds thin
wrappers and the cache classes of EasyDeL's Lightning cache.
"""

from .cache import (
    LAYER_KINDS,
    LightningCache,
    LightningCacheMetaData,
    LightningCacheView,
    LightningMetadata,
    minimax_layer_kinds,
)
from .ops import (
    build_info,
    cached_attention,
    concatenate_to_cache,
    init_kv_cache,
    init_state,
    lightning_accept,
    lightning_decode,
    lightning_prefill,
    lightning_slopes,
    rewind_cache,
    split_key_value,
    write_to_cache,
)

__all__ = [
    "LAYER_KINDS",
    "LightningCache",
    "LightningCacheMetaData",
    "LightningCacheView",
    "LightningMetadata",
    "minimax_layer_kinds",
    "build_info",
    "cached_attention",
    "concatenate_to_cache",
    "init_kv_cache",
    "init_state",
    "lightning_accept",
    "lightning_decode",
    "lightning_prefill",
    "lightning_slopes",
    "rewind_cache",
    "split_key_value",
    "write_to_cache",
]
__version__ = "0.1.0"
