"""Context parallelism (jaxlm/ring.py) on the 8 fake CPU devices: the zig-zag layout, ring attention
against the reference, a 2048-token sequence split 4 and 8 ways training like one device with and
without document masking, per-device memory falling with the context size, the same eval batches
on a context mesh, the rows each process loads, and the refusals (exact resume:
tests/test_checkpoint.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from test_sharding import collectives
from tolerances import assert_close, assert_trees_close, attention_terms, grad_terms, loss_terms

from jaxlm import lm, model, ring, sharding
from jaxlm.attention import attend
from jaxlm.cli import main as cli
from jaxlm.config import ConfigError, MeshConfig, apply_overrides, preset
from jaxlm.evaluate import make_eval_step, mean_loss
from jaxlm.state import state_shardings

TINY = Path(__file__).resolve().parents[1] / "experiments" / "tiny.py"


def _mesh(context: int, data: int = 1) -> jax.sharding.Mesh:
    return sharding.make_mesh(MeshConfig(data=data, context=context), jax.devices()[: data * context])


def test_the_zigzag_layout_gives_every_shard_an_early_and_a_late_chunk():
    order = ring.zigzag_order(16, 4)  # chunks of 2; shard i holds chunks i and 7 - i
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    x = np.arange(2 * 16).reshape(2, 16)
    np.testing.assert_array_equal(ring.to_zigzag(x, 4), x[:, order])
    np.testing.assert_array_equal(ring.from_zigzag(ring.to_zigzag(x, 4), 4), x)
    # The causal work of a shard, the keys its queries see (t + 1 for query t), is the same on all.
    assert len({int((order[i * 4 : i * 4 + 4] + 1).sum()) for i in range(4)}) == 1


def _qkv(B=2, T=64, H=4, G=2, K=8):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    seg = np.zeros((B, T), np.int32)
    seg[0, :20], seg[0, 20:45], seg[0, 45 : T - 4] = 1, 2, 3  # documents across shard boundaries, padding
    seg[1, :7], seg[1, 7:] = 1, 2
    q, k, v = (jax.random.normal(key, (B, T, n, K)) for key, n in ((kq, H), (kk, G), (kv, G)))
    return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("C, documents, window", [(4, True, 13), (8, False, 0)])
def test_ring_attention_matches_the_reference(C, documents, window):
    """Outputs and q/k/v gradients of ring attention (inputs put in zig-zag order, the output put
    back) equal the one-device reference: GQA, packed documents and a window across shard boundaries."""
    q, k, v, seg = _qkv()
    seg = seg if documents else None
    weights = jnp.cos(jnp.arange(q.size).reshape(q.shape))

    def loss(q, k, v, backend, C):
        z = (lambda x: ring.to_zigzag(x, C)) if C > 1 else (lambda x: x)
        o = attend(
            z(q), z(k), z(v), backend=backend, segment_ids_BxT=None if seg is None else z(seg), window=window
        )
        o = ring.from_zigzag(o, C) if C > 1 else o
        return (o * weights).sum(), o

    grad = lambda backend, C: jax.jit(
        jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=(3, 4)
    )
    (_, o_ref), g_ref = grad("reference", 1)(q, k, v, "reference", 1)
    with jax.set_mesh(_mesh(C)):
        (_, o), g = grad("auto", C)(q, k, v, "auto", C)
    n = attention_terms(q.shape[-1], q.shape[1])
    assert_close(o, o_ref, n)
    for a, b, name in zip(g, g_ref, "qkv", strict=True):
        assert_close(a, b, 2 * n, err_msg=f"d{name}")  # the backward retraces the forward's sums


# --------------------------------------------------------------------------------------------
# A 2048-token sequence split 4 and 8 ways: loss and gradients of one device
# --------------------------------------------------------------------------------------------

T_LONG = 2048
LONG = preset("tiny", vocab_size=64, seq_len=T_LONG, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32)


def _long_batch(documents: bool, B: int = 2) -> dict[str, np.ndarray]:
    """Random tokens; with ``documents``, rows packed with documents of 50 to 700 tokens (so they
    cross the shard boundaries of every context size) and a padding tail, positions restarting at
    each document as the segmenter writes them."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, LONG.vocab_size, size=(B, T_LONG + 1), dtype=np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.tile(np.arange(T_LONG, dtype=np.int32), (B, 1)),
        "segment_ids": np.ones((B, T_LONG), np.int32),
        "loss_mask": np.ones((B, T_LONG), np.float32),
    }
    batch["loss_mask"][1, -100:] = 0.0
    if documents:
        for row in range(B):
            cuts = np.cumsum(rng.integers(50, 700, size=T_LONG // 50))
            starts = np.concatenate([[0], cuts[cuts < T_LONG]])
            seg = np.searchsorted(starts, np.arange(T_LONG), side="right").astype(np.int32)
            batch["segment_ids"][row] = seg
            batch["positions"][row] = np.arange(T_LONG) - starts[seg - 1]
        batch["segment_ids"][1, -100:] = 0  # padding: segment 0, no loss
    return batch


def _loss_and_grads(params, batch, documents: bool):
    def mean_loss(p):
        sums = model.loss_sums(p, batch, LONG, documents)
        return sums.xent / sums.count

    return jax.value_and_grad(mean_loss)(params)


_ONE_DEVICE: dict[bool, tuple] = {}


@pytest.mark.parametrize("documents", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("C", [4, 8])
def test_a_2048_token_sequence_split_over_context_trains_like_one_device(C, documents):
    params = model.init_params(LONG, jax.random.key(0))
    batch = _long_batch(documents)
    if documents not in _ONE_DEVICE:
        _ONE_DEVICE[documents] = jax.device_get(
            jax.jit(_loss_and_grads, static_argnums=2)(params, batch, documents)
        )
    want_loss, want_grads = _ONE_DEVICE[documents]
    mesh = _mesh(C, data=8 // C)  # the rows over data, the positions of each row over context
    with jax.set_mesh(mesh):
        sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
        replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        loss, grads = jax.jit(_loss_and_grads, static_argnums=2)(replicated, sharded, documents)
    # the same sums of the same terms in another order (per shard, per ring step, then across)
    n_tokens = int(batch["loss_mask"].size)
    assert_close(loss, want_loss, loss_terms(LONG, n_tokens))
    assert_trees_close(jax.device_get(grads), want_grads, grad_terms(LONG, n_tokens))


def test_activation_memory_per_device_falls_with_the_context_size():
    """XLA's temp allocation per device for the loss and gradients of one 2048-token row on C
    devices, context C. The activations are [T / C, ...] per device and the largest score block
    (T / 2C)^2, so each doubling of C must at least shrink it by 1.6x (2x, less what does not
    shrink: the [T] position and segment ids each shard holds while permuting the batch)."""
    batch = jax.tree.map(lambda x: x[:1], _long_batch(documents=True))
    params = jax.eval_shape(lambda: model.init_params(LONG, jax.random.key(0)))
    temp = {}
    for C in (1, 2, 4, 8):
        mesh = _mesh(C)
        with jax.set_mesh(mesh):
            f = jax.jit(_loss_and_grads, static_argnums=2, in_shardings=(None, sharding.batch_sharding(mesh)))
            compiled = f.lower(params, batch, True).compile()
        temp[C] = compiled.memory_analysis().temp_size_in_bytes
        if C > 1:  # K/V go round the ring; they are never gathered whole
            assert collectives(compiled.as_text()).get("collective-permute"), C
    for C in (2, 4, 8):
        assert temp[C] * 1.6 <= temp[C // 2], temp


# --------------------------------------------------------------------------------------------
# The trainer on a context mesh: the same batches, exact resume, the refusals
# --------------------------------------------------------------------------------------------


def test_a_context_mesh_sees_the_same_eval_batches(tiny_cfg):
    """The batches do not depend on the mesh, and the model on a context mesh scores the same tokens:
    the val loss of one checkpoint is that of one device, with packed documents."""
    from jaxlm.data import pipeline

    cfg = apply_overrides(tiny_cfg, {"data.document_masking": "true"})
    index = pipeline.ensure_prepared(cfg.data, cfg.model)
    params = jax.device_get(model.init_params(cfg.model, jax.random.key(0)))
    losses = {}
    for C in (1, 2):
        mesh = _mesh(C, data=8 // C)
        c = dataclasses.replace(cfg, mesh=MeshConfig(data=8 // C, context=C))
        with jax.set_mesh(mesh):
            param_sh = state_shardings(c, mesh).params
            batch_sh = sharding.batch_sharding(mesh)
            batches = pipeline.eval_batches(c.data, c.model, index, 8, 2)
            to_global = lambda b, batch_sh=batch_sh: sharding.global_batch(b, batch_sh, 1)
            step = make_eval_step(c, param_sh, batch_sh)
            losses[C] = mean_loss(step, jax.device_put(params, param_sh), batches, to_global)
    assert_close(losses[2], losses[1], loss_terms(cfg.model, 2 * 8 * cfg.model.seq_len))


def test_processes_on_one_row_block_load_the_same_full_rows():
    """A context axis across processes: processes 0 and 1 hold the positions of rows block 0, 2 and 3
    those of block 1. Each loads the full rows of its block; ``global_batch`` (its global shape has the
    local rows' length) then hands each device its own positions from them."""
    procs = (np.arange(8) // 2).reshape(2, 1, 1, 4, 1)  # data 2, context 4, 2 devices per process
    got = [sharding.batch_blocks(procs, list(sharding.MESH_AXES), p) for p in range(4)]
    assert got == [(0, 2), (0, 2), (1, 2), (1, 2)]
    mesh = _mesh(4, data=2)
    rows = np.arange(2 * 32, dtype=np.int32).reshape(2, 32)
    x = sharding.global_batch({"inputs": rows}, sharding.batch_sharding(mesh), 1)["inputs"]
    assert x.sharding.spec == PartitionSpec("data", "context")
    np.testing.assert_array_equal(np.asarray(x), rows)


def test_the_cli_refuses_a_context_mesh_it_cannot_run_before_writing_anything(tiny_cfg, capsys):
    run_dir = tiny_cfg.train.run_dir
    sets = [
        "mesh.context=8",
        "mesh.data=1",
        "model.seq_len=24",
        f"data.dir={tiny_cfg.data.dir}",
        f"train.run_dir={run_dir}",
    ]
    assert cli(["train", str(TINY), "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mesh.context=8 needs model.seq_len divisible by 2 x context = 16")
    assert len(err.splitlines()) == 1 and not Path(run_dir).exists()  # one line; nothing written


def test_what_context_parallelism_cannot_run_is_refused_by_name(tiny_cfg):
    m = tiny_cfg.model  # seq_len 32
    decls = lm.get(m).decls
    check = lambda model_cfg, C: sharding.check_divisible(model_cfg, decls, _mesh(C, data=8 // C))
    check(m, 8)  # 32 = 2 x 8 x 2: fine
    with pytest.raises(
        ConfigError, match=r"mesh.context=8 needs model.seq_len divisible by 2 x context = 16"
    ):
        check(dataclasses.replace(m, seq_len=24), 8)
    with pytest.raises(
        ConfigError, match=r"model.attention='xla' cannot run with mesh.context=2.*set model.attention=auto"
    ):
        check(dataclasses.replace(m, attention="xla"), 2)
    with pytest.raises(ConfigError, match=r"model.module='x.py:M' cannot use it: set mesh.context=1"):
        ring.check_config(dataclasses.replace(m, module="x.py:M"), 2)
    q = k = v = np.zeros((2, 32, 2, 8), np.float32)
    with jax.set_mesh(_mesh(2)), pytest.raises(ConfigError, match="model.attention='blockwise' cannot run"):
        attend(q, k, v, backend="blockwise")
    # a cached decode step brings its own mask: plain attention, whatever the mesh
    mask = jnp.ones((1, 32, 32), bool)
    with jax.set_mesh(_mesh(2)):
        jax.jit(lambda q, k, v: attend(q, k, v, mask, backend="reference"))(q, k, v)


def test_logits_and_residual_streams_on_a_context_mesh_are_in_the_original_order(tiny_cfg):
    """model.forward and residual_streams permute into the zig-zag order and back: position t of
    their outputs is position t of one device's."""
    m = tiny_cfg.model
    params = model.init_params(m, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, m.seq_len), dtype=np.int32)
    positions = np.tile(np.arange(m.seq_len, dtype=np.int32), (2, 1))
    run = jax.jit(lambda p, t, pos: (model.forward(p, t, pos, None, m), model.residual_streams(p, t, pos, m)))
    want_logits, want_streams = run(params, tokens, positions)
    with jax.set_mesh(_mesh(4, data=2)):
        logits, streams = run(params, tokens, positions)
    assert_close(logits, want_logits, loss_terms(m, 0))
    assert_close(streams, want_streams, loss_terms(m, 0))
