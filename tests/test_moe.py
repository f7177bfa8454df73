"""Mixture of experts (jaxlm/moe.py): routing picks the right experts and weights, the bucketed
dispatch equals a per-token loop and the dense reference, capacity drops what it says, the
load-balancing loss has its formula's gradient, and expert parallelism (all_to_all on the expert
mesh axis) gives the one-device loss and gradients on two meshes of the 8 fake devices."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close, assert_trees_close, grad_terms, loss_terms

from jaxlm import bench, lm, model, moe, optim, sharding, train
from jaxlm.config import Config, ConfigError, MeshConfig, TrainConfig, preset, validate

SWIGLU = lambda up, gate: model.ffn_activation("swiglu", up, gate)
# Jitted: run op by op, every small op would compile on its own.
dispatch = jax.jit(moe.dispatch, static_argnums=(4, 5))
dense_dispatch = jax.jit(moe.dense_dispatch, static_argnums=(4, 5))


def moe_model(**overrides):
    """A tiny MoE model: d_model 32, 2 layers, 8 experts top-2, dropless, seq 16."""
    return preset("tiny", seq_len=16, moe_experts=8, moe_top_k=2, **overrides)


def experts(E=8, D=16, F=24, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "up": jax.random.normal(k[0], (E, D, F)) / np.sqrt(D),
        "gate": jax.random.normal(k[1], (E, D, F)) / np.sqrt(D),
        "down": jax.random.normal(k[2], (E, F, D)) / np.sqrt(F),
    }


def per_token_loop(x_NxD, expert_NxK, weight_NxK, p, kept=None):
    """y_n = sum over token n's chosen (and kept) experts e of w * expert_e(x_n), one at a time."""
    x, e, w = (np.asarray(a, np.float64) for a in (x_NxD, expert_NxK, weight_NxK))
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    silu = lambda a: a / (1 + np.exp(-a))
    y = np.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(e.shape[1]):
            if kept is not None and not kept[n, k]:
                continue
            j = int(e[n, k])
            h = silu(x[n] @ p["gate"][j]) * (x[n] @ p["up"][j])
            y[n] += w[n, k] * (h @ p["down"][j])
    return y


def test_top_k_routing_picks_the_largest_logits_and_renormalises_their_weights():
    router_DxE = jnp.eye(4)  # logits = x
    x_NxD = jnp.array([[0.0, 2.0, 1.0, -1.0], [3.0, -2.0, 0.5, 0.4]])
    _, probs, expert, weight = moe.route(x_NxD, router_DxE, top_k=2)
    np.testing.assert_array_equal(expert, [[1, 2], [0, 2]])
    # Renormalised over the two chosen: a softmax over their two logits.
    want = jax.nn.softmax(jnp.array([[2.0, 1.0], [3.0, 0.5]]), axis=-1)
    np.testing.assert_allclose(weight, want, rtol=4 * 1.19e-7)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=4 * 1.19e-7)
    # top-1: the chosen expert's probability itself (Switch), not a constant 1.
    _, probs, expert, weight = moe.route(x_NxD, router_DxE, top_k=1)
    np.testing.assert_array_equal(expert[:, 0], [1, 0])
    np.testing.assert_array_equal(weight[:, 0], probs[jnp.arange(2), expert[:, 0]])
    assert float(weight[0, 0]) < 1.0


def test_dropless_dispatch_equals_a_per_token_loop_and_the_dense_reference():
    N, D, F, E, K = 40, 16, 24, 8, 2
    p = experts(E, D, F)
    x_NxD = jax.random.normal(jax.random.key(1), (N, D))
    _, _, expert, weight = moe.route(x_NxD, jax.random.normal(jax.random.key(2), (D, E)), K)
    want = per_token_loop(x_NxD, expert, weight, p)
    y, dropped = dispatch(x_NxD[None], expert[None], weight[None], p, SWIGLU, 0.0)
    y_dense, dropped_dense = dense_dispatch(x_NxD, expert, weight, p, SWIGLU, 0.0)
    assert int(dropped) == int(dropped_dense) == 0
    # Two matmul chains (over D, then F) and the sum over the K experts, in float32.
    assert_close(y[0], want, D + F + K)
    assert_close(y_dense, want, D + F + E)


