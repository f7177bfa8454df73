"""Loss and perplexity of a checkpoint on one split of a prepared data directory (``jaxlm eval``).

The checkpoint alone defines the model; the evaluation step and batches are the trainer's own
(``make_eval_step``, ``pipeline.eval_batches``), so with the defaults the loss is the one the
run logged as val loss at that step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from jaxlm import checkpoint, lm, sharding
from jaxlm.config import Config, ConfigError
from jaxlm.data.prepare import DataError
from jaxlm.metrics import perplexity

SPLITS = ("val", "train")


def make_eval_step(cfg: Config, param_sh, batch_sh):
    """(params, batch) -> (sum of token cross-entropies, number of targets): the trainer's loss
    without gradients and without the z-loss, which is a training regulariser, not a measure."""
    model = lm.get(cfg.model)

    def eval_step(params, batch):
        sums = model.loss_sums(params, batch, cfg.data.document_masking)
        return sums.xent, sums.count

    return jax.jit(eval_step, in_shardings=(param_sh, batch_sh))


def mean_loss(eval_step, params, batches, to_global) -> float:
    """Mean token loss over ``batches`` (host arrays of this process's rows, made global by ``to_global``)."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss_sum, n = eval_step(params, to_global(batch))
        total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0)


def check_batch_size(rows: int, mesh: jax.sharding.Mesh) -> None:
    """Refuses an eval batch of ``rows`` the mesh cannot split evenly, naming the nearest that it can."""
    shards = sharding.batch_shards(mesh)
    if rows < 1 or rows % shards:
        raise ConfigError(
            f"--batch-size={rows} must be a positive multiple of the {shards} devices; "
            f"pass --batch-size {shards * max(1, rows // shards)}"
        )


def evaluate_checkpoint(
    path: str | Path,
    data_dir: str | Path | None = None,
    split: str = "val",
    batches: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Mean token loss of the checkpoint at ``path`` on ``split`` of ``data_dir``.

    ``data_dir`` defaults to the run's ``data.dir``, ``batches`` to its ``train.eval_batches``
    (0: the whole split) and ``batch_size`` to its per-micro-batch batch size. Runs on every
    device, params split over fsdp as far as the model allows (``sharding.loading_mesh``).
    """
    from jaxlm.data import pipeline  # grain: imported where needed, so the trainer's importers stay light

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not valid; choose one of {list(SPLITS)}")
    cfg, params, step, mesh = checkpoint.load_params(path)
    data_cfg = cfg.data
    if data_dir is not None:
        if not (Path(data_dir) / "index.json").is_file():
            raise DataError(
                f"--data {str(data_dir)!r} holds no prepared data (no index.json); prepare it with "
                f"`jaxlm prepare ... --out {data_dir}` using tokenizer {cfg.data.tokenizer!r}"
            )
        data_cfg = dataclasses.replace(cfg.data, dir=str(data_dir), mixture={}, mixture_schedule=())
    index = pipeline.ensure_prepared(data_cfg, cfg.model, check_split=data_dir is None)
    global_batch = batch_size or cfg.train.batch_size // cfg.train.micro_batches
    n_batches = cfg.train.eval_batches if batches is None else batches
    if n_batches < 0:
        raise ConfigError(f"--batches={n_batches} must be >= 0 (0 evaluates the whole split)")
    check_batch_size(global_batch, mesh)

    param_sh = jax.tree.map(lambda x: x.sharding, params)
    batch_sh = sharding.batch_sharding(mesh)
    data_part = sharding.process_batch_slice(mesh)

    def to_global(local):
        return sharding.global_batch(local, batch_sh, data_part[1])

    with jax.set_mesh(mesh):  # the activation sharding constraints the trainer's eval ran under
        eval_step = make_eval_step(cfg, param_sh, batch_sh)
        it = pipeline.eval_batches(
            data_cfg, cfg.model, index, global_batch, n_batches, *data_part, split=split
        )
        loss = mean_loss(eval_step, params, it, to_global)
    return {
        "step": step,
        "split": split,
        "data": str(data_cfg.dir),
        "loss": loss,
        "perplexity": perplexity(loss),
        "batches": n_batches,
        "batch_size": global_batch,
    }
