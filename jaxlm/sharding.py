"""All sharding in one place: the mesh, the logical-axis rule table, and what derives from them.

Every weight and activation names its dimensions with logical axes (``embed``, ``heads``, ...).
One table maps each logical axis to a mesh axis; PartitionSpecs for parameters, optimizer state,
batches and activation constraints all derive from it, so changing the parallelism strategy is a
one-line edit here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jaxlm import ring
from jaxlm.config import MESH_AXES, ConfigError, MeshConfig, ModelConfig, TrainConfig

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
# Parameters: FSDP shards the model dimension of every weight (ZeRO-3: gathered per layer inside
# the scan); tensor parallelism splits heads / MLP hidden / vocabulary Megatron-style (column-
# parallel in, row-parallel out). Activations use their own names (act_*) so that the model
# dimension of an activation stays whole while its batch is split over data and fsdp.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "positions": None,
    "experts": "expert",  # expert parallelism: each device of the expert axis holds E / mesh.expert experts
    # activations
    # Expert parallelism splits the tokens too: a device of the expert axis routes its own rows to
    # the experts it and its expert-axis peers hold. Context parallelism splits the positions.
    "batch": ("data", "fsdp", "expert"),
    "seq": "context",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def logical_to_spec(
    axes: Sequence[str | None], rules: dict = RULES, mesh: Mesh | AbstractMesh | None = None
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec, refusing two axes of one array on one mesh axis.

    With ``mesh``, mesh axes of size 1 are left out (splitting over one device is replication), so
    the spec says what is really sharded on that mesh.
    """
    used: dict[str, str] = {}
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        for mesh_axis in targets:
            if mesh_axis in used:
                raise ConfigError(
                    f"sharding rules map logical axes {used[mesh_axis]!r} and {name!r} of one array "
                    f"{tuple(axes)} onto the same mesh axis {mesh_axis!r}; change RULES in jaxlm/sharding.py"
                )
            used[mesh_axis] = name
        if mesh is not None:
            targets = tuple(a for a in targets if mesh.shape[a] > 1)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """The mesh's sizes in ``MESH_AXES`` order from the config; one may be -1 to take the devices left."""
    sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.context, cfg.tensor]  # MESH_AXES order
    shown = lambda sizes: " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh: {shown(sizes)} cannot fill {n_devices} devices "
                f"({n_devices} is not divisible by {known}); choose sizes whose product divides {n_devices}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh: {shown(sizes)} = {math.prod(sizes)} devices, "
            f"but {n_devices} are present; make the product {n_devices} or set one size to -1"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of ``MESH_AXES`` over ``devices`` (default: every device of every process).

    Devices are laid out process-major, so one process's devices fill the innermost axes first:
    tensor parallelism stays inside a host (fast links) and each process holds a contiguous
    block of the batch (see ``process_batch_slice``). On TPU, JAX's topology-aware layout is
    used instead; it keeps the same axis order.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        arr = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(shape)
    return Mesh(arr, MESH_AXES)


# What each logical axis of a weight measures, so a divisibility error names the config field.
AXIS_FIELDS = {
    "layers": "model.n_layers",
    "embed": "model.d_model",
    "heads": "model.n_heads",
    "kv_heads": "model.n_kv_heads",
    "head_dim": "model.head_dim",
    "mlp": "model.d_ff",
    "positions": "model.seq_len",
    "experts": "model.moe_experts",
}


def _axis_label(axis: str, size: int, model: ModelConfig, where: str) -> str:
    if axis == "vocab":
        return (
            f"the padded vocabulary {size} (model.vocab_size={model.vocab_size} rounded up to a multiple of "
            f"model.vocab_multiple={model.vocab_multiple})"
        )
    if axis in AXIS_FIELDS and not model.module:
        return f"{AXIS_FIELDS[axis]}={size}"
    return f"axis {axis!r} of {where} (size {size})"


def _split_dims(decls, mesh_shape: dict[str, int], rules: dict):
    """(logical axis, size, mesh axes, ways, parameter path) for every weight dimension the rules split."""
    for path, w in jax.tree_util.tree_flatten_with_path(decls, is_leaf=lambda x: hasattr(x, "axes"))[0]:
        for size, axis in zip(w.shape, w.axes, strict=True):
            if axis is None:
                continue
            target = rules[axis] if axis in rules else None
            names = (target,) if isinstance(target, str) else tuple(target or ())
            yield axis, size, names, math.prod(mesh_shape[a] for a in names), jax.tree_util.keystr(path)


def check_divisible(model: ModelConfig, decls, mesh: Mesh, rules: dict = RULES) -> None:
    """Every weight dimension that ``rules`` split over the mesh must split evenly; one error lists
    every mismatch. Derived from the weight declarations and the rule table, so changing a rule
    changes what is checked. The sequence split over ``context`` is checked too (``ring.check_config``)."""
    ring.check_config(model, mesh.shape["context"])
    for w in jax.tree.leaves(decls, is_leaf=lambda x: hasattr(x, "axes")):
        logical_to_spec(w.axes, rules)  # unknown axes and collisions first, with their own message
    bad: dict[tuple[str, tuple[str, ...]], str] = {}
    for axis, size, names, ways, where in _split_dims(decls, dict(mesh.shape), rules):
        if ways > 1 and size % ways:
            mesh_axes = " x ".join(f"mesh.{a}" for a in names)
            shown = f"{mesh_axes}={ways}" if len(names) > 1 else f"mesh.{names[0]}={ways}"
            bad.setdefault((axis, names), f"{shown} does not divide {_axis_label(axis, size, model, where)}")
    if bad:
        raise ConfigError(
            "; ".join(bad.values()) + ". Pick mesh sizes that divide these model sizes (or change the model)"
        )


