"""The seed's ``partition_axis`` / ``kv_sharding`` on ``torch.distributed``: DeviceMesh and DTensor.

* :class:`PartitionAxis` names the mesh dimensions that shard batch rows and heads.
* Every op that takes tensors gets a DTensor sharding strategy (:func:`register_sharding_strategies`): each
  rank runs the op on its local shard, with no communication. Which dimension of which argument is sharded
  over which axis is one table, :data:`ARGUMENT_DIMS`, keyed by the argument names of the op schemas, so a new
  trailing argument is one row. Placements that disagree are a ``ValueError`` naming the argument and its
  placement, raised before anything is written: DTensor would otherwise redistribute the argument, and a
  cache redistributed into a temporary would silently lose the write.
* Sharded allocation of the caches (:func:`allocate_kv_cache`, :func:`allocate_state`) and the ``kv_sharding``
  check (:func:`check_kv_sharding`) used by the cache classes. The tensor-parallel model is
  :mod:`torch_lightning_cache.models.tensor_parallel`.

``torch.distributed.tensor`` is imported only when DTensors are used (it costs over a second at import),
so the strategies are registered on first use: when ``torch_lightning_cache`` is imported after
``torch.distributed.tensor``, by the first eager call of a wrapper (``torch_lightning_cache.concatenate_to_cache``
...) or cache class with DTensors (the check :mod:`~torch_lightning_cache.ops` runs through the hook this
module installs), by a cache built on a mesh, or by :func:`register_sharding_strategies`. Call that before the
first raw ``torch.ops.lightning_cache`` call on DTensors (or compiled one) otherwise.
"""

from __future__ import annotations

import dataclasses
import sys
import typing as tp

import torch

from . import ops

# Tensor argument (or return) name -> (dim sharded over the batch axis, dim sharded over the head axis);
# None: replicated over that axis. The one source of truth for the op strategies and the cache allocation.
ARGUMENT_DIMS: dict[str, tuple[int | None, int | None]] = {
    "key_value": (0, 2),  # [B, L, H, Dk + Dv]
    "index": (0, None),  # [B]
    "query": (0, 2),  # [B, q, H, D]
    "key": (0, 2),
    "value": (0, 2),
    "attention_mask": (0, None),  # [B, L], [B, 1, q, L] or [B, n]
    "causal_mask": (None, None),  # [T, T] / [1, 1, T, T]: one for every row
    "token_type_ids": (0, None),  # [B, q]
    "state": (0, 1),  # [B or slots, H, Dk, Dv]
    "slopes": (None, 0),  # [H]
    "slot_ids": (0, None),  # [B]: ids of the rank's own rows of the state pool
    "step_states": (0, 2),  # [B, n + 1, H, Dk, Dv]
    "checkpoints": (0, 2),  # [B, C, H, Dk, Dv]
    "scales": (0, 2),  # [B, L, H, 2]: quantized storage, one scale per token, head and K/V
    "num_tokens": (0, None),  # [B]
    "num_accepted": (0, None),  # [B]
    # serving layouts (SPEC 11)
    "block_tables": (0, None),  # [B, max_pages]: each batch row's pages
    "cu_seqlens": (None, None),  # [S + 1]: a packed batch is one input row, replicated over the batch axis
    "cache_seqlens": (0, None),  # [B]
    # returns
    "mask": (0, None),  # [B, 1, q, L]
    "output": (0, 2),  # [B, n, H, Dv]
}

# Ops that take tensors; each gets a strategy from the table above. Per-op exceptions go in OP_ARGUMENT_DIMS.
SHARDED_OPS = ("concatenate_to_cache", "write_to_cache", "lightning_decode", "lightning_prefill", "rewind_cache",
               "lightning_accept", "cached_attention", "dequantize_kv")
