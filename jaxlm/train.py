"""The trainer, top to bottom: mesh, data, sharded init, restore, the jitted step, eval, logging,
checkpoints. Read it in order; everything it calls is a small pure function elsewhere."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import checkpoint, distributed, lm, profile, sharding, tasks
from jaxlm.config import Config, ConfigError, ModelConfig, to_dict
from jaxlm.evaluate import make_eval_step, mean_loss
from jaxlm.files import write_json
from jaxlm.metrics import RunLogger, check_loggers, perplexity
from jaxlm.model import compute_dtype, no_moe_stats
from jaxlm.optim import lr_schedule
from jaxlm.state import TrainState, abstract_state, create_state, fresh_opt_state, make_tx, state_shardings

# ============================================================================================
# The step: gradient accumulation over micro-batches, one optimizer update, metrics.
# ============================================================================================


def objective_sum(m: ModelConfig, sums: lm.LossSums) -> jax.Array:
    """The training objective summed over a batch's targets (the trainer divides by the count):
    the cross-entropy, the z-loss, and with experts the load-balancing and router z-losses."""
    # A Python branch, so z_loss=0 is the plain cross-entropy, its gradient bit for bit.
    loss = sums.xent + m.z_loss * sums.z if m.z_loss else sums.xent
    if sums.moe is not None:  # mixture of experts: its two router losses (jaxlm/moe.py)
        loss = loss + m.moe_aux_loss * sums.moe.aux + m.moe_router_z_loss * sums.moe.router_z
    return loss


def make_train_step(cfg: Config, state_sh: TrainState, batch_sh, stop_flags: bool = False):
    """The jitted ``step(state, batch) -> (state, metrics)``. With ``stop_flags`` it takes a third
    argument, ``StopRequest.flags`` (sharded as it comes), and returns its max as metric "stop"."""
    tx, model = make_tx(cfg), lm.get(cfg.model)
    schedule = lr_schedule(cfg.optim, cfg.train.steps)
    M = cfg.train.micro_batches
    doc_mask = cfg.data.document_masking

    z_coef = cfg.model.z_loss

    def objective(p, micro):  # summed, not averaged: the micro-batch sums add up to the batch's
        sums = model.loss_sums(p, micro, doc_mask)
        return objective_sum(cfg.model, sums), sums

    def loss_and_grads(params, micro):
        (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params, micro)
        return sums, grads

    def train_step(
        state: TrainState, batch: dict[str, jax.Array], flags_N: jax.Array | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        params = state.params
        if M == 1:
            sums, grads = loss_and_grads(params, batch)
        else:
            # Row r goes to micro-batch r % M, so every device keeps its own rows in each micro-batch.
            def split(x_BxT):
                x = x_BxT.reshape(-1, M, *x_BxT.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(
                    x,
                    jax.sharding.NamedSharding(
                        batch_sh.mesh, jax.sharding.PartitionSpec(None, *batch_sh.spec)
                    ),
                )

            def accumulate(carry, micro):
                return jax.tree.map(jnp.add, carry, loss_and_grads(params, micro)), None

            zero = jnp.zeros((), jnp.float32)
            zero_sums = lm.LossSums(zero, zero, zero, no_moe_stats(cfg.model))
            zeros = (zero_sums, jax.tree.map(jnp.zeros_like, params))
            (sums, grads), _ = jax.lax.scan(accumulate, zeros, jax.tree.map(split, batch))
        count = jnp.maximum(sums.count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)  # gradient of the mean token loss
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_state = TrainState(
            step=state.step + 1, params=optax.apply_updates(params, updates), opt_state=opt_state
        )
        metrics = {
            "loss": sums.xent / count,  # the cross-entropy, what val loss is compared with
            "z_loss": z_coef * sums.z / count,  # the term the objective adds to it
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": sums.count,
        }
        if sums.moe is not None:  # before their coefficients; load: the fraction each expert receives
            metrics["moe/aux_loss"] = sums.moe.aux / count
            metrics["moe/router_z_loss"] = sums.moe.router_z / count
            metrics["moe/dropped_fraction"] = sums.moe.dropped / jnp.maximum(sums.moe.assigned, 1.0)
            for e in range(cfg.model.moe_experts):
                metrics[f"moe/load/expert_{e}"] = sums.moe.load_E[e] / count
        if flags_N is not None:
            metrics["stop"] = jnp.max(flags_N)
        return new_state, metrics

    in_sh = (state_sh, batch_sh, None) if stop_flags else (state_sh, batch_sh)  # None: as it comes
    return jax.jit(train_step, in_shardings=in_sh, out_shardings=(state_sh, None), donate_argnums=0)


# ============================================================================================
# The run.
# ============================================================================================


def run(
    cfg: Config, resume: bool | None = None, profile_steps: tuple[int | None, int] | None = None
) -> dict[str, Any]:
    """Train ``cfg``; returns the summary written to ``<run>/summary.json``.

    ``resume=None`` continues from the latest checkpoint when the run directory has one; ``True``
    requires one; ``False`` refuses to overwrite a run that already has checkpoints.
    ``profile_steps`` (``profile.parse_steps`` of ``--profile``) traces those steps into ``<run>/profile/``.
    """
    check_loggers(cfg.train.loggers)
    # ---- processes and mesh -------------------------------------------------------------------
    distributed.initialize(cfg.mesh)
    if cfg.model.compute_dtype == "auto":
        # Resolved once and recorded in config.json and the checkpoints: the run's numerics are
        # written down, and a resume where "auto" means another dtype names the change.
        resolved = compute_dtype(cfg.model).name
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=resolved))
    t = cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_divisible(cfg.model, lm.get(cfg.model).decls, mesh)
    sharding.micro_batch_rows(t, mesh)  # refuses a batch the mesh cannot split evenly
    # The mesh is scoped: a later run or sampling in this process sees no stale mesh. With several
    # processes, when one is lost the others exit within seconds, naming it and the last checkpoint.
    with jax.set_mesh(mesh), distributed.watch_peers(cfg.run_path / "checkpoints"):
        return _run_on_mesh(cfg, mesh, resume, profile_steps)


def _run_on_mesh(
    cfg: Config, mesh: jax.sharding.Mesh, resume: bool | None, profile_steps: tuple[int | None, int] | None
) -> dict[str, Any]:
    # Imported here, not at the top: the data pipeline needs grain, and what imports this module
    # for its state and step alone (jaxlm bench, on synthetic tokens) must run where grain is absent.
    from jaxlm.data import mixture, pipeline

    t, pid = cfg.train, jax.process_index()

    # ---- what the run directory already holds -------------------------------------------------
    run_path = cfg.run_path
    ckpt_dir = run_path / "checkpoints"
    saved = checkpoint.complete_steps(ckpt_dir)
    if resume is True and not saved:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
    if resume is False and saved:
        raise ConfigError(
            f"{run_path} already holds checkpoints up to step {saved[-1]}; resume it, or pick another name"
        )
    if saved and saved[-1] >= t.steps:
        # Nothing to train: the run's record (config, summary, events, log) stays exactly as it is.
        if pid == 0:
            print(
                f"{run_path} already has a checkpoint at step {saved[-1]} >= train.steps={t.steps}; nothing "
                f"to train. Raise train.steps (e.g. --set train.steps={saved[-1] + t.steps}) to continue, "
                "or give the run another name (--set name=NEW) to start fresh",
                flush=True,
            )
        return {"status": "nothing to train", "step": saved[-1]}

    # ---- data ---------------------------------------------------------------------------------
    index = pipeline.ensure_prepared(cfg.data, cfg.model)
    # Read and tokenized before anything is written, so a bad task file fails at once.
    task_evals = tasks.TaskEvals(
        tasks.read_tasks(t.eval_tasks), cfg.data.tokenizer, cfg.model, t.batch_size // t.micro_batches
    )

    # ---- run directory, state, restore --------------------------------------------------------
    run_path.mkdir(parents=True, exist_ok=True)
    state_sh = state_shardings(cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    # This process loads the rows its devices hold; processes sharing rows (tensor parallelism
    # across hosts) load the same ones.
    data_part = sharding.process_batch_slice(mesh)  # (index, count) of this process's rows
    config_dict = to_dict(cfg)
    notes: list[str] = []  # what the restore had to say, logged once the log is open
    if saved:
        # The latest readable checkpoint, resharded onto this mesh; the data pipeline resumes at its step.
        abstract = checkpoint.abstract_with_shardings(abstract_state(cfg).as_tree(), state_sh.as_tree())
        tree, start_step, notes = checkpoint.restore(
            ckpt_dir, abstract, config_dict, fresh_opt_state(cfg, state_sh)
        )
        state = TrainState.from_tree(tree)
    else:
        state = create_state(cfg, state_sh)
        start_step = 0
    trace = profile.run_window(run_path / "profile", profile_steps, start_step, t.steps)
    if pid == 0:
        write_json(run_path / "config.json", config_dict)

    train_step = make_train_step(cfg, state_sh, batch_sh, stop_flags=True)
    eval_step = make_eval_step(cfg, state_sh.params, batch_sh)

    def to_global(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.global_batch(local, batch_sh, data_part[1])

    def split_loss(params, data_cfg, index) -> float:
        batches = pipeline.eval_batches(
            data_cfg, cfg.model, index, t.batch_size // t.micro_batches, t.eval_batches, *data_part
        )
        return mean_loss(eval_step, params, batches, to_global)

    def val_loss(params) -> dict[str, float]:
        """{"loss": the val loss}; for a mixture also each source's "<name>/loss" (those with a val
        split), and "loss" is ``mixture.mixture_loss`` of them."""
        if not cfg.data.mixture:
            return {"loss": split_loss(params, cfg.data, index)}
        losses = {
            name: split_loss(params, source, index["sources"][name])
            for name, source in mixture.mixture_sources(cfg.data).items()
            if index["sources"][name]["splits"]["val"]["tokens"] > 0
        }
        return {
            "loss": mixture.mixture_loss(cfg.data, losses),
            **{f"{n}/loss": v for n, v in losses.items()},
        }

    log = RunLogger(run_path, t.steps, start_step, t.loggers, config_dict)
    n_params = lm.get(cfg.model).count
    log.line(
        f"jaxlm: {cfg.name} | {n_params / 1e6:.2f}M params, {cfg.model.compute_dtype} compute | "
        f"mesh {dict(mesh.shape)} on "
        f"{jax.device_count()} {jax.default_backend()} device(s) | "
        f"{pipeline.split_tokens(index, 'train'):,} train tokens | step {start_step} -> {t.steps}"
    )
    log.line(
        f"unigram entropy of the train split: {pipeline.unigram_entropy(cfg.data, index):.3f} nats/token "
        "(the loss to beat)"
    )
    if cfg.data.mixture:
        log.line(pipeline.describe_mixture(cfg.data, index))
    for note in notes:
        log.line(note)
    ckpt = checkpoint.Checkpointer(ckpt_dir, cfg.checkpoint, say=log.line)

    # ---- loop ---------------------------------------------------------------------------------
    batches = pipeline.Loader(cfg.data, cfg.model, index, t.batch_size, start_step, *data_part)
    pending = None  # (step, device metrics): read one step late, so the device never waits
    last_time = time.perf_counter()
    history: dict[str, float] = {}
    best_val = float("inf")
    val = None

    agreed_stop = False  # whether a process asked to stop, as of the last step drain() read

    def drain(pending) -> None:
        nonlocal last_time, agreed_stop
        step, metrics = pending
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        agreed_stop = agreed_stop or m.pop("stop") > 0
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):  # either makes state `step` junk
            raise FloatingPointError(
                f"training diverged at step {step} (loss {m['loss']:.4g}, gradient norm "
                f"{m['grad_norm']:.4g}); nothing of it was saved and the checkpoints in {ckpt_dir} are "
                "untouched: lower optim.lr or check the data, then run again to continue from the latest one"
            )
        now = time.perf_counter()
        m["step_time"] = now - last_time
        last_time = now
        m["tokens_per_s"] = m["tokens"] / m["step_time"]
        m["perplexity"] = perplexity(m["loss"])
        history.update(m)
        if step % t.log_every == 0 or step == t.steps:
            log.scalars(
                step,
                {
                    k: m[k]
                    for k in ("loss", "z_loss", "perplexity", "grad_norm", "lr", "tokens_per_s", "step_time")
                    + tuple(k for k in m if k.startswith("moe/"))
                },
                prefix="train/",
            )
            log.progress(step, m)
            if batches.mixture is not None:
                log.scalars(step, batches.mixture_scalars(step), prefix="data/")

    stopped = None  # (step, signal name) when SIGTERM/SIGINT ended the run early
    reached = None  # the step whose val loss met train.target_val_loss
    # From here the first SIGTERM/SIGINT finishes the step, checkpoints it and returns; a second exits.
    stop = checkpoint.StopRequest()
    try:
        for step in range(start_step + 1, t.steps + 1):
            batch = to_global(next(batches))
            state, metrics = trace.call(step, train_step, state, batch, stop.flags(mesh))
            if trace.done(step):
                log.line(f"profile: steps {trace.first}..{step} traced into {trace.folder()}")
            if pending is not None:
                drain(pending)
            pending = (step, metrics)
            # No wait for the device here: with several processes, the flags of the step drained
            # just now say whether any asked to stop, the same on all of them.
            stopping = stop.requested(agreed_stop)
            if not stopping and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
                drain(pending)
                pending = None
                if pipeline.split_tokens(index, "val") > 0:
                    vals = val_loss(state.params)
                    val = vals["loss"]
                    best_val = min(best_val, val)
                    log.scalars(step, {**vals, "perplexity": perplexity(val)}, prefix="val/")
                    by_source = "".join(
                        f" | {k.removesuffix('/loss')} {v:.4f}" for k, v in vals.items() if k != "loss"
                    )
                    log.line(
                        f"step {step:6d} | val loss {val:.4f} | val ppl {perplexity(val):.2f}{by_source}"
                    )
                    # Every process computed the same global val loss, so all of them stop here.
                    if t.target_val_loss and val <= t.target_val_loss:
                        reached = step
                        stopping = True
                        log.line(f"val loss {val:.4f} <= train.target_val_loss={t.target_val_loss}: stopping")
                for name, r in task_evals(state.params).items():
                    log.scalars(step, {"acc": r["acc"], "acc_norm": r["acc_norm"]}, prefix=f"tasks/{name}/")
                    log.line(
                        f"step {step:6d} | task {name} | acc {r['acc']:.4f} | acc_norm {r['acc_norm']:.4f}"
                    )
            if stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.steps:
                if pending is not None:  # a diverged state must never be saved (nor rotate out a good one)
                    drain(pending)
                    pending = None
                ckpt.save(step, state.as_tree(), config_dict)
            if reached:
                break
            if stopping:
                stopped = (step, stop.signal)
                break
        if pending is not None:
            drain(pending)
        saved_ok = ckpt.wait()
        if stopped:
            where = ckpt_dir / str(stopped[0]) if saved_ok else "FAILED, see the error above"
            log.line(
                f"stopped by {stopped[1]} at step {stopped[0]}; checkpoint {where}; run again to continue"
            )
    finally:
        trace.close()
        stop.restore()
        batches.close()
        ckpt.close()
        log.close()

    summary = {
        "status": f"stopped by {stopped[1]}"
        if stopped
        else "reached target_val_loss"
        if reached
        else "finished",
        "step": stopped[0] if stopped else reached or t.steps,
        "train_loss": history.get("loss"),
        "val_loss": val,
        "best_val_loss": best_val if val is not None else None,
        "tokens_per_s": history.get("tokens_per_s"),
        "params": n_params,
    }
    if pid == 0:
        write_json(run_path / "summary.json", summary)
    return summary
