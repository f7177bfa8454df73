"""The model interface: what the trainer, evaluation, sampling and the benchmark need of a model,
so one code path serves jaxlm's own transformer and a researcher's Flax NNX module.

An ``LM`` is a frozen bundle of the declaration of every parameter (``model.Weight``: shape,
logical axes, whether AdamW decays it) and pure functions over a plain params pytree. Sharding,
sharded init, decay masks and parameter counts derive from the declarations, as for the built-in
model. ``get(cfg)`` builds it from the ``ModelConfig``:

- ``model.module=""``: the built-in transformer of jaxlm/model.py;
- ``model.module="FILE.py:Class"`` or ``"package.module:Class"``: an ``nnx.Module`` built as
  ``Class(cfg, rngs=nnx.Rngs(key))`` (see jaxlm/nnx_model.py and experiments/nnx_gpt.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxlm import model
from jaxlm.config import ModelConfig

Params = model.Params
LossSums = model.LossSums
Batch = dict[str, jax.Array]


@dataclass(frozen=True)
class LM:
    cfg: ModelConfig
    name: str
    """What the model is, for logs and errors: 'jaxlm transformer' or the module's 'FILE.py:Class'."""
    decls: Params
    """``model.Weight`` per parameter, in the params' tree structure."""
    init: Callable[[jax.Array], Params]
    """key -> params; jit it with out_shardings to initialise every shard where it lives."""
    loss_sums: Callable[[Params, Batch, bool], LossSums]
    """(params, batch, document_masking) -> ``model.LossSums``: the masked cross-entropy and log²Z
    sums and the number of targets; the trainer adds ``cfg.z_loss`` times the second."""
    logits: Callable[[Params, jax.Array, jax.Array, jax.Array | None], jax.Array]
    """(params, tokens_BxT, positions_BxT, segment_ids_BxT or None) -> float32 [B, T, vocab_size]."""
    kv_cache: bool
    """Whether sampling can decode with ``model.block``'s key/value cache (else a full forward per token)."""
    count: int
    """Parameters as published (vocabulary padding rows left out)."""
    flop_params: int
    """N of the 6N FLOP rule: every parameter a token's forward multiplies by (see jaxlm/bench.py);
    with experts, the active parameters (a token's top-k experts, not all of them)."""

    def logical_axes(self) -> Params:
        return jax.tree.map(lambda w: w.axes, self.decls, is_leaf=model.is_weight)

    def decay_mask(self) -> Params:
        return jax.tree.map(lambda w: w.decay, self.decls, is_leaf=model.is_weight)

    def lr_mults(self) -> Params | None:
        """Per-parameter learning-rate factors under µP (``model.Weight.lr_mult``); None otherwise,
        so the standard optimizer is built exactly as before."""
        if self.cfg.parametrization != "mup":
            return None
        return jax.tree.map(lambda w: w.lr_mult, self.decls, is_leaf=model.is_weight)

    def abstract_params(self) -> Params:
        dtype = jnp.dtype(self.cfg.param_dtype)
        return jax.tree.map(
            lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype or dtype), self.decls, is_leaf=model.is_weight
        )


def masked_xent_sums(logits_BxTxV: jax.Array, targets_BxT: jax.Array, loss_mask_BxT: jax.Array) -> LossSums:
    """``LossSums`` from float32 logits, as the built-in model computes them."""
    xent_BxT, lse_BxT = model.token_xent_and_lse(logits_BxTxV.astype(jnp.float32), targets_BxT)
    mask = loss_mask_BxT.astype(jnp.float32)
    return LossSums(*model.masked_sums(xent_BxT, lse_BxT, mask), mask.sum())


def _builtin(cfg: ModelConfig) -> LM:
    return LM(
        cfg=cfg,
        name="jaxlm transformer",
        decls=model.param_decls(cfg),
        init=lambda key: model.init_params(cfg, key),
        loss_sums=lambda params, batch, doc_mask: model.loss_sums(params, batch, cfg, doc_mask),
        logits=lambda params, tokens, positions, segment_ids: model.forward(
            params, tokens, positions, segment_ids, cfg
        ),
        kv_cache=True,
        count=model.count_params(cfg),
        # A tied embedding is also the output projection, which every token multiplies by; of a
        # sparse layer's experts a token multiplies by its top-k only (active parameters).
        flop_params=model.count_params(cfg, embedding=False)
        + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
        - model.inactive_expert_params(cfg),
    )


@functools.cache
def get(cfg: ModelConfig) -> LM:
    """The model ``cfg`` describes (cached: configs are frozen and hashable)."""
    if not cfg.module:
        return _builtin(cfg)
    from jaxlm import nnx_model

    return nnx_model.build(cfg)
