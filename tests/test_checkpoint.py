"""Checkpoints: exact resume after kill -9, SIGTERM, restore onto other meshes, corruption, full disk,
changed optimizer and changed model."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlm import checkpoint, sharding, train
from jaxlm.config import ConfigError, MeshConfig, apply_overrides, load_config, to_dict
from jaxlm.report import read_curves
from jaxlm.state import abstract_state, fresh_opt_state, state_shardings

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.py"
NNX = ROOT / "experiments" / "nnx_gpt.py"  # a Flax NNX module: the same guarantees must hold
STEPS = 40
# Recipe options in one run: Muon for the hidden matrices, and sliding-window attention over
# documents (layer 0 windowed to 8 tokens, layer 1 global).
RECIPE = {
    "optim.name": "muon",
    "model.attention_window": 8,
    "model.global_every": 2,
    "data.document_masking": "true",
}


def _sets(tiny_data: str, run_dir: Path, name: str, **extra) -> list[str]:
    base = {
        "name": name,
        "data.dir": tiny_data,
        "train.run_dir": str(run_dir),
        "train.steps": STEPS,
        "train.log_every": 1,
        "train.eval_every": 0,
        "checkpoint.every": 4,
        # Sharded, not replicated, params: orbax then compiles no per-array replica slices when saving.
        "mesh.data": 1,
        "mesh.fsdp": 8,
    }
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def _cfg(tiny_data: str, run_dir: Path, name: str, experiment: Path = TINY, **extra):
    return load_config(experiment, _sets(tiny_data, run_dir, name, **extra))


def _losses(run: Path) -> dict[int, float]:
    """Per-step train loss from the run's TensorBoard events; a resumed run's redone steps win."""
    return dict(read_curves(run / "tb", ("train/loss",)).get("train/loss", []))


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def _spawn(sets: list[str], experiment: Path = TINY) -> subprocess.Popen:
    """`jaxlm train EXPERIMENT --set ...` in a fresh process (8 fake devices, like here)."""
    return subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "train", str(experiment), "--set", *sets],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(proc: subprocess.Popen, done) -> list[str]:
    """Read the child's output until ``done(step)`` holds for a logged training step."""
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"run ended (rc {proc.wait()}) before the expected step:\n{''.join(lines)}")
        lines.append(line)
        m = re.match(r"step\s+(\d+) \| loss", line)
        if m and done(int(m[1])):
            return lines


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 40-step run, checkpointed every 4 steps (tiny keeps the last 2)."""
    runs = tmp_path_factory.mktemp("reference")
    summary = train.run(_cfg(tiny_data, runs, "ref"))
    assert summary["status"] == "finished"
    return runs / "ref"


# --------------------------------------------------------------------------------------------
# Interrupted runs continue exactly.
# --------------------------------------------------------------------------------------------


def test_kill9_at_a_random_step_then_resume_reproduces_the_loss_curve(tiny_data, tmp_path, reference_run):
    _kill9_then_resume(tiny_data, tmp_path, reference_run, TINY)


def _kill9_then_resume(
    tiny_data, tmp_path, reference_run, experiment: Path, extra: dict | None = None
) -> None:
    """SIGKILL at a random step, resume: the loss curve and final params equal the uninterrupted
    run's bit for bit (one program, one machine). ``extra``: more overrides for both runs."""
    extra = extra or {}
    kill_after = random.randint(5, 14)
    run = tmp_path / "killed"
    proc = _spawn(_sets(tiny_data, tmp_path, "killed", **extra), experiment)
    try:
        _read_until(proc, lambda s: s >= kill_after and checkpoint.complete_steps(run / "checkpoints"))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "summary.json").exists()
    before = _losses(run)
    resumed_from = checkpoint.complete_steps(run / "checkpoints")[-1]
    assert kill_after <= max(before) < STEPS

    summary = train.run(_cfg(tiny_data, tmp_path, "killed", experiment, **extra), resume=True)
    assert summary["status"] == "finished"
    assert f"resumed from {run / 'checkpoints' / str(resumed_from)}" in (run / "log.txt").read_text()
    # Bit for bit: one program on one machine, interrupted or not (no stored numbers).
    ref, got = _losses(reference_run), _losses(run)
    assert set(before) | set(range(resumed_from + 1, STEPS + 1)) <= set(got)
    assert got == {s: ref[s] for s in got}, f"killed after step {kill_after}, resumed at {resumed_from}"
    _assert_trees_equal(checkpoint.load_params(run)[1], checkpoint.load_params(reference_run)[1])


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_0(tiny_data, tmp_path):
    run = tmp_path / "term"
    # checkpoint.every=0: only the end of a run saves, so any checkpoint here is the signal's doing.
    proc = _spawn(_sets(tiny_data, tmp_path, "term", **{"train.steps": 100000, "checkpoint.every": 0}))
    try:
        lines = _read_until(proc, lambda s: s >= 3)
        proc.send_signal(signal.SIGTERM)
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint (\S+)", out)[1])
    assert checkpoint.complete_steps(run / "checkpoints") == [stopped_at]
    checkpoint.verify(run / "checkpoints" / str(stopped_at))
    cfg, params, step, _ = checkpoint.load_params(run)
    assert step == stopped_at and cfg.train.steps == 100000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped by SIGTERM" and summary["step"] == stopped_at


