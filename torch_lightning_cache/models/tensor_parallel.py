"""Tensor parallelism over heads for :class:`~torch_lightning_cache.models.hybrid.HybridLM`.

:func:`parallelize_hybrid_lm` splits every layer's heads over a mesh axis with
``torch.distributed.tensor.parallel`` and gives each rank caches holding only its heads (and, with a batch
axis, its rows); :func:`model_caches` shows those caches as DTensors. The sharding rules themselves are
:mod:`torch_lightning_cache.sharding`'s.
"""

from __future__ import annotations

import torch

from .. import ops
from ..cache import ATTENTION
from ..sharding import BATCH_ROLE, HEAD_ROLE, PartitionAxis, from_local_shard
from .hybrid import HybridLM


class HeadShardedRMSNorm(torch.nn.Module):
    """RMSNorm over features split across the head axis: the sum of squares is all-reduced (as vLLM's
    MiniMax RMSNormTP does), so every rank normalizes its heads by the norm of the whole vector."""

    def __init__(self, norm, mesh, tp_rank: int, tp_size: int):
        super().__init__()
        size = norm.weight.shape[0]
        self.weight = torch.nn.Parameter(norm.weight.detach().chunk(tp_size)[tp_rank].clone())
        self.eps, self.size, self.mesh = norm.eps, size, mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol  # slow to import: tensor-parallel users only

        x32 = x.float()
        square_sum = funcol.all_reduce(x32.pow(2).sum(-1, keepdim=True), "sum", self.mesh)
        x32 = x32 * torch.rsqrt(square_sum / self.size + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def _group_rows_by_rank(linear: torch.nn.Linear, parts: int, tp_size: int) -> None:
    """Reorders a fused projection's output rows ``[part 0 | part 1 | ...]`` (each split by heads) so that
    column-wise sharding gives rank ``r`` its own heads of every part: ``[part 0 of r | part 1 of r | ...]``."""
    with torch.no_grad():
        w = linear.weight
        linear.weight.copy_(w.view(parts, tp_size, w.shape[0] // (parts * tp_size), w.shape[1])
                            .transpose(0, 1).reshape(w.shape))


def parallelize_hybrid_lm(model: HybridLM, mesh, partition_axis: PartitionAxis | None = None) -> HybridLM:
    """Makes ``model`` (a :class:`~torch_lightning_cache.models.hybrid.HybridLM`) tensor-parallel over heads, in place.

    The head axis of ``partition_axis`` (default: the whole 1-D ``mesh``) splits every attention and
    lightning layer's heads: q/k/v (and the lightning gate) column-wise, the output projection row-wise
    (``torch.distributed.tensor.parallel``); the MLPs are split the same way. Each rank keeps only its heads'
    caches (``key_value``, states) and the global heads' slopes. With a batch axis, each rank's cache holds
    only its batch rows and the model takes that rank's rows of ``input_ids`` (data parallel). Every rank
    computes on local tensors; the only communication is the row-wise projections' all-reduce and the
    lightning norm's sum of squares. Returns ``model``; :func:`model_caches` gives its caches as DTensors.
    """
    from torch.distributed.tensor.parallel import (  # slow to import: tensor-parallel users only
        ColwiseParallel, RowwiseParallel, parallelize_module)

    axis = partition_axis or PartitionAxis(head_axis=0 if mesh.ndim == 1 else None)
    head_dim_index = axis.mesh_dim(mesh, HEAD_ROLE)
    batch_dim_index = axis.mesh_dim(mesh, BATCH_ROLE)
    coordinate = mesh.get_coordinate()
    tp_size = mesh.size(head_dim_index) if head_dim_index is not None else 1
    tp_rank = coordinate[head_dim_index] if head_dim_index is not None else 0
    dp_size = mesh.size(batch_dim_index) if batch_dim_index is not None else 1
    config = model.config
    if config.num_heads % tp_size:
        raise ValueError(f"parallelize_hybrid_lm: {config.num_heads} heads cannot be split over {tp_size} ranks")
    if config.intermediate_size % tp_size:
        raise ValueError(f"parallelize_hybrid_lm: intermediate_size {config.intermediate_size} cannot be split over "
                         f"{tp_size} ranks")
    if model.batch_size % dp_size:
        raise ValueError(f"parallelize_hybrid_lm: batch_size {model.batch_size} cannot be split over {dp_size} ranks")
    if tp_size > 1 and mesh.ndim > 1 and not mesh.mesh_dim_names:
        raise ValueError("parallelize_hybrid_lm: a mesh of several dimensions needs mesh_dim_names")
    local_heads = config.num_heads // tp_size
    heads = slice(tp_rank * local_heads, (tp_rank + 1) * local_heads)
    model.batch_size //= dp_size
    model.tensor_parallel_mesh, model.tensor_parallel_axis = mesh, axis
    for layer in model.layers:
        mixer = layer.mixer
        if tp_size > 1:
            head_mesh = mesh[mesh.mesh_dim_names[head_dim_index]] if mesh.ndim > 1 else mesh
            _group_rows_by_rank(mixer.qkv, 3, tp_size)
            _group_rows_by_rank(layer.mlp_in, 2, tp_size)
            plan = {"qkv": ColwiseParallel(), "out": RowwiseParallel()}
            if layer.kind != ATTENTION:
                plan["gate"] = ColwiseParallel()
                mixer.norm = HeadShardedRMSNorm(mixer.norm, head_mesh, tp_rank, tp_size)
            parallelize_module(mixer, head_mesh, plan)
            parallelize_module(layer, head_mesh, {"mlp_in": ColwiseParallel(), "mlp_out": RowwiseParallel()})
        mixer.heads = local_heads
        # Each rank keeps only its rows and heads of every cache (plain tensors: the layers compute locally).
        if layer.kind == ATTENTION:
            key_value, index = ops.init_kv_cache(model.batch_size, config.max_length, local_heads, config.head_dim,
                                                 config.head_dim, dtype=mixer.key_value.dtype,
                                                 device=mixer.key_value.device)
            mixer.key_value, mixer.index = key_value, index
        else:
            mixer.state = ops.init_state(model.batch_size, local_heads, config.head_dim, config.head_dim,
                                         device=mixer.state.device)
            mixer.slopes = mixer.slopes[heads].clone()  # the global heads' decay rates
    return model


def model_caches(model: HybridLM) -> list:
    """The caches of a :func:`parallelize_hybrid_lm` model as DTensors (global shapes, no copy: they alias
    each rank's buffers): ``[key_value, index]`` per attention layer, ``[state]`` per lightning layer."""
    mesh, axis = model.tensor_parallel_mesh, model.tensor_parallel_axis
    result = []
    for layer in model.layers:
        mixer = layer.mixer
        names = ("key_value", "index") if layer.kind == ATTENTION else ("state",)
        for name in names:
            local = getattr(mixer, name)
            placements = axis.placements(mesh, name)
            shape = list(local.shape)
            for mesh_dim, placement in enumerate(placements):
                if placement.is_shard():
                    shape[placement.dim] *= mesh.size(mesh_dim)
            result.append(from_local_shard(local, mesh, placements, shape))
    return result
