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
