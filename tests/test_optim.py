"""Muon for the hidden matrices, AdamW for the rest: which weights go where (built-in and Flax NNX),
one update against a hand computation, and a sharded update against the one-device update."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from optax.contrib import MuonDimensionNumbers as Dims
from tolerances import assert_close, newton_schulz_terms, tol

from jaxlm import lm, model, sharding
from jaxlm.config import ConfigError, MeshConfig, OptimConfig, apply_overrides, load_config
from jaxlm.optim import lr_schedule, muon_dim_numbers
from jaxlm.state import make_tx, state_shardings

ROOT = Path(__file__).resolve().parents[1]
# No clipping and no warmup: the update is Muon's alone, at its full learning rate.
MUON = {
    "optim.name": "muon",
    "optim.grad_clip": "0",
    "optim.warmup_steps": "0",
    "optim.muon_weight_decay": "0.1",
}
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # optax's quintic Newton-Schulz coefficients


def _cfg(experiment: str = "tiny.py", **overrides: str):
    return apply_overrides(load_config(ROOT / "experiments" / experiment), {**MUON, **overrides})


def _flat_dims(cfg) -> dict[str, Dims | None]:
    m = lm.get(cfg.model)
    return traverse_util.flatten_dict(muon_dim_numbers(m.decls, m.name), sep="/")


def test_muon_takes_the_hidden_matrices_and_adamw_the_embeddings_head_norms_and_biases():
    cfg = _cfg(
        **{
            "model.use_bias": "true",
            "model.qk_norm": "true",
            "model.norm": "layernorm",
            "model.positions": "learned",
            "model.tie_embeddings": "false",
        }
    )
    dims = _flat_dims(cfg)
    muon = {k for k, d in dims.items() if d is not None}
    assert muon == {f"blocks/attn/{n}" for n in "qkvo"} | {f"blocks/mlp/{n}" for n in ("up", "gate", "down")}
    adamw = {"embed", "pos_embed", "unembed", "final_norm/scale", "final_norm/bias"}
    adamw |= {f"blocks/{norm}/{p}" for norm in ("attn_norm", "mlp_norm") for p in ("scale", "bias")}
    adamw |= {f"blocks/attn/{n}" for n in ("q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm")}
    adamw |= {f"blocks/mlp/{n}" for n in ("up_bias", "gate_bias", "down_bias")}
    assert set(dims) - muon == adamw
    # The reduction is what a token's activation is multiplied along; axis 0 (layers) is neither,
    # so each layer's matrix is orthogonalised on its own.
    assert dims["blocks/attn/q"] == Dims(reduction_axis=(1,), output_axis=(2, 3))  # [L, D | H, K]
    assert dims["blocks/attn/o"] == Dims(reduction_axis=(1, 2), output_axis=(3,))  # [L, H, K | D]
    assert dims["blocks/mlp/up"] == dims["blocks/mlp/down"] == Dims(reduction_axis=(1,), output_axis=(2,))


def test_muon_reads_a_flax_nnx_module_s_axes_the_same_way():
    dims = _flat_dims(_cfg("nnx_gpt.py"))
    muon = {k for k, d in dims.items() if d is not None}
    kernels = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down")
    assert muon == {f"blocks/{i}/{k}/kernel" for i in range(2) for k in kernels}
    assert dims["blocks/0/attn/q/kernel"] == Dims(reduction_axis=(0,), output_axis=(1, 2))  # [D | H, K]
    assert dims["blocks/1/attn/o/kernel"] == Dims(reduction_axis=(0, 1), output_axis=(2,))  # [H, K | D]
    assert dims["embed/embedding"] is None and dims["norm/scale"] is None


def test_a_matrix_whose_axes_do_not_say_its_sides_is_refused_by_name():
    mix = model.Weight((2, 8, 8), ("layers", "mlp", None), decay=True)  # hidden -> hidden: which is which?
    with pytest.raises(
        ConfigError, match=r"optim.name='muon': x.py:Net parameter blocks\.mix has logical axes"
    ):
        muon_dim_numbers({"blocks": {"mix": mix}}, "x.py:Net")
    # A Flax bias [heads, head_dim] (decay=False) is not a matrix: AdamW's.
    bias = model.Weight((4, 8), ("heads", "head_dim"), decay=False)
    assert muon_dim_numbers({"bias": bias}, "x.py:Net") == {"bias": None}


def _newton_schulz(x_MxN: np.ndarray) -> np.ndarray:
    """Muon's orthogonalisation in float64, written out: Frobenius-normalise, five quintic steps."""
    a, b, c = NS_COEFFS
    wide = x_MxN.T if x_MxN.shape[0] > x_MxN.shape[1] else x_MxN  # iterate on the short side
    x = wide / (np.linalg.norm(wide) + 1e-8)
    for _ in range(5):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if x_MxN.shape[0] > x_MxN.shape[1] else x


