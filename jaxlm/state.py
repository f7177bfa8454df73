"""The train state: what it holds, how it is sharded, and how it is built where it lives.

Declared shapes -> shardings -> a jitted init that writes each shard on its own device, so full
params never exist on one host. The model comes from ``lm.get(cfg.model)``: the built-in
transformer and a Flax NNX module go through the same functions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxlm import lm
from jaxlm.config import Config
from jaxlm.optim import make_optimizer, muon_dim_numbers
from jaxlm.sharding import shardings


@struct.dataclass
class TrainState:
    step: jax.Array
    """int32 []: optimizer steps taken."""
    params: Any
    opt_state: optax.OptState

    def as_tree(self) -> dict[str, Any]:
        """The checkpoint layout, {"step", "params", "opt_state"} (unchanged since jaxlm's first runs)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> TrainState:
        return cls(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])


def make_tx(cfg: Config) -> optax.GradientTransformation:
    model = lm.get(cfg.model)
    dims = muon_dim_numbers(model.decls, model.name) if cfg.optim.name == "muon" else None
    return make_optimizer(
        cfg.optim, cfg.train.steps, model.decay_mask(), muon_dims_tree=dims, lr_mults=model.lr_mults()
    )


def init_state(cfg: Config, key: jax.Array) -> TrainState:
    params = lm.get(cfg.model).init(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_tx(cfg).init(params))


def abstract_state(cfg: Config) -> TrainState:
    """Shapes and dtypes of the state, computed without allocating it."""
    return jax.eval_shape(lambda: init_state(cfg, jax.random.key(0)))


def state_shardings(cfg: Config, mesh: jax.sharding.Mesh) -> TrainState:
    """Params shard by their logical axes; optimizer moments like the params they track."""
    abstract = abstract_state(cfg)
    param_sh = shardings(mesh, lm.get(cfg.model).logical_axes(), abstract.params)
    return TrainState(
        step=_replicated(mesh), params=param_sh, opt_state=opt_state_shardings(abstract, param_sh, mesh)
    )


def _replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def opt_state_shardings(abstract: TrainState, param_sh, mesh: jax.sharding.Mesh):
    """A leaf of the optimizer state that sits under a parameter's path with that parameter's shape
    (AdamW's mu and nu, Muon's momentum) is sharded like it; counts and constants are replicated.

    Params are nested dicts, so a parameter's path is the run of dict keys that ends a leaf's path
    (``.inner_states['muon'].inner_state[0].mu['blocks']['attn']['q']``). optax.tree_map_params
    cannot say this for optax.partition, whose state holds the params tree with the other
    partition's leaves masked out.
    """
    by_path = {
        path: (sh, leaf.shape)
        for (path, sh), leaf in zip(
            jax.tree_util.tree_flatten_with_path(param_sh)[0], jax.tree.leaves(abstract.params), strict=True
        )
    }

    def one(path, leaf):
        n = len(path)
        while n and isinstance(path[n - 1], jax.tree_util.DictKey):
            n -= 1
        sh, shape = by_path.get(tuple(path[n:]), (None, None))
        return sh if sh is not None and shape == leaf.shape else _replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract.opt_state)


def create_state(cfg: Config, shardings_: TrainState) -> TrainState:
    """A fresh state from ``train.seed``, each shard initialised on the device that holds it."""
    init = jax.jit(lambda k: init_state(cfg, k), out_shardings=shardings_)
    return init(jax.random.key(cfg.train.seed))


def fresh_opt_state(cfg: Config, shardings_: TrainState):
    """params -> a new optimizer state placed like ``shardings_.opt_state`` (restore, HF import)."""
    return jax.jit(make_tx(cfg).init, out_shardings=shardings_.opt_state)


def from_params(cfg: Config, params, shardings_: TrainState) -> TrainState:
    """Step 0 with a fresh optimizer state around ``params`` (already placed like ``shardings_.params``)."""
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings_.step)
    return TrainState(step=step, params=params, opt_state=fresh_opt_state(cfg, shardings_)(params))