OP_ARGUMENT_DIMS: dict[str, dict[str, tuple[int | None, int | None]]] = {}
# Calls with block_tables: the page pool [N, page_size, H, Dk + Dv] and its scales are shared by every batch
# row, so they are replicated over the batch axis (each rank holds every page) and sharded over heads.
PAGED_ARGUMENT_DIMS: dict[str, tuple[int | None, int | None]] = {"key_value": (None, 2), "scales": (None, 2)}

# The two roles a mesh dimension can play (PartitionAxis.mesh_dim).
BATCH_ROLE, HEAD_ROLE = "batch", "head"


@dataclasses.dataclass(frozen=True)
class PartitionAxis:
    """Which ``DeviceMesh`` dimensions shard the cache (the seed's ``es.PartitionAxis``, reduced to what it uses).

    ``batch_axis`` shards batch rows (dim 0 of every per-row tensor), ``head_axis`` shards heads (dim 2 of
    ``key_value`` and of ``query``/``key``/``value``, dim 1 of a recurrent state, dim 0 of ``slopes``). Each is
    a mesh dimension name (``init_device_mesh(..., mesh_dim_names=...)``), an index, or ``None``
    (replicated). Mesh dimensions named by neither are replicated.
    """

    batch_axis: str | int | None = None
    head_axis: str | int | None = None

    def __post_init__(self):
        for name in ("batch_axis", "head_axis"):
            value = getattr(self, name)
            if not (value is None or isinstance(value, (str, int))) or isinstance(value, bool):
                raise TypeError(f"PartitionAxis: {name} must be a mesh dimension name, an int or None, got "
                                f"{type(value).__name__} {value!r}")
        if self.batch_axis is not None and self.batch_axis == self.head_axis:
            raise ValueError(f"PartitionAxis: batch_axis and head_axis are the same mesh dimension "
                             f"({self.batch_axis!r})")

    def mesh_dim(self, mesh, role: str) -> int | None:
        """Index in ``mesh`` of the batch (``role="batch"``) or head axis; ``None`` if not sharded."""
        axis = self.batch_axis if role == BATCH_ROLE else self.head_axis
        if axis is None:
            return None
        names = mesh.mesh_dim_names or ()
        if isinstance(axis, str):
            if axis not in names:
                raise ValueError(f"PartitionAxis: {role}_axis={axis!r} is not a dimension of the mesh "
                                 f"(mesh_dim_names={names})")
            return names.index(axis)
        if not 0 <= axis < mesh.ndim:
            raise ValueError(f"PartitionAxis: {role}_axis={axis} is out of range for a {mesh.ndim}-D mesh")
        return axis

    def placements(self, mesh, name: str) -> tuple:
        """The placements of the tensor argument ``name`` (a key of :data:`ARGUMENT_DIMS`) on ``mesh``."""
        from torch.distributed.tensor import Replicate, Shard  # slow to import: DTensor users only

        batch_dim, head_dim = ARGUMENT_DIMS[name]
        result = [Replicate()] * mesh.ndim
        for role, dim in ((BATCH_ROLE, batch_dim), (HEAD_ROLE, head_dim)):
            mesh_dim = self.mesh_dim(mesh, role)
            if mesh_dim is not None and dim is not None:
                result[mesh_dim] = Shard(dim)
        return tuple(result)


# --------------------------------------------------------------------------- op strategies

_registered = False


def _argument_dims(op_name: str, name: str, paged: bool = False) -> tuple[int | None, int | None] | None:
    if paged and name in PAGED_ARGUMENT_DIMS:
        return PAGED_ARGUMENT_DIMS[name]
    return OP_ARGUMENT_DIMS.get(op_name, {}).get(name, ARGUMENT_DIMS.get(name))


