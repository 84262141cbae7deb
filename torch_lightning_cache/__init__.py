"""Cache operators for Lightning-attention (MiniMax-style hybrid) models.

Operators live under ``torch.ops.lightning_cache``; this package adds thin
wrappers and the cache classes of EasyDeL's Lightning cache.

Layers, each importing only those before it: ``ops`` (wrappers, fake kernels) -> ``sharding`` (DTensor
rules) -> ``cache`` (the seed's classes) -> ``models`` / ``integrations`` -> ``cli`` (demo, serve, bench,
the pure-PyTorch peers) -> ``__main__``. ``tests/test_layering.py`` keeps it so.
"""

import sys as _sys

from .cache import (
    LAYER_KINDS,
    LightningCache,
    LightningCacheMetaData,
    LightningCacheView,
    LightningMetadata,
    minimax_layer_kinds,
)
from .models.hybrid import HybridConfig, HybridLM
from .ops import (
    build_info,
    KV_QUANTIZATION,
    cached_attention,
    concatenate_to_cache,
    dequantize_kv,
    init_kv_cache,
    init_paged_kv_cache,
    init_quantized_kv_cache,
    init_state,
    lightning_accept,
    lightning_decode,
    lightning_prefill,
    lightning_slopes,
    rewind_cache,
    split_key_value,
    write_to_cache,
)
from .sharding import PartitionAxis, register_sharding_strategies

__all__ = [
    "HybridConfig",
    "HybridLM",
    "LAYER_KINDS",
    "LightningCache",
    "LightningCacheMetaData",
    "LightningCacheView",
    "LightningMetadata",
    "PartitionAxis",
    "minimax_layer_kinds",
    "build_info",
    "KV_QUANTIZATION",
    "cached_attention",
    "concatenate_to_cache",
    "dequantize_kv",
    "init_kv_cache",
    "init_paged_kv_cache",
    "init_quantized_kv_cache",
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

if "torch.distributed.tensor" in _sys.modules:  # DTensor already in use: its op strategies now (see sharding.py)
    register_sharding_strategies()
