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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.config import ConfigError, MeshConfig, ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

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
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def logical_to_spec(axes: Sequence[str | None], rules: dict = RULES) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec, refusing two axes on one mesh axis."""
    used: dict[str, str] = {}
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = rules[name]
        for mesh_axis in (target,) if isinstance(target, str) else (target or ()):
            if mesh_axis in used:
                raise ConfigError(
                    f"sharding rules map logical axes {used[mesh_axis]!r} and {name!r} of one array "
                    f"{tuple(axes)} onto the same mesh axis {mesh_axis!r}; change RULES in jaxlm/sharding.py"
                )
            used[mesh_axis] = name
        out.append(target)
    return PartitionSpec(*out)


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh: data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} cannot fill {n_devices} devices "
                f"({n_devices} is not divisible by {known}); choose sizes whose product divides {n_devices}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {n_devices} are present; make the product {n_devices} or set one size to -1"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # unusual topologies: fall back to the given order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def check_divisible(model: ModelConfig, mesh: Mesh) -> None:
    """Tensor parallelism must split heads, kv heads, MLP hidden and vocabulary evenly."""
    tp = mesh.shape["tensor"]
    for key, value in (
        ("model.n_heads", model.n_heads),
        ("model.n_kv_heads", model.kv_heads),
        ("model.d_ff", model.d_ff),
        ("model.vocab_size (padded)", model.padded_vocab),
    ):
        if value % tp:
            raise ConfigError(
                f"mesh.tensor={tp} does not divide {key}={value}; pick a tensor size that divides it"
            )


def shardings(mesh: Mesh, axes_tree, shapes_tree=None):
    """NamedShardings for a pytree of logical-axis tuples; checks each dimension divides evenly."""

    def one(axes, shape=None):
        spec = logical_to_spec(axes)
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
    return NamedSharding(mesh, logical_to_spec(("batch", "seq")))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation inside jit; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))