def _grads(params, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)


def _two_updates(tx, params, g1, g2):
    """The second update from a fresh state (so the momentum holds g1 when g2 arrives)."""
    _, state = tx.update(g1, tx.init(params), params)
    return tx.update(g2, state, params)


def _orthogonalise(x: np.ndarray, n_in: int, stacked: bool) -> np.ndarray:
    """Each layer's [n_in, fan_out] matrix on its own (``stacked``: x is [layers, ...])."""
    layers = x if stacked else x[None]
    out = [_newton_schulz(layer.reshape(n_in, -1)).reshape(layer.shape) for layer in layers]
    return np.stack(out).reshape(x.shape)


def _hidden(name: str) -> str:
    """'blocks/attn/q' (stacked layers) or an NNX module's 'blocks/0/attn/q/kernel' -> 'attn/q'."""
    return "/".join(p for p in name.split("/") if p not in ("blocks", "kernel") and not p.isdigit())


@pytest.mark.parametrize("experiment", ["tiny.py", "nnx_gpt.py"])
def test_one_muon_update_is_nesterov_momentum_then_newton_schulz_per_layer_then_the_scaled_lr(experiment):
    cfg = _cfg(experiment)
    m, o = cfg.model, cfg.optim
    params = jax.device_get(lm.get(m).init(jax.random.key(0)))
    g1, g2 = _grads(params, 1), _grads(params, 2)
    updates, _ = jax.jit(lambda *a: _two_updates(make_tx(cfg), *a))(params, g1, g2)
    D, HK, F = m.d_model, m.n_heads * m.dim_per_head, m.d_ff
    # Written out by hand: the input side of each hidden matrix (the rest is its output side).
    fan_in = {"attn/q": D, "attn/k": D, "attn/v": D, "attn/o": HK, "mlp/up": D, "mlp/gate": D, "mlp/down": F}
    flat = {k: traverse_util.flatten_dict(t, sep="/") for k, t in (("g1", g1), ("g2", g2), ("p", params))}
    flat_updates = traverse_util.flatten_dict(updates, sep="/")
    hidden = {name for name in flat["p"] if _hidden(name) in fan_in}
    assert hidden == {k for k, d in _flat_dims(cfg).items() if d is not None}
    beta, wd = o.muon_momentum, o.muon_weight_decay
    lr = float(lr_schedule(o, cfg.train.steps, o.muon_lr)(1))  # the second update's learning rate
    for name in sorted(hidden):
        n_in = fan_in[_hidden(name)]
        stacked = name.split("/")[1] in ("attn", "mlp")  # the built-in model's [layers, ...]
        G1, G2, P = (np.asarray(flat[k][name], np.float64) for k in ("g1", "g2", "p"))
        mu = beta * (1 - beta) * G1 + (1 - beta) * G2
        # optax's Nesterov momentum, bias-corrected at step 2
        nesterov = beta * mu / (1 - beta**3) + (1 - beta) * G2 / (1 - beta**2)
        orthogonalise = functools.partial(_orthogonalise, n_in=n_in, stacked=stacked)
        ortho = orthogonalise(nesterov)
        n_out = P.size // n_in // (P.shape[0] if stacked else 1)
        width = math.sqrt(max(1.0, n_out / n_in))  # Keller Jordan's scaling for wide outputs
        want = -lr * (width * ortho + wd * P)
        # Newton-Schulz in float32 against float64, the momentum's 6 roundings before it; then the
        # scaling, the decay term and the learning rate, a few roundings of values <= max|want|.
        ns = newton_schulz_terms(min(n_in, n_out), max(n_in, n_out), input_terms=6)
        bound = lr * width * tol(1.0, ns) + tol(np.abs(want).max(), 4)
        got = np.asarray(flat_updates[name], np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=bound, err_msg=f"{name} (bound {bound:.3g})")
        # Not vacuous: plain (not Nesterov) momentum, or a missing width scale, is outside the bound.
        assert np.abs(-lr * (width * orthogonalise(mu) + wd * P) - got).max() > bound, name
        if width > 1:
            assert np.abs(-lr * (ortho + wd * P) - got).max() > bound, name
    # Every other weight gets exactly AdamW's update (elementwise: a few roundings apart).
    adamw_cfg = dataclasses.replace(cfg, optim=dataclasses.replace(o, name="adamw"))
    adam_updates, _ = jax.jit(lambda *a: _two_updates(make_tx(adamw_cfg), *a))(params, g1, g2)
    flat_adam = traverse_util.flatten_dict(adam_updates, sep="/")
    for name in set(flat_updates) - hidden:
        assert_close(flat_updates[name], flat_adam[name], 8, err_msg=name)