def _describe(placements) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def _check_placements(op_name: str, mesh_ndim: int, named_specs: list[tuple[str, tp.Any]],
                      paged: bool = False) -> list[str | None]:
    """Infers each mesh dimension's role (batch, head or replicated) from the first argument sharded on it,
    then checks every argument (``(name, object with .placements)``) against that role. Returns the roles;
    raises ``ValueError`` naming the first argument whose placement disagrees."""
    from torch.distributed.tensor import Replicate, Shard  # slow to import: DTensor users only

    roles: list[str | None] = []
    for mesh_dim in range(mesh_ndim):
        role, anchor = None, None
        for name, spec in named_specs:
            placement = spec.placements[mesh_dim]
            if isinstance(placement, Replicate):
                continue
            dims = _argument_dims(op_name, name, paged)
            if type(placement) is Shard and placement.dim in dims:
                role = BATCH_ROLE if placement.dim == dims[0] else HEAD_ROLE
                anchor = f"{name} {_describe(spec.placements)}"
            else:
                raise ValueError(f"{op_name}: {name} has placement {_describe(spec.placements)}; on mesh dim "
                                 f"{mesh_dim} it may only be Replicate(){_shard_choices(dims)}")
            break
        roles.append(role)
        for name, spec in named_specs:
            expected = _role_placement(op_name, name, role, paged)
            if spec.placements[mesh_dim] != expected:
                raise ValueError(f"{op_name}: {name} has placement {_describe(spec.placements)} but {anchor} "
                                 f"shards mesh dim {mesh_dim} over the {role} axis, so {name} must be {expected!r} "
                                 f"there (each rank computes on its local shard; nothing is redistributed)")
    return roles


def _shard_choices(dims) -> str:
    batch_dim, head_dim = dims
    return "".join(f", Shard({d}) (the {r} axis)" for d, r in ((batch_dim, BATCH_ROLE), (head_dim, HEAD_ROLE))
                   if d is not None)


def _role_placement(op_name: str, name: str, role: str | None, paged: bool = False):
    from torch.distributed.tensor import Replicate, Shard  # slow to import: DTensor users only

    if role is None:
        return Replicate()
    dim = _argument_dims(op_name, name, paged)[0 if role == BATCH_ROLE else 1]
    return Replicate() if dim is None else Shard(dim)


def _make_strategy(op):
    schema = op._schema
    op_name = schema.name.split("::")[-1]
    arg_names = [a.name for a in schema.arguments]
    return_names = [r.name for r in schema.returns]

    def strategy(*args, **kwargs):
        from torch.distributed.tensor._dtensor_spec import DTensorSpec  # slow to import: DTensor users only

        named = list(zip(arg_names, args)) + list(kwargs.items())
        named_specs = [(name, value) for name, value in named if isinstance(value, DTensorSpec)]
        for name, _ in named_specs + [(name, None) for name in return_names]:
            if _argument_dims(op_name, name) is None:
                raise NotImplementedError(f"{op_name}: no sharding rule for the tensor argument {name!r}: add it to "
                                          "torch_lightning_cache.sharding.ARGUMENT_DIMS")
        paged = any(name == "block_tables" and value is not None for name, value in named)
        roles = _check_placements(op_name, named_specs[0][1].mesh.ndim, named_specs, paged)
        result = []
        for role in dict.fromkeys(roles):  # each distinct role once: the mesh expansion combines them
            outputs = [_role_placement(op_name, name, role, paged) for name in return_names]
            inputs = [_role_placement(op_name, name, role, paged) if isinstance(value, DTensorSpec) else None
                      for name, value in named]
            result.append((outputs, inputs))
        return result

    return strategy


def check_dtensor_arguments(op_name: str, tensors: dict[str, tp.Any]) -> None:
    """The strategies' placement check, run by the Python wrappers before dispatch so that the error is a
    ``ValueError`` (DTensor re-raises errors from a strategy as ``RuntimeError``, with the same message), plus
    the mix of DTensors and plain tensors, named. ``tensors``: argument name -> tensor or ``None``."""
    if op_name not in SHARDED_OPS:
        return
    given = [(name, t) for name, t in tensors.items() if t is not None]
    dtensors = [(name, t) for name, t in given if is_dtensor(t)]
    if not dtensors:
        return
    first_name, first = dtensors[0]
    for name, t in given:
        if not is_dtensor(t):
            raise ValueError(f"{op_name}: {name} is a plain torch.Tensor but {first_name} is a DTensor: pass every "
                             f"tensor as a DTensor on {first_name}'s mesh")
        if t.device_mesh != first.device_mesh:
            raise ValueError(f"{op_name}: {name} is on mesh {t.device_mesh} but {first_name} is on "
                             f"{first.device_mesh}")
    _check_placements(op_name, first.device_mesh.ndim, dtensors, tensors.get("block_tables") is not None)


