"""µP (model.parametrization="mup"): the coordinate check, the per-parameter learning rates, the
standard parametrization left as it was, validation and export refusal (its exact resume:
tests/test_checkpoint.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import lm, model
from jaxlm.config import ConfigError, OptimConfig, apply_overrides, load_config, preset
from jaxlm.hf.arch import architecture
from jaxlm.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (64, 256, 1024)
BASE = 64


def _cfg(width: int, parametrization: str):
    # width = d_model; the heads (head_dim 16) and d_ff = 4 x width grow with it
    return preset(
        "tiny", vocab_size=257, vocab_multiple=1, seq_len=16, d_model=width, n_heads=width // 16,
        d_ff=4 * width, parametrization=parametrization, mup_base_width=BASE, compute_dtype="float32",
    )  # fmt: skip


def _coordinate_rms(width: int, parametrization: str, steps: int = 3, lr: float = 1e-2) -> np.ndarray:
    """RMS of the residual stream after each block and of the logits, after ``steps`` Adam steps at a
    constant ``lr`` on one batch of 4 x 16 tokens: [n_layers + 1]."""
    cfg = _cfg(width, parametrization)
    m = lm.get(cfg)
    opt = OptimConfig(lr=lr, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0, weight_decay=0.0)
    tx = make_optimizer(opt, steps, m.decay_mask(), lr_mults=m.lr_mults())
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (4, 17)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (4, 16))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions}
    batch["loss_mask"] = jnp.ones((4, 16))

    def loss(params):
        sums = m.loss_sums(params, batch, False)
        return sums.xent / sums.count

    @jax.jit
    def run(key):
        params = m.init(key)

        def step(carry, _):
            params, opt_state = carry
            updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
            return (jax.tree.map(jnp.add, params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        acts = [*model.residual_streams(params, batch["inputs"], positions, cfg)]
        acts.append(model.forward(params, batch["inputs"], positions, None, cfg))
        return jnp.stack([jnp.sqrt(jnp.mean(jnp.square(a))) for a in acts])

    return np.asarray(run(jax.random.key(0)))


def test_coordinate_check_activations_stay_flat_across_widths_under_mup_and_grow_under_standard():
    """Tensor Programs V's coordinate check: a few Adam steps move every activation by an amount
    that under µP does not depend on the width; under the standard parametrization (one lr for
    every matrix) a hidden layer's update grows like the width, and so do its outputs."""
    mup = np.stack([_coordinate_rms(w, "mup") for w in WIDTHS])  # [widths, layers + logits]
    std = np.stack([_coordinate_rms(w, "standard") for w in WIDTHS])
    # µP: every layer and the logits within a factor 3 from width 64 to 1024 (x16). The spread
    # that remains is finite width: width 64 is the base, with 4 heads and as many tokens (64) as
    # coordinates; from 256 to 1024 the layers move by under 10%.
    assert (mup.max(0) / mup.min(0) < 3).all(), mup
    np.testing.assert_array_less(np.abs(mup[2] / mup[1] - 1), 0.25)
    # Standard: each block's output grows with the width, by far more than a factor 10 (~16x is
    # the width ratio). The logits pass the final norm, which bounds them, so they are not compared.
    blocks = std[:, :-1]
    assert (np.diff(blocks, axis=0) > 0).all() and (blocks[-1] / blocks[0] > 10).all(), std


def test_hidden_matrices_step_base_over_width_times_the_standard_update():
    """One AdamW step from the same params and gradients: under µP every hidden matrix moves by
    base/width times the standard update (here 1/4, a power of two, so exactly), every other
    weight by the same amount."""
    std_cfg, mup_cfg = _cfg(256, "standard"), _cfg(256, "mup")
    params = lm.get(std_cfg).init(jax.random.key(0))
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)
    opt = OptimConfig(lr=1e-2, warmup_steps=0)

    def update(cfg):
        m = lm.get(cfg)
        tx = make_optimizer(opt, 10, m.decay_mask(), lr_mults=m.lr_mults())
        return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)

    hidden = {"q", "k", "v", "o", "up", "down", "gate"}
    flat_std = dict(jax.tree_util.tree_leaves_with_path(update(std_cfg)))
    flat_mup = dict(jax.tree_util.tree_leaves_with_path(update(mup_cfg)))
    assert flat_std.keys() == flat_mup.keys()
    for path, u_std in flat_std.items():
        name = path[-1].key
        scale = BASE / 256 if name in hidden else 1.0
        np.testing.assert_array_equal(flat_mup[path], u_std * scale, err_msg=jax.tree_util.keystr(path))
    assert lm.get(std_cfg).lr_mults() is None  # the standard optimizer has no extra transform


def test_mup_at_the_base_width_declares_the_standard_weights():
    """At d_model = mup_base_width every init std and learning rate is the standard one, so the
    standard parametrization (the default) is what it was; only attention's 1/head_dim differs."""
    std, mup = _cfg(BASE, "standard"), _cfg(BASE, "mup")
    assert model.param_decls(std) == model.param_decls(mup)
    assert all(w.lr_mult == 1.0 for w in jax.tree.leaves(model.param_decls(std), is_leaf=model.is_weight))
    wide = model.param_decls(_cfg(4 * BASE, "mup"))
    assert wide["blocks"]["attn"]["q"].std == std.init_std / 2 and wide["blocks"]["attn"]["q"].lr_mult == 0.25
    assert wide["embed"].std == std.init_std and wide["embed"].lr_mult == 1.0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"model.parametrization": "mup", "model.mup_base_width": 0},
            r"model.mup_base_width: must be a posi",
        ),
        (
            {"model.parametrization": "mup", "model.module": "experiments/nnx_gpt.py:GPT"},
            r"model.parametrization: 'mup' scales the weights of jaxlm's own transformer",
        ),
        ({"model.parametrization": "mu"}, r"model.parametrization='mu' is not valid; choose one of"),
    ],
)
def test_bad_mup_settings_are_refused_naming_the_key(overrides, match):
    cfg = load_config(ROOT / "experiments" / "tiny.py")
    with pytest.raises(ConfigError, match=match):
        apply_overrides(cfg, {k: str(v) for k, v in overrides.items()})


def test_export_refuses_mup_by_name():
    cfg = preset("llama-1b", parametrization="mup", mup_base_width=512)
    with pytest.raises(ConfigError, match=r"model.parametrization='mup': .*1/head_dim"):
        architecture(cfg)
    architecture(dataclasses.replace(cfg, parametrization="standard"))  # the rest is representable
