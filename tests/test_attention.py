"""Attention backends agree with the reference on packed batches, and refuse what they cannot do."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close, attention_terms, forward_terms

from jaxlm import attention, model
from jaxlm.attention import attend, resolve_backend
from jaxlm.config import ConfigError, MeshConfig, preset
from jaxlm.sharding import make_mesh


def _packed(B=2, T=128, H=4, G=2, K=16, seed=0):
    """q/k/v with GQA and rows of several documents, plus a padding tail (segment 0)."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, H, K))
    k = jax.random.normal(kk, (B, T, G, K))
    v = jax.random.normal(kv, (B, T, G, K))
    seg = np.zeros((B, T), np.int32)
    seg[0, :40], seg[0, 40:90], seg[0, 90 : T - 8] = 1, 2, 3  # three documents, then padding
    seg[1, :7], seg[1, 7:] = 1, 2
    return q, k, v, jnp.asarray(seg)


def _loss(backend, interpret=False, window=0):
    def f(q, k, v, seg):
        o = attend(q, k, v, backend=backend, segment_ids_BxT=seg, window=window, interpret=interpret)
        return (o * jnp.cos(jnp.arange(o.size).reshape(o.shape))).sum(), o

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize(
    "backend, T",
    [("xla", 128), ("splash", 128), ("blockwise", 128), ("blockwise", 512), ("blockwise", 300)],
)
def test_backends_match_reference_on_packed_gqa_batches(backend, T):
    """Outputs and gradients equal the einsum reference; splash runs in the Pallas interpreter;
    blockwise in one block, four, and two uneven ones."""
    q, k, v, seg = _packed(T=T)
    (_, o_ref), g_ref = _loss("reference")(q, k, v, seg)
    (_, o), g = _loss(backend, interpret=backend == "splash")(q, k, v, seg)
    n = attention_terms(q.shape[-1], T)
    assert_close(o, o_ref, n)
    for a, b, name in zip(g, g_ref, "qkv", strict=True):
        assert_close(a, b, 2 * n, err_msg=f"d{name}")  # the backward retraces the forward's sums
    # the document mask is honoured, not ignored: plain causal attention gives other outputs
    causal = attend(q, k, v, backend="reference")
    assert np.abs(np.asarray(causal - o_ref)[0, 40:]).max() > 1e-2


