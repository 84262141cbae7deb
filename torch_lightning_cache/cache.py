"""The cache classes of EasyDeL's Lightning cache, working, over the operators.

A Lightning-attention model mixes two kinds of layers and this cache serves both:

* ``"attention"`` layers keep a sequence cache: one unified buffer
  ``key_value [B, L, H, Dk + Dv]`` (each head's key followed by its value) and
  per-row positions ``index [B]``;
* ``"lightning"`` layers keep a recurrent state ``[B, H, Dk, Dv]`` per row and
  head, stored in the same ``key_value`` field (as EasyDeL's only real
  Lightning model used it).

Names and signatures follow the seed (``LightningCacheMetaData.create``,
``LightningCacheView.init`` / ``concatenate_to_cache``,
``LightningCache.init_cache`` / ``init_empty``, ``LightningMetadata``).
"""

from __future__ import annotations

import dataclasses
import typing as tp

import torch

from . import ops, sharding

_INT64_LIMIT = 2**63

ATTENTION = "attention"
LIGHTNING = "lightning"
LAYER_KINDS = (ATTENTION, LIGHTNING)


def _check_positive(name: str, value: tp.Any, op: str = "LightningCacheMetaData.create") -> None:
    """``None`` or a positive int: a wrong type is a ``TypeError``, a bad value a ``ValueError``."""
    if value is None:
        return
    ops.check_types(op, **{name: (value, "int")})
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_head_dims(op: str, metadata: LightningCacheMetaData, **tensors: tuple[torch.Tensor, int]) -> None:
    """``name=(tensor, expected last dim)``: each ``[B, n, H, D]`` input must match the metadata's heads and dims."""
    for name, (tensor, dim) in tensors.items():
        if tensor.dim() != 4 or tensor.shape[2] != metadata.key_heads or tensor.shape[3] != dim:
            raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)} but the metadata says "
                             f"[batch, tokens, heads={metadata.key_heads}, head dim={dim}] (key_dim="
                             f"{metadata.key_dim}, value_dim={metadata.value_dim})")


@dataclasses.dataclass(frozen=True)
class LightningCacheMetaData:
    """Static configuration of a Lightning cache (see :meth:`create`)."""

    partition_axis: tp.Any
    batch_size: int | None
    num_heads: int | None
    head_dim: int | None
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    max_length: int | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    ring: bool = False
    state_dtype: torch.dtype = torch.float32
    block_size: int = 256
    kv_quantization: str | None = None

    @classmethod
    def create(
        cls,
        partition_axis: tp.Any = None,
        batch_size: int | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
        key_heads: int | None = None,
        value_heads: int | None = None,
        key_dim: int | None = None,
        value_dim: int | None = None,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        ring: bool = False,
        state_dtype: torch.dtype = torch.float32,
        block_size: int = 256,
        kv_quantization: str | None = None,
    ) -> LightningCacheMetaData:
        """Validates and fills in defaults, as EasyDeL's transformer cache does.

        ``key_heads``/``value_heads`` fall back to ``num_heads`` and
        ``key_dim``/``value_dim`` to ``head_dim``. ``batch_size`` and
        ``max_length`` may stay ``None``: they are then taken from the first
        update (the batch from the key, the capacity from the attention mask's
        last dimension). The fields after ``value_dim`` are this package's:
        ``max_length`` (capacity L of attention layers), ``dtype`` (cache dtype;
        default: the first key's), ``device``, ``ring`` (sliding window: write
        positions wrap modulo L), ``state_dtype`` (float32 or bfloat16 for
        lightning layers), ``block_size`` (chunk length of the prefill) and
        ``kv_quantization`` (attention layers' storage: ``None``, ``"int8"`` or
        ``"fp8_e4m3"``; ``dtype`` is then the compute dtype of the dense
        ``key_cache`` / ``value_cache`` the views return).

        Raises ``ValueError`` naming the field for zero, negative, missing or
        inconsistent values.
        """
        for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("head_dim", head_dim),
                            ("key_heads", key_heads), ("value_heads", value_heads), ("key_dim", key_dim),
                            ("value_dim", value_dim), ("max_length", max_length), ("block_size", block_size)):
            _check_positive(name, value)
        ops.check_types("LightningCacheMetaData.create", dtype=(dtype, "dtype?"), device=(device, "device?"),
                        ring=(ring, "bool"), state_dtype=(state_dtype, "dtype?"))
        key_heads = key_heads if key_heads is not None else num_heads
        value_heads = value_heads if value_heads is not None else num_heads
        key_dim = key_dim if key_dim is not None else head_dim
        value_dim = value_dim if value_dim is not None else head_dim
        for name, value, fallback in (("key_heads", key_heads, "num_heads"), ("value_heads", value_heads, "num_heads"),
                                      ("key_dim", key_dim, "head_dim"), ("value_dim", value_dim, "head_dim")):
            if value is None:
                raise ValueError(f"{name} is missing and {fallback} gives no fallback: pass {name} or {fallback}")
        if key_heads != value_heads:
            raise ValueError(f"key_heads ({key_heads}) must equal value_heads ({value_heads}): the unified "
                             "key_value layout stores each head's key and value side by side")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        ops.check_kv_quantization("LightningCacheMetaData.create", kv_quantization)
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype!r}")
        return cls(partition_axis=partition_axis, batch_size=batch_size, num_heads=num_heads, head_dim=head_dim,
                   key_heads=key_heads, value_heads=value_heads, key_dim=key_dim, value_dim=value_dim,
                   max_length=max_length, dtype=dtype, device=torch.device(device) if device is not None else None,
                   ring=ring, state_dtype=state_dtype, block_size=block_size, kv_quantization=kv_quantization)


