"""Bring-your-own Flax NNX model (jaxlm/nnx_model.py): declarations read from the module's
annotations, shardings, init, and the forward contract (logits, losses, causality, documents)."""

import dataclasses
import math
import re
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm import lm, model, nnx_model, sharding
from jaxlm.config import ConfigError, MeshConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
EPS = float(jnp.finfo(jnp.float32).eps)

# Small modules, each breaking (or exercising) one rule of the contract; written to a file so they
# load the way a researcher's do, as model.module="FILE.py:Class".
MODULES = '''
import jax, jax.numpy as jnp
from flax import nnx

def part(axes):
    return nnx.with_partitioning(nnx.initializers.normal(0.02), axes)

class Untied(nnx.Module):
    """Learned positions, untied output, every decay case."""
    def __init__(self, cfg, *, rngs):
        V, D = cfg.vocab_size, cfg.d_model
        self.tok = nnx.Embed(V, D, embedding_init=part(("vocab", "embed")), rngs=rngs)
        self.pos = nnx.Param(jnp.zeros((cfg.seq_len, D)), out_sharding=("positions", "embed"))
        self.head = nnx.Linear(D, V, kernel_init=part(("embed", "vocab")),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("vocab",)), rngs=rngs)
        self.no_decay = nnx.Param(jnp.zeros((D, D)), out_sharding=("embed", "mlp"), decay=False)
        self.yes_decay = nnx.Param(jnp.zeros((D,)), out_sharding=("embed",), decay=True)
        self.meta = nnx.Linear(D, D, kernel_init=nnx.with_metadata(
            nnx.initializers.normal(0.02), out_sharding=("embed", "mlp"), decay=False),
                               use_bias=False, rngs=rngs)
        self.head_bias = nnx.Param(jnp.zeros((2, D // 2)), out_sharding=("heads", "head_dim"))
        self.bias = nnx.Param(jnp.zeros((2, D // 2)), out_sharding=("heads", "head_dim"))

        @nnx.split_rngs(splits=3)
        @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stack(rngs):
            return nnx.Linear(D, D, kernel_init=part(("embed", "mlp")),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)), rngs=rngs)
        self.stacked = stack(rngs)

    def __call__(self, tokens, *, positions, segment_ids=None):
        return self.head(self.tok(tokens) + self.pos[positions])

class NoAxes(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.blocks = nnx.List([nnx.Linear(cfg.d_model, cfg.d_model, rngs=rngs)])

class UnknownAxis(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.w = nnx.Param(jnp.zeros((4, 4)), out_sharding=("embed", "hidden"))

class WrongRank(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.w = nnx.Param(jnp.zeros((4, 4)), out_sharding=("embed",))

class Dropout(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.w = nnx.Param(jnp.zeros((4, 4)), out_sharding=("embed", "mlp"))
        self.drop = nnx.Dropout(0.1, rngs=rngs)

class PlainArray(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.w = nnx.Param(jnp.zeros((4, 4)), out_sharding=("embed", "mlp"))
        self.inv_freq = jnp.ones((4,))

class Broken(nnx.Module):
    def __init__(self, cfg, *, rngs):
        raise ValueError("d_model must be even")

class WrongOutput(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.w = nnx.Param(jnp.zeros((4, cfg.vocab_size - 1)), out_sharding=("embed", "vocab"))
    def __call__(self, tokens, *, positions, segment_ids=None):
        return jax.nn.one_hot(tokens, 4) @ self.w

class NoPositions(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.w = nnx.Param(jnp.zeros((4, cfg.vocab_size)), out_sharding=("embed", "vocab"))
    def __call__(self, tokens):
        return jax.nn.one_hot(tokens, 4) @ self.w

not_a_module = 3
'''


@pytest.fixture(scope="module")
def modules_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("nnx") / "modules.py"
    path.write_text(textwrap.dedent(MODULES))
    return str(path)


@pytest.fixture(scope="module")
def gpt_cfg():
    """experiments/nnx_gpt.py's model, the vocabulary padded to 384 rows so tensor=2 divides it."""
    return dataclasses.replace(load_config(ROOT / "experiments" / "nnx_gpt.py").model, vocab_multiple=128)


