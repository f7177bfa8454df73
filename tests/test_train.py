import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from tolerances import assert_close, assert_trees_close, grad_terms, loss_terms

from jaxlm import lm, model, report, sharding, train
from jaxlm.cli import main as cli
from jaxlm.config import MeshConfig, OptimConfig, apply_overrides
from jaxlm.optim import lr_schedule
from jaxlm.state import create_state, make_tx, state_shardings


def _one_device_setup(cfg):
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    state_sh = state_shardings(cfg, mesh)
    return mesh, state_sh, sharding.batch_sharding(mesh)


def _fixed_batch(cfg, B=8, seed=0):
    T = cfg.model.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(B, T + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "segment_ids": np.ones((B, T), np.int32),
        "loss_mask": np.ones((B, T), np.float32),
    }


def test_loss_decreases_on_a_fixed_batch(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, {"optim.warmup_steps": "0", "optim.lr": "1e-2", "train.steps": "40"})
    mesh, state_sh, batch_sh = _one_device_setup(cfg)
    state = create_state(cfg, state_sh)
    step = train.make_train_step(cfg, state_sh, batch_sh)
    batch = _fixed_batch(cfg)
    losses = []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(np.log(cfg.model.vocab_size), abs=0.3)
    assert losses[-1] < 0.5 * losses[0], losses  # memorising one batch
    assert int(state.step) == 40


@pytest.mark.parametrize(
    "extra",
    # Experts (dropless): the router z-loss is a sum over tokens like the cross-entropy, so it adds
    # up exactly; the load-balancing loss, a product of two means, is each micro-batch's own (off).
    [{}, {"model.moe_experts": "4", "model.moe_aux_loss": "0", "model.moe_router_z_loss": "0.1"}],
    ids=["dense", "moe"],
)
def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_cfg, extra):
    # Clipping off: it would rescale a gradient that is off by a constant factor back to norm 1.
    base = apply_overrides(tiny_cfg, {"optim.grad_clip": "0"} | extra)
    batch = _fixed_batch(base)
    results = []
    for M in (1, 4):
        cfg = apply_overrides(base, {"train.micro_batches": str(M)})
        mesh, state_sh, batch_sh = _one_device_setup(cfg)
        state = create_state(cfg, state_sh)
        state, m = train.make_train_step(cfg, state_sh, batch_sh)(state, batch)
        # Adam's first moment after one step is (1 - b1) x the gradient it was given. The params are
        # no witness: the first Adam step moves a weight by lr * g / (|g| + eps), which turns a
        # rounding-level change in a near-zero g into a move of up to lr.
        mu = jax.device_get(optax.tree.get(state.opt_state, "mu"))
        results.append((float(m["loss"]), float(m["grad_norm"]), mu))
    (l1, g1, mu1), (l4, g4, mu4) = results
    # M micro-batch sums of B*T/M tokens each, then M partial sums, against one sum of B*T tokens:
    # the same terms in another order, so within the rounding of B*T tokens behind each value.
    n_tokens = batch["loss_mask"].size
    assert_close(l4, l1, loss_terms(cfg.model, n_tokens))
    assert_close(g4, g1, grad_terms(cfg.model, n_tokens))  # the norm: the gradients' relative error
    assert_trees_close(mu4, mu1, grad_terms(cfg.model, n_tokens))


def _step_once(cfg, batch):
    mesh, state_sh, batch_sh = _one_device_setup(cfg)
    state = create_state(cfg, state_sh)
    before = jax.device_get(state.params)  # the step donates the state
    new, m = train.make_train_step(cfg, state_sh, batch_sh)(state, batch)
    return before, jax.device_get(new.params), {k: float(v) for k, v in m.items()}