def test_capacity_drops_the_copies_beyond_each_experts_slots_and_counts_them():
    N, D, F, E, K = 12, 8, 8, 4, 2
    p = experts(E, D, F, seed=3)
    x_NxD = jax.random.normal(jax.random.key(4), (N, D))
    # Every token's first choice is expert 0, second choices cycle over 1..3.
    expert = jnp.stack([jnp.zeros(N, jnp.int32), 1 + jnp.arange(N, dtype=jnp.int32) % 3], axis=1)
    weight = jnp.full((N, K), 0.5)
    factor = 1.0
    cap = moe.capacity(N, K, E, factor)  # ceil(1.0 * 12 * 2 / 4) = 6 slots per expert
    assert cap == 6
    # First choices first, in token order: tokens 0..5 keep expert 0, tokens 6..11 lose it; each of
    # experts 1..3 gets 4 second choices, within its 6 slots.
    kept = np.ones((N, K), bool)
    kept[cap:, 0] = False
    want = per_token_loop(x_NxD, expert, weight, p, kept)
    y, dropped = dispatch(x_NxD[None], expert[None], weight[None], p, SWIGLU, factor)
    y_dense, dropped_dense = dense_dispatch(x_NxD, expert, weight, p, SWIGLU, factor)
    assert int(dropped) == int(dropped_dense) == N - cap == 6
    assert_close(y[0], want, D + F + K)
    assert_close(y_dense, want, D + F + E)


def test_moe_layer_reports_dropped_fraction_and_load():
    cfg = moe_model(moe_capacity_factor=0.5)
    params = model.init_params(cfg, jax.random.key(0))
    sums = jax.jit(lambda p, b: model.loss_sums(p, b, cfg, False))(params, batch(cfg, 4))
    N, K, E = 4 * cfg.seq_len, cfg.moe_top_k, cfg.moe_experts
    assert float(sums.moe.assigned) == cfg.moe_layers * N * K
    # Half the slots the copies need: at least half the copies are dropped.
    assert float(sums.moe.dropped) >= 0.5 * cfg.moe_layers * N * K
    np.testing.assert_allclose(float(sums.moe.load_E.sum()), float(sums.count), rtol=E * 1.19e-7)


def test_load_balance_loss_has_the_gradient_of_its_formula():
    N, E, K = 32, 6, 2
    logits_NxE = 2.0 * jax.random.normal(jax.random.key(5), (N, E))

    def aux_of(logits):
        probs = jax.nn.softmax(logits, axis=-1)
        _, expert = jax.lax.top_k(probs, K)  # integer choices: no gradient, like f_e
        return moe.load_balance_loss(probs, expert)

    (aux, f_E), grad = jax.value_and_grad(aux_of, has_aux=True)(logits_NxE)
    p = np.asarray(jax.nn.softmax(logits_NxE, axis=-1), np.float64)
    f = np.asarray(f_E, np.float64)
    np.testing.assert_allclose(f.sum(), 1.0, rtol=1e-6)
    assert_close(aux, E * np.sum(f * p.mean(0)), E + N)
    # d/dlogit_nj of E * sum_e f_e mean_n p_ne = (E / N) p_nj (f_j - sum_e f_e p_ne): only P_e moves.
    want = (E / N) * p * (f[None, :] - (p * f[None, :]).sum(-1, keepdims=True))
    assert_close(grad, want, 2 * E + N)
    # Uniform routing is the minimum's value, 1.
    uniform = jnp.zeros((E, E))
    assert float(moe.load_balance_loss(jax.nn.softmax(uniform), jnp.arange(E)[:, None])[0]) == pytest.approx(
        1.0
    )