SHARDABLE = {
    "model.n_heads": "8",
    "model.n_kv_heads": "8",
    "model.d_ff": "64",
    "model.d_model": "64",
    "model.vocab_multiple": "8",
}


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)], ids=["2x2x2", "1x8x1"])
def test_a_sharded_muon_update_equals_the_one_device_update(shape):
    cfg = _cfg(**SHARDABLE)
    params = jax.device_get(model.init_params(cfg.model, jax.random.key(0)))
    g1, g2 = _grads(params, 1), _grads(params, 2)
    two = lambda *a: _two_updates(make_tx(cfg), *a)
    ref_updates, ref_state = jax.device_get(jax.jit(two)(params, g1, g2))
    mesh = sharding.make_mesh(MeshConfig(*shape), devices=jax.devices()[: math.prod(shape)])
    sh = state_shardings(cfg, mesh)
    with jax.set_mesh(mesh):
        args = [jax.device_put(t, sh.params) for t in (params, g1, g2)]
        updates, state = jax.jit(two, out_shardings=(sh.params, sh.opt_state))(*args)
    # Muon's momentum is split like its matrix (FSDP and tensor), not replicated.
    for path, s in jax.tree_util.tree_flatten_with_path(sh.opt_state)[0]:
        key = jax.tree_util.keystr(path)
        if "['muon']" in key and ".mu[" in key:
            param = traverse_util.flatten_dict(sh.params, sep="/")["/".join(k.key for k in path[-3:])]
            assert s.spec == param.spec and any(s.spec), key
    # The mesh sums the matrix norm and the Newton-Schulz matmuls in other orders: each float32
    # computation is within the bound of the exact one, so the two are within twice it. The
    # momentum and AdamW are elementwise: the same few roundings.
    lr = float(lr_schedule(cfg.optim, cfg.train.steps, cfg.optim.muon_lr)(1))
    dims = _flat_dims(cfg)
    flat, flat_ref = (traverse_util.flatten_dict(u, sep="/") for u in (jax.device_get(updates), ref_updates))
    for name, d in dims.items():
        if d is None:
            assert_close(flat[name], flat_ref[name], 8, err_msg=name)
            continue
        shape_ = flat_ref[name].shape
        n_in = math.prod(shape_[i] for i in d.reduction_axis)
        n_out = math.prod(shape_[i] for i in d.output_axis)
        width = math.sqrt(max(1.0, n_out / n_in))
        ns = newton_schulz_terms(min(n_in, n_out), max(n_in, n_out), input_terms=6)
        bound = 2 * lr * width * tol(1.0, ns) + tol(np.abs(flat_ref[name]).max(), 4)
        np.testing.assert_allclose(flat[name], flat_ref[name], rtol=0, atol=bound, err_msg=name)
    jax.tree.map(lambda a, b: assert_close(a, b, 8), jax.device_get(state), ref_state)


def test_muon_settings_are_validated():
    with pytest.raises(ConfigError, match="optim.muon_lr: must be positive"):
        _cfg(**{"optim.muon_lr": "0"})
    with pytest.raises(ConfigError, match=r"optim.muon_momentum: must be in \[0, 1\)"):
        _cfg(**{"optim.muon_momentum": "1"})
    with pytest.raises(ConfigError, match="optim.name='sgd' is not valid"):
        _cfg(**{"optim.name": "sgd"})
    assert OptimConfig().name == "adamw"  # off by default
