"""Data, FSDP and tensor parallelism on the 8 fake CPU devices: meshes from config, the golden
PartitionSpec of every parameter and optimizer-state leaf and of the batch (meshes with a context
axis too), sharded training == one device, the collectives each mesh compiles to, and per-device
memory falling as 1/fsdp.

Regenerate the golden table after a deliberate change to RULES or the model (then read the diff):
    python tests/test_sharding.py
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import serialization, traverse_util
from jax.sharding import PartitionSpec
from tolerances import assert_close, grad_terms, loss_terms, tol

from jaxlm import lm, model, sharding, train
from jaxlm.config import ConfigError, MeshConfig, apply_overrides, load_config
from jaxlm.state import create_state, state_shardings

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden_sharding.json")
MESHES = {"8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x1x8": (1, 1, 8), "1x8x1": (1, 8, 1)}
STEPS = 3
# Sizes every mesh axis of 8 divides: 8 heads and kv heads, d_ff 64, d_model 64, vocab 257 -> 264.
# optim.eps = optim.lr: Adam moves a weight by lr * m / (sqrt(v) + eps), which a change in the
# gradient moves by at most lr/eps = 1 times that change; with a small eps the rounding of a
# near-zero gradient could move a weight by up to lr.
OVERRIDES = {
    "model.n_heads": "8",
    "model.n_kv_heads": "8",
    "model.d_ff": "64",
    "model.d_model": "64",
    "model.vocab_multiple": "8",
    "optim.lr": "1e-2",
    "optim.warmup_steps": "0",
    "optim.eps": "1e-2",
}


def small_config():
    return apply_overrides(load_config(ROOT / "experiments" / "tiny.py"), OVERRIDES)


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    """A mesh on the first data*fsdp*tensor devices."""
    return sharding.make_mesh(MeshConfig(*shape), devices=jax.devices()[: int(np.prod(shape))])


def flat_specs(shardings) -> dict[str, str]:
    """{"params/blocks/attn/q": "P(None, 'fsdp', 'tensor', None)", ...} for a pytree of shardings."""

    def spec(s):
        return "P(" + ", ".join(repr(a) for a in s.spec) + ")"

    flat = traverse_util.flatten_dict(serialization.to_state_dict(shardings), sep="/")
    return {path: spec(s) for path, s in flat.items()}


# More meshes for the golden table, (data, fsdp, expert, context, tensor): two with the context
# axis, and two for the mixture of experts (8 experts, top-2) with the experts axis on the expert
# mesh axis, beside fsdp and tensor on the same weight, and the expert axis alone.
CONTEXT_MESHES = {"2x1x1x4x1": (2, 1, 1, 4, 1), "1x2x1x2x2": (1, 2, 1, 2, 2)}
MOE_MESHES = {"moe-fsdp2-expert2-tensor2": (1, 2, 2, 1, 2), "moe-expert8": (1, 1, 8, 1, 1)}
GOLDEN_MESHES = (
    {name: (shape[0], shape[1], 1, 1, shape[2]) for name, shape in MESHES.items()}
    | CONTEXT_MESHES
    | MOE_MESHES
)


def golden_table() -> dict[str, dict[str, str]]:
    """Per mesh: the spec of every params and optimizer-state leaf, and of the [batch, seq] inputs."""
    cfg = small_config()
    moe = apply_overrides(cfg, {"model.moe_experts": "8", "model.moe_top_k": "2"})
    table = {}
    for name, sizes in GOLDEN_MESHES.items():
        mesh = sharding.make_mesh(MeshConfig(**dict(zip(sharding.MESH_AXES, sizes, strict=True))))
        table[name] = flat_specs(state_shardings(moe if name in MOE_MESHES else cfg, mesh)) | flat_specs(
            {"batch": sharding.batch_sharding(mesh)}
        )
    return table


# --------------------------------------------------------------------------------------------
# Mesh and rules
# --------------------------------------------------------------------------------------------


def test_mesh_from_config_with_one_size_filled():
    # sizes in MESH_AXES order: data, fsdp, expert, context, tensor
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2), 8) == (2, 2, 1, 1, 2)
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1, 1, 1)
    assert sharding.mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=4), 8) == (1, 2, 1, 1, 4)
    assert sharding.mesh_shape(MeshConfig(data=-1, expert=2, context=2), 8) == (2, 1, 2, 2, 1)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "context": 1, "tensor": 2}
    assert list(mesh.devices.flat) == sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def test_bad_mesh_sizes_name_the_numbers():
    twelve = r"data=3 x fsdp=2 x expert=1 x context=1 x tensor=2 = 12 devices, but 8 are present"
    with pytest.raises(ConfigError, match=twelve):
        sharding.mesh_shape(MeshConfig(data=3, fsdp=2, tensor=2), 8)
    with pytest.raises(ConfigError, match=r"tensor=3 cannot fill 8 devices \(8 is not divisible by 3\)"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=1, tensor=3), 8)


def test_tensor_and_fsdp_sizes_must_divide_the_model():
    cfg = load_config(ROOT / "experiments" / "tiny.py")  # n_heads 4, d_ff 64, d_model 32, vocab 257
    with pytest.raises(ConfigError) as e:
        sharding.check_divisible(cfg.model, lm.get(cfg.model).decls, mesh_of((1, 1, 8)))
    msg = str(e.value)
    assert "mesh.tensor=8 does not divide model.n_heads=4" in msg
    assert "mesh.tensor=8 does not divide model.n_kv_heads=4" in msg
    assert "the padded vocabulary 257 (model.vocab_size=257" in msg and "vocab_multiple=1" in msg
    assert "d_ff" not in msg  # 64 divides
    narrow = apply_overrides(cfg, {"model.d_model": "20", "model.n_heads": "2"})
    with pytest.raises(ConfigError, match="mesh.fsdp=8 does not divide model.d_model=20"):
        sharding.check_divisible(narrow.model, lm.get(narrow.model).decls, mesh_of((1, 8, 1)))
    small = small_config().model
    sharding.check_divisible(small, lm.get(small).decls, mesh_of((2, 2, 2)))  # all divide: no error


def test_the_divisibility_check_follows_the_rule_table():
    """Changing a rule changes what must divide: the check derives from RULES and the declarations."""
    cfg = apply_overrides(load_config(ROOT / "experiments" / "tiny.py"), {"model.d_ff": "20"})
    decls, mesh = lm.get(cfg.model).decls, mesh_of((8, 1, 1))
    sharding.check_divisible(cfg.model, decls, mesh)  # d_ff is split over tensor (size 1) only
    rules = dict(sharding.RULES, mlp="data")
    with pytest.raises(ConfigError, match=r"mesh.data=8 does not divide model.d_ff=20"):
        sharding.check_divisible(cfg.model, decls, mesh, rules)
    narrow = apply_overrides(cfg, {"model.d_model": "20", "model.n_heads": "2"})
    sharding.check_divisible(
        narrow.model, lm.get(narrow.model).decls, mesh_of((1, 8, 1)), dict(sharding.RULES, embed=None)
    )


def test_the_loading_mesh_splits_params_over_fsdp_as_far_as_the_model_allows():
    cfg = load_config(ROOT / "experiments" / "tiny.py").model  # d_model 32: fsdp 8 divides it

    def shape(model):  # the mesh axes the loading mesh splits
        return {a: n for a, n in sharding.loading_mesh(model, lm.get(model).decls).shape.items() if n > 1}

    assert shape(cfg) == {"fsdp": 8}
    narrow = dataclasses.replace(cfg, d_model=20, n_heads=2)  # 20 = 4 * 5: fsdp 4 of 8 devices
    assert shape(narrow) == {"data": 2, "fsdp": 4}
    one = sharding.loading_mesh(narrow, lm.get(narrow).decls, jax.devices()[:1])
    assert one.devices.size == 1


def test_two_logical_axes_on_one_mesh_axis_is_an_error():
    rules = dict(sharding.RULES, mlp="fsdp")  # "embed" is already on fsdp
    with pytest.raises(ConfigError, match="'embed' and 'mlp' of one array .* same mesh axis 'fsdp'"):
        sharding.logical_to_spec(("layers", "embed", "mlp"), rules)
    with pytest.raises(ConfigError, match="logical axis 'nope' has no sharding rule"):
        sharding.logical_to_spec(("nope",))


def test_specs_leave_out_mesh_axes_of_size_one():
    axes = ("batch", "seq", "act_mlp")
    assert sharding.logical_to_spec(axes) == PartitionSpec(("data", "fsdp", "expert"), "context", "tensor")
    assert sharding.logical_to_spec(axes, mesh=mesh_of((2, 2, 2))) == PartitionSpec(
        ("data", "fsdp"), None, "tensor"
    )
    assert sharding.logical_to_spec(axes, mesh=mesh_of((8, 1, 1))) == PartitionSpec("data", None, None)
    assert sharding.logical_to_spec(axes, mesh=mesh_of((1, 1, 1))) == PartitionSpec(None, None, None)


def test_golden_partition_specs_of_params_and_optimizer_state():
    expected = json.loads(GOLDEN.read_text())
    actual = golden_table()
    assert set(actual) == set(expected) == set(GOLDEN_MESHES)
    for name in GOLDEN_MESHES:
        diff = {
            k: (expected[name].get(k), actual[name].get(k))
            for k in set(expected[name]) | set(actual[name])
            if expected[name].get(k) != actual[name].get(k)
        }
        assert not diff, f"mesh {name}: leaf: (golden, now) {diff}"
    # Each expert weight's experts axis is on the expert mesh axis, beside fsdp and tensor.
    assert (
        expected["moe-fsdp2-expert2-tensor2"]["params/blocks/moe/up"] == "P(None, 'expert', 'fsdp', 'tensor')"
    )
    # The context axis splits the positions of the batch and no weight: the params of a context
    # mesh are split as on the mesh without it.
    assert expected["2x1x1x4x1"]["batch"] == "P('data', 'context')"
    unsplit = lambda specs: {k: v for k, v in specs.items() if k != "batch"}
    assert unsplit(expected["2x1x1x4x1"]) == unsplit(expected["8x1x1"])
    assert unsplit(expected["1x2x1x2x2"]) == unsplit(expected["2x2x2"])
    # The table covers the optimizer moments, not only the params, and they match the params.
    for name in GOLDEN_MESHES:
        specs = expected[name]
        moments = [k for k in specs if "/mu/" in k or "/nu/" in k]
        assert len(moments) == 2 * sum(k.startswith("params/") for k in specs)
        for k in moments:
            assert specs[k] == specs["params/" + k.split("/mu/")[-1].split("/nu/")[-1]]


# --------------------------------------------------------------------------------------------
# Processes and the batch
# --------------------------------------------------------------------------------------------


def _procs(shape, per_process):
    """Process ids of a (data, fsdp, tensor) mesh, laid out process-major like make_mesh does, with
    the expert and context axes of size 1 between fsdp and tensor (MESH_AXES order)."""
    data, fsdp, tensor = shape
    return (np.arange(int(np.prod(shape))) // per_process).reshape(data, fsdp, 1, 1, tensor)


@pytest.mark.parametrize(
    "shape, per_process, expected",
    [
        # data x fsdp = 4 blocks over 2 processes of 4 devices: two contiguous blocks each.
        ((2, 2, 2), 4, [(0, 2), (1, 2)]),
        ((4, 2, 1), 4, [(0, 2), (1, 2)]),
        ((8, 1, 1), 1, [(i, 8) for i in range(8)]),
        # tensor=4 across 2-device processes: process pairs hold the same rows and load them both.
        ((1, 2, 4), 2, [(0, 2), (0, 2), (1, 2), (1, 2)]),
        ((1, 1, 8), 4, [(0, 1), (0, 1)]),
    ],
)
def test_each_process_feeds_the_rows_its_devices_hold(shape, per_process, expected):
    procs = _procs(shape, per_process)
    got = [sharding.batch_blocks(procs, list(sharding.MESH_AXES), p) for p in range(len(expected))]
    assert got == expected


def test_scattered_or_overlapping_batch_blocks():
    # A topology-aware layout may interleave processes: each feeds its rank-th share of the rows.
    procs = np.array([1, 0, 1, 0]).reshape(4, 1, 1, 1, 1)
    assert sharding.batch_blocks(procs, list(sharding.MESH_AXES), 1) == (0, 2)
    assert sharding.batch_blocks(procs, list(sharding.MESH_AXES), 0) == (1, 2)
    uneven = np.array([0, 1, 0, 0]).reshape(2, 1, 1, 1, 2)  # process 0 holds both rows, process 1 one
    with pytest.raises(ConfigError, match="overlapping or uneven"):
        sharding.batch_blocks(uneven, list(sharding.MESH_AXES), 0)
    assert sharding.process_batch_slice(mesh_of((2, 2, 2))) == (0, 1)  # one process: everything


# --------------------------------------------------------------------------------------------
# Sharded init and memory
# --------------------------------------------------------------------------------------------

_STATES: dict[tuple, dict] = {}


def initial_state(shape):
    """create_state on a mesh (each compiled once per test session)."""
    if shape not in _STATES:
        cfg, mesh = small_config(), mesh_of(shape)
        _STATES[shape] = create_state(cfg, state_shardings(cfg, mesh))
    return _STATES[shape]


def bytes_on_device(tree, device) -> int:
    return sum(
        s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device
    )


def test_params_and_optimizer_bytes_per_device_fall_as_one_over_fsdp():
    dev0 = jax.devices()[0]
    one = initial_state((1, 1, 1))
    total = bytes_on_device(one, dev0)
    scalars = sum(x.nbytes for x in jax.tree.leaves(one) if x.ndim == 0)  # step and Adam counts
    assert total > 2 * 4 * model.count_params(small_config().model)  # params + mu + nu
    for k in (2, 4, 8):
        state = initial_state((1, k, 1))
        assert bytes_on_device(state, dev0) == (total - scalars) // k + scalars, f"fsdp={k}"
    # Sharded init writes the same numbers as one device does, bit for bit: the random bits are
    # integer arithmetic and the rest elementwise, with no sum whose order a mesh could change.
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(initial_state((1, 8, 1)).params),
        jax.device_get(one.params),
    )


# --------------------------------------------------------------------------------------------
# Training on each mesh == one device; the collectives each mesh compiles to
# --------------------------------------------------------------------------------------------


def fixed_batch(B=16, T=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 257, size=(B, T + 1), dtype=np.int32)
    mask = np.ones((B, T), np.float32)
    mask[:, :3] = 0.0  # a few unscored targets, like padding
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "segment_ids": np.ones((B, T), np.int32),
        "loss_mask": mask,
    }


_RUNS: dict[tuple, tuple] = {}


def train_on(shape) -> tuple[list[float], dict, str]:
    """(losses, final state on the host, compiled HLO text) after STEPS steps from the one-device init."""
    if shape not in _RUNS:
        cfg, mesh = small_config(), mesh_of(shape)
        start = jax.device_get(initial_state((1, 1, 1)))  # host copy: the step donates its input
        with jax.set_mesh(mesh):
            state_sh, batch_sh = state_shardings(cfg, mesh), sharding.batch_sharding(mesh)
            state = jax.device_put(start, state_sh)
            batch = jax.device_put(fixed_batch(), batch_sh)
            step = train.make_train_step(cfg, state_sh, batch_sh).lower(state, batch).compile()
            losses = []
            for _ in range(STEPS):
                state, metrics = step(state, batch)
                losses.append(float(metrics["loss"]))
        _RUNS[shape] = (losses, jax.device_get(state), step.as_text())
    return _RUNS[shape]


def collectives(hlo: str) -> dict[str, list[tuple[bool, str]]]:
    """{op: [(inside a while-loop body, result shape), ...]} for the cross-device ops of compiled HLO."""
    bodies = set(re.findall(r"\bbody=(%[\w.\-]+)", hlo))
    out: dict[str, list] = {}
    comp = None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
        if header:
            comp = header.group(1)
            continue
        op = re.match(
            r"\s*(?:ROOT )?%\S+ = (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
            r"(?:-start)?\(",
            line,
        )
        if op:
            out.setdefault(op.group(2), []).append((comp in bodies, op.group(1)))
    return out


def test_one_device_reference_learns():
    losses, _, hlo = train_on((1, 1, 1))
    assert losses[0] == pytest.approx(np.log(257), abs=0.3) and losses[-1] < losses[0]
    assert not collectives(hlo)


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_trains_like_one_device_with_the_expected_collectives(name):
    shape = MESHES[name]
    data, fsdp, tensor = shape
    losses, state, hlo = train_on(shape)
    ref_losses, ref_state, _ = train_on((1, 1, 1))
    # The mesh sums the batch's tokens in another order (per device, then across devices): each step
    # adds the rounding of one loss, one gradient, and one update of every weight.
    cfg = small_config()
    n_tokens = int(np.prod(fixed_batch()["loss_mask"].shape))
    for k, (got, want) in enumerate(zip(losses, ref_losses, strict=True), start=1):
        assert_close(got, want, k * loss_terms(cfg.model, n_tokens), err_msg=f"{name} loss of step {k}")
    # Adam's second moment bounds every gradient the run took: nu >= (1 - b2) b2^(STEPS - k) g_k^2.
    b2 = cfg.optim.b2
    nu = optax.tree.get(ref_state.opt_state, "nu")
    for (path, a), b, v in zip(
        jax.tree_util.tree_flatten_with_path(state.params)[0],
        jax.tree.leaves(ref_state.params),
        jax.tree.leaves(nu),
        strict=True,
    ):
        g_max = np.sqrt(v.max() / ((1 - b2) * b2 ** (STEPS - 1)))
        # each step: the gradient's rounding times Adam's gain lr/eps, then p + update rounded
        bound = STEPS * (cfg.optim.lr / cfg.optim.eps) * tol(g_max, grad_terms(cfg.model, n_tokens))
        bound += tol(np.abs(b).max(), 2 * STEPS)
        np.testing.assert_allclose(a, b, rtol=0, atol=bound, err_msg=f"{name} {jax.tree_util.keystr(path)}")

    ops = collectives(hlo)
    # Gradients (and TP partial sums) are summed across devices. XLA:CPU writes the FSDP
    # reduce-scatter as all-reduce + slice; GPU/TPU emit reduce-scatter.
    assert ops.get("all-reduce") or ops.get("reduce-scatter"), ops.keys()
    # No involuntary resharding: layouts chosen by the rules never need a shuffle.
    assert not ops.get("all-to-all") and not ops.get("collective-permute"), ops.keys()
    gathers = ops.get("all-gather", [])
    if fsdp == 1:
        # DP replicates weights; TP keeps them split (column-parallel in, row-parallel out).
        assert not gathers, gathers
    else:
        # ZeRO-3: each layer's weights are gathered inside the layer loop, one layer at a time;
        # no stacked [n_layers, ...] block weight is ever gathered whole.
        assert any(in_loop for in_loop, _ in gathers), gathers
        blocks = jax.eval_shape(lambda: model.init_params(small_config().model, jax.random.key(0)))["blocks"]
        stacked = {f"f32[{','.join(map(str, w.shape))}]" for w in jax.tree.leaves(blocks)}
        assert not [s for _, s in gathers if s.split("{")[0] in stacked], gathers


if __name__ == "__main__":
    import os

    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    GOLDEN.write_text(json.dumps(golden_table(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
