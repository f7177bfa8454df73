"""Checkpoints with orbax: train state, data position and the resolved config in one step dir.

Layout: ``<run>/checkpoints/<step>/{state, data, config}``. ``config`` is the full resolved config
as JSON, so a checkpoint describes itself: sampling and evaluation need nothing but its path. The
data position is one number, the global step, from which the data pipeline derives every later
batch, whatever the number of processes or the mesh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlm.config import CheckpointConfig


def manager(run_path: Path, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        keep_period=cfg.keep_every or None,
        enable_async_checkpointing=cfg.async_save,
        create=True,
    )
    return ocp.CheckpointManager(
        (run_path / "checkpoints").absolute(), options=options, item_names=("state", "data", "config")
    )


def save(mngr: ocp.CheckpointManager, step: int, state, config: dict[str, Any], force: bool = False) -> bool:
    return mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"step": step}),
            config=ocp.args.JsonSave(config),
        ),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
    """Restore onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs with .sharding),
    so a checkpoint written on one mesh loads onto any other."""
    out = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
    )
    return out["state"], out["data"]


def abstract_with_shardings(abstract_tree, shardings_tree):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings_tree
    )


def resolve(path: str | Path) -> tuple[Path, int]:
    """A run dir, its checkpoints/ dir or one step dir -> (checkpoints dir, step)."""
    p = Path(path).absolute()
    if p.name.isdigit() and (p / "state").is_dir():
        return p.parent, int(p.name)
    for root in (p / "checkpoints", p):
        if root.is_dir():
            steps = sorted(int(d.name) for d in root.iterdir() if d.name.isdigit() and (d / "state").is_dir())
            if steps:
                return root, steps[-1]
    raise FileNotFoundError(
        f"no checkpoint found at {str(path)!r}; pass a run directory (runs/NAME), its checkpoints/ "
        "directory or one step directory (runs/NAME/checkpoints/STEP)"
    )


def load_params(path: str | Path, mesh: jax.sharding.Mesh | None = None):
    """(config, params, step) from a checkpoint alone; params placed on ``mesh`` (default: all
    local devices, replicated by the model's sharding rules). Optimizer state is not read."""
    from jaxlm import model, sharding
    from jaxlm.config import from_dict

    root, step = resolve(path)
    mngr = ocp.CheckpointManager(root, item_names=("state", "data", "config"))
    try:
        cfg = from_dict(mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
        if mesh is None:
            mesh = sharding.make_mesh(type(cfg.mesh)(data=-1))
        abstract = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))
        shard = sharding.shardings(mesh, model.logical_axes(cfg.model), abstract)
        target = {"params": abstract_with_shardings(abstract, shard)}
        state = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )["state"]
    finally:
        mngr.close()
    return cfg, state["params"], step
