import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import BF16_EPS, assert_close, assert_trees_close, forward_terms, grad_terms, loss_terms

from jaxlm import model
from jaxlm.config import PRESETS, preset

TINY = preset("tiny")


def _inputs(cfg, B=2, T=16, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    return tokens, positions


def test_preset_parameter_counts_match_published_sizes():
    assert model.count_params(PRESETS["gpt2-124m"]) == 124_439_808  # GPT-2 small, tied
    assert model.count_params(PRESETS["llama-1b"]) == 1_235_814_400  # Llama-3.2-1B, tied, GQA
    # padding the vocabulary to 50304 rows is a speed detail, not a change in model size
    padded = model.param_decls(PRESETS["gpt2-124m"])["embed"].shape
    assert padded == (50304, 768)


def test_every_weight_declared_once_with_axes():
    decls = model.param_decls(
        dataclasses.replace(TINY, use_bias=True, tie_embeddings=False, positions="learned", norm="layernorm")
    )
    for w in jax.tree.leaves(decls, is_leaf=lambda x: isinstance(x, model.Weight)):
        assert len(w.axes) == len(w.shape)
    params = model.init_params(TINY, jax.random.key(0))
    shapes = jax.tree.map(
        lambda w: w.shape, model.param_decls(TINY), is_leaf=lambda x: isinstance(x, model.Weight)
    )
    assert jax.tree.map(lambda p: p.shape, params) == shapes


def _input_dependence(cfg, T, segment_ids_BxT=None) -> np.ndarray:
    """[t, s]: sum |d out[t] / d input[s]| of the decoder over given input embeddings."""
    params = model.init_params(cfg, jax.random.key(1))
    tokens, positions_BxT = _inputs(cfg, B=1, T=T)
    x_BxTxD = model.embed(params, tokens, positions_BxT, cfg)

    def out_T(x_emb):
        return model.decoder(params, x_emb, positions_BxT, segment_ids_BxT, cfg)[0].sum(-1)

    return np.asarray(jnp.abs(jax.jit(jax.jacrev(out_T))(x_BxTxD)[:, 0]).sum(-1))


@pytest.mark.parametrize("positions", ["learned", "rope", "sinusoidal"])
def test_causality_through_gradients(positions):
    """d logits[t] / d input[s] is exactly zero for every s > t and non-zero for s <= t."""
    cfg = dataclasses.replace(TINY, positions=positions, n_kv_heads=2, compute_dtype="float32")
    jac_TxT = _input_dependence(cfg, 8)
    assert np.all(np.triu(jac_TxT, k=1) == 0.0), jac_TxT  # no output depends on a later input
    assert np.all(jac_TxT[np.tril_indices(8)] > 0.0), jac_TxT  # and every earlier input matters


@pytest.mark.parametrize(
    "n_layers, global_every, documents, reach",
    [
        (1, 0, False, 2),  # one windowed layer: t sees t-2..t
        (2, 0, False, 4),  # two: each adds window - 1 more
        (2, 0, True, 4),  # and never across a document boundary
        (2, 2, False, 11),  # the second layer is global: the whole causal context
    ],
)
def test_sliding_window_through_gradients(n_layers, global_every, documents, reach):
    """With a window of 3, d out[t] / d input[s] is non-zero exactly for 0 <= t - s <= reach, the
    window - 1 = 2 tokens per windowed layer (the whole context once a layer is global), within t's
    document."""
    T = 12
    cfg = dataclasses.replace(
        TINY, n_layers=n_layers, attention_window=3, global_every=global_every, compute_dtype="float32"
    )
    seg_T = np.array([1] * 5 + [2] * 7) if documents else np.ones(T, int)
    jac_TxT = _input_dependence(cfg, T, jnp.asarray(seg_T)[None] if documents else None)
    distance_TxT = np.arange(T)[:, None] - np.arange(T)[None, :]
    visible = (distance_TxT >= 0) & (distance_TxT <= reach) & (seg_T[:, None] == seg_T[None, :])
    assert np.all(jac_TxT[~visible] == 0.0), jac_TxT
    assert np.all(jac_TxT[visible] > 0.0), jac_TxT


def test_global_every_windows_exactly_the_layers_it_says():
    """global_every=k keeps layers k-1, 2k-1, ... global: the scanned decoder equals the layers run
    one by one with exactly those windowed, and not the pattern shifted by one layer."""
    assert model.windowed_layers(dataclasses.replace(TINY, n_layers=6, attention_window=4)).all()
    six = dataclasses.replace(TINY, n_layers=6, attention_window=4, global_every=3)
    assert model.windowed_layers(six).tolist() == [True, True, False, True, True, False]
    assert not model.windowed_layers(dataclasses.replace(TINY, n_layers=6)).any()

    cfg = dataclasses.replace(TINY, n_layers=3, attention_window=3, global_every=2, compute_dtype="float32")
    params = model.init_params(cfg, jax.random.key(3))
    tokens, pos = _inputs(cfg, B=2, T=16)
    x_BxTxD = model.embed(params, tokens, pos, cfg)

    @functools.partial(jax.jit, static_argnums=0)
    def layer_by_layer(windowed_L):
        x = x_BxTxD
        for i, windowed in enumerate(windowed_L):
            p_layer = jax.tree.map(lambda w, i=i: w[i], params["blocks"])
            x, _, _ = model.block(p_layer, x, pos, cfg, windowed=windowed)
        return model.norm(params["final_norm"], x, cfg.norm, cfg.norm_eps)

    scanned = model.decoder(params, x_BxTxD, pos, None, cfg)
    assert_close(scanned, layer_by_layer((True, False, True)), forward_terms(cfg))
    shifted = layer_by_layer((False, True, False))
    assert np.abs(np.asarray(scanned - shifted)).max() > 1e-3


def test_document_masking_blocks_attention_across_documents():
    cfg = dataclasses.replace(TINY, compute_dtype="float32")
    params = model.init_params(cfg, jax.random.key(2))
    tokens, _ = _inputs(cfg, B=1, T=8)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]])
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]])
    full = model.forward(params, tokens, pos, seg, cfg)
    # the second document alone, at the same positions, gives the same logits
    alone = model.forward(params, tokens[:, 3:], pos[:, 3:], seg[:, 3:], cfg)
    assert_close(alone, full[:, 3:], forward_terms(cfg))  # a shorter sequence: other kernels
    # and changing the first document does not move the second document's logits, not by one bit:
    # the same program, where the masked keys get a weight of exactly 0
    other = tokens.at[0, :3].set((tokens[0, :3] + 7) % cfg.vocab_size)
    np.testing.assert_array_equal(model.forward(params, other, pos, seg, cfg)[:, 3:], full[:, 3:])