def test_z_loss_zero_leaves_the_objective_the_plain_cross_entropy(tiny_cfg, monkeypatch):
    """With model.z_loss=0 the z sum never enters the objective (not even as 0 * z): poisoned with
    NaN, the step's loss, gradient and update are bit for bit those of the unpoisoned step."""
    batch = _fixed_batch(tiny_cfg)
    _, clean, m_clean = _step_once(tiny_cfg, batch)
    real = lm.get(tiny_cfg.model)

    def poisoned(params, batch, doc_mask):
        s = real.loss_sums(params, batch, doc_mask)
        return s._replace(z=s.z * jnp.nan)

    monkeypatch.setattr(lm, "get", lambda c: dataclasses.replace(real, loss_sums=poisoned))
    _, dirty, m_dirty = _step_once(tiny_cfg, batch)
    assert np.isnan(m_dirty.pop("z_loss")) and m_clean.pop("z_loss") == 0.0
    assert m_dirty == m_clean
    jax.tree.map(np.testing.assert_array_equal, dirty, clean)


def test_z_loss_adds_its_gradient_and_is_logged_apart_from_the_cross_entropy(tiny_cfg):
    batch = _fixed_batch(tiny_cfg)
    c = 1e-2
    cfg = apply_overrides(tiny_cfg, {"model.z_loss": str(c)})
    params, _, m = _step_once(cfg, batch)

    @jax.jit  # one compile for the sums and both parts' gradients (op by op, each op compiles)
    def parts(p):
        grad = lambda f: jax.grad(lambda q: getattr(model.loss_sums(q, batch, cfg.model, False), f))(p)
        return model.loss_sums(p, batch, cfg.model, False), grad("xent"), grad("z")

    sums, g_x, g_z = parts(params)
    # metrics: loss is the cross-entropy alone, z_loss the coefficient times the mean log²Z
    np.testing.assert_allclose(m["loss"], sums.xent / sums.count, rtol=1e-6)
    np.testing.assert_allclose(m["z_loss"], c * sums.z / sums.count, rtol=1e-6)
    assert m["z_loss"] > 0.1  # log Z ~ log 257: the term is not negligible at this coefficient
    # the gradient is that of (xent + c z) / n: its norm (clipping is after the metric) from the parts
    g_x, g_z = (jax.tree.map(lambda g: g / sums.count, g) for g in (g_x, g_z))
    want = optax.tree.norm(jax.tree.map(lambda a, b: a + c * b, g_x, g_z))
    assert abs(float(optax.tree.norm(g_z)) * c) > 0.01 * float(want)  # z's share shows in the norm
    np.testing.assert_allclose(m["grad_norm"], want, rtol=1e-5)