class LightningCacheView:
    """One layer's cache: a sequence cache (attention) or a recurrent state (lightning).

    ``key_value`` is ``None`` until the first update allocates it from the
    first tensors seen, unless the metadata gives every size, the dtype and the
    device, in which case :meth:`init` allocates it at once.
    """

    def __init__(self, metadata: LightningCacheMetaData, layer_index: int | None = None,
                 layer_kind: str = ATTENTION, num_layers: int | None = None, mesh: tp.Any = None):
        if not isinstance(metadata, LightningCacheMetaData):
            raise TypeError(f"LightningCacheView: metadata must be a LightningCacheMetaData, got "
                            f"{type(metadata).__name__} {metadata!r}")
        if layer_kind not in LAYER_KINDS:
            raise ValueError(f"layer_kind must be one of {LAYER_KINDS}, got {layer_kind!r}")
        if layer_index is not None:
            ops.check_types("LightningCacheView", layer_index=(layer_index, "int"))
        _check_positive("num_layers", num_layers, "LightningCacheView")
        if layer_index is not None and not 0 <= layer_index < (num_layers or _INT64_LIMIT):
            raise ValueError(f"layer_index must be in [0, num_layers), got layer_index={layer_index}, "
                             f"num_layers={num_layers}")
        # A lightning layer's slopes depend on layer_index / num_layers: without
        # num_layers they would silently be built as if this were the last layer.
        if layer_kind == LIGHTNING and layer_index is not None and num_layers is None:
            raise ValueError(f"a lightning view needs num_layers with layer_index={layer_index}: its slopes depend "
                             "on both (LightningCacheView.init(metadata, layer_index, 'lightning', num_layers=N))")
        if mesh is not None:  # the axes checked against the mesh now, not at the first update
            for role in ("batch", "head"):
                sharding.partition_axis_of(metadata).mesh_dim(mesh, role)
        self.metadata = metadata
        self.mesh = mesh  # a DeviceMesh: the tensors are DTensors sharded by metadata.partition_axis
        self.layer_index = layer_index
        self.layer_kind = layer_kind
        self.num_layers = num_layers
        self.key_value: torch.Tensor | None = None  # [B, L, H, Dk+Dv] or, for lightning, state [B, H, Dk, Dv]
        self.index: torch.Tensor | None = None  # [B] int64 positions (attention layers)
        self.slopes: torch.Tensor | None = None  # [H] decay rates (lightning layers)
        self.scales: torch.Tensor | None = None  # [B, L, H, 2] float32 (quantized attention layers)
        self.compute_dtype: torch.dtype | None = None  # dtype of the dense key/value caches when quantized

    @classmethod
    def init(cls, metadata: LightningCacheMetaData, layer_index: int | None = None, layer_kind: str = ATTENTION,
             num_layers: int | None = None, mesh: tp.Any = None) -> LightningCacheView:
        view = cls(metadata, layer_index, layer_kind, num_layers, mesh)
        m = metadata
        sizes_known = m.batch_size is not None and (layer_kind == LIGHTNING or m.max_length is not None)
        device_known = m.device is not None or mesh is not None
        if sizes_known and device_known and (layer_kind == LIGHTNING or m.dtype is not None):
            view._allocate(m.batch_size, m.max_length, m.dtype, m.device)
        return view

    # ------------------------------------------------------------------ state

    @property
    def is_allocated(self) -> bool:
        return self.key_value is not None

    def _allocate(self, batch_size: int, max_length: int | None, dtype: torch.dtype | None,
                  device: torch.device | None) -> None:
        m = self.metadata
        if self.layer_kind == ATTENTION and m.kv_quantization is not None:
            self.compute_dtype = dtype or torch.get_default_dtype()  # of the dense views
        if self.mesh is not None:  # each rank allocates only its shard
            if self.layer_kind == ATTENTION:
                self.key_value, self.index, self.scales = sharding.allocate_kv_cache(m, self.mesh, batch_size,
                                                                                     max_length, dtype, m.device)
            else:
                self.key_value = sharding.allocate_state(m, self.mesh, batch_size, m.device)
        elif self.layer_kind == ATTENTION and m.kv_quantization is not None:
            self.key_value, self.index, self.scales = ops.init_quantized_kv_cache(
                batch_size, max_length, m.key_heads, m.key_dim, m.value_dim, m.kv_quantization, device=device)
        elif self.layer_kind == ATTENTION:
            self.key_value, self.index = ops.init_kv_cache(batch_size, max_length, m.key_heads, m.key_dim,
                                                           m.value_dim, dtype=dtype, device=device)
        else:
            self.key_value = ops.init_state(batch_size, m.key_heads, m.key_dim, m.value_dim, dtype=m.state_dtype,
                                            device=device)

    def _adopt_mesh(self, tensor: torch.Tensor) -> None:
        # DTensor inputs to a view built without a mesh: allocate on their mesh, sharded by partition_axis.
        if self.mesh is None and sharding.is_dtensor(tensor):
            self.mesh = tensor.device_mesh

    def _kv_placements(self) -> tuple | None:
        """The placements of ``key_value`` (allocated or to be), ``None`` off a mesh."""
        if self.key_value is not None:
            return tuple(self.key_value.placements) if sharding.is_dtensor(self.key_value) else None
        if self.mesh is None:
            return None
        return sharding.partition_axis_of(self.metadata).placements(self.mesh, "key_value")

    def _require(self, kind: str, operation: str) -> None:
        if self.layer_kind != kind:
            raise TypeError(f"{operation} is for {kind} layers, but layer {self.layer_index} is a "
                            f"{self.layer_kind} layer")

    def reset(self) -> None:
        """Forgets every token (positions and states back to zero), keeping the buffers."""
        if self.key_value is not None:
            self.key_value.zero_()
        if self.index is not None:
            self.index.zero_()
        if self.scales is not None:
            self.scales.zero_()

    def _dense_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the unified buffer, or, with quantized storage, dense copies in the compute dtype."""
        if self.scales is not None:
            return ops.dequantize_kv(self.key_value, self.scales, self.metadata.key_dim, self.compute_dtype)
        return ops.split_key_value(self.key_value, self.metadata.key_dim)

    @property
    def key_cache(self) -> torch.Tensor | None:
        """``[B, L, H, Dk]`` view of the unified buffer (attention layers; a dense copy when quantized)."""
        self._require(ATTENTION, "key_cache")
        return None if self.key_value is None else self._dense_caches()[0]

    @property
    def value_cache(self) -> torch.Tensor | None:
        """``[B, L, H, Dv]`` view of the unified buffer (attention layers; a dense copy when quantized)."""
        self._require(ATTENTION, "value_cache")
        return None if self.key_value is None else self._dense_caches()[1]

    # ---------------------------------------------------------- attention path

    def concatenate_to_cache(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, kv_sharding: tp.Any = None,
                             quantizer: tp.Any = None, causal_mask: torch.Tensor | bool | None = None,
                             token_type_ids: torch.Tensor | None = None, slot_ids: torch.Tensor | None = None,
                             check_bounds: bool = True):
        """Writes the new keys/values at each row's position; returns ``(key_cache, value_cache, mask)``.

        ``causal_mask`` may be a ``[T, T]`` / ``[1, 1, T, T]`` tensor, ``True``
        (causal mask generated on the fly, the fast path) or ``None``/``False``
        (no causal term, as in the seed).
        ``quantizer`` is ``None`` (whatever the storage is) or the metadata's
        ``kv_quantization`` string (``"int8"``, ``"fp8_e4m3"``); anything else is a
        ``ValueError``. With quantized storage the new tokens are quantized by the
        write op and ``key_cache`` / ``value_cache`` are dense tensors in the
        compute dtype (metadata ``dtype``, else the first key's), not views.
        ``slot_ids [B]`` make this layer's buffers a pool (rows of ``metadata.batch_size``):
        batch row ``b`` writes pool row ``slot_ids[b]`` (``-1`` skips it; see
        :func:`ops.concatenate_to_cache`); the returned views are of the whole pool.

        On a mesh (``LightningCache.init_cache(..., mesh=mesh)``) the cache is a DTensor and ``key``/
        ``value`` must be DTensors sharded like it (heads over the head axis, rows over the batch axis);
        the results are DTensors. ``kv_sharding`` may restate the cache's placements (a sequence of
        ``Placement``, a ``PartitionAxis``, or one mesh dimension name per ``key_value`` dim as in the seed's
        PartitionSpec): a mismatch is a ``ValueError``. With a plain cache it must be ``None``.
        """
        self._require(ATTENTION, "concatenate_to_cache")
        op = "LightningCacheView.concatenate_to_cache"
        ops.check_types(op, query=(query, "tensor?"), key=(key, "tensor"), value=(value, "tensor"),
                        attention_mask=(attention_mask, "tensor?"), token_type_ids=(token_type_ids, "tensor?"),
                        slot_ids=(slot_ids, "tensor?"), check_bounds=(check_bounds, "bool"))
        if not (causal_mask is None or isinstance(causal_mask, (bool, torch.Tensor))):
            raise TypeError(f"{op}: causal_mask must be a torch.Tensor, a bool or None, got "
                            f"{type(causal_mask).__name__} {causal_mask!r}")
        _check_head_dims(op, self.metadata, key=(key, self.metadata.key_dim), value=(value, self.metadata.value_dim))
        if quantizer is not None and not isinstance(quantizer, str):
            raise TypeError(f"{op}: quantizer must be None or a str, got {type(quantizer).__name__} {quantizer!r}")
        if quantizer is not None and quantizer != self.metadata.kv_quantization:
            raise ValueError(f"{op}: quantizer={quantizer!r} does not match the cache storage "
                             f"(kv_quantization={self.metadata.kv_quantization!r}); pass None or the storage's")
        if kv_sharding is not None:  # before the first update allocates anything
            self._adopt_mesh(key)
            sharding.check_kv_sharding(op, kv_sharding, self.mesh, self._kv_placements())
        if self.key_value is None:
            max_length = self.metadata.max_length
            if max_length is None:
                if attention_mask is None:
                    raise ValueError("max_length is unknown: give LightningCacheMetaData.create(max_length=...) "
                                     "or an attention_mask whose last dimension is the capacity")
                max_length = attention_mask.shape[-1]
            if slot_ids is not None and self.metadata.batch_size is None:
                raise ValueError("with slot_ids, the pool size must be given as batch_size in the metadata")
            batch = self.metadata.batch_size or key.shape[0]
            self._adopt_mesh(key)
            self._allocate(batch, max_length, self.metadata.dtype or key.dtype, key.device)
        is_causal = causal_mask is True
        causal_tensor = causal_mask if isinstance(causal_mask, torch.Tensor) else None
        key_cache, value_cache, mask = ops.concatenate_to_cache(
            self.key_value, self.index, key, value, attention_mask=attention_mask, causal_mask=causal_tensor,
            token_type_ids=token_type_ids, is_causal=is_causal, ring=self.metadata.ring, check_bounds=check_bounds,
            slot_ids=slot_ids, scales=self.scales)
        if self.scales is not None:
            key_cache, value_cache = self._dense_caches()
        return key_cache, value_cache, mask

    # ---------------------------------------------------------- lightning path

    def layer_slopes(self, device: torch.device | None = None) -> torch.Tensor:
        """MiniMax slopes for this layer (from its index and the model's layer count)."""
        if self.slopes is None or (device is not None and self.slopes.device != device and self.mesh is None):
            if self.num_layers is None or self.layer_index is None:
                raise ValueError(f"layer {self.layer_index}: the MiniMax slopes need layer_index and num_layers "
                                 f"(got {self.layer_index} and {self.num_layers}); build the view with both, or pass "
                                 "slopes= to recurrent_update")
            self.slopes = ops.lightning_slopes(self.metadata.key_heads, self.layer_index, self.num_layers,
                                               device=device)
            if self.mesh is not None:  # every rank holds the global heads' slopes of its shard
                placements = sharding.partition_axis_of(self.metadata).placements(self.mesh, "slopes")
                self.slopes = sharding.shard_full_tensor(self.slopes, self.mesh, placements)
        return self.slopes

    def recurrent_update(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, slot_ids: torch.Tensor | None = None,
                         slopes: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """Runs the lightning recurrence over ``[B, n, H, D]`` inputs from the current state; returns ``[B, n, H, Dv]``.

        One token uses the decode kernel, several the chunked prefill (same
        results). ``slot_ids [B]`` pick state rows (-1: skip the row);
        ``attention_mask [B, n]`` zeros skip a token whole (no decay, no ``k^T v``, output 0).
        """
        self._require(LIGHTNING, "recurrent_update")
        op = "LightningCacheView.recurrent_update"
        ops.check_types(op, query=(query, "tensor"), key=(key, "tensor"), value=(value, "tensor"),
                        attention_mask=(attention_mask, "tensor?"), slot_ids=(slot_ids, "tensor?"),
                        slopes=(slopes, "tensor?"), scale=(scale, "float"))
        m = self.metadata
        _check_head_dims(op, m, query=(query, m.key_dim), key=(key, m.key_dim), value=(value, m.value_dim))
        if self.key_value is None:
            if slot_ids is not None and self.metadata.batch_size is None:
                raise ValueError("with slot_ids, the state pool size must be given as batch_size in the metadata")
            self._adopt_mesh(query)
            self._allocate(self.metadata.batch_size or query.shape[0], None, None, query.device)
        slopes = slopes if slopes is not None else self.layer_slopes(query.device)
        if query.shape[1] == 1 and attention_mask is None:
            return ops.lightning_decode(self.key_value, query, key, value, slopes, slot_ids=slot_ids, scale=scale)
        return ops.lightning_prefill(self.key_value, query, key, value, slopes, attention_mask=attention_mask,
                                     slot_ids=slot_ids, block_size=self.metadata.block_size, scale=scale)

    def __repr__(self) -> str:
        if self.key_value is None:
            storage = "key_value=None"
        elif self.mesh is not None:
            local = self.key_value.to_local()
            storage = (f"{'key_value' if self.layer_kind == ATTENTION else 'state'}={tuple(self.key_value.shape)}, "
                       f"placements={tuple(self.key_value.placements)}, local shape={tuple(local.shape)}, "
                       f"dtype={local.dtype}, device={local.device}")
            if self.index is not None:
                storage += f", local positions={self.index.to_local().tolist()}"
        elif self.layer_kind == ATTENTION:
            storage = (f"key_value={tuple(self.key_value.shape)}, dtype={self.key_value.dtype}, "
                       f"device={self.key_value.device}, positions={self.index.tolist()}")
            if self.scales is not None:
                storage += f", kv_quantization={self.metadata.kv_quantization}, compute_dtype={self.compute_dtype}"
        else:
            storage = (f"state={tuple(self.key_value.shape)}, dtype={self.key_value.dtype}, "
                       f"device={self.key_value.device}")
        return f"{self.__class__.__name__}(kind={self.layer_kind}, layer_index={self.layer_index}, {storage})"

    __str__ = __repr__


class LightningCache:
    """All layers' views; ``cache[i]`` is layer ``i``'s :class:`LightningCacheView` (or ``None``)."""

    def __init__(self, views: list[LightningCacheView | None]):
        self.views = views

    @classmethod
    def init_cache(cls, num_hidden_layers: int, metadata: LightningCacheMetaData,
                   layer_kinds: tp.Sequence[str] | None = None, mesh: tp.Any = None) -> LightningCache:
        """One view per layer. ``layer_kinds`` (``"attention"``/``"lightning"`` per layer) defaults to all
        attention layers, as the seed builds it; see :func:`minimax_layer_kinds` for a hybrid.

        With ``mesh`` (a ``torch.distributed.device_mesh.DeviceMesh``) every layer's tensors are DTensors:
        batch rows ``Shard(0)`` over ``metadata.partition_axis.batch_axis``, heads over its ``head_axis``
        (``key_value`` dim 2, state dim 1, slopes dim 0), replicated otherwise; each rank allocates only its
        shard (eagerly when the metadata gives the sizes and, for attention layers, the dtype)."""
        _check_positive("num_hidden_layers", num_hidden_layers, "LightningCache.init_cache")
        if num_hidden_layers is None:
            raise TypeError("LightningCache.init_cache: num_hidden_layers must be an int, got None")
        if not isinstance(metadata, LightningCacheMetaData):
            raise TypeError(f"LightningCache.init_cache: metadata must be a LightningCacheMetaData, got "
                            f"{type(metadata).__name__} {metadata!r}")
        kinds = list(layer_kinds) if layer_kinds is not None else [ATTENTION] * num_hidden_layers
        if len(kinds) != num_hidden_layers:
            raise ValueError(f"layer_kinds has {len(kinds)} entries but num_hidden_layers is {num_hidden_layers}")
        return cls([LightningCacheView.init(metadata, layer_index=i, layer_kind=kind, num_layers=num_hidden_layers,
                                            mesh=mesh) for i, kind in enumerate(kinds)])

    @classmethod
    def init_empty(cls, num_hidden_layers: int) -> LightningCache:
        """``num_hidden_layers`` empty slots (``None``), to be filled later."""
        _check_positive("num_hidden_layers", num_hidden_layers, "LightningCache.init_empty")
        if num_hidden_layers is None:
            raise TypeError("LightningCache.init_empty: num_hidden_layers must be an int, got None")
        return cls([None] * num_hidden_layers)

    def __getitem__(self, index: int) -> LightningCacheView | None:
        return self.views[index]

    def __setitem__(self, index: int, view: LightningCacheView | None) -> None:
        self.views[index] = view

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self) -> tp.Iterator[LightningCacheView | None]:
        return iter(self.views)

    def reset(self) -> None:
        for view in self.views:
            if view is not None:
                view.reset()

    # ------------------------------------------------- beam search and forking

    def _pool_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """Every allocated per-row buffer (row = dim 0): attention ``key_value``/``index``, lightning states.

        On a mesh, each rank's local shard (aliasing the DTensor's storage): ids are rows of the rank's own
        shard, as slot ids are, and nothing is communicated. fp8 codes come as their bytes (uint8 views of the
        same memory), since row copies move bits and CPU indexing kernels lack the float8 dtypes."""
        buffers = []
        for i, view in enumerate(self.views):
            if view is None or view.key_value is None:
                continue
            local = (lambda t: _as_bytes_if_fp8(t.to_local())) if sharding.is_dtensor(view.key_value) \
                else _as_bytes_if_fp8
            buffers.append((f"layer {i} key_value", local(view.key_value)))
            if view.index is not None:
                buffers.append((f"layer {i} index", local(view.index)))
            if view.scales is not None:
                buffers.append((f"layer {i} scales", local(view.scales)))
        return buffers

    def _check_ids(self, op: str, check_bounds: bool, unique: tuple[str, ...] = (),
                   **ids: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Type/shape/dtype/device checks (free, no sync), then, with ``check_bounds`` outside captured code,
        the value checks (one host sync): ids in ``[0, rows)``, and no repeats in the arguments named in
        ``unique``. Returns the buffers to update. Everything is checked before anything is written."""
        ops.check_types(op, check_bounds=(check_bounds, "bool"), **{name: (t, "tensor") for name, t in ids.items()})
        for name, t in ids.items():
            if t.dtype != torch.int64:
                raise TypeError(f"{op}: {name} must be an int64 tensor, got {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
        lengths = {name: t.shape[0] for name, t in ids.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{op}: " + " and ".join(ids) + f" must have the same length, got {lengths}")
        buffers = self._pool_buffers()
        for name, t in ids.items():
            for buffer_name, buffer in buffers:
                if t.device != buffer.device:
                    raise ValueError(f"{op}: {name} must be on the cache's device ({buffer_name} is on "
                                     f"{buffer.device}), got {t.device}")
        # The value checks need the ids on the host: skipped in captured code (no sync, no graph break),
        # where copy_slots / reset_slots skip out-of-range ids and reorder_cache's indexing refuses them
        # (IndexError on CPU, a device-side assert on CUDA); nothing is ever written outside a buffer.
        if check_bounds and buffers and not torch.compiler.is_compiling():
            smallest_name, smallest = min(buffers, key=lambda named: named[1].shape[0])
            rows = smallest.shape[0]  # an id must be a row of every layer
            for name, t in ids.items():
                seen = set()
                for i, v in enumerate(t.tolist()):
                    if not 0 <= v < rows:
                        raise IndexError(f"{op}: {name}[{i}] = {v} is out of range [0, {rows}) "
                                         f"({smallest_name} has {rows} rows)")
                    if name in unique and v in seen:
                        raise IndexError(f"{op}: {name} repeats row {v} at {name}[{i}] (each row may be "
                                         "written once)")
                    seen.add(v)
        return buffers

    def reorder_cache(self, beam_idx: torch.Tensor, check_bounds: bool = True) -> None:
        """Beam search (Hugging Face's name): new row ``b`` = old row ``beam_idx[b]``, in every layer.

        Attention layers' K/V rows and positions and lightning layers' states are gathered in place:
        the buffers keep their addresses (CUDA graphs stay valid). ``beam_idx`` is a 1-D int64 tensor on
        the cache's device whose length is the number of rows; repeats are allowed (a beam kept twice).
        Compile-safe: no host sync under ``torch.compile`` (see ``check_bounds`` in :meth:`copy_slots`).
        On a mesh (DTensor caches) ids are rows of each rank's local shard, as slot ids are: every rank
        passes its own, and nothing is communicated (this holds for :meth:`copy_slots` and
        :meth:`reset_slots` too).
        """
        op = "LightningCache.reorder_cache"
        buffers = self._check_ids(op, check_bounds, beam_idx=beam_idx)
        for name, buffer in buffers:
            if buffer.shape[0] != beam_idx.shape[0]:
                raise ValueError(f"{op}: beam_idx must have one entry per cache row: {name} has "
                                 f"{buffer.shape[0]} rows, beam_idx has {beam_idx.shape[0]}")
        # A copy, so that a beam_idx sharing memory with a buffer (a layer's index) is read as it was
        # before any layer is written. copy_slots / reset_slots build fresh ids before writing too.
        beam_idx = beam_idx.clone()
        for _, buffer in buffers:
            buffer.copy_(buffer.index_select(0, beam_idx))

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor, check_bounds: bool = True) -> None:
        """Forks pool rows: row ``dst[i]`` becomes a copy of row ``src[i]``, in every layer.

        All sources are read before anything is written, so swaps (``src=[0, 1], dst=[1, 0]``) and
        overlapping ``src``/``dst`` work. Other rows stay bit-identical. ``src`` and ``dst`` are 1-D int64
        tensors of one length on the cache's device.

        ``check_bounds=True`` (default) checks the ids on the host (one sync) and raises ``IndexError``
        for an id outside ``[0, rows)`` or a repeated ``dst``, before any write. Under ``torch.compile``,
        and with ``check_bounds=False``, there is no sync: a pair with an out-of-range ``src`` or ``dst``
        is skipped (nothing written for it, the other pairs proceed, as the ops skip bad slot ids), and
        for a repeated ``dst`` the first occurrence wins (deterministically).
        """
        op = "LightningCache.copy_slots"
        buffers = self._check_ids(op, check_bounds, unique=("dst",), src=src, dst=dst)
        if dst.shape[0] == 0 or not buffers:  # argmax below needs a non-empty dim; nothing to copy anyway
            return
        # Skipped pairs become repeats of the first kept pair (same dst, same src), or copy row 0 onto
        # itself when no pair is kept: every write then carries a value some kept pair (or the row
        # itself) already writes, so nothing is written for them and nothing is half-written.
        rows = min(buffer.shape[0] for _, buffer in buffers)
        kept = src.ge(0) & src.lt(rows) & dst.ge(0) & dst.lt(rows)
        lead = kept.to(torch.uint8).argmax().view(1)
        any_kept = kept.any()
        zero = torch.zeros((), dtype=torch.int64, device=dst.device)
        dst = torch.where(kept, dst, torch.where(any_kept, dst.index_select(0, lead), zero))
        src = torch.where(kept, src, torch.where(any_kept, src.index_select(0, lead), zero))
        # Later duplicates of a dst copy the first occurrence's source: every write to a row then
        # carries the same value, so index_copy_'s unordered duplicate writes are deterministic.
        first = (dst.unsqueeze(1) == dst.unsqueeze(0)).to(torch.uint8).argmax(dim=1)
        src = src.index_select(0, first)
        for _, buffer in buffers:
            buffer.index_copy_(0, dst, buffer.index_select(0, src))

    def reset_slots(self, ids: torch.Tensor, check_bounds: bool = True) -> None:
        """Forgets rows ``ids`` in every layer: positions 0, K/V 0, states 0; other rows bit-identical.

        ``ids`` is a 1-D int64 tensor on the cache's device; repeats are harmless. ``check_bounds`` as in
        :meth:`copy_slots` (repeats are not an error here): without it an out-of-range id is skipped.
        """
        op = "LightningCache.reset_slots"
        buffers = self._check_ids(op, check_bounds, ids=ids)
        if ids.shape[0] == 0 or not buffers:
            return
        # Skipped ids become repeats of the first kept id (zeroed twice), or, when none is kept, row 0
        # written with its own contents: nothing is written for them and nothing is half-written.
        rows = min(buffer.shape[0] for _, buffer in buffers)
        kept = ids.ge(0) & ids.lt(rows)
        any_kept = kept.any()
        zero = torch.zeros((), dtype=torch.int64, device=ids.device)
        ids = torch.where(kept, ids, torch.where(any_kept, ids.index_select(0, kept.to(torch.uint8).argmax().view(1)),
                                                 zero))
        for _, buffer in buffers:
            # index_copy_, not index_fill_: index_fill_ wraps a negative id onto another row.
            keep_own = buffer.index_select(0, ids)
            zeros = torch.zeros_like(keep_own)
            buffer.index_copy_(0, ids, torch.where(any_kept, zeros, keep_own))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(\n  " + "\n  ".join(str(view) for view in self.views) + "\n)"

    __str__ = __repr__


def _as_bytes_if_fp8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def minimax_layer_kinds(num_hidden_layers: int, attention_every: int = 8) -> list[str]:
    """MiniMax-Text-01's pattern: every ``attention_every``-th layer is softmax attention, the rest lightning."""
    _check_positive("num_hidden_layers", num_hidden_layers)
    _check_positive("attention_every", attention_every)
    return [ATTENTION if (i + 1) % attention_every == 0 else LIGHTNING for i in range(num_hidden_layers)]


class LightningMetadata:
    """Runtime metadata of the Lightning cache. Empty: positions live in the views' ``index`` tensors."""

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"