def test_gqa_with_repeated_kv_equals_multi_head():
    cfg_gqa = dataclasses.replace(TINY, n_kv_heads=2, compute_dtype="float32")
    cfg_mha = dataclasses.replace(TINY, n_kv_heads=None, compute_dtype="float32")
    p = model.init_params(cfg_gqa, jax.random.key(3))
    rep = lambda w: jnp.repeat(w, 2, axis=2)  # [L, D, G, K] -> [L, D, H, K]
    p_mha = jax.tree.map(lambda x: x, p)
    p_mha["blocks"]["attn"] = dict(
        p["blocks"]["attn"], k=rep(p["blocks"]["attn"]["k"]), v=rep(p["blocks"]["attn"]["v"])
    )
    tokens, pos = _inputs(TINY)
    assert_close(
        model.forward(p_mha, tokens, pos, None, cfg_mha),
        model.forward(p, tokens, pos, None, cfg_gqa),
        forward_terms(cfg_gqa),
    )


def _batch(cfg, B=4, T=16):
    tokens, pos = _inputs(cfg, B, T + 1)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": pos[:, :-1],
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "loss_mask": jnp.ones((B, T), jnp.float32),
    }


@pytest.mark.parametrize("variant", [{"logits_chunk": 24}, {"remat": "full"}, {"remat": "save_matmuls"}])
def test_memory_levers_change_nothing(variant):
    """Chunked cross-entropy and remat give the same loss, z-loss and gradients as the plain path."""
    cfg = dataclasses.replace(TINY, compute_dtype="float32", vocab_size=250, vocab_multiple=128)
    params = model.init_params(cfg, jax.random.key(4))
    batch = _batch(cfg)

    def mean_loss(p, c):
        s = model.loss_sums(p, batch, c, False)
        return (s.xent + 0.1 * s.z) / s.count

    l0, g0 = jax.value_and_grad(mean_loss)(params, cfg)
    l1, g1 = jax.value_and_grad(mean_loss)(params, dataclasses.replace(cfg, **variant))
    # chunks sum the tokens in another order; remat recomputes the forward, perhaps fused otherwise
    n_tokens = batch["loss_mask"].size
    assert_close(l1, l0, loss_terms(cfg, n_tokens))
    assert_trees_close(g1, g0, grad_terms(cfg, n_tokens))


