"""Hugging Face transformers' ``MiniMaxForCausalLM`` on this package's ops.

    from torch_lightning_cache.integrations.transformers import LightningMiniMaxCache, patch_minimax
    patch_minimax(model)                                  # once; idempotent
    cache = LightningMiniMaxCache(model.config, batch_size=2, max_length=64)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=16)

``patch_minimax`` replaces, on this model instance only, the forward of every ``MiniMaxAttention`` (the K/V go
through ``concatenate_to_cache`` with the on-the-fly causal mask, then SDPA over the cache) and every
``MiniMaxLightningAttention`` (``lightning_prefill`` / ``lightning_decode`` on a float32 state, with float32
slopes from ``lightning_slopes``), and wraps ``MiniMaxModel.forward`` so the layers get the 2-D padding mask and
the cache's own length rather than the 4-D masks Hugging Face builds from its cache. Layer kinds come from
``config.layer_types``, in any order.

What the cache adds over Hugging Face's ``MiniMaxCache`` (transformers 5.23):

* ``get_seq_length()`` is right whatever layer 0 is (Hugging Face's reports 0 when a linear layer comes first);
* ``reorder_cache(beam_idx)`` gathers the attention rows *and* the recurrent states (beam search);
* ``crop(n)`` (assisted / prompt-lookup decoding): the K/V positions go back with ``rewind_cache``; a recurrent
  state cannot be un-decayed, so while past recording is on (``generate`` turns it on for assisted decoding) each
  forward of at most ``max_rewind`` unpadded tokens runs ``lightning_decode(..., step_states=...)``, keeping the
  state after every token, and ``crop`` restores the right one with ``lightning_accept``. Snapshots, not
  recomputation: a crop costs one gather. Tokens older than the last ``max_rewind`` recorded ones, or behind a
  longer or padded forward, cannot be cropped (``ValueError``);
* ``generate`` makes one itself when none is passed (prefill chunking and assisted decoding work without one).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

try:
    from transformers.cache_utils import DynamicLayer  # the layer class of Hugging Face's caches
    from transformers.models.minimax import modeling_minimax as _hf
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("torch_lightning_cache.integrations.transformers needs Hugging Face transformers "
                      "(pip install 'transformers>=5.23')") from error

try:  # transformers' registry of recordable outputs, keyed on the model's class (5.x)
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:  # pragma: no cover - older transformers
    _CAN_RECORD_REGISTRY = {}

from .. import ops
from ..cache import ATTENTION, LIGHTNING, LightningCache, LightningCacheMetaData, LightningCacheView

__all__ = ["LightningMiniMaxCache", "patch_minimax"]

_KINDS = {"full_attention": ATTENTION, "linear_attention": LIGHTNING}

# The cache's keyword in Hugging Face's forwards and generate's model_kwargs: transformers 5.25 renamed
# ``past_key_values`` to ``cache`` (the old name is still accepted, with a FutureWarning, until 5.40).
_CACHE_ARG = "cache" if "cache" in inspect.signature(_hf.MiniMaxModel.forward).parameters else "past_key_values"


def _take_cache(past_key_values, kwargs: dict):
    """The cache, whichever name it came under (pops ``cache`` from ``kwargs``)."""
    cache = kwargs.pop("cache", None)
    return cache if cache is not None else past_key_values


def _layer_kinds(config) -> list[str]:
    kinds = []
    for i, name in enumerate(config.layer_types):
        if name not in _KINDS:
            raise ValueError(f"config.layer_types[{i}] = {name!r}: expected 'full_attention' or 'linear_attention'")
        kinds.append(_KINDS[name])
    if len(kinds) != config.num_hidden_layers:
        raise ValueError(f"config.layer_types has {len(kinds)} entries, num_hidden_layers is "
                         f"{config.num_hidden_layers}")
    return kinds


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _hf_keys_values(view: LightningCacheView, tokens: int, head_dim: int,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``tokens`` of an attention layer's K|V as Hugging Face's (keys, values), [batch, heads, tokens,
    head_dim] each: views of the buffer, or, for quantized storage, dequantized copies in ``dtype``."""
    held = view.key_value[:, :tokens]
    if view.scales is not None:
        keys, values = ops.dequantize_kv(held, view.scales[:, :tokens].contiguous(), head_dim, dtype or torch.float32)
        return keys.transpose(1, 2), values.transpose(1, 2)
    return held[..., :head_dim].transpose(1, 2), held[..., head_dim:].transpose(1, 2)


