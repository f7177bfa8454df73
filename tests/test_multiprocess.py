"""Multi-process training: two real processes on this machine (jax.distributed over localhost,
gloo CPU collectives) train through the ``jaxlm train`` CLI and match one process; plus how
``distributed.initialize`` finds its peers."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, distributed, train
from jaxlm.config import ConfigError, MeshConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tiny_data, tmp_path):
    # fsdp=2 spans the two processes (each holds half the batch rows and half of every weight);
    # tensor=2 stays inside each process. Two micro-batches exercise the accumulation split.
    common = {
        "data.dir": tiny_data,
        "train.steps": "3",
        "train.batch_size": "8",
        "train.micro_batches": "2",
        "train.log_every": "1",
        "train.eval_batches": "1",
        "model.vocab_multiple": "8",  # 257 -> 264, divisible by tensor=2
        "optim.eps": "1e-4",  # keeps Adam from magnifying float rounding in tiny gradients
    }
    two = dict(common, **{"train.run_dir": str(tmp_path / "two"), "mesh.data": "1", "mesh.fsdp": "2"})
    two["mesh.tensor"] = "2"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAXLM_COORDINATOR=f"127.0.0.1:{_free_port()}",
        JAXLM_NUM_PROCESSES="2",
    )
    cmd = [
        sys.executable,
        "-m",
        "jaxlm.cli",
        "train",
        str(TINY),
        "--set",
        *(f"{k}={v}" for k, v in two.items()),
    ]
    procs = [
        subprocess.Popen(
            cmd,
            env=dict(env, JAXLM_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out}"

    # The same run in this process: one process, all 8 devices, another mesh.
    one = dict(common, **{"train.run_dir": str(tmp_path / "one"), "mesh.data": "4", "mesh.tensor": "2"})
    cfg = apply_overrides(load_config(TINY), one)
    with jax.set_mesh(None):
        ref = train.run(cfg, resume=False)

    run = tmp_path / "two" / cfg.name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    assert summary["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
    _, params, step, _ = checkpoint.load_params(run)  # written by both processes together
    ref_params = checkpoint.load_params(tmp_path / "one" / cfg.name).params
    assert step == 3
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6),
        jax.device_get(params),
        jax.device_get(ref_params),
    )

    # Only process 0 logs: its lines appear once in log.txt, and process 1 prints none.
    log = (run / "log.txt").read_text().splitlines()
    assert [line.split("|")[0].strip() for line in log if line.startswith("step") and "val" not in line] == [
        "step      1",
        "step      2",
        "step      3",
    ]
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2} on 4 cpu device(s)" in log[0]
    assert "step      3" in outs[0] and "step " not in outs[1] and "jaxlm:" not in outs[1], outs[1]
    assert len(list((run / "tb").iterdir())) == 1


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
