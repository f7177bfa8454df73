"""Multi-process training: two real processes on this machine (jax.distributed over localhost,
gloo CPU collectives) train through the ``jaxlm train`` CLI and match one process; plus how
``distributed.initialize`` finds its peers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_checkpoint import _read_until

from jaxlm import checkpoint, distributed, train
from jaxlm.config import ConfigError, MeshConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Both processes of a run: fsdp=2 spans them (each holds half the batch rows and half of every
# weight); tensor=2 stays inside each (2 fake CPU devices per process).
TWO = {
    "train.batch_size": "8",
    "train.log_every": "1",
    "model.vocab_multiple": "8",  # 257 -> 264, divisible by tensor=2
    "mesh.data": "1",
    "mesh.fsdp": "2",
    "mesh.tensor": "2",
}
# Each process 2 CPU devices, with the suite's other XLA flags (tests/conftest.py: LLVM -O0).
CPU2 = {
    "XLA_FLAGS": re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
    + " --xla_force_host_platform_device_count=2",
    "JAX_PLATFORMS": "cpu",
}


def _start_two(sets: dict, program: list[str], **env) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run: ``program train experiments/tiny.py --set ...``."""
    env = dict(os.environ, **CPU2, **env, JAXLM_NUM_PROCESSES="2")
    env["JAXLM_COORDINATOR"] = f"127.0.0.1:{_free_port()}"
    cmd = [*program, "train", str(TINY), "--set", *(f"{k}={v}" for k, v in sets.items())]
    return [
        subprocess.Popen(
            cmd,
            env=dict(env, JAXLM_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen], before: list[str] = ()) -> list[str]:
    """Each process's whole output (``before``: lines already read from process 0)."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs[0] = "".join(before) + outs[0]
    return outs


# `jaxlm ARGS` counting, for each train step, the times the main thread waits for device results
# between dispatching that step and the next: calls of jax.device_get / jax.block_until_ready, and
# any other read of an array's value, each counted once, outside them: np.asarray / np.array of a
# jax.Array (which read a CPU array's buffer directly) and float(), int(), .item() and the like
# (through ArrayImpl._value).
COUNT_WAITS = r"""
import json, os, sys, threading
import jax
import numpy as np
from jax._src import array
from jaxlm import cli, train

waits, inside = [], [0]

def counted(fn):
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        if inside[0] == 0 and waits:
            waits[-1] += 1
        inside[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            inside[0] -= 1
    return wrapper

def if_jax_array(numpy_fn):
    counted_fn = counted(numpy_fn)
    return lambda x, *a, **k: (counted_fn if isinstance(x, jax.Array) else numpy_fn)(x, *a, **k)

jax.device_get = counted(jax.device_get)
jax.block_until_ready = counted(jax.block_until_ready)
array.ArrayImpl._value = property(counted(array.ArrayImpl._value.fget))
np.asarray, np.array = if_jax_array(np.asarray), if_jax_array(np.array)
make_train_step = train.make_train_step

def make_counted(*args, **kwargs):
    step = make_train_step(*args, **kwargs)
    def dispatch(*args):
        waits.append(0)
        return step(*args)
    return dispatch

train.make_train_step = make_counted
rc = cli.main(sys.argv[1:])
with open(os.environ["WAITS_OUT"] + str(jax.process_index()), "w") as f:
    json.dump(waits, f)
sys.exit(rc)
"""


def test_two_processes_train_like_one_and_wait_for_the_device_once_a_step(tiny_data, tmp_path):
    common = {  # both runs; two micro-batches exercise the accumulation split
        **{k: v for k, v in TWO.items() if not k.startswith("mesh.")},
        "data.dir": tiny_data,
        "train.steps": "4",
        "train.micro_batches": "2",
        "train.eval_batches": "1",
        "optim.eps": "1e-4",  # bounds how much Adam magnifies float rounding in tiny gradients
    }
    driver = tmp_path / "count_waits.py"
    driver.write_text(COUNT_WAITS)
    procs = _start_two(
        {**TWO, **common, "train.run_dir": str(tmp_path / "two")},
        [sys.executable, str(driver)],
        WAITS_OUT=str(tmp_path / "waits"),
    )
    outs = _finish(procs)
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out}"

    # Each step's host waits: only the metrics of the step before (none after step 1), read one
    # step late, with the stop flags among them; no stop check of its own. (The last step also
    # evaluates and checkpoints.) Before the flags rode along, it was [1, 2, 2]: an all-gather too.
    for i in range(2):
        waits = json.loads((tmp_path / f"waits{i}").read_text())
        assert len(waits) == 4 and waits[:-1] == [0, 1, 1], f"process {i}: {waits}"

    # The same run in this process: one process, all 8 devices, another mesh.
    one = dict(common, **{"train.run_dir": str(tmp_path / "one"), "mesh.data": "4", "mesh.tensor": "2"})
    cfg = apply_overrides(load_config(TINY), one)
    with jax.set_mesh(None):
        ref = train.run(cfg, resume=False)

    # Not bitwise: the runs split the batch over 2 vs 4 devices, so each step adds its n = 8 x 32 =
    # 256 token terms in another order; float32 rounds such a sum to ~sqrt(n) x eps = 16 x 1.19e-7
    # = 1.9e-6 relative, so the losses agree within rel=1e-5. A parameter: its 4 updates are each
    # rounded once (4 x eps relative: rtol 1e-6), and a gradient element off by d moves an Adam
    # update by at most lr x d / optim.eps (the update's slope in g, steepest at g = 0), with d <=
    # sqrt(n) x eps x 0.25 (0.25 bounds the sum of |per-token terms| of any gradient element of
    # this model at init; 0.21 at most, in the embedding) and lr summed over the 4 warmup steps.
    n, eps = 8 * 32, 1.19e-7
    lr_sum = sum(cfg.optim.lr * (s + 1) / cfg.optim.warmup_steps for s in range(4))
    atol = lr_sum * n**0.5 * eps * 0.25 / cfg.optim.eps  # 1.4e-5, ~5% of the first update (lr)
    run = tmp_path / "two" / cfg.name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    assert summary["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
    _, params, step, _ = checkpoint.load_params(run)  # written by both processes together
    ref_params = checkpoint.load_params(tmp_path / "one" / cfg.name).params
    assert step == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=atol),
        jax.device_get(params),
        jax.device_get(ref_params),
    )

    # Only process 0 logs: its lines appear once in log.txt, and process 1 prints none.
    log = (run / "log.txt").read_text().splitlines()
    assert [line.split("|")[0].strip() for line in log if line.startswith("step") and "val" not in line] == [
        f"step      {s}" for s in range(1, 5)
    ]
    assert "mesh {'data': 1, 'fsdp': 2, 'expert': 1, 'context': 1, 'tensor': 2} on 4 cpu device(s)" in log[0]
    assert "step      4" in outs[0] and "step " not in outs[1] and "jaxlm:" not in outs[1], outs[1]
    assert len(list((run / "tb").iterdir())) == 1


def _until_stopped(tiny_data: str, run_dir: Path, every: int) -> dict:
    """Settings of a run of both processes that goes on until stopped, saving every ``every`` steps."""
    return {
        **TWO,
        "data.dir": tiny_data,
        "train.run_dir": str(run_dir),
        "train.steps": "100000",
        "train.eval_every": "0",
        "checkpoint.every": str(every),
    }


def test_a_signal_to_one_process_stops_both_at_the_same_step(tiny_data, tmp_path):
    # checkpoint.every=0: only the end of a run saves, so any checkpoint is the signal's doing.
    procs = _start_two(_until_stopped(tiny_data, tmp_path, 0), [sys.executable, "-m", "jaxlm.cli"])
    try:
        lines = _read_until(procs[0], lambda s: s >= 2)  # only process 0 logs
        procs[1].send_signal(signal.SIGTERM)  # process 1 alone sees it
    except BaseException:
        for p in procs:
            p.kill()
        raise
    outs = _finish(procs, lines)
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out}"
    assert "SIGTERM: finishing this step" in outs[1]
    stopped_at = int(re.search(r"stopped by a signal to another process at step (\d+);", outs[0])[1])
    run = tmp_path / "tiny"
    assert checkpoint.complete_steps(run / "checkpoints") == [stopped_at]  # both wrote the same step
    checkpoint.verify(run / "checkpoints" / str(stopped_at))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped by a signal to another process" and summary["step"] == stopped_at


def _children(pid: int) -> dict[int, int]:
    """{JAXLM_PROCESS_ID: pid} of the processes ``pid`` started (Linux /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
                found[int(env["JAXLM_PROCESS_ID"])] = int(proc.name)
        except (OSError, KeyError, IndexError, ValueError):
            continue  # gone meanwhile, or not one of ours
    return found


def test_kill9_of_one_process_ends_the_other_with_one_line_and_local_sh_waits(tiny_data, tmp_path):
    # The kill comes right after the first checkpoint, so the survivor meets the loss in a train
    # step, not in the next save (which would report its own failure first).
    sets = _until_stopped(tiny_data, tmp_path, 10)
    ckpts = tmp_path / "tiny" / "checkpoints"
    env = dict(os.environ, **CPU2, NPROC="2", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    launcher = subprocess.Popen(
        [str(ROOT / "launch" / "local.sh"), str(TINY), *(f"{k}={v}" for k, v in sets.items())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _read_until(launcher, lambda s: bool(checkpoint.complete_steps(ckpts)))
        os.kill(_children(launcher.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        # Output ends when every holder of the pipe is gone: local.sh and the survivor too.
        out = "".join(lines) + launcher.communicate(timeout=60)[0]
        waited = time.monotonic() - killed
    finally:
        if launcher.poll() is None:  # the test failed: stop what is left of the run
            for pid in [*_children(launcher.pid).values(), launcher.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            launcher.wait()
    assert waited < 30, out  # the survivor left by itself: a liveness bound, not a timing
    assert launcher.returncode == 128 + signal.SIGKILL, out
    assert "local.sh: process 1 of 2 was killed by SIGKILL" in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    m = re.fullmatch(
        r"error: process 1 of 2 was lost \(no heartbeat for 10 s\); the last complete checkpoint is "
        r"(\S+) \(step (\d+)\); run again to resume",
        errors[0],
    )
    assert m, errors[0]
    assert "Traceback" not in out and "stack trace" not in out, out
    assert m[1] == str(ckpts / m[2]) and checkpoint.complete_steps(ckpts)[-1] == int(m[2])
    checkpoint.verify(ckpts / m[2])


# --------------------------------------------------------------------------------------------
# How a process finds its peers (no process is started here).
# --------------------------------------------------------------------------------------------

_ENV = (
    "JAXLM_COORDINATOR",
    "JAXLM_NUM_PROCESSES",
    "JAXLM_PROCESS_ID",
    "JAXLM_DISTRIBUTED",
    "JOB_COMPLETION_INDEX",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "JAXLM_PEER_TIMEOUT",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_initializes_nothing(clean_env):
    assert distributed.initialize(MeshConfig()) == ""
    clean_env.setenv("SLURM_NTASKS", "4")  # inside an sbatch script but outside srun: one process
    assert distributed.detect_cluster() == ""


@pytest.mark.parametrize(
    "var, value, name",
    [
        ("SLURM_STEP_NUM_TASKS", "8", "slurm"),
        ("OMPI_COMM_WORLD_SIZE", "2", "openmpi"),
        ("TPU_WORKER_HOSTNAMES", "t1-w-0,t1-w-1", "tpu"),
        ("MEGASCALE_COORDINATOR_ADDRESS", "10.0.0.2:8080", "tpu multislice"),
        ("JAXLM_DISTRIBUTED", "auto", "JAXLM_DISTRIBUTED=auto"),
    ],
)
def test_cluster_launchers_are_detected(clean_env, var, value, name):
    clean_env.setenv(var, value)
    assert distributed.detect_cluster() == name


def test_incomplete_or_bad_settings_name_what_is_missing(clean_env):
    clean_env.setenv("JAXLM_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match="needs mesh.coordinator_address.*address='', num_processes=2"):
        distributed.initialize(MeshConfig())
    clean_env.setenv("JAXLM_COORDINATOR", "10.0.0.1:1234")
    clean_env.setenv("JOB_COMPLETION_INDEX", "5")  # a Kubernetes indexed Job's pod index
    with pytest.raises(ConfigError, match=r"mesh.process_id=5 must be in \[0, mesh.num_processes=2\)"):
        distributed.initialize(MeshConfig())
    with pytest.raises(ConfigError, match="coordinator_address='node0' must be host:port"):
        distributed.initialize(dataclasses.replace(MeshConfig(), coordinator_address="node0", process_id=1))
    clean_env.setenv("JAXLM_PROCESS_ID", "one")
    with pytest.raises(ConfigError, match="JAXLM_PROCESS_ID='one' must be an integer"):
        distributed.initialize(MeshConfig())


def test_the_peer_timeout_is_seconds_below_jaxs_own(clean_env):
    assert distributed.peer_timeout() == 10
    clean_env.setenv("JAXLM_PEER_TIMEOUT", "4.5")
    assert distributed.peer_timeout() == 4.5
    for bad in ("ten", "1", "100"):  # JAX aborts every process after 100 s without a heartbeat
        clean_env.setenv("JAXLM_PEER_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=rf"JAXLM_PEER_TIMEOUT='{bad}' must be seconds in \[3, 100\)"):
            distributed.peer_timeout()
