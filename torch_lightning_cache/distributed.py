"""The seed's ``partition_axis`` / ``kv_sharding`` on ``torch.distributed``: DeviceMesh, DTensor, tensor parallelism.

* :class:`PartitionAxis` names the mesh dimensions that shard batch rows and heads.
* Every op that takes tensors gets a DTensor sharding strategy (:func:`register_sharding_strategies`): each
  rank runs the op on its local shard, with no communication. Which dimension of which argument is sharded
  over which axis is one table, :data:`ARGUMENT_DIMS`, keyed by the argument names of the op schemas, so a new
  trailing argument is one row. Placements that disagree are a ``ValueError`` naming the argument and its
  placement, raised before anything is written: DTensor would otherwise redistribute the argument, and a
  cache redistributed into a temporary would silently lose the write.
* :func:`parallelize_hybrid_lm` runs :class:`~torch_lightning_cache.model.HybridLM` tensor-parallel over heads
  with ``torch.distributed.tensor.parallel`` and caches holding only each rank's heads (and batch rows).

``torch.distributed.tensor`` is imported only when DTensors are used (it costs over a second at import),
so the strategies are registered on first use: when ``torch_lightning_cache`` is imported after
``torch.distributed.tensor``, by the first eager call of a wrapper (``torch_lightning_cache.concatenate_to_cache``
...) or cache class with DTensors, by a cache built on a mesh, or by :func:`register_sharding_strategies`.
Call that before the first raw ``torch.ops.lightning_cache`` call on DTensors (or compiled one) otherwise.
"""

from __future__ import annotations

import dataclasses
import typing as tp

import torch

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
    # returns
    "mask": (0, None),  # [B, 1, q, L]
    "output": (0, 2),  # [B, n, H, Dv]
}

# Ops that take tensors; each gets a strategy from the table above. Per-op exceptions go in OP_ARGUMENT_DIMS.
SHARDED_OPS = ("concatenate_to_cache", "write_to_cache", "lightning_decode", "lightning_prefill", "rewind_cache",
               "lightning_accept", "cached_attention")
OP_ARGUMENT_DIMS: dict[str, dict[str, tuple[int | None, int | None]]] = {}

_BATCH, _HEAD = "batch", "head"


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
        axis = self.batch_axis if role == _BATCH else self.head_axis
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
        from torch.distributed.tensor import Replicate, Shard

        batch_dim, head_dim = ARGUMENT_DIMS[name]
        result = [Replicate()] * mesh.ndim
        for role, dim in ((_BATCH, batch_dim), (_HEAD, head_dim)):
            mesh_dim = self.mesh_dim(mesh, role)
            if mesh_dim is not None and dim is not None:
                result[mesh_dim] = Shard(dim)
        return tuple(result)


# --------------------------------------------------------------------------- op strategies

_registered = False


def _argument_dims(op_name: str, name: str) -> tuple[int | None, int | None] | None:
    return OP_ARGUMENT_DIMS.get(op_name, {}).get(name, ARGUMENT_DIMS.get(name))


def _describe(placements) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def _check_placements(op_name: str, mesh_ndim: int, named_specs: list[tuple[str, tp.Any]]) -> list[str | None]:
    """Infers each mesh dimension's role (batch, head or replicated) from the first argument sharded on it,
    then checks every argument (``(name, object with .placements)``) against that role. Returns the roles;
    raises ``ValueError`` naming the first argument whose placement disagrees."""
    from torch.distributed.tensor import Replicate, Shard

    roles: list[str | None] = []
    for mesh_dim in range(mesh_ndim):
        role, anchor = None, None
        for name, spec in named_specs:
            placement = spec.placements[mesh_dim]
            if isinstance(placement, Replicate):
                continue
            dims = _argument_dims(op_name, name)
            if type(placement) is Shard and placement.dim in dims:
                role = _BATCH if placement.dim == dims[0] else _HEAD
                anchor = f"{name} {_describe(spec.placements)}"
            else:
                raise ValueError(f"{op_name}: {name} has placement {_describe(spec.placements)}; on mesh dim "
                                 f"{mesh_dim} it may only be Replicate(){_shard_choices(dims)}")
            break
        roles.append(role)
        for name, spec in named_specs:
            expected = _role_placement(op_name, name, role)
            if spec.placements[mesh_dim] != expected:
                raise ValueError(f"{op_name}: {name} has placement {_describe(spec.placements)} but {anchor} "
                                 f"shards mesh dim {mesh_dim} over the {role} axis, so {name} must be {expected!r} "
                                 f"there (each rank computes on its local shard; nothing is redistributed)")
    return roles


def _shard_choices(dims) -> str:
    batch_dim, head_dim = dims
    return "".join(f", Shard({d}) (the {r} axis)" for d, r in ((batch_dim, _BATCH), (head_dim, _HEAD))
                   if d is not None)