@pytest.fixture(scope="module")
def gpt(gpt_cfg) -> lm.LM:
    # the shipped module path is relative to the working directory, as in `jaxlm train`
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        return lm.get(gpt_cfg)


MESH = MeshConfig(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def on_mesh(gpt_cfg):
    """As the trainer does: the model built under the mesh, every shard initialised where it lives."""
    mesh = sharding.make_mesh(MESH)
    with jax.set_mesh(mesh), pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        m = nnx_model.build(gpt_cfg)
        out_sh = sharding.shardings(mesh, m.logical_axes(), m.abstract_params())
        init = jax.jit(m.init, out_shardings=out_sh)
        return m, mesh, init, init(jax.random.key(0))


@pytest.fixture(scope="module")
def gpt_params(on_mesh):
    """The same params on one device (one init compiled for the whole file: CPUs here are few)."""
    return jax.device_put(jax.device_get(on_mesh[-1]), jax.devices()[0])


@pytest.fixture(scope="module")
def logits_fn(gpt):
    return jax.jit(gpt.logits)


def _build(modules_file, name, **changes):
    cfg = dataclasses.replace(load_config(ROOT / "experiments" / "nnx_gpt.py").model, **changes)
    return nnx_model.build(dataclasses.replace(cfg, module=f"{modules_file}:{name}"))


def _flat(tree) -> dict:
    return {
        ".".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=model.is_weight)[0]
    }


def test_declarations_come_from_the_module_annotations(gpt, gpt_cfg):
    decls = _flat(gpt.decls)
    D, H, K, F, V = gpt_cfg.d_model, gpt_cfg.n_heads, gpt_cfg.dim_per_head, gpt_cfg.d_ff, 384
    weight = lambda shape, axes, decay: model.Weight(shape, axes, decay, "module", 0.0, "float32")
    assert decls["embed.embedding"] == weight((V, D), ("vocab", "embed"), True)
    assert decls["blocks.0.attn.q.kernel"].axes == ("embed", "heads", "head_dim")
    assert decls["blocks.1.attn.o.kernel"].shape == (H, K, D)
    assert decls["blocks.1.attn.o.kernel"].axes == ("heads", "head_dim", "embed")
    assert decls["blocks.0.mlp.down.kernel"] == weight((F, D), ("mlp", "embed"), True)
    assert decls["norm.scale"] == weight((D,), ("embed",), False)
    assert len(decls) == 1 + 1 + gpt_cfg.n_layers * 8
    assert gpt.name == "experiments/nnx_gpt.py:GPT" and gpt.kv_cache is False
    # published count: the 384 - 257 padding rows of the tied embedding are left out
    L, Vp = gpt_cfg.n_layers, gpt_cfg.vocab_size
    assert gpt.count == L * (4 * D * H * K + 2 * D * F + 2 * D) + Vp * D + D
    assert gpt.flop_params == gpt.count  # tied_output: the embedding is also the output projection


def test_param_dtype_follows_the_config(gpt_cfg):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        bf16 = lm.get(dataclasses.replace(gpt_cfg, param_dtype="bfloat16"))
    assert {w.dtype for w in _flat(bf16.decls).values()} == {"bfloat16"}
    params = jax.eval_shape(bf16.init, jax.random.key(0))
    assert jax.tree.map(lambda a: a.dtype, params) == jax.tree.map(lambda a: a.dtype, bf16.abstract_params())


def test_golden_partition_specs_on_a_2x2x2_mesh(gpt, on_mesh):
    out_sh = sharding.shardings(sharding.make_mesh(MESH), gpt.logical_axes(), gpt.abstract_params())
    golden = {
        "embed.embedding": P("tensor", "fsdp"),
        "norm.scale": P("fsdp"),
        **{
            f"blocks.{i}.{name}": spec
            for i in range(2)
            for name, spec in {
                "attn_norm.scale": P("fsdp"),
                "mlp_norm.scale": P("fsdp"),
                "attn.q.kernel": P("fsdp", "tensor", None),
                "attn.k.kernel": P("fsdp", "tensor", None),
                "attn.v.kernel": P("fsdp", "tensor", None),
                "attn.o.kernel": P("tensor", None, "fsdp"),
                "mlp.up.kernel": P("fsdp", "tensor"),
                "mlp.down.kernel": P("tensor", "fsdp"),
            }.items()
        },
    }
    assert {k: s.spec for k, s in _flat(out_sh).items()} == golden
    # built under the mesh (NNX would attach shardings from the names there) and initialised
    # sharded, each parameter lies as its spec says
    built_on_mesh, *_, params = on_mesh
    assert built_on_mesh.decls == gpt.decls
    assert _flat(jax.tree.map(lambda a: a.sharding.spec, params)) == golden


