"""The optimizer: AdamW, or Muon for the hidden matrices with AdamW for the rest; both with linear
warmup + cosine decay and global-norm clipping.

Which weights Muon takes, and which of their dimensions a token's activation is multiplied along
(the reduction) and which it comes out along (the output), are read from each weight's declared
logical axes (``model.Weight.axes``), so the built-in transformer and a Flax NNX module are treated
alike and no second per-weight table exists.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from jaxlm import model
from jaxlm.config import ConfigError, OptimConfig

MUON_NS_STEPS = 5
"""Newton-Schulz iterations per update (modded-nanogpt's), with optax's default quintic coefficients."""


def lr_schedule(cfg: OptimConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` (default ``cfg.lr``) over warmup_steps, then cosine decay to
    peak * min_lr_ratio at total_steps (held there if training continues)."""
    peak = cfg.lr if peak is None else peak
    warmup = cfg.warmup_steps
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def muon_dims(w: model.Weight) -> MuonDimensionNumbers | None:
    """Muon's [reduction, output] split of a hidden matrix, or None for AdamW.

    A hidden matrix of a transformer reads from the residual stream or writes to it, so its
    ``embed`` axis is its first (q, k, v, up, gate: x_D @ W) or its last (o, down: h @ W -> D);
    the other axes (heads and head_dim, mlp) are the other side of the product. ``layers`` is
    neither: the stacked layers (and experts) are orthogonalised one by one. Vectors (norm scales, biases) and
    the lookup tables and output head (a ``vocab`` or ``positions`` axis) are AdamW's.
    """
    if not _is_matrix(w):
        return None
    core = [i for i, a in enumerate(w.axes) if a not in STACK_AXES]
    first, last = w.axes[core[0]] == "embed", w.axes[core[-1]] == "embed"
    if first and not last:
        return MuonDimensionNumbers(reduction_axis=(core[0],), output_axis=tuple(core[1:]))
    if last and not first:
        return MuonDimensionNumbers(reduction_axis=tuple(core[:-1]), output_axis=(core[-1],))
    return None


STACK_AXES = ("layers", "experts")
"""Axes along which a weight is a batch of matrices, each orthogonalised on its own: the stacked
layers, and the experts of a sparse layer (an expert's up [D, F] is a matrix like a dense MLP's).
A router [layers, embed, experts] is then no matrix of Muon's: it keeps AdamW."""


def _is_matrix(w: model.Weight) -> bool:
    """Two or more axes besides the ``STACK_AXES``, and not a lookup table or the output head."""
    core = [a for a in w.axes if a not in STACK_AXES]
    return len(core) >= 2 and not any(a in model.TABLE_AXES for a in w.axes)


def muon_dim_numbers(decls, model_name: str):
    """``muon_dims`` of every declared weight. A decayed matrix that has no ``embed`` axis at
    exactly one end is refused by name: Muon cannot tell its input side from its output side."""

    def one(path, w: model.Weight):
        dims = muon_dims(w)
        if dims is None and w.decay and _is_matrix(w):
            name = jax.tree_util.keystr(path, simple=True, separator=".")
            raise ConfigError(
                f"optim.name='muon': {model_name} parameter {name} "
                f"has logical axes {w.axes}, a matrix without an 'embed' axis at exactly one end, so "
                "Muon cannot tell which dimensions a token multiplies it along; name its input or output "
                "side 'embed', mark it decay=False to leave it to AdamW, or use optim.name=adamw"
            )
        return dims

    return jax.tree_util.tree_map_with_path(one, decls, is_leaf=model.is_weight)


def _width_scale(update: jax.Array, dims: MuonDimensionNumbers) -> jax.Array:
    """Keller Jordan's sqrt(max(1, fan_out / fan_in)): an orthogonal update has unit singular
    values, so its per-entry size falls with the width; this keeps wide outputs moving."""
    fan_in = math.prod(update.shape[i] for i in dims.reduction_axis)
    fan_out = math.prod(update.shape[i] for i in dims.output_axis)
    return update * math.sqrt(max(1.0, fan_out / fan_in))


def scale_by_lr_mults(lr_mults) -> optax.GradientTransformation:
    """Multiply each parameter's update by its own factor (a pytree of floats like the params, see
    ``lm.LM.lr_mults``): per-parameter learning rates, as µP needs. It scales AdamW's whole step,
    its decoupled weight decay included, as torch's per-group lr (and the mup package's MuAdamW) do."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, lr_mults), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, decay_mask, *, muon_dims_tree=None, lr_mults=None
) -> optax.GradientTransformation:
    """``decay_mask`` is a pytree of bools like the params (see ``lm.LM.decay_mask``);
    ``muon_dims_tree`` (``muon_dim_numbers``, needed when ``cfg.name == "muon"``) has a
    ``MuonDimensionNumbers`` for each of Muon's weights and None for AdamW's; ``lr_mults``, if
    given, a pytree of per-parameter learning-rate factors (``scale_by_lr_mults``, µP)."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    adamw = optax.adamw(
        lr_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    # µP's per-parameter factors scale the whole step (config.validate allows them with AdamW only)
    after = [scale_by_lr_mults(lr_mults)] if lr_mults is not None else []
    if cfg.name == "adamw":
        return optax.chain(*parts, adamw, *after)
    # Not optax.contrib.muon: its Adam half is Nesterov Adam with one unmasked weight decay for
    # every non-Muon leaf (norms included); this keeps the non-Muon params on exactly the AdamW
    # above. The chain is the rest of optax.contrib.muon: momentum -> Newton-Schulz -> shape
    # scaling sqrt(max(1, fan_out / fan_in)) -> decoupled decay -> learning rate.
    is_dims = lambda x: x is None or isinstance(x, MuonDimensionNumbers)
    labels = jax.tree.map(lambda d: "adamw" if d is None else "muon", muon_dims_tree, is_leaf=is_dims)
    # Inside optax.partition Muon sees AdamW's leaves as MaskedNode; its dimension numbers must too.
    masked_dims = jax.tree.map(
        lambda d: optax.MaskedNode() if d is None else d, muon_dims_tree, is_leaf=is_dims
    )
    muon = optax.chain(
        scale_by_muon(
            ns_steps=MUON_NS_STEPS,
            beta=cfg.muon_momentum,
            nesterov=True,
            weight_dimension_numbers=masked_dims,
        ),
        optax.stateless(lambda updates, _: jax.tree.map(_width_scale, updates, masked_dims, is_leaf=is_dims)),
        optax.add_decayed_weights(cfg.muon_weight_decay, decay_mask),
        optax.scale_by_learning_rate(lr_schedule(cfg, total_steps, cfg.muon_lr)),
    )
    return optax.chain(*parts, optax.partition({"muon": muon, "adamw": adamw}, labels), *after)