def test_padded_vocabulary_never_predicted():
    cfg = dataclasses.replace(TINY, vocab_size=250, vocab_multiple=128)
    params = model.init_params(cfg, jax.random.key(5))
    tokens, pos = _inputs(cfg)
    logits = model.forward(params, tokens, pos, None, cfg)
    assert logits.shape[-1] == 250
    # the loss normalises over the 250 real tokens only: log-sum-exp of the visible logits
    batch = _batch(cfg)
    s = model.loss_sums(params, batch, cfg, False)
    full = model.forward(params, batch["inputs"], batch["positions"], None, cfg)
    ref = -jnp.take_along_axis(jax.nn.log_softmax(full), batch["targets"][..., None], -1).mean()
    n_terms = loss_terms(cfg, batch["loss_mask"].size)
    assert_close(s.xent / s.count, ref, n_terms)
    # and log Z of the z-loss is over them too
    assert_close(s.z / s.count, (jax.nn.logsumexp(full, -1) ** 2).mean(), 2 * n_terms)


def test_bf16_compute_close_to_float32():
    cfg = dataclasses.replace(TINY, compute_dtype="float32")
    params = model.init_params(cfg, jax.random.key(6))
    tokens, pos = _inputs(cfg)
    f32 = model.forward(params, tokens, pos, None, cfg)
    bf16 = model.forward(params, tokens, pos, None, dataclasses.replace(cfg, compute_dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    # bfloat16 sums in float32 but rounds each weight and each matmul, norm, activation and
    # residual output: about 18 roundings per layer, then the embedding, final norm and unembedding.
    # With 8 bits all of them one way is no bound worth testing; independent roundings add like a
    # random walk, sqrt(n) of them, and eps per rounding (twice the half-ulp) is the margin.
    assert_close(bf16, f32, np.sqrt(18 * cfg.n_layers + 3), eps=BF16_EPS)


# --------------------------------------------------------------------------------------------
# Recipe options: QK-norm, z-loss, ReLU² MLP.
# --------------------------------------------------------------------------------------------


def test_qk_norm_declares_two_undecayed_scales_and_makes_attention_blind_to_the_qk_scale():
    """RMSNorm of q and k per head: multiplying W_q and W_k (and their biases) by 7 changes the
    logits without QK-norm and leaves them unchanged (up to the norm's eps) with it."""
    base = dataclasses.replace(TINY, compute_dtype="float32", use_bias=True, positions="rope")
    assert "q_norm" not in model.param_decls(base)["blocks"]["attn"]
    cfg = dataclasses.replace(base, qk_norm=True)
    attn = model.param_decls(cfg)["blocks"]["attn"]
    for name in ("q_norm", "k_norm"):
        assert attn[name] == model.Weight(
            (cfg.n_layers, cfg.dim_per_head), ("layers", "head_dim"), False, "ones"
        )
    params = model.init_params(cfg, jax.random.key(7))
    params["blocks"]["attn"]["q_norm"] = params["blocks"]["attn"]["q_norm"] * 0.5  # not the identity
    scaled = jax.tree.map(lambda x: x, params)
    scaled["blocks"]["attn"] = dict(params["blocks"]["attn"])
    for name in ("q", "k", "q_bias", "k_bias"):
        scaled["blocks"]["attn"][name] = 7.0 * params["blocks"]["attn"][name]
    tokens, pos = _inputs(cfg)
    plain = {k: v for k, v in params["blocks"]["attn"].items() if not k.endswith("_norm")}
    plain_scaled = {k: v for k, v in scaled["blocks"]["attn"].items() if not k.endswith("_norm")}

    def off(a):
        return model.forward(dict(params, blocks=dict(params["blocks"], attn=a)), tokens, pos, None, base)

    assert np.abs(off(plain) - off(plain_scaled)).max() > 1e-2
    # RMS of q/k ~ 0.02 * sqrt(D) ~ 0.1 >> sqrt(norm_eps): the eps term moves the result ~1e-3 relatively
    np.testing.assert_allclose(
        model.forward(params, tokens, pos, None, cfg),
        model.forward(scaled, tokens, pos, None, cfg),
        atol=2e-3,
    )


def test_qk_norm_normalises_each_head_before_rope():
    cfg = dataclasses.replace(TINY, compute_dtype="float32", positions="rope", qk_norm=True, n_kv_heads=2)
    p = jax.tree.map(lambda w: w[0], model.init_params(cfg, jax.random.key(8))["blocks"]["attn"])
    p["q_norm"] = jnp.linspace(0.5, 2.0, cfg.dim_per_head)
    x = jax.random.normal(jax.random.key(9), (1, 5, cfg.d_model))
    pos = jnp.arange(5)[None]
    q, k, _ = model.qkv(p, x, pos, cfg)
    raw_q = np.einsum("btd,dhk->bthk", x, p["q"])
    want_q = raw_q / np.sqrt((raw_q**2).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(p["q_norm"])
    np.testing.assert_allclose(q, model.rope(jnp.asarray(want_q), pos, cfg.rope_theta), atol=1e-5)
    # rope rotates pairs, so each key head keeps the RMS the norm gave it (k_norm scales are ones):
    # 1, less the eps term's share
    ms_k = (np.einsum("btd,dgk->btgk", x, p["k"]) ** 2).mean(-1)
    np.testing.assert_allclose(jnp.sqrt((k**2).mean(-1)), np.sqrt(ms_k / (ms_k + cfg.norm_eps)), rtol=1e-5)


def test_relu2_mlp_is_relu_squared_without_a_gate():
    cfg = dataclasses.replace(TINY, mlp="relu2", use_bias=True)
    decls = model.param_decls(cfg)["blocks"]["mlp"]
    assert sorted(decls) == sorted(model.param_decls(dataclasses.replace(cfg, mlp="gelu"))["blocks"]["mlp"])
    rng = np.random.default_rng(0)
    D = cfg.d_model
    p = {k: rng.normal(size=w.shape[1:]).astype(np.float32) for k, w in decls.items()}
    x = rng.normal(size=(2, 3, D)).astype(np.float32)
    h = np.maximum(x @ p["up"] + p["up_bias"], 0.0) ** 2
    want = h @ p["down"] + p["down_bias"]
    # sums of D then F products of O(1..10) terms: float32 eps * F * the magnitude of the terms
    np.testing.assert_allclose(model.mlp(p, jnp.asarray(x), "relu2"), want, rtol=1e-4, atol=1e-3)


def test_z_loss_gradient_is_the_analytic_one():
    """d/dW of (xent + c log²Z) / n for the unembedding W [D, V]:
    h^T (softmax - onehot + 2c logZ softmax) / n."""
    cfg = dataclasses.replace(
        TINY, compute_dtype="float32", tie_embeddings=False, vocab_size=256, vocab_multiple=128
    )
    params = model.init_params(cfg, jax.random.key(10))
    params["unembed"] = params["unembed"] * 50.0  # logits of a few units, so log Z is far from log V
    batch = _batch(cfg)
    batch["loss_mask"] = batch["loss_mask"].at[:, :3].set(0.0)
    c = 0.3

    def objective(p):
        s = model.loss_sums(p, batch, cfg, False)
        return (s.xent + c * s.z) / s.count

    grad_W = jax.grad(objective)(params)["unembed"]
    h_NxD = model.hidden(params, batch["inputs"], batch["positions"], None, cfg).reshape(-1, cfg.d_model)
    logits_NxV = h_NxD @ params["unembed"]
    lse_N = jax.nn.logsumexp(logits_NxV, -1)
    p_NxV = jax.nn.softmax(logits_NxV, -1)
    onehot_NxV = jax.nn.one_hot(batch["targets"].reshape(-1), cfg.vocab_size)
    mask_N = batch["loss_mask"].reshape(-1)
    d_NxV = (p_NxV - onehot_NxV + 2 * c * lse_N[:, None] * p_NxV) * mask_N[:, None] / mask_N.sum()
    want = h_NxD.T @ d_NxV
    # sums over N=64 tokens of terms <= |h| * (1 + 2c log Z) ~ 10: 64 * 10 * 1.2e-7, well within 1e-5
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(grad_W, want, atol=1e-5, rtol=1e-4)