def test_router_z_loss_is_the_mean_squared_log_normaliser():
    logits_NxE = jax.random.normal(jax.random.key(6), (10, 4))
    want = np.mean(np.log(np.exp(np.asarray(logits_NxE, np.float64)).sum(-1)) ** 2)
    assert_close(moe.router_z_loss(logits_NxE), want, 4 + 10)


# --------------------------------------------------------------------------------------------
# Expert parallelism == one device
# --------------------------------------------------------------------------------------------


def batch(cfg, B, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, cfg.seq_len + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), (B, cfg.seq_len)).copy(),
        "segment_ids": np.ones((B, cfg.seq_len), np.int32),
        "loss_mask": np.ones((B, cfg.seq_len), np.float32),
    }


def loss_and_grads(cfg, params, data, mesh=None):
    """(mean objective, its gradients, compiled HLO) on ``mesh`` (None: one device, no mesh)."""

    def mean_objective(p, b):
        sums = model.loss_sums(p, b, cfg, False)
        return train.objective_sum(cfg, sums) / sums.count

    f = jax.value_and_grad(mean_objective)
    if mesh is None:
        compiled = jax.jit(f).lower(params, data).compile()
        return *compiled(params, data), compiled.as_text()
    with jax.set_mesh(mesh):
        param_sh = sharding.shardings(mesh, lm.get(cfg).logical_axes())
        batch_sh = sharding.batch_sharding(mesh)
        params, data = jax.device_put(params, param_sh), jax.device_put(data, batch_sh)
        compiled = jax.jit(f, in_shardings=(param_sh, batch_sh)).lower(params, data).compile()
        loss, grads = compiled(params, data)
        return loss, jax.device_get(grads), compiled.as_text()


@functools.cache
def one_device_reference():
    cfg = moe_model(moe_shared_expert=True)
    params = model.init_params(cfg, jax.random.key(0))
    data = batch(cfg, 16)
    return cfg, params, data, *loss_and_grads(cfg, params, data)[:2]


@pytest.mark.parametrize(
    "mesh_cfg",
    [MeshConfig(data=1, expert=8), MeshConfig(data=1, fsdp=2, expert=2, tensor=2)],
    ids=["expert8", "fsdp2-expert2-tensor2"],
)
def test_expert_parallel_loss_and_grads_equal_one_device(mesh_cfg):
    cfg, params, data, ref_loss, ref_grads = one_device_reference()
    mesh = sharding.make_mesh(mesh_cfg)
    loss, grads, hlo = loss_and_grads(cfg, params, data, mesh)
    assert "all-to-all" in hlo  # tokens reach their experts by all_to_all, not by gathering weights
    n_tokens = 16 * cfg.seq_len
    # The mesh sums the tokens in another order; an MoE layer adds its router (d_model) and the
    # combine over top-k to the terms of a dense layer.
    extra = cfg.n_layers * (cfg.d_model + cfg.moe_top_k + cfg.moe_experts)
    assert_close(loss, ref_loss, loss_terms(cfg, n_tokens) + extra)
    assert_trees_close(grads, ref_grads, grad_terms(cfg, n_tokens) + 2 * extra)


def test_every_kth_layer_is_sparse():
    cfg = preset("tiny", seq_len=16, n_layers=4, moe_experts=4, moe_every=2)
    decls = model.param_decls(cfg)["blocks"]
    assert decls["mlp"]["up"].shape[0] == 2 and decls["moe"]["up"].shape[:2] == (2, 4)
    assert decls["attn"]["q"].shape[0] == 4
    params = model.init_params(cfg, jax.random.key(0))
    # Zeroing the dense layers' MLPs changes the output; zeroing a sparse layer's experts too:
    # both stacks are run, in their layers.
    forward = jax.jit(lambda p, b: model.forward(p, b["inputs"], b["positions"], None, cfg))
    base = forward(params, batch(cfg, 2))
    for stack in ("mlp", "moe"):
        zeroed = jax.tree.map(lambda w: w, params)
        zeroed["blocks"][stack] = jax.tree.map(jnp.zeros_like, params["blocks"][stack])
        out = forward(zeroed, batch(cfg, 2))
        assert float(jnp.abs(out - base).max()) > 1e-3, stack
    # Active parameters: each token multiplies by its top-k experts of each sparse layer only.
    per_expert = 3 * cfg.d_model * cfg.d_ff
    every_expert = lm.get(dataclasses.replace(cfg, moe_top_k=4))
    assert every_expert.count == lm.get(cfg).count
    assert every_expert.flop_params - lm.get(cfg).flop_params == 2 * (4 - 2) * per_expert