def _role_placement(op_name: str, name: str, role: str | None):
    from torch.distributed.tensor import Replicate, Shard

    if role is None:
        return Replicate()
    dim = _argument_dims(op_name, name)[0 if role == _BATCH else 1]
    return Replicate() if dim is None else Shard(dim)


def _make_strategy(op):
    schema = op._schema
    op_name = schema.name.split("::")[-1]
    arg_names = [a.name for a in schema.arguments]
    return_names = [r.name for r in schema.returns]

    def strategy(*args, **kwargs):
        from torch.distributed.tensor._dtensor_spec import DTensorSpec

        named = list(zip(arg_names, args)) + list(kwargs.items())
        named_specs = [(name, value) for name, value in named if isinstance(value, DTensorSpec)]
        for name, _ in named_specs + [(name, None) for name in return_names]:
            if _argument_dims(op_name, name) is None:
                raise NotImplementedError(f"{op_name}: no sharding rule for the tensor argument {name!r}: add it to "
                                          "torch_lightning_cache.distributed.ARGUMENT_DIMS")
        roles = _check_placements(op_name, named_specs[0][1].mesh.ndim, named_specs)
        result = []
        for role in dict.fromkeys(roles):  # each distinct role once: the mesh expansion combines them
            outputs = [_role_placement(op_name, name, role) for name in return_names]
            inputs = [_role_placement(op_name, name, role) if isinstance(value, DTensorSpec) else None
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
    _check_placements(op_name, first.device_mesh.ndim, dtensors)


def register_sharding_strategies() -> None:
    """Registers a DTensor sharding strategy for every op in :data:`SHARDED_OPS` (idempotent)."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor.experimental import register_sharding

    from . import ops  # noqa: F401  (loads the operator library)

    for name in SHARDED_OPS:
        op = getattr(torch.ops.lightning_cache, name).default
        register_sharding(op)(_make_strategy(op))
    _registered = True


# --------------------------------------------------------------------------- DTensor helpers


def is_dtensor(value: tp.Any) -> bool:
    """True for a DTensor (without importing ``torch.distributed.tensor`` when no one else did)."""
    import sys

    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _local_shape(op: str, name: str, shape: tp.Sequence[int], mesh, placements) -> list[int]:
    from torch.distributed.tensor import Shard

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
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(global_shape),
                              stride=torch.empty(global_shape, device="meta").stride())


def shard_full_tensor(full: torch.Tensor, mesh, placements):
    """This rank's shard of a tensor every rank holds in full, as a DTensor (no communication)."""
    from torch.distributed.tensor import Shard

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
    """``(key_value, index)`` as DTensors on ``mesh``, each rank allocating only its shard."""
    from . import ops

    register_sharding_strategies()
    axis = partition_axis_of(metadata)
    m = metadata
    shape = [batch_size, max_length, m.key_heads, m.key_dim + m.value_dim]
    placements = axis.placements(mesh, "key_value")
    b, length, heads, _ = _local_shape("LightningCache", "key_value", shape, mesh, placements)
    key_value, index = ops.init_kv_cache(b, length, heads, m.key_dim, m.value_dim, dtype=dtype,
                                         device=device or mesh_device(mesh))
    return (from_local_shard(key_value, mesh, placements, shape),
            from_local_shard(index, mesh, axis.placements(mesh, "index"), [batch_size]))


def allocate_state(metadata, mesh, batch_size: int, device=None):
    """A recurrent state ``[B, H, Dk, Dv]`` as a DTensor on ``mesh``, each rank allocating only its shard."""
    from . import ops

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
    from torch.distributed.tensor import Placement, Replicate, Shard

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


# --------------------------------------------------------------------------- tensor-parallel HybridLM


class HeadShardedRMSNorm(torch.nn.Module):
    """RMSNorm over features split across the head axis: the sum of squares is all-reduced (as vLLM's
    MiniMax RMSNormTP does), so every rank normalizes its heads by the norm of the whole vector."""

    def __init__(self, norm, mesh, tp_rank: int, tp_size: int):
        super().__init__()
        size = norm.weight.shape[0]
        self.weight = torch.nn.Parameter(norm.weight.detach().chunk(tp_size)[tp_rank].clone())
        self.eps, self.size, self.mesh = norm.eps, size, mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

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


def parallelize_hybrid_lm(model, mesh, partition_axis: PartitionAxis | None = None):
    """Makes ``model`` (a :class:`~torch_lightning_cache.model.HybridLM`) tensor-parallel over heads, in place.

    The head axis of ``partition_axis`` (default: the whole 1-D ``mesh``) splits every attention and
    lightning layer's heads: q/k/v (and the lightning gate) column-wise, the output projection row-wise
    (``torch.distributed.tensor.parallel``); the MLPs are split the same way. Each rank keeps only its heads'
    caches (``key_value``, states) and the global heads' slopes. With a batch axis, each rank's cache holds
    only its batch rows and the model takes that rank's rows of ``input_ids`` (data parallel). Every rank
    computes on local tensors; the only communication is the row-wise projections' all-reduce and the
    lightning norm's sum of squares. Returns ``model``; :func:`model_caches` gives its caches as DTensors.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from . import ops
    from .cache import ATTENTION

    axis = partition_axis or PartitionAxis(head_axis=0 if mesh.ndim == 1 else None)
    head_dim_index = axis.mesh_dim(mesh, _HEAD)
    batch_dim_index = axis.mesh_dim(mesh, _BATCH)
    coordinate = mesh.get_coordinate()
    tp_size = mesh.size(head_dim_index) if head_dim_index is not None else 1
    tp_rank = coordinate[head_dim_index] if head_dim_index is not None else 0
    dp_size = mesh.size(batch_dim_index) if batch_dim_index is not None else 1
    dp_rank = coordinate[batch_dim_index] if batch_dim_index is not None else 0
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


def model_caches(model) -> list:
    """The caches of a :func:`parallelize_hybrid_lm` model as DTensors (global shapes, no copy: they alias
    each rank's buffers): ``[key_value, index]`` per attention layer, ``[state]`` per lightning layer."""
    from .cache import ATTENTION

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


# --------------------------------------------------------------------------- the demo's --tp


class DemoTensorParallel:
    """``torchrun --nproc-per-node N -m torch_lightning_cache demo --tp N``: the demo's model split over N ranks
    (gloo on the CPU, NCCL on GPUs), checked against the same model in one process."""

    def __init__(self, args, device: torch.device):
        import os

        import torch.distributed as dist

        from .demo import DemoError

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != args.tp:
            raise DemoError(f"--tp {args.tp} needs {args.tp} processes, this is {world}: run "
                            f"torchrun --nproc-per-node {args.tp} -m torch_lightning_cache demo --tp {args.tp}")
        if args.heads % args.tp:
            raise DemoError(f"--heads ({args.heads}) must be a multiple of --tp ({args.tp})")
        self.args, self.device = args, device
        if device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank = dist.get_rank()
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(device.type, (args.tp,), mesh_dim_names=("tp",))
        if self.rank != 0:  # one rank reports
            import sys

            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)

    @staticmethod
    def _bytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    def parallelize(self, model):
        """Keeps a single-process copy for the comparison, then splits ``model`` over the ranks' heads."""
        import copy

        import torch.distributed as dist

        self.reference = copy.deepcopy(model)
        full = (self._bytes(model.parameters()), self._bytes(model.cache_buffers()))
        parallelize_hybrid_lm(model, self.mesh, PartitionAxis(head_axis="tp"))
        local = (self._bytes(p.to_local() if is_dtensor(p) else p for p in model.parameters()),
                 self._bytes(model.cache_buffers()))
        every_rank = [None] * self.args.tp
        dist.all_gather_object(every_rank, local)
        print(f"tensor parallel: {self.args.tp} ranks ({dist.get_backend()}), heads split {self.args.heads // self.args.tp}"
              f" per rank; memory per rank (weights + caches): "
              + ", ".join(f"rank {r} {w / 2**20:.2f} + {c / 2**20:.2f} MiB" for r, (w, c) in enumerate(every_rank))
              + f"; one process: {full[0] / 2**20:.2f} + {full[1] / 2**20:.2f} MiB")
        return model

    def check(self, prompts, sequences, logits) -> bool:
        """Generates with the single-process model; True when the logits agree to 1e-5 (float32) and the
        tokens are identical. Ends the process group."""
        import torch.distributed as dist

        from .demo import _Progress, generate_with_cache

        with torch.inference_mode():
            expected_sequences, expected = generate_with_cache(self.reference, prompts, self.args.tokens,
                                                               self.reference, _Progress(1, "", False))
        worst = (logits - expected).abs().max().item()
        same = all(torch.equal(a, b) for a, b in zip(sequences, expected_sequences))
        tolerance = 1e-5 if logits.dtype == torch.float32 and self.reference.embed.weight.dtype == torch.float32 \
            else 0.1
        worst_all = torch.tensor([worst, float(not same)], dtype=torch.float64, device=self.device)
        dist.all_reduce(worst_all, op=dist.ReduceOp.MAX)  # every rank's verdict
        worst, same = worst_all[0].item(), worst_all[1].item() == 0
        ok = worst <= tolerance and same
        print(f"tensor parallel check: max |logits with {self.args.tp} ranks - one process| = {worst:.3e} "
              f"(tolerance {tolerance:g}) {'PASS' if ok else 'FAIL'}; greedy tokens identical: {same}")
        dist.destroy_process_group()
        return ok