def _per_query_loop(q, k, v, seg, window):
    """Attention by its definition, one query at a time in float64: query t of row b averages the
    values of the keys s with s <= t, t - s < window and (with segment ids) seg[b, s] == seg[b, t]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, K = q.shape
    R = H // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            s = np.arange(max(0, t - window + 1), t + 1)
            if seg is not None:
                s = s[np.asarray(seg)[b, s] == np.asarray(seg)[b, t]]
            k_SxHxK, v_SxHxK = np.repeat(k[b, s], R, axis=1), np.repeat(v[b, s], R, axis=1)
            scores_HxS = np.einsum("hk,shk->hs", q[b, t], k_SxHxK) / np.sqrt(K)
            p_HxS = np.exp(scores_HxS - scores_HxS.max(-1, keepdims=True))
            out[b, t] = np.einsum("hs,shk->hk", p_HxS / p_HxS.sum(-1, keepdims=True), v_SxHxK)
    return out


@pytest.mark.parametrize("documents", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize(
    "backend, T",
    [("reference", 128), ("xla", 128), ("splash", 128), ("blockwise", 128), ("blockwise", 300)],
)
def test_sliding_window_matches_a_per_query_loop(backend, T, documents):
    """A window of 50 keys, with and without documents: outputs equal the definition computed
    query by query, gradients equal the reference's. Blockwise in one block and in two uneven
    ones, the second skipping the keys before its window; splash in the Pallas interpreter."""
    window = 50
    q, k, v, seg = _packed(T=T)
    seg = seg if documents else None
    (_, o_ref), g_ref = _loss("reference", window=window)(q, k, v, seg)
    (_, o), g = _loss(backend, interpret=backend == "splash", window=window)(q, k, v, seg)
    n = attention_terms(q.shape[-1], window)
    assert_close(o, _per_query_loop(q, k, v, seg, window), n)
    for a, b, name in zip(g, g_ref, "qkv", strict=True):
        assert_close(a, b, 2 * n, err_msg=f"d{name}")
    # the window is applied, not ignored: beyond it the full causal context gives other outputs
    full = attend(q, k, v, backend="reference", segment_ids_BxT=seg)
    assert np.abs(np.asarray(full - o)[:, window:]).max() > 1e-2


def test_a_window_changes_exactly_the_outputs_it_should():
    """d out[t] / d k[s], v[s] is exactly zero for t - s >= window (and s > t), non-zero inside."""
    window, T = 3, 10
    q, k, v, _ = _packed(T=T)

    def out_T(k, v):
        return attend(q, k, v, backend="blockwise", window=window)[0].sum((1, 2))

    jac_k, jac_v = jax.jit(jax.jacrev(out_T, argnums=(0, 1)))(k, v)  # [t, B, s, G, K]; row 0's keys
    dep_TxS = np.abs(np.asarray(jac_k[:, 0])).sum((2, 3)) + np.abs(np.asarray(jac_v[:, 0])).sum((2, 3))
    distance_TxS = np.arange(T)[:, None] - np.arange(T)[None, :]
    inside = (distance_TxS >= 0) & (distance_TxS < window)
    assert np.all(dep_TxS[~inside] == 0.0), dep_TxS
    assert np.all(dep_TxS[inside] > 0.0), dep_TxS


def test_an_explicit_mask_takes_no_window():
    q = k = v = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="fold the window into mask_BxTxS"):
        attend(q, k, v, attention.causal_mask(8), "reference", window=3)


def test_splash_under_a_mesh_matches_reference():
    """The shard_map glue: batch over data/fsdp and heads over tensor, on 8 fake devices."""
    q, k, v, seg = _packed(B=4)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    ref = attend(q, k, v, backend="reference", segment_ids_BxT=seg)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: attend(*a[:3], backend="splash", segment_ids_BxT=a[3], interpret=True))(
            q, k, v, seg
        )
    assert_close(out, ref, attention_terms(q.shape[-1], q.shape[1]))


def test_blockwise_under_a_mesh_matches_reference():
    """Four query blocks with batch split over data/fsdp and heads over tensor, on 8 fake devices."""
    q, k, v, seg = _packed(B=4, T=512)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    ref = attend(q, k, v, backend="reference", segment_ids_BxT=seg)
    heads = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    with jax.set_mesh(mesh):
        q, k, v = (jax.device_put(x, jax.sharding.NamedSharding(mesh, heads)) for x in (q, k, v))
        out = jax.jit(lambda *a: attend(*a[:3], backend="blockwise", segment_ids_BxT=a[3]))(q, k, v, seg)
    assert out.sharding.spec[2] == "tensor"  # heads stay split: no gather to one device
    assert_close(out, ref, attention_terms(q.shape[-1], q.shape[1]))


def test_explicit_mask_matches_reference():
    """An explicit mask (a key/value cache: T new queries against S keys) on reference and xla."""
    q, k, v, _ = _packed(T=16)
    mask = attention.causal_mask(4, 16) & (jnp.arange(16) < 14)[None, None]
    mask = jnp.broadcast_to(mask, (2, 4, 16))
    outs = [jax.jit(attend, static_argnums=4)(q[:, -6:-2], k, v, mask, b) for b in ("reference", "xla")]
    assert_close(outs[1], outs[0], attention_terms(q.shape[-1], k.shape[1]))


def test_model_forward_same_for_every_cpu_backend():
    cfg = dataclasses.replace(preset("tiny"), n_kv_heads=2, compute_dtype="float32", attention="reference")
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    seg = jnp.asarray([[1] * 10 + [2] * 22, [1] * 32])
    pos = jnp.asarray([list(range(10)) + list(range(22)), list(range(32))])
    forward = jax.jit(model.forward, static_argnums=4)
    ref = forward(params, tokens, pos, seg, cfg)
    for backend in ("xla", "blockwise", "auto"):
        out = forward(params, tokens, pos, seg, dataclasses.replace(cfg, attention=backend))
        assert_close(out, ref, forward_terms(cfg))


def _resolve(backend, platform, segment_ids=False, dtype=jnp.bfloat16, seq_len=1024, custom_mask=False):
    return resolve_backend(
        backend,
        segment_ids=segment_ids,
        dtype=dtype,
        seq_len=seq_len,
        custom_mask=custom_mask,
        platform=platform,
    )


def test_auto_picks_the_fastest_backend_that_supports_the_request():
    assert _resolve("auto", "gpu") == "cudnn"
    assert _resolve("auto", "gpu", segment_ids=True) == "xla"  # cuDNN cannot mask documents
    assert _resolve("auto", "gpu", dtype=jnp.float32) == "xla"
    assert _resolve("auto", "tpu", segment_ids=True) == "splash"
    assert _resolve("auto", "tpu", seq_len=1000) == "xla"  # splash tiles in 128s
    assert _resolve("auto", "tpu", custom_mask=True) == "xla"
    assert _resolve("auto", "cpu", segment_ids=True) == "blockwise"
    assert _resolve("auto", "cpu", custom_mask=True) == "xla"  # a key/value cache's mask
    assert jax.default_backend() == "cpu" and _resolve("auto", None) == "blockwise"


@pytest.mark.parametrize(
    "request_, match",
    [
        (dict(backend="cudnn", platform="cpu"), "needs a GPU"),
        (dict(backend="cudnn", platform="gpu", segment_ids=True), "document masking"),
        (dict(backend="cudnn", platform="gpu", dtype=jnp.float32), "bfloat16"),
        (dict(backend="cudnn", platform="gpu", custom_mask=True), "explicit attention mask"),
        (dict(backend="splash", platform="cpu"), "needs a TPU"),
        (dict(backend="splash", platform="gpu", segment_ids=True), "needs a TPU"),
        (dict(backend="splash", platform="tpu", seq_len=1000), "divisible by 128"),
        (dict(backend="splash", platform="tpu", custom_mask=True), "explicit attention mask"),
        (dict(backend="blockwise", platform="cpu", custom_mask=True), "explicit attention mask"),
        (dict(backend="flash", platform="gpu"), "unknown"),
    ],
)
def test_unsupported_requests_are_refused(request_, match):
    with pytest.raises(ConfigError, match=match):
        _resolve(**request_)


def test_cpu_model_refuses_cudnn_and_splash_with_a_config_error():
    cfg = dataclasses.replace(preset("tiny"), attention="cudnn")
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    pos = jnp.arange(8)[None]
    for backend in ("cudnn", "splash"):
        with pytest.raises(ConfigError, match=f"model.attention='{backend}'"):
            model.forward(params, tokens, pos, None, dataclasses.replace(cfg, attention=backend))


def test_causal_blocks_tile_the_sequence_in_at_most_eight_blocks():
    for T in (32, 128, 300, 1024, 8192):
        blocks = attention.causal_blocks(T)
        assert blocks[0][0] == 0 and blocks[-1][1] == T and len(blocks) <= 8
        assert all(a[1] == b[0] for a, b in zip(blocks[:-1], blocks[1:], strict=True))
        assert min(e - s for s, e in blocks) >= min(T, 128) or len(blocks) == 1
    assert attention.causal_blocks(1024) == [(i * 128, (i + 1) * 128) for i in range(8)]


def test_splash_block_sizes_tile_the_sequence():
    assert attention.splash_block_sizes(1024).block_q == 512
    assert attention.splash_block_sizes(384).block_kv == 128
    assert attention.splash_block_sizes(768).block_q_dkv == 256