def test_muon_orthogonalises_each_expert_and_leaves_the_router_to_adamw():
    decls = model.param_decls(moe_model())["blocks"]["moe"]
    up = optim.muon_dims(decls["up"])  # [layers, experts, embed, mlp]
    assert (up.reduction_axis, up.output_axis) == ((2,), (3,))
    down = optim.muon_dims(decls["down"])  # [layers, experts, mlp, embed]
    assert (down.reduction_axis, down.output_axis) == ((2,), (3,))
    assert optim.muon_dims(decls["router"]) is None


@pytest.mark.parametrize(
    ("model_kw", "mesh_kw", "needle"),
    [
        ({"moe_experts": 1}, {}, "model.moe_experts: 1 expert"),
        ({"moe_experts": 4, "moe_top_k": 5}, {}, "model.moe_top_k: must be in [1, moe_experts=4]"),
        ({"moe_experts": 4, "moe_every": 3}, {}, "model.moe_every: moe_every=3 must be a positive divisor"),
        ({"moe_experts": 4, "moe_capacity_factor": -1.0}, {}, "model.moe_capacity_factor"),
        ({"moe_experts": 4, "moe_aux_loss": float("nan")}, {}, "model.moe_aux_loss"),
        ({"moe_experts": 4, "moe_router_z_loss": -1.0}, {}, "model.moe_router_z_loss"),
        ({"moe_experts": 4, "use_bias": True}, {}, "model.use_bias"),
        ({"moe_experts": 4, "module": "x.py:M"}, {}, "model.moe_experts: mixture of experts"),
        ({"moe_experts": 6}, {"expert": 4}, "mesh.expert: mesh.expert=4 must divide model.moe_experts=6"),
    ],
)
def test_bad_moe_settings_are_one_error_each(model_kw, mesh_kw, needle):
    cfg = Config(model=preset("tiny", **model_kw), mesh=MeshConfig(**mesh_kw), train=TrainConfig(steps=1))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_an_expert_axis_that_does_not_divide_the_experts_is_refused_by_the_rules():
    cfg = moe_model()
    mesh = sharding.make_mesh(MeshConfig(data=-1, expert=8))
    sharding.check_divisible(cfg, model.param_decls(cfg), mesh)
    with pytest.raises(ConfigError, match="mesh.expert=8 does not divide model.moe_experts=4"):
        small = dataclasses.replace(cfg, moe_experts=4)
        sharding.check_divisible(small, model.param_decls(small), mesh)


def test_bench_counts_active_parameters_and_says_so():
    cfg = moe_model()
    per_expert = 3 * cfg.d_model * cfg.d_ff
    every_expert = lm.get(dataclasses.replace(cfg, moe_top_k=cfg.moe_experts)).flop_params
    want = every_expert - cfg.n_layers * (cfg.moe_experts - cfg.moe_top_k) * per_expert
    assert bench.flops_per_token(cfg)["dense"] == 6 * want
    note = bench.active_note(cfg)
    assert "active parameters (top-2 of 8 experts in 2 sparse layers" in note
    assert f"{lm.get(cfg).count:,} in all" in note and bench.active_note(preset("tiny")) == ""


def test_the_experts_axis_colliding_with_the_batch_on_the_expert_mesh_axis_is_an_error():
    assert sharding.logical_to_spec(("layers", "experts", "embed", "mlp")) == jax.sharding.PartitionSpec(
        None, "expert", "fsdp", "tensor"
    )
    with pytest.raises(ConfigError, match="'batch' and 'experts' of one array .* mesh axis 'expert'"):
        sharding.logical_to_spec(("batch", "experts"))