def test_a_second_signal_exits_at_once_and_old_handlers_come_back(monkeypatch):
    exits = []
    monkeypatch.setattr(checkpoint.os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = checkpoint.StopRequest()

    def handled(condition) -> bool:
        # The handler runs in the main thread between bytecodes once the kernel has delivered the
        # signal, which on a loaded machine may take longer than any fixed sleep: wait up to 10 s.
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.001)
        return condition()

    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        assert handled(stop.requested) and stop.signal == "SIGINT" and exits == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert handled(lambda: exits) and exits == [128 + signal.SIGTERM]
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# --------------------------------------------------------------------------------------------
# Restore anywhere.
# --------------------------------------------------------------------------------------------


def _random_state(cfg, mesh, step: int, seed: int):
    """A train state on ``mesh`` whose every leaf (moments too) holds distinct values."""
    shard = state_shardings(cfg, mesh).as_tree()
    abstract = abstract_state(cfg).as_tree()
    rng = np.random.default_rng(seed)
    values = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
    values["step"] = np.int32(step)
    return jax.tree.map(jax.device_put, values, shard)


def _abstract(cfg, mesh):
    return checkpoint.abstract_with_shardings(
        abstract_state(cfg).as_tree(), state_shardings(cfg, mesh).as_tree()
    )


def test_restore_onto_other_meshes_and_device_counts_gives_identical_values(tiny_cfg, tmp_path):
    cfg = apply_overrides(
        tiny_cfg, {"model.vocab_multiple": "8", "mesh.data": "2", "mesh.fsdp": "2", "mesh.tensor": "2"}
    )
    state = _random_state(cfg, sharding.make_mesh(cfg.mesh), step=3, seed=0)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", cfg.checkpoint)
    assert ckpt.save(3, state, to_dict(cfg)) and ckpt.wait()
    ckpt.close()
    for mesh_cfg, devices in ((MeshConfig(data=8), jax.devices()), (MeshConfig(data=1), jax.devices()[:1])):
        other = dataclasses.replace(cfg, mesh=mesh_cfg)
        mesh = sharding.make_mesh(mesh_cfg, devices=devices)
        target = _abstract(other, mesh)
        restored, step, notes = checkpoint.restore(tmp_path / "checkpoints", target, to_dict(other), None)
        assert step == 3
        _assert_trees_equal(restored, state)
        for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
            assert leaf.sharding == want.sharding
        assert any(f"mesh.data: 2 -> {mesh_cfg.data}" in n for n in notes), notes
        _, params, _, _ = checkpoint.load_params(tmp_path, devices)
        _assert_trees_equal(params, state["params"])
        assert {d for leaf in jax.tree.leaves(params) for d in leaf.devices()} == set(devices)