def test_weight_decay_shrinks_exactly_the_matrices(tiny_cfg):
    """Non-zero params, zero gradients: Adam's step is 0, so only the decoupled decay moves a weight,
    by exactly -lr * weight_decay * w. Biases (q/k/v biases are [L, H, K], as many dims as a matrix),
    norm scales and norm biases must not move."""
    cfg = dataclasses.replace(
        tiny_cfg,
        model=dataclasses.replace(
            tiny_cfg.model, use_bias=True, norm="layernorm", mlp="swiglu", positions="learned"
        ),
        optim=OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0.0),
    )
    # + 0.5: zero-initialised biases would hide a decay
    params = jax.tree.map(lambda w: w + 0.5, model.init_params(cfg.model, jax.random.key(0)))
    tx = make_tx(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    flat_updates = traverse_util.flatten_dict(updates, sep="/")
    flat_params = traverse_util.flatten_dict(params, sep="/")
    moved = {path for path, u in flat_updates.items() if np.any(np.asarray(u) != 0)}
    matrices = {"embed", "pos_embed"} | {f"blocks/attn/{n}" for n in "qkvo"}
    matrices |= {f"blocks/mlp/{n}" for n in ("up", "gate", "down")}
    assert moved == matrices
    lr = float(lr_schedule(cfg.optim, cfg.train.steps)(0))
    for path in matrices:
        u, w = flat_updates[path], flat_params[path]
        # -lr * wd * w is two float32 products: within a few ulps of w's magnitude
        np.testing.assert_allclose(u, -lr * 0.5 * w, rtol=4 * np.finfo(np.float32).eps)


def test_lr_schedule_warmup_then_cosine():
    o = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    s = lr_schedule(o, 110)
    # a few float32 operations each (a cos, products, a sum): approx's default rel=1e-6 is 8 eps
    assert float(s(0)) == pytest.approx(0.1) and float(s(9)) == pytest.approx(1.0)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine
    assert float(s(110)) == pytest.approx(0.1) and float(s(500)) == pytest.approx(0.1)


def test_train_cli_end_to_end(tiny_data, tmp_path, capsys):
    """`jaxlm train` writes a self-describing run directory and the validation loss falls."""
    runs = tmp_path / "runs"
    rc = cli(
        [
            "train",
            "experiments/tiny.py",
            "--set",
            f"data.dir={tiny_data}",
            f"train.run_dir={runs}",
            "train.steps=30",
            "train.eval_every=15",
            "checkpoint.every=15",
            "mesh.data=8",
            "model.z_loss=1e-4",
        ]
    )
    assert rc == 0
    assert jax.sharding.get_abstract_mesh().empty  # the run's mesh does not leak into the process
    run = runs / "tiny"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["steps"] == 30 and config["data"]["dir"] == tiny_data
    assert list((run / "tb").glob("events.out.tfevents.*"))
    curves = report.read_curves(run / "tb", ("train/loss", "train/z_loss"))
    # the z-loss is its own curve, PaLM's 1e-4 times log²Z (~ log² 257 = 31 at the start): the
    # cross-entropy curve (val loss's counterpart) does not include it
    assert [s for s, _ in curves["train/z_loss"]] == [s for s, _ in curves["train/loss"]] == [10, 20, 30]
    assert all(0 < z < 1e-4 * 40 for _, z in curves["train/z_loss"]), curves
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["15", "30"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 30
    assert summary["val_loss"] < np.log(257) - 1.0, summary  # well below a uniform guess
    log = (run / "log.txt").read_text()
    assert "step     30" in log and "val loss" in log

    # A rerun with fewer steps trains nothing, says so in one line, and rewrites nothing.
    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    before = tree(run)
    capsys.readouterr()
    rerun = ["train", "experiments/tiny.py", "--set", f"data.dir={tiny_data}", f"train.run_dir={runs}"]
    assert cli([*rerun, "train.steps=20", "mesh.data=8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "step 30 >= train.steps=20" in out[0] and "train.steps" in out[0], out
    assert tree(run) == before


def test_target_val_loss_stops_at_the_first_evaluation_that_meets_it(tiny_cfg):
    """Any val loss meets a target of 100, so the run stops at its first evaluation (step 2 of 6),
    checkpointed there, and says so; the schedule still spans all 6 steps."""
    train_cfg = dataclasses.replace(tiny_cfg.train, steps=6, eval_every=2, target_val_loss=100.0)
    cfg = dataclasses.replace(tiny_cfg, train=train_cfg)
    summary = train.run(cfg)
    assert summary["status"] == "reached target_val_loss" and summary["step"] == 2, summary
    assert summary["val_loss"] <= 100.0
    assert sorted(p.name for p in (cfg.run_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    log = (cfg.run_path / "log.txt").read_text()
    assert "<= train.target_val_loss=100.0: stopping" in log and "step      3" not in log
    assert json.loads((cfg.run_path / "summary.json").read_text()) == summary


def test_train_cli_refuses_bad_override(tiny_data, capsys):
    assert cli(["train", "experiments/tiny.py", "--set", "model.n_heads=3"]) == 2
    assert "n_heads=3" in capsys.readouterr().err
    assert (
        cli(
            [
                "train",
                "experiments/tiny.py",
                "--set",
                "train.batch_size=12",
                "mesh.data=8",
                f"data.dir={tiny_data}",
            ]
        )
        == 2
    )
    assert "batch_size=12" in capsys.readouterr().err


def test_train_cli_names_missing_corpus(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "*.txt"
    rc = cli(
        [
            "train",
            "experiments/tiny.py",
            "--set",
            f"data.inputs={missing}",
            f"data.dir={tmp_path / 'd'}",
            f"train.run_dir={tmp_path / 'runs'}",
            "mesh.data=8",
        ]
    )
    assert rc == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing half-prepared left behind