def loading_mesh(model: ModelConfig, decls, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The one mesh for evaluating, sampling, exporting and importing: ``devices`` (default all),
    params split over ``fsdp`` as far as every fsdp-split weight dimension allows (so a model too
    large for one device still loads), the rest of the devices on ``data``."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    on_fsdp = [
        size
        for _, size, names, _, _ in _split_dims(decls, dict.fromkeys(MESH_AXES, 1), RULES)
        if "fsdp" in names
    ]
    fsdp = max(d for d in range(1, n + 1) if n % d == 0 and all(size % d == 0 for size in on_fsdp))
    return make_mesh(MeshConfig(data=n // fsdp, fsdp=fsdp), devices)


def shardings(mesh: Mesh, axes_tree, shapes_tree=None):
    """NamedShardings for a pytree of logical-axis tuples; checks each dimension divides evenly."""

    def one(axes, shape=None):
        spec = logical_to_spec(axes, mesh=mesh)
        if shape is not None:
            for dim, target in zip(shape, spec, strict=True):
                names = (target,) if isinstance(target, str) else (target or ())
                n = math.prod(mesh.shape[a] for a in names)
                if dim % n:
                    raise ConfigError(
                        f"dimension {dim} of an array with axes {tuple(axes)} is not divisible by mesh axes "
                        f"{names} of size {n}; change the mesh or the model size"
                    )
        return NamedSharding(mesh, spec)

    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    if shapes_tree is None:
        return jax.tree.map(one, axes_tree, is_leaf=is_axes)
    return jax.tree.map(lambda a, s: one(a, s.shape), axes_tree, shapes_tree, is_leaf=is_axes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] arrays: rows split over the batch axes, positions over context."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), mesh=mesh))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the mesh axes the ``batch`` rule names."""
    return math.prod(mesh.shape[axis] for axis in RULES["batch"])


def micro_batch_rows(train: TrainConfig, mesh: Mesh) -> int:
    """Rows of one micro-batch on one device; a batch the mesh cannot split evenly is refused."""
    shards = batch_shards(mesh)
    if (train.batch_size // train.micro_batches) % shards:
        axes = " x ".join(RULES["batch"])
        raise ConfigError(
            f"train.batch_size={train.batch_size} / train.micro_batches={train.micro_batches} must be "
            f"divisible by mesh {axes} = {shards}; change the batch size or the mesh"
        )
    return train.batch_size // train.micro_batches // shards


def process_batch_slice(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
    """(index, count): this process feeds rows [index * B/count, (index+1) * B/count) of a global batch.

    ``jax.make_array_from_process_local_data`` fills a process's devices from its local rows in
    global-row order, so the rows the data pipeline hands a process must be exactly the block its
    devices hold. Processes that hold the same rows (tensor parallelism across hosts) get the same
    index and load the same rows; count is the number of distinct blocks, not of processes.
    """
    pid = jax.process_index() if process_index is None else process_index
    procs = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    return batch_blocks(procs, list(mesh.axis_names), pid)


def batch_blocks(procs: np.ndarray, axis_names: list[str], process_index: int) -> tuple[int, int]:
    """``process_batch_slice`` on an array of process ids shaped like the mesh (testable anywhere)."""
    batch_axes = logical_to_spec(("batch",))[0]
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    rest = [a for a in axis_names if a not in batch_axes]
    # Rows of the batch are ordered by the batch mesh axes in rule order; other axes replicate.
    order = [axis_names.index(a) for a in (*batch_axes, *rest)]
    p = procs.transpose(order).reshape(math.prod(procs.shape[axis_names.index(a)] for a in batch_axes), -1)
    n_blocks = p.shape[0]
    held = {q: tuple(sorted({b for b in range(n_blocks) if q in p[b]})) for q in np.unique(procs).tolist()}
    if process_index not in held:
        raise ValueError(f"process {process_index} owns no device of the mesh")
    groups = sorted(set(held.values()))
    sizes = {len(g) for g in groups}
    covered = sorted(b for g in groups for b in g)
    if len(sizes) != 1 or covered != list(range(n_blocks)):
        raise ConfigError(
            f"the mesh gives processes overlapping or uneven parts of the batch ({held}); "
            f"each process must hold an equal share of the {' x '.join(batch_axes)} axes; "
            "change the mesh sizes"
        )
    # make_mesh gives each process one contiguous block (rank == position). A topology-aware TPU
    # layout may give a process scattered blocks: it then feeds the rank-th share of the rows,
    # so the global batch holds the same rows in another order, which changes no sum over rows.
    mine = held[process_index]
    return groups.index(mine), len(groups)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation inside jit; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh=mesh))


def global_batch(local: dict, batch_sh: NamedSharding, row_blocks: int) -> dict[str, jax.Array]:
    """This process's rows of a batch (one of ``row_blocks`` equal blocks of the global batch, see
    ``process_batch_slice``) assembled into global arrays sharded by ``batch_sh``. The rows are
    whole even where the mesh splits their positions over ``context`` (across processes too): the
    global shape has their length, so each device takes its own positions from them."""
    return {
        k: jax.make_array_from_process_local_data(batch_sh, v, (v.shape[0] * row_blocks, *v.shape[1:]))
        for k, v in local.items()
    }