def test_changed_optimizer_hyperparameters_keep_the_optimizer_state(tiny_data, tmp_path, reference_run):
    run = tmp_path / "ref"
    shutil.copytree(reference_run, run)
    cfg = _cfg(
        tiny_data, tmp_path, "ref", **{"train.steps": STEPS + 2, "optim.lr": 1e-3, "optim.weight_decay": 0}
    )
    assert train.run(cfg)["step"] == STEPS + 2
    log = (run / "log.txt").read_text()
    assert f"resumed from {run / 'checkpoints' / str(STEPS)}: params, optimizer state and step {STEPS}" in log
    assert "optim.lr: 0.003 -> 0.001" in log and "optim.weight_decay: 0.1 -> 0.0" in log
    assert f"train.steps: {STEPS} -> {STEPS + 2}" in log


@pytest.mark.parametrize(
    "change, note",
    [
        ({"optim.grad_clip": 0}, "optim.grad_clip: 1.0 -> 0.0"),  # drops the clip state
        (
            {"optim.name": "muon"},
            "optim.name: 'adamw' -> 'muon'",
        ),  # Muon's momentum for the matrices, no Adam moments
    ],
    ids=["grad_clip", "muon"],
)
def test_changed_optimizer_structure_restores_params_and_step_only(tiny_data, reference_run, change, note):
    cfg = _cfg(tiny_data, reference_run.parent, "ref", **change)
    mesh = sharding.make_mesh(cfg.mesh)
    fresh = fresh_opt_state(cfg, state_shardings(cfg, mesh))
    state, step, notes = checkpoint.restore(
        reference_run / "checkpoints", _abstract(cfg, mesh), to_dict(cfg), fresh
    )
    assert step == STEPS and int(state["step"]) == STEPS
    assert "optimizer state NOT restored" in notes[0] and note in notes[1]
    _assert_trees_equal(state["params"], checkpoint.load_params(reference_run).params)
    _assert_trees_equal(state["opt_state"], fresh(state["params"]))


def test_a_changed_model_shape_is_refused_naming_the_parameter(tiny_data, tmp_path, reference_run):
    shutil.copytree(reference_run, tmp_path / "ref")
    before = sorted(p.name for p in (tmp_path / "ref" / "checkpoints").iterdir())
    with pytest.raises(ConfigError) as e:
        train.run(_cfg(tiny_data, tmp_path, "ref", **{"model.d_ff": 128, "train.steps": STEPS + 2}))
    msg = str(e.value)
    assert "parameter 'blocks.mlp.down' has shape (2, 64, 32)" in msg and "but (2, 128, 32)" in msg, msg
    assert "model.d_ff: 64 -> 128" in msg
    assert sorted(p.name for p in (tmp_path / "ref" / "checkpoints").iterdir()) == before