class LightningMiniMaxCache(_hf.MiniMaxCache):
    """The cache to pass as ``past_key_values`` to a model patched by :func:`patch_minimax`.

    Attention layers keep a unified K|V buffer ``[rows, max_length, kv_heads, 2 * head_dim]`` (``dtype``:
    the model's unless given) and lightning layers a float32 state ``[rows, heads, head_dim, head_dim]``, as
    :class:`~torch_lightning_cache.LightningCache` views. Buffers are allocated at the first forward (on its
    device); ``rows`` is then that forward's batch, which must be a multiple of ``batch_size`` (``generate``
    with ``num_beams`` or ``num_return_sequences`` runs ``k * batch_size`` rows). Like Hugging Face's caches,
    every row holds the same number of tokens (left padding included): ``get_seq_length()``.

    ``max_rewind``: how many recent tokens :meth:`crop` can take back while recording (see the module doc).
    ``growable``: grow ``max_length`` when a forward would overflow it (the caches ``generate`` and the
    patched forward make themselves); otherwise overflowing is a ``ValueError``.
    ``kv_quantization``: ``"int8"`` / ``"fp8_e4m3"`` keeps the attention layers' K|V as codes with per-token,
    per-head float32 scales (``2 * head_dim + 8`` bytes per token and head instead of ``2 * head_dim`` elements);
    each forward quantizes only its new tokens and attention reads the codes (``cached_attention``).
    """

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return False  # generate must not build 4-D masks for it

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        return self._rows() if self.lightning is not None else self.rows_per_batch

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self.lightning is not None

    # Hugging Face's MiniMaxCache exposes its storage as ``layers[i].keys / .values`` ([batch, kv_heads, tokens,
    # head_dim]) for attention layers and ``linear_cache[i]`` ([batch, heads, head_dim, head_dim]) for linear
    # ones; code written against it (its own tests among it) reads them. Here they are read-only views of this
    # cache's buffers, built on access: writing through them changes the cache, assigning them does nothing.
    @property
    def layers(self) -> list:  # type: ignore[override]
        if self.lightning is None:
            return []
        out = []
        for view in self.lightning:
            layer = DynamicLayer()
            if view.layer_kind == ATTENTION:
                layer.keys, layer.values = _hf_keys_values(view, self._length, _head_dim(self.config),
                                                           self._compute_dtype)
                layer.dtype, layer.device, layer.is_initialized = layer.keys.dtype, layer.keys.device, True
            out.append(layer)
        return out

    @layers.setter
    def layers(self, value) -> None:  # Cache.__init__ assigns its own (empty) list: the buffers are the storage
        pass

    @property
    def linear_cache(self) -> list:  # type: ignore[override]
        if self.lightning is None:
            return []
        return [view.key_value if view.layer_kind == LIGHTNING else [] for view in self.lightning]

    @linear_cache.setter
    def linear_cache(self, value) -> None:  # MiniMaxCache.__init__ assigns an empty list
        pass

    def __init__(self, config, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, max_rewind: int = 32, growable: bool = False,
                 kv_quantization: str | None = None):
        super().__init__()
        ops.check_types("LightningMiniMaxCache", batch_size=(batch_size, "int"), max_length=(max_length, "int"),
                        dtype=(dtype, "dtype?"), device=(device, "device?"), max_rewind=(max_rewind, "int"),
                        growable=(growable, "bool"))
        ops.check_kv_quantization("LightningMiniMaxCache", kv_quantization)
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if value <= 0:
                raise ValueError(f"LightningMiniMaxCache: {name} must be positive, got {value}")
        if max_rewind < 0:
            raise ValueError(f"LightningMiniMaxCache: max_rewind must be >= 0, got {max_rewind}")
        self.config = config
        self.kinds = _layer_kinds(config)
        self.rows_per_batch = batch_size  # (Cache.batch_size is a read-only property: the rows held)
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.max_rewind = max_rewind
        self.growable = growable
        self.kv_quantization = kv_quantization
        self._compute_dtype: torch.dtype | None = None  # the model's dtype, known at the first forward
        self.lightning: LightningCache | None = None  # allocated at the first forward
        self._length = 0  # tokens held by every row (the index of every attention layer)
        self._recording = False
        # (tokens, step_states per lightning layer): step_states[:, t] is the state before the entry's t-th token
        self._history: list[tuple[int, dict[int, torch.Tensor]]] = []
        self._step: dict | None = None  # the current forward's masks (set by the patched MiniMaxModel.forward)

    # ------------------------------------------------------------------ Hugging Face's Cache interface

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return True

    def __len__(self) -> int:
        return self.config.num_hidden_layers

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens seen by every row (padding included), the same for every layer."""
        return self._length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        """From now on, keep per-token states so :meth:`crop` can take tokens back (``generate`` calls this)."""
        self._recording = True

    def update(self, *args, **kwargs):
        raise RuntimeError("LightningMiniMaxCache is used by a patched model: call "
                           "torch_lightning_cache.integrations.transformers.patch_minimax(model) first")

    def get_linear_cache(self, layer_idx: int):
        self.update()

    def reset(self) -> None:
        if self.lightning is not None:
            self.lightning.reset()
        self._length = 0
        self._history.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``b`` becomes old row ``beam_idx[b]``, in every layer, recurrent states included."""
        if self.lightning is None:
            return
        self.lightning.reorder_cache(beam_idx.to(device=self._device(), dtype=torch.int64))
        self._history.clear()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)].contiguous())

    def crop(self, max_length: int) -> None:
        """Hugging Face's convention: ``max_length <= 0`` removes ``-max_length`` tokens, ``> 0`` keeps that many.

        Only tokens recorded since :meth:`activate_past_recording` (at most ``max_rewind``) can be removed.
        """
        ops.check_types("LightningMiniMaxCache.crop", max_length=(max_length, "int"))
        remove = -max_length if max_length <= 0 else max(self._length - max_length, 0)
        if remove == 0:
            return
        recorded = sum(n for n, _ in self._history)
        if remove > recorded:
            raise ValueError(f"LightningMiniMaxCache.crop: cannot remove {remove} tokens: only the last {recorded} "
                             f"are recorded (activate_past_recording() must precede the forwards to undo, and at "
                             f"most max_rewind={self.max_rewind} tokens are kept)")
        rows = self._rows()
        counts = torch.full((rows,), remove, dtype=torch.int64, device=self._device())
        for view in self.lightning:
            if view.layer_kind == ATTENTION:
                ops.rewind_cache(view.index, counts)
        remaining = remove
        while True:
            tokens, states = self._history[-1]
            if remaining < tokens:
                keep = tokens - remaining
                self._history[-1] = (keep, {i: s[:, :keep + 1] for i, s in states.items()})
                break
            self._history.pop()
            remaining -= tokens
            if remaining == 0:
                keep = 0
                break
        accepted = torch.full((rows,), keep, dtype=torch.int64, device=self._device())
        for i, step_states in states.items():
            ops.lightning_accept(self.lightning[i].key_value, step_states, accepted)
        self._length -= remove

    # ------------------------------------------------------------------ storage

    def _device(self) -> torch.device:
        return self.lightning[0].key_value.device

    def _rows(self) -> int:
        return self.lightning[0].key_value.shape[0]

    def _map_rows(self, fn) -> None:
        if self.lightning is None:
            return
        for view in self.lightning:
            view.key_value = fn(view.key_value)
            if view.index is not None:
                view.index = fn(view.index)
            if view.scales is not None:
                view.scales = fn(view.scales)
        self._history.clear()

    def _allocate(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        c = self.config
        num_layers = c.num_hidden_layers
        dtype = self.dtype or dtype
        device = self.device or device
        self._compute_dtype = dtype
        attention = LightningCacheMetaData.create(batch_size=rows, num_heads=c.num_key_value_heads,
                                                  head_dim=_head_dim(c), max_length=self.max_length, dtype=dtype,
                                                  device=device, kv_quantization=self.kv_quantization)
        lightning = LightningCacheMetaData.create(batch_size=rows, num_heads=c.num_attention_heads,
                                                  head_dim=_head_dim(c), device=device, block_size=c.block_size)
        self.lightning = LightningCache([
            LightningCacheView.init(attention if kind == ATTENTION else lightning, i, kind, num_layers=num_layers)
            for i, kind in enumerate(self.kinds)])
        for view in self.lightning:
            if view.layer_kind == LIGHTNING:
                view.layer_slopes(device)  # float32, whatever the model's dtype

    def _grow(self, needed: int) -> None:
        new_length = max(needed, 2 * self.max_length)
        for view in self.lightning:
            if view.layer_kind == ATTENTION:
                for name in ("key_value", "scales"):  # scales: quantized storage only
                    old = getattr(view, name)
                    if old is not None:
                        grown = old.new_zeros((old.shape[0], new_length, *old.shape[2:]))
                        grown[:, :old.shape[1]].copy_(old)
                        setattr(view, name, grown)
        self.max_length = new_length

    def _begin(self, rows: int, tokens: int, attention_mask: torch.Tensor | None, dtype: torch.dtype,
               device: torch.device, attentions: bool = False) -> None:
        """Called once per forward, before the layers: allocation, capacity, the masks every layer uses."""
        if self.lightning is None or (self._length == 0 and rows != self._rows()):
            if rows % self.rows_per_batch != 0:
                raise ValueError(f"LightningMiniMaxCache: the batch has {rows} rows, not a multiple of batch_size="
                                 f"{self.rows_per_batch}")
            self._allocate(rows, dtype, device)
        elif rows != self._rows():
            raise ValueError(f"LightningMiniMaxCache: the batch has {rows} rows but the cache holds {self._rows()} "
                             f"(with {self._length} tokens); reset() it or make a new one")
        total = self._length + tokens
        if total > self.max_length:
            if not self.growable:
                raise ValueError(f"LightningMiniMaxCache: {self._length} cached + {tokens} new tokens exceed "
                                 f"max_length={self.max_length}")
            self._grow(total)
        full_mask = new_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != rows or attention_mask.shape[1] != total:
                raise ValueError(f"LightningMiniMaxCache: attention_mask must be the 2-D padding mask [batch, cached "
                                 f"+ new tokens] = [{rows}, {total}], got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if not bool(mask.all()):  # one host sync per forward, as Hugging Face's own mask code does
                full_mask = F.pad(mask, (0, self.max_length - total))
                new_mask = mask[:, self._length:]
                if bool(new_mask.all()):
                    new_mask = None
        # While recording, the last min(tokens, max_rewind) tokens of every forward keep per-token states (the
        # lightning layers prefill the head and decode the tail); older recorded tokens are dropped past max_rewind.
        recorded = min(tokens, self.max_rewind) if self._recording else 0
        if recorded:
            excess = sum(n for n, _ in self._history) + recorded - self.max_rewind
            while excess > 0:
                oldest, states = self._history[0]
                if oldest <= excess:
                    self._history.pop(0)
                    excess -= oldest
                else:
                    self._history[0] = (oldest - excess, {i: s[:, excess:] for i, s in states.items()})
                    excess = 0
            self._history.append((recorded, {}))
        else:
            self._history.clear()
        self._step = {"full_mask": full_mask, "new_mask": new_mask, "tokens": tokens, "total": total,
                      "recorded": recorded, "attentions": attentions}

    def _end(self) -> None:
        self._length += self._step["tokens"]
        self._step = None

    def __repr__(self) -> str:
        return (f"LightningMiniMaxCache(layers={self.kinds}, batch_size={self.rows_per_batch}, max_length="
                f"{self.max_length}, seq_length={self._length}, recording={self._recording})")


# --------------------------------------------------------------------------- the patched classes
#
# patch_minimax swaps the class of the model's modules for these subclasses (same state, same parameters), so
# copies, state_dict round trips, to() and pickling keep the patch. Each forward takes the package's path only when
# its cache is a LightningMiniMaxCache in a forward begun by _PatchedMiniMaxModel; otherwise it is Hugging Face's.


def _active_step(cache) -> dict | None:
    return cache._step if isinstance(cache, LightningMiniMaxCache) else None


class _PatchedMiniMaxAttention(_hf.MiniMaxAttention):
    """Softmax attention on ``concatenate_to_cache`` + SDPA over the cache (``cached_attention`` over the codes of
    quantized storage), or explicit weights when asked."""

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        past_key_values = _take_cache(past_key_values, kwargs)
        step = _active_step(past_key_values)
        if step is None:
            return super().forward(hidden_states, position_embeddings, attention_mask,
                                   **{_CACHE_ARG: past_key_values}, **kwargs)
        b, q = hidden_states.shape[:2]
        hidden_shape = (b, q, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = _hf.apply_rotary_pos_emb(query, key, cos, sin)
        view = past_key_values.lightning[self.layer_idx]
        total = step["total"]
        mask = ops.concatenate_to_cache(view.key_value, view.index, key.transpose(1, 2), value.transpose(1, 2),
                                        attention_mask=step["full_mask"], is_causal=True,
                                        scales=view.scales)[2][..., :total]
        window = getattr(self.config, "sliding_window", None)
        if window is not None:  # Hugging Face's window on cache positions: key j is seen from position p if p - j < w
            columns = torch.arange(total, device=mask.device)
            rows = columns[total - q:, None]
            mask = mask & (columns > rows - window)
        # A padding query sees no column; give it every column so the softmax stays finite (its output reaches
        # nothing: later queries never see a padding key, and the lightning layers skip padding tokens).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        weights = None
        if view.scales is not None and not step["attentions"]:  # attention straight from the codes, no dense copy
            out = ops.cached_attention(query.transpose(1, 2), view.key_value[:, :total], mask, self.head_dim,
                                       view.scales[:, :total], softmax_scale=self.scaling)
            return self.o_proj(out.reshape(b, q, -1)), None
        keys, values = _hf_keys_values(view, total, self.head_dim, query.dtype)
        if step["attentions"]:  # the weights Hugging Face's eager attention returns: softmax in float32
            groups = query.shape[1] // keys.shape[1]
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            scores = (query @ keys.transpose(2, 3)) * self.scaling
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(query.dtype)
            out = weights @ values
        else:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=keys.shape[1] != query.shape[1])
        out = out.transpose(1, 2).reshape(b, q, -1)
        return self.o_proj(out), weights


class _PatchedMiniMaxLightningAttention(_hf.MiniMaxLightningAttention):
    """Lightning attention on ``lightning_prefill`` / ``lightning_decode`` over a float32 state."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        past_key_values = _take_cache(past_key_values, kwargs)
        step = _active_step(past_key_values)
        if step is None:
            return super().forward(hidden_states, position_embeddings, attention_mask,
                                   **{_CACHE_ARG: past_key_values}, **kwargs)
        cache = past_key_values
        b, n = hidden_states.shape[:2]
        heads, d = self.num_attention_heads, self.head_dim
        qkv = self.act_fn(self.qkv_proj(hidden_states)).view(b, n, heads, 3 * d)
        query, key, value = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]  # strided views, no copies
        view = cache.lightning[self.layer_idx]
        state, slopes = view.key_value, view.slopes
        new_mask = step["new_mask"]
        recorded = step["recorded"]
        head = n - recorded  # tokens run without per-token states
        outputs = []
        if head == 1 and new_mask is None:
            outputs.append(ops.lightning_decode(state, query[:, :1], key[:, :1], value[:, :1], slopes))
        elif head == 1:  # a padding token: skip the row (state kept, output 0)
            rows = torch.arange(b, device=state.device)
            slot_ids = torch.where(new_mask[:, 0], rows, torch.full_like(rows, -1))
            outputs.append(ops.lightning_decode(state, query[:, :1], key[:, :1], value[:, :1], slopes,
                                                slot_ids=slot_ids))
        elif head > 1:
            head_mask = new_mask[:, :head] if new_mask is not None else None
            outputs.append(ops.lightning_prefill(state, query[:, :head], key[:, :head], value[:, :head], slopes,
                                                 attention_mask=head_mask, block_size=self.block_size))
        if recorded:
            tail_key, tail_value = key[:, head:], value[:, head:]
            if new_mask is not None:  # padding adds nothing to the state (left padding: the state is still 0)
                keep = new_mask[:, head:, None, None].to(key.dtype)
                tail_key, tail_value = tail_key * keep, tail_value * keep
            step_states = state.new_empty((b, recorded + 1, *state.shape[1:]))
            outputs.append(ops.lightning_decode(state, query[:, head:], tail_key, tail_value, slopes,
                                                step_states=step_states))
            cache._history[-1][1][self.layer_idx] = step_states
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        out = self.norm(out.reshape(b, n, heads * d))
        out = torch.sigmoid(self.output_gate(hidden_states)) * out
        # Hugging Face returns the state after the forward as this layer's "attention weights"
        weights = state.to(hidden_states.dtype).clone() if step["attentions"] else None
        return self.out_proj(out), weights


def _needs_autograd(model, inputs_embeds) -> bool:
    """The package's ops have no autograd: a forward that must be differentiable runs Hugging Face's path."""
    if not torch.is_grad_enabled():
        return False
    if inputs_embeds is not None and inputs_embeds.requires_grad:
        return True
    return any(p.requires_grad for p in model.parameters())


class _PatchedMiniMaxModel(_hf.MiniMaxModel):
    """Begins and ends each forward on a LightningMiniMaxCache; Hugging Face's own forward where one is not in play."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        cache = past_key_values = _take_cache(past_key_values, kwargs)
        autograd = _needs_autograd(self, inputs_embeds) or (self.training and self.config.attention_dropout > 0)
        if not isinstance(cache, LightningMiniMaxCache):
            # Training, no cache wanted, Hugging Face's own cache or 4-D masks: exactly Hugging Face's model.
            if autograd or not use_cache or cache is not None or isinstance(attention_mask, dict):
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       **{_CACHE_ARG: past_key_values}, inputs_embeds=inputs_embeds,
                                       use_cache=use_cache, **kwargs)
        elif autograd:
            raise ValueError("a LightningMiniMaxCache is for inference (the package's ops have no autograd): run "
                             "under torch.no_grad() with the model in eval() mode, or pass no cache to train")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if isinstance(attention_mask, dict):
            raise TypeError("a model patched by patch_minimax takes the 2-D padding mask, not a dict of masks")
        rows, length = tokens.shape[0], tokens.shape[1]
        if cache is None:  # use_cache without a cache: a private one, returned
            cache = LightningMiniMaxCache(self.config, rows, max(length, 1), growable=True)
        attentions = kwargs.get("output_attentions")
        attentions = self.config.output_attentions if attentions is None else attentions
        cache._begin(rows, length, attention_mask, self.embed_tokens.weight.dtype, tokens.device,
                     attentions=bool(attentions))
        try:
            masks = {"full_attention": None, "linear_attention": None}  # the layers read the cache's masks
            out = super().forward(input_ids=input_ids, attention_mask=masks, position_ids=position_ids,
                                  **{_CACHE_ARG: cache}, inputs_embeds=inputs_embeds, use_cache=True, **kwargs)
        except BaseException:
            cache._step = None
            raise
        cache._end()
        if not use_cache and _CACHE_ARG in getattr(out, "__dataclass_fields__", {}):
            setattr(out, _CACHE_ARG, None)
        return out


class _PatchedMiniMaxForCausalLM(_hf.MiniMaxForCausalLM):
    """``generate`` makes a LightningMiniMaxCache when none is passed (Hugging Face's makes none for MiniMax)."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get(_CACHE_ARG) is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            batch_size = kwargs.get("batch_size", args[1] if len(args) > 1 else 1)
            max_length = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None) or 256
            cache = LightningMiniMaxCache(self.config, batch_size, max(int(max_length), 1), growable=True)
            if getattr(generation_config, "is_assistant", False):
                cache.activate_past_recording()
            model_kwargs[_CACHE_ARG] = cache
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


_PATCHED = {cls.__mro__[1]: cls for cls in (_PatchedMiniMaxAttention, _PatchedMiniMaxLightningAttention,
                                            _PatchedMiniMaxModel, _PatchedMiniMaxForCausalLM)}
for _cls in _PATCHED.values():
    # Hugging Face's names: save_pretrained writes config.architectures from __name__, and loss and cache
    # selection read it; __qualname__ stays this module's, so pickling finds the patched class.
    _cls.__name__ = _cls.__mro__[1].__name__
for _cls in (_PatchedMiniMaxModel, _PatchedMiniMaxForCausalLM):
    # Hugging Face treats models whose class lives outside transformers as custom code and then skips its
    # checkpoint conversions (weight renames) on load and save; these run Hugging Face's own code and weights.
    _cls.is_custom_code = classmethod(lambda cls: cls.__mro__[1].is_custom_code())


def patch_minimax(model):
    """Runs a ``MiniMaxForCausalLM`` (or ``MiniMaxModel``) on this package's ops; idempotent. Returns ``model``.

    Only this instance changes: its modules' classes become subclasses whose forwards use a
    ``LightningMiniMaxCache`` (``generate`` makes one when none is passed). Forwards that need autograd, training
    with dropout, ``use_cache=False`` or Hugging Face's own ``MiniMaxCache`` run Hugging Face's code unchanged.
    """
    base = model.model if isinstance(model, _hf.MiniMaxForCausalLM) else model
    if not isinstance(base, _hf.MiniMaxModel):
        raise TypeError(f"patch_minimax: expected a MiniMaxForCausalLM or MiniMaxModel, got {type(model).__name__}")
    _layer_kinds(base.config)
    for module in model.modules():
        patched = _PATCHED.get(type(module))
        if patched is not None:
            module.__class__ = patched
            if isinstance(module, _hf.MiniMaxPreTrainedModel):  # output_attentions/hidden_states: keyed on class
                _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
    return model