def register_sharding_strategies() -> None:
    """Registers a DTensor sharding strategy for every op in :data:`SHARDED_OPS` (idempotent)."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor.experimental import register_sharding  # slow import: only when DTensors are used

    for name in SHARDED_OPS:
        op = getattr(torch.ops.lightning_cache, name).default
        register_sharding(op)(_make_strategy(op))
    _registered = True


# --------------------------------------------------------------------------- DTensor helpers


def is_dtensor(value: tp.Any) -> bool:
    """True for a DTensor (without importing ``torch.distributed.tensor`` when no one else did)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _local_shape(op: str, name: str, shape: tp.Sequence[int], mesh, placements) -> list[int]:
    from torch.distributed.tensor import Shard  # slow to import: DTensor users only

    local = list(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            parts = mesh.size(mesh_dim)
            if local[placement.dim] % parts:
                raise ValueError(f"{op}: {name} dim {placement.dim} has size {shape[placement.dim]}, which mesh dim "
                                 f"{mesh_dim} ({parts} ranks) cannot split evenly")
            local[placement.dim] //= parts
    return local


def from_local_shard(local: torch.Tensor, mesh, placements, global_shape: tp.Sequence[int]):
    """Wraps this rank's shard (no copy, no communication) as a DTensor of ``global_shape``."""
    from torch.distributed.tensor import DTensor  # slow to import: DTensor users only

    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(global_shape),
                              stride=torch.empty(global_shape, device="meta").stride())


def shard_full_tensor(full: torch.Tensor, mesh, placements):
    """This rank's shard of a tensor every rank holds in full, as a DTensor (no communication)."""
    from torch.distributed.tensor import Shard  # slow to import: DTensor users only

    local = full
    coordinate = mesh.get_coordinate()
    _local_shape("shard_full_tensor", "tensor", full.shape, mesh, placements)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            local = local.chunk(mesh.size(mesh_dim), placement.dim)[coordinate[mesh_dim]]
    return from_local_shard(local.contiguous(), mesh, placements, full.shape)


def mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def partition_axis_of(metadata) -> PartitionAxis:
    axis = metadata.partition_axis
    if axis is None:
        return PartitionAxis()
    if not isinstance(axis, PartitionAxis):
        raise TypeError(f"LightningCacheMetaData: partition_axis must be a PartitionAxis or None to allocate on a "
                        f"mesh, got {type(axis).__name__} {axis!r}")
    return axis


def allocate_kv_cache(metadata, mesh, batch_size: int, max_length: int, dtype, device=None):
    """``(key_value, index, scales)`` as DTensors on ``mesh``, each rank allocating only its shard. With
    ``metadata.kv_quantization`` ``key_value`` holds the codes and ``scales [B, L, H, 2]`` is placed as they are
    (rows over the batch axis, heads over the head axis); else ``scales`` is None."""
    register_sharding_strategies()
    axis = partition_axis_of(metadata)
    m = metadata
    shape = [batch_size, max_length, m.key_heads, m.key_dim + m.value_dim]
    placements = axis.placements(mesh, "key_value")
    b, length, heads, _ = _local_shape("LightningCache", "key_value", shape, mesh, placements)
    device = device or mesh_device(mesh)
    scales = None
    if m.kv_quantization is not None:
        key_value, index, scales = ops.init_quantized_kv_cache(b, length, heads, m.key_dim, m.value_dim,
                                                               m.kv_quantization, device=device)
        scales = from_local_shard(scales, mesh, axis.placements(mesh, "scales"), [batch_size, max_length, m.key_heads, 2])
    else:
        key_value, index = ops.init_kv_cache(b, length, heads, m.key_dim, m.value_dim, dtype=dtype, device=device)
    return (from_local_shard(key_value, mesh, placements, shape),
            from_local_shard(index, mesh, axis.placements(mesh, "index"), [batch_size]), scales)