# --------------------------------------------------------------------------------------------
# Faults.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip bytes"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_cfg, tmp_path, damage, capsys):
    cfg = dataclasses.replace(tiny_cfg, mesh=MeshConfig(data=1))
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    good, newer = _random_state(cfg, mesh, step=1, seed=1), _random_state(cfg, mesh, step=2, seed=2)
    directory = tmp_path / "checkpoints"
    ckpt = checkpoint.Checkpointer(directory, cfg.checkpoint)
    ckpt.save(1, good, to_dict(cfg))
    ckpt.save(2, newer, to_dict(cfg))
    ckpt.close()
    biggest = max(
        (p for p in (directory / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(biggest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2 : len(data) // 2 + 16] = bytes(
            b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 16]
        )
    biggest.write_bytes(bytes(data))

    capsys.readouterr()
    assert checkpoint.load_params(tmp_path, jax.devices()[:1]).step == 1
    (warning,) = capsys.readouterr().err.splitlines()  # one plain line, no Python warning machinery
    assert warning.startswith(f"warning: skipped unreadable checkpoint(s) {directory / '2'}: "), warning
    assert warning.endswith(f"loaded {directory / '1'}")
    state, step, notes = checkpoint.restore(directory, _abstract(cfg, mesh), to_dict(cfg), None)
    assert step == 1
    _assert_trees_equal(state, good)
    assert str(directory / "2") in notes[0] and str(directory / "1") in notes[0] and biggest.name in notes[0]
    # The damaged one is kept aside for inspection, out of the way of a new step 2.
    assert checkpoint.complete_steps(directory) == [1] and list(directory.glob("2.unreadable-*"))
    ckpt = checkpoint.Checkpointer(directory, cfg.checkpoint)
    assert ckpt.save(2, newer, to_dict(cfg)) and ckpt.wait()
    ckpt.close()
    assert checkpoint.complete_steps(directory) == [1, 2]


def test_a_full_disk_fails_one_save_loudly_and_the_run_goes_on(
    tiny_data, tmp_path, monkeypatch, reference_run
):
    run = tmp_path / "ref"
    shutil.copytree(reference_run, run)  # checkpoints 36 and 40; continue to 48 with a full disk at 44
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == STEPS + 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    summary = train.run(_cfg(tiny_data, tmp_path, "ref", **{"train.steps": STEPS + 8}))
    assert summary["status"] == "finished" and summary["step"] == STEPS + 8
    log = (run / "log.txt").read_text()
    assert f"error: checkpoint of step {STEPS + 4}" in log and "No space left on device" in log, log
    # keep=2 counts complete checkpoints only: step 40 survives the failed step 44.
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [STEPS, STEPS + 8]


def test_a_write_failing_in_the_background_is_reported_and_keeps_earlier_checkpoints(
    tiny_cfg, tmp_path, monkeypatch
):
    cfg = dataclasses.replace(tiny_cfg, mesh=MeshConfig(data=1))
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, keep=1))
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    directory, errors = tmp_path / "checkpoints", []
    ckpt = checkpoint.Checkpointer(directory, cfg.checkpoint, say=errors.append)
    assert ckpt.save(1, _random_state(cfg, mesh, step=1, seed=1), to_dict(cfg)) and ckpt.wait()

    def disk_full(step_dir):  # runs in orbax's background thread, after the arrays are written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(step_dir))

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_file_checksums", disk_full)
        assert ckpt.save(2, _random_state(cfg, mesh, step=2, seed=2), to_dict(cfg))  # returns at once
        assert not ckpt.wait()
    assert len(errors) == 1 and "checkpoint of step 2" in errors[0] and "No space left" in errors[0], errors
    assert sorted(p.name for p in directory.iterdir()) == ["1"]  # keep=1, yet step 1 stays
    assert ckpt.save(3, _random_state(cfg, mesh, step=3, seed=3), to_dict(cfg)) and ckpt.wait()
    ckpt.close()
    assert sorted(p.name for p in directory.iterdir()) == ["3"]


# --------------------------------------------------------------------------------------------
# Every feature that keeps state of its own resumes bit for bit from a mid-run checkpoint.
# --------------------------------------------------------------------------------------------

