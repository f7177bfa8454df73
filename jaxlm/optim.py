"""AdamW with linear warmup + cosine decay, global-norm clipping and a decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to lr * min_lr_ratio at
    total_steps (held there if training continues)."""
    warmup = cfg.warmup_steps
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (step + 1) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def scale_by_lr_mults(lr_mults) -> optax.GradientTransformation:
    """Multiply each parameter's update by its own factor (a pytree of floats like the params, see
    ``lm.LM.lr_mults``): per-parameter learning rates, as µP needs. It scales AdamW's whole step,
    its decoupled weight decay included, as torch's per-group lr (and the mup package's MuAdamW) do."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, lr_mults), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, decay_mask, lr_mults=None
) -> optax.GradientTransformation:
    """``decay_mask`` is a pytree of bools like the params (see ``model.decay_mask``); ``lr_mults``,
    if given, a pytree of per-parameter learning-rate factors (``scale_by_lr_mults``)."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    if lr_mults is not None:
        parts.append(scale_by_lr_mults(lr_mults))
    return optax.chain(*parts)