def allocate_state(metadata, mesh, batch_size: int, device=None):
    """A recurrent state ``[B, H, Dk, Dv]`` as a DTensor on ``mesh``, each rank allocating only its shard."""
    register_sharding_strategies()
    m = metadata
    shape = [batch_size, m.key_heads, m.key_dim, m.value_dim]
    placements = partition_axis_of(metadata).placements(mesh, "state")
    b, heads, _, _ = _local_shape("LightningCache", "state", shape, mesh, placements)
    state = ops.init_state(b, heads, m.key_dim, m.value_dim, dtype=m.state_dtype, device=device or mesh_device(mesh))
    return from_local_shard(state, mesh, placements, shape)


def check_kv_sharding(op: str, kv_sharding, mesh, actual) -> None:
    """``kv_sharding`` restates the cache's placements ``actual`` on ``mesh``; a mismatch is a ``ValueError``.

    Accepted forms: a sequence of ``Placement`` (one per mesh dimension), a :class:`PartitionAxis`, or the
    seed's PartitionSpec style, one mesh dimension name (or ``None``) per ``key_value`` dimension, e.g.
    ``("dp", None, "tp", None)``.
    """
    if mesh is None or actual is None:
        raise ValueError(f"{op}: kv_sharding={kv_sharding!r} was given but the cache is not a DTensor; build it "
                         "with LightningCache.init_cache(..., mesh=mesh) (or pass DTensor keys and values)")
    from torch.distributed.tensor import Placement, Replicate, Shard  # slow to import: DTensor users only

    actual = tuple(actual)
    if isinstance(kv_sharding, PartitionAxis):
        expected = kv_sharding.placements(mesh, "key_value")
    elif isinstance(kv_sharding, (tuple, list)) and all(isinstance(p, Placement) for p in kv_sharding):
        expected = tuple(kv_sharding)
    elif isinstance(kv_sharding, (tuple, list)) and all(p is None or isinstance(p, str) for p in kv_sharding):
        if len(kv_sharding) != 4:
            raise ValueError(f"{op}: kv_sharding {tuple(kv_sharding)} names {len(kv_sharding)} dims but key_value "
                             "has 4 ([batch, length, heads, key_dim + value_dim])")
        names = mesh.mesh_dim_names or ()
        result = [Replicate()] * mesh.ndim
        for dim, axis in enumerate(kv_sharding):
            if axis is not None:
                if axis not in names:
                    raise ValueError(f"{op}: kv_sharding names {axis!r}, not a mesh dimension ({names})")
                result[names.index(axis)] = Shard(dim)
        expected = tuple(result)
    else:
        raise TypeError(f"{op}: kv_sharding must be None, a PartitionAxis, a sequence of Placements or one mesh "
                        f"dimension name (or None) per key_value dim, got {type(kv_sharding).__name__} "
                        f"{kv_sharding!r}")
    if tuple(expected) != actual:
        raise ValueError(f"{op}: kv_sharding says key_value is {_describe(expected)} but the cache is "
                         f"{_describe(actual)} on mesh {mesh.mesh_dim_names or mesh.shape}")


def _check_dtensor_call(op_name: str, tensors: dict[str, tp.Any]) -> None:
    register_sharding_strategies()  # idempotent
    check_dtensor_arguments(op_name, tensors)


# ops.check_types runs this on eager calls once torch.distributed.tensor is loaded (ops sits below this module
# and cannot import it).
ops.set_dtensor_argument_check(_check_dtensor_call)