MOE = {"model.moe_experts": 4, "model.moe_top_k": 2, "model.seq_len": 16, "model.vocab_multiple": 8}
# Six steps checkpointed at 3 and 6; the one at 6 deleted, the run resumed from 3 in this process.
# One program run twice on one machine, so bit for bit; the kill -9 of a real process is the test
# above (the default model) and tests/test_multiprocess.py's, this is what each feature adds to it.
RESUMED = {
    # Muon's momentum, and sliding-window attention over documents (layer 0 windowed, layer 1 global)
    "muon-window": (TINY, RECIPE),
    # a Flax NNX module's params, declared by its annotations
    "nnx": (NNX, {}),
    # experts split over the expert axis, and the routing stats logged apart
    "moe-expert4": (TINY, MOE | {"mesh.fsdp": 1, "mesh.data": 2, "mesh.expert": 4}),
    # positions split over the context axis (zig-zag ring attention), documents masked
    "context2": (TINY, {"mesh.fsdp": 4, "mesh.context": 2, "data.document_masking": "true"}),
    # µP's per-parameter learning rates, an optimizer transform of their own
    "mup": (TINY, {"model.parametrization": "mup", "model.mup_base_width": 16, "optim.warmup_steps": 2}),
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_a_mid_run_checkpoint_resumes_bit_for_bit(tiny_data, tmp_path, name, capsys):
    experiment, extra = RESUMED[name]
    cfg = _cfg(tiny_data, tmp_path, name, experiment, **{"train.steps": 6, "checkpoint.every": 3, **extra})
    assert train.run(cfg)["status"] == "finished"
    run = tmp_path / name
    want_losses, want_params = _losses(run), jax.device_get(checkpoint.load_params(run)[1])
    assert sorted(want_losses) == [1, 2, 3, 4, 5, 6]
    assert checkpoint.complete_steps(run / "checkpoints") == [3, 6]
    shutil.rmtree(run / "checkpoints" / "6")
    (run / "summary.json").unlink()
    assert train.run(cfg, resume=True)["status"] == "finished"
    log = (run / "log.txt").read_text()
    assert f"resumed from {run / 'checkpoints' / '3'}: params, optimizer state and step 3" in log, log
    assert _losses(run) == want_losses
    _assert_trees_equal(checkpoint.load_params(run)[1], want_params)
    from jaxlm.cli import main as cli

    capsys.readouterr()
    hf = tmp_path / "hf"
    if name == "muon-window":  # the window comes back from the checkpoint; export refuses it by name
        loaded = checkpoint.load_params(str(run))[0]
        assert (loaded.model.attention_window, loaded.model.global_every) == (8, 2)
        assert cli(["sample", "--checkpoint", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "12"]) == 0
        assert capsys.readouterr().out.startswith("ROMEO:")
        assert cli(["export", "--checkpoint", str(run), "--out", str(hf)]) == 2
        assert "model.attention_window=8 (global_every=2)" in capsys.readouterr().err and not hf.exists()
    if name == "nnx":  # samples (a full forward per token: no cache), evaluates, refuses export
        assert cli(["sample", "--checkpoint", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "5"]) == 0
        assert capsys.readouterr().out.startswith("ROMEO:")
        assert cli(["eval", "--checkpoint", str(run), "--batches", "2"]) == 0
        assert "step 6 | val split" in capsys.readouterr().out
        assert cli(["export", "--checkpoint", str(run), "--out", str(hf)]) == 2
        assert "cannot export model.module='experiments/nnx_gpt.py:GPT'" in capsys.readouterr().err
        assert not hf.exists()
    if name == "moe-expert4":
        curves = read_curves(run / "tb", ("train/moe/aux_loss", "train/moe/load/expert_0"))
        assert len(curves["train/moe/aux_loss"]) >= 6 and curves["train/moe/load/expert_0"]


# Mixture of experts: the generic machinery carries the expert weights and their expert axis.
# --------------------------------------------------------------------------------------------


def test_moe_checkpoint_restores_onto_another_expert_parallel_degree(tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, MOE | {"mesh.data": "2", "mesh.expert": "4"})
    state = _random_state(cfg, sharding.make_mesh(cfg.mesh), step=2, seed=1)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", cfg.checkpoint)
    assert ckpt.save(2, state, to_dict(cfg)) and ckpt.wait()
    ckpt.close()
    other = dataclasses.replace(cfg, mesh=MeshConfig(data=2, expert=2, tensor=2))
    target = _abstract(other, sharding.make_mesh(other.mesh))
    restored, step, notes = checkpoint.restore(tmp_path / "checkpoints", target, to_dict(other), None)
    assert step == 2 and any("mesh.expert: 4 -> 2" in n for n in notes), notes
    _assert_trees_equal(restored, state)
    up = restored["params"]["blocks"]["moe"]["up"]  # [layers, experts, embed, mlp]
    assert up.sharding.spec[1] == "expert" and up.sharding == target["params"]["blocks"]["moe"]["up"].sharding
    assert up.addressable_shards[0].data.shape[1] == 2  # 4 experts over expert=2
