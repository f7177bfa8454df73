import dataclasses

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


@pytest.mark.parametrize("positions", ["learned", "rope", "sinusoidal"])
def test_causality_through_gradients(positions):
    """d logits[t] / d input[s] is exactly zero for every s > t and non-zero for s <= t."""
    cfg = dataclasses.replace(TINY, positions=positions, n_kv_heads=2, compute_dtype="float32")
    params = model.init_params(cfg, jax.random.key(1))
    tokens, positions_BxT = _inputs(cfg, B=1, T=8)
    x_BxTxD = model.embed(params, tokens, positions_BxT, cfg)

    def out_T(x_emb):
        # the decoder over given input embeddings, so d out[t] / d input[s] is visible per position
        return model.decoder(params, x_emb, positions_BxT, None, cfg)[0].sum(-1)

    jac_TxT = jnp.abs(jax.jit(jax.jacrev(out_T))(x_BxTxD)[:, 0]).sum(-1)  # [t, s]
    assert np.all(np.triu(jac_TxT, k=1) == 0.0), jac_TxT  # no output depends on a later input
    assert np.all(jac_TxT[np.tril_indices(8)] > 0.0), jac_TxT  # and every earlier input matters


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
    """Chunked cross-entropy and remat give the same loss and gradients as the plain path."""
    cfg = dataclasses.replace(TINY, compute_dtype="float32", vocab_size=250, vocab_multiple=128)
    params = model.init_params(cfg, jax.random.key(4))
    batch = _batch(cfg)

    def mean_loss(p, c):
        s, n = model.loss_sums(p, batch, c, False)
        return s / n

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
    s, n = model.loss_sums(params, batch, cfg, False)
    full = model.forward(params, batch["inputs"], batch["positions"], None, cfg)
    ref = -jnp.take_along_axis(jax.nn.log_softmax(full), batch["targets"][..., None], -1).mean()
    assert_close(s / n, ref, loss_terms(cfg, batch["loss_mask"].size))


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