def test_init_is_a_plain_dict_of_arrays_deterministic_in_the_key(gpt, on_mesh):
    _, mesh, init, params = on_mesh
    assert jax.tree.structure(params) == jax.tree.structure(gpt.abstract_params())
    assert type(params) is dict and type(params["blocks"]["0"]) is dict
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
        lambda a: (a.shape, a.dtype), gpt.abstract_params()
    )
    # compared on the host: an op per sharded leaf would compile a program each
    with jax.set_mesh(mesh):  # the mesh it was compiled under: no second compilation
        again, other = init(jax.random.key(0)), init(jax.random.key(1))
    first, again, other = jax.device_get((params, again, other))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, first, again)))
    emb = first["embed"]["embedding"]
    assert not np.array_equal(emb, other["embed"]["embedding"])
    assert abs(float(emb.std()) - 0.02) < 0.002  # the module's own init, std model.init_std


def _batch(cfg, B=2, seed=0):
    T = cfg.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T + 1))
    # even rows: documents 1 (10 tokens) and 2 (the rest); odd rows: one document, 4 padding tokens
    seg = np.stack([np.r_[np.full(10, 1), np.full(T - 10, 2)], np.r_[np.full(T - 4, 1), np.zeros(4)]])
    pos = np.stack([np.r_[np.arange(10), np.arange(T - 10)], np.r_[np.arange(T - 4), np.zeros(4)]])
    seg, pos = np.tile(seg, (B // 2, 1)), np.tile(pos, (B // 2, 1))
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "positions": jnp.asarray(pos, jnp.int32),
        "segment_ids": jnp.asarray(seg, jnp.int32),
        "loss_mask": jnp.asarray(seg > 0, jnp.float32),
    }


def test_logits_shape_and_dtype(gpt_cfg, gpt_params, logits_fn):
    b = _batch(gpt_cfg)
    out = logits_fn(gpt_params, b["inputs"], b["positions"], None)
    # the module returns the 384 padded columns; the adapter keeps the vocabulary's 257
    assert out.shape == (2, gpt_cfg.seq_len, gpt_cfg.vocab_size) and out.dtype == jnp.float32


@pytest.mark.parametrize("document_masking", [False, True])
def test_loss_sums_is_the_cross_entropy_of_the_logits(gpt, gpt_cfg, gpt_params, logits_fn, document_masking):
    """...and the z-loss's log²Z sum, which the trainer weighs by model.z_loss as for the built-in model."""
    b = _batch(gpt_cfg)
    sums = jax.jit(gpt.loss_sums, static_argnums=2)(gpt_params, b, document_masking)
    total, z, count = sums.xent, sums.z, sums.count
    assert sums.moe is None  # no experts: the trainer adds no router losses
    seg = b["segment_ids"] if document_masking else None
    logits = np.asarray(logits_fn(gpt_params, b["inputs"], b["positions"], seg), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.asarray(b["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(b["loss_mask"])
    want = ((lse - target) * mask).sum()
    assert float(count) == mask.sum()
    # float32 logsumexp over V columns then a sum of N token losses (each ~ln V): error below
    # |sum| x eps x (V + N)
    N, V = mask.size, gpt_cfg.vocab_size
    assert abs(float(total) - want) <= abs(want) * EPS * (V + N)
    want_z = (lse**2 * mask).sum()  # squaring doubles the relative error of log Z
    assert abs(float(z) - want_z) <= abs(want_z) * EPS * (2 * V + N)


def _tol(logits, cfg) -> float:
    """Equal up to reduction order: |logit| x eps x (the D-long matmuls + the T-long attention sums)
    through every layer."""
    return float(np.abs(logits).max()) * EPS * (cfg.d_model + cfg.seq_len) * (cfg.n_layers + 1)


def test_documents_do_not_see_each_other(gpt_cfg, gpt_params, logits_fn):
    b = _batch(gpt_cfg)
    other = b["inputs"].at[0, :10].set((b["inputs"][0, :10] + 1) % gpt_cfg.vocab_size)  # change document 1
    base = np.asarray(logits_fn(gpt_params, b["inputs"], b["positions"], b["segment_ids"]))
    changed = np.asarray(logits_fn(gpt_params, other, b["positions"], b["segment_ids"]))
    assert np.abs(base[0, 10:] - changed[0, 10:]).max() <= _tol(base, gpt_cfg)
    assert np.abs(base[0, :10] - changed[0, :10]).max() > 1e-3  # document 1's own logits do change
    # without segment ids, document 2 attends to document 1: the check above can fail
    plain = np.asarray(logits_fn(gpt_params, b["inputs"], b["positions"], None))
    plain_changed = np.asarray(logits_fn(gpt_params, other, b["positions"], None))
    assert np.abs(plain[0, 10:] - plain_changed[0, 10:]).max() > 100 * _tol(base, gpt_cfg)


def test_causal(gpt_cfg, gpt_params, logits_fn):
    b = _batch(gpt_cfg)
    t = 20
    other = b["inputs"].at[:, t].set((b["inputs"][:, t] + 1) % gpt_cfg.vocab_size)
    base = np.asarray(logits_fn(gpt_params, b["inputs"], b["positions"], None))
    changed = np.asarray(logits_fn(gpt_params, other, b["positions"], None))
    assert np.abs(base[:, :t] - changed[:, :t]).max() <= _tol(base, gpt_cfg)
    # every later position sees the change, far above rounding
    assert np.abs(base[:, t:] - changed[:, t:]).max(-1).min() > 100 * _tol(base, gpt_cfg)


def test_decay_rule_counts_and_stacked_layers(modules_file):
    m = _build(modules_file, "Untied", vocab_multiple=1)
    decls = _flat(m.decls)
    decay = {k: w.decay for k, w in decls.items()}
    assert decay == {
        "tok.embedding": True,  # a matrix
        "pos": True,
        "head.kernel": True,
        "head.bias": False,  # a vector
        "no_decay": False,  # nnx.Param(..., decay=False)
        "yes_decay": True,  # nnx.Param(..., decay=True)
        "meta.kernel": False,  # nnx.with_metadata(init, decay=False)
        "head_bias": True,  # [heads, head_dim] under another name: a matrix unless said otherwise
        "bias": False,  # Flax's name for a bias, whatever its shape
        "stacked.kernel": True,  # [layers, embed, mlp]
        "stacked.bias": False,  # [layers, mlp]: a vector per layer
    }
    # nnx.vmap's transform_metadata names the stacked axis
    assert decls["stacked.kernel"].axes == ("layers", "embed", "mlp")
    assert decls["stacked.bias"].axes == ("layers", "mlp")
    assert decls["pos"].axes == ("positions", "embed")
    total = sum(math.prod(w.shape) for w in decls.values())
    assert m.count == total
    V, D, T = 257, 32, 32
    assert m.flop_params == total - V * D - T * D  # lookup tables out; the untied head stays in


@pytest.mark.parametrize(
    "name, match",
    [
        ("NoAxes", r"parameters blocks\.0\.bias \(32,\), blocks\.0\.kernel \(32, 32\) without logical axes"),
        ("UnknownAxis", r"parameter w \('embed', 'hidden'\): 'hidden' is not a jaxlm logical axis; known"),
        ("WrongRank", r"parameter w has shape \(4, 4\) but 1 logical axes"),
        (
            "Dropout",
            r"drop\.rngs\.\w+ is an Rng\w+, not an nnx\.Param; jaxlm trains nnx\.Param variables only",
        ),
        ("PlainArray", r"inv_freq is a plain array, not an nnx\.Param; .* compute constants in __call__"),
        (
            "Broken",
            r"Broken\(cfg, rngs=nnx\.Rngs\(key\)\) failed: ValueError: d_model must be even "
            r"\(at .*modules\.py:\d+\)",
        ),
        (
            "NoPositions",
            r"NoPositions\(tokens_BxT, positions=positions_BxT, segment_ids=None\) failed: TypeError: "
            r".*unexpected keyword argument 'positions'",
        ),
        ("WrongOutput", r"WrongOutput returned shape \(1, 32, 256\) .* V >= model\.vocab_size=257"),
        ("Missing", r".*modules\.py has no class 'Missing'; its nnx\.Module classes: \['Broken', 'Dropout'"),
        ("not_a_module", r"not_a_module \(int\) is not a flax\.nnx\.Module subclass"),
    ],
)
def test_a_module_breaking_the_contract_is_one_clear_error(modules_file, name, match):
    with pytest.raises(ConfigError, match=r"model\.module='.*modules\.py:" + name + "': " + match):
        _build(modules_file, name)


@pytest.mark.parametrize(
    "module, match",
    [
        ("nope/gpt.py:GPT", r"file 'nope/gpt.py' does not exist \(a relative path is taken from the working"),
        ("no_such_package.models:GPT", "no module 'no_such_package.models' on the Python path"),
        ("flax.nnx:Linear", r"Linear\(cfg, rngs=nnx.Rngs\(key\)\) failed: TypeError"),
        ("jaxlm.config:ModelConfig", r"ModelConfig \(type\) is not a flax\.nnx\.Module subclass"),
        ("experiments/nnx_gpt.py", "must look like 'FILE.py:Class' or 'package.module:Class'"),
    ],
)
def test_a_module_that_cannot_be_loaded_is_named(module, match):
    cfg = load_config(ROOT / "experiments" / "nnx_gpt.py").model
    with pytest.raises(ConfigError, match=r"model\.module=" + re.escape(repr(module)) + ": " + match):
        nnx_model.build(dataclasses.replace(cfg, module=module))


# --------------------------------------------------------------------------------------------
# Through the trainer: the same train_step as the built-in model.
# --------------------------------------------------------------------------------------------


def _train_losses(cfg, mesh, start, batch, steps: int) -> list[float]:
    from jaxlm import train
    from jaxlm.state import state_shardings

    with jax.set_mesh(mesh):
        state_sh, batch_sh = state_shardings(cfg, mesh), sharding.batch_sharding(mesh)
        state = jax.device_put(start, state_sh)
        step = train.make_train_step(cfg, state_sh, batch_sh)
        batch = jax.device_put(batch, batch_sh)
        losses = []
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses


def test_an_nnx_module_trains_on_a_2x2x2_mesh_as_on_one_device(gpt_cfg, monkeypatch):
    """FSDP x tensor x data parallel from the module's own annotations: the train step's losses
    (document masking on) equal one device's, up to the order of float32 sums."""
    from jaxlm.config import apply_overrides
    from jaxlm.state import create_state, state_shardings

    monkeypatch.chdir(ROOT)
    base = load_config(ROOT / "experiments" / "nnx_gpt.py")
    cfg = apply_overrides(
        base,
        {
            "data.document_masking": "true",
            "optim.warmup_steps": "0",
            # Adam moves a weight by lr * m / (sqrt(v) + eps): with eps = lr its gain on a
            # gradient's rounding is at most 1, where the default eps would magnify a near-zero
            # gradient's rounding up to a move of lr (see tests/test_sharding.py).
            "optim.eps": str(base.optim.lr),
            "train.batch_size": "8",
            "model.vocab_multiple": "128",
        },
    )
    one = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    start = jax.device_get(create_state(cfg, state_shardings(cfg, one)))
    batch = {k: np.asarray(v) for k, v in _batch(cfg.model, B=8).items()}
    ref = _train_losses(cfg, one, start, batch, steps=3)
    got = _train_losses(cfg, sharding.make_mesh(MESH), start, batch, steps=3)
    assert ref[-1] < ref[0]  # it learns
    # Each loss is the same arithmetic summed in another order (gradients all-reduced, matmuls
    # split over fsdp and tensor): relative error of eps per term along the longest reductions
    # (D-long projections, F-long MLP down projection, T-long attention, V-long softmax normaliser),
    # per layer. With Adam's gain at most 1 (above), the updates carry that error forward without
    # magnifying it, so the loss of every step stays within the same bound.
    m = cfg.model
    rtol = EPS * (m.d_model + m.d_ff + m.seq_len + m.vocab_size) * (m.n_layers + 1)
    np.testing.assert_allclose(got, ref, rtol=rtol)
