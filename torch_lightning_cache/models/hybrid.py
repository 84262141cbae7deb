"""A small MiniMax-style hybrid decoder that uses the cache operators.

Softmax-attention layers keep a sequence cache (``concatenate_to_cache`` with
the on-the-fly causal mask, then ``scaled_dot_product_attention`` over the
cache); lightning layers keep a recurrent state (``lightning_prefill`` for
prompts, ``lightning_decode`` for single tokens). The caches are module
buffers, so the model can be compiled (decode steps do not recompile: the
positions live in the ``index`` buffers), captured in CUDA graphs (the buffers
have static addresses), scripted with TorchScript and exported.

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
