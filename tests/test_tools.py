"""The usual tools: Weights & Biases beside TensorBoard (offline, read back from the run file it
writes), jax.profiler traces of `jaxlm train --profile` and `jaxlm bench --profile` naming the train
step, and a real one-node SLURM cluster running launch/slurm.sbatch and a sweep's job array."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import bench, cli, profile, report, sweep, train
from jaxlm.config import apply_overrides, load_config
from jaxlm.metrics import RunLogger

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Weights & Biases.
# --------------------------------------------------------------------------------------------


def finished_wandb_records(path: Path, timeout: float = 60) -> list:
    """``read_wandb_records`` once the file holds the run's record and its history: W&B's service
    process may still be writing the file when ``finish()`` returns on a loaded machine (seen once in
    CI: a resumed run's file without them). A wait for a writer, not a timing check."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path) if path.stat().st_size >= 7 else []  # 7: the file header
        kinds = {r.WhichOneof("record_type") for r in records}
        if {"run", "history"} <= kinds or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def read_wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` run file: LevelDB's log format (32 KiB blocks of records, each
    a 7-byte header: CRC32C, length, type full/first/middle/last) after W&B's 7-byte file header,
    every record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, parts, block = [], b"", 32768
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes, too few for a header, are padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zeros: the preallocated rest of the file
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def test_wandb_run_of_a_sweep_logs_what_tensorboard_logs(tiny_data, tmp_path, monkeypatch):
    """A sweep's run with train.loggers=tensorboard,wandb, in W&B's offline mode: the W&B run is
    named after the run, grouped under its sweep, carries the run's config, and its history holds
    every scalar of the TensorBoard events at the same steps with the same values."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_PROJECT", "jaxlm-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # W&B's console capture would fight pytest's
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")  # no system-metrics process in a test
    (tmp_path / "wandb_dir").mkdir()
    experiment = tmp_path / "wb_sweep.py"
    experiment.write_text(
        textwrap.dedent(
            f'''
            """Run: - Expect: -"""
            from jaxlm import sweep
            from jaxlm.config import load_experiment

            def get_config():
                return load_experiment({str(ROOT / "experiments" / "tiny.py")!r}).get_config()

            def get_sweep():
                return sweep.grid({{"optim.lr": [0.002]}})
            '''
        )
    )
    sets = [
        f"data.dir={tiny_data}",
        f"train.run_dir={tmp_path / 'runs'}",
        "train.loggers=tensorboard,wandb",
        "train.steps=4",
        "train.log_every=2",
        "train.eval_every=4",
        "train.eval_batches=1",
        "checkpoint.every=0",
        "mesh.data=8",
    ]
    runs = sweep.expand(experiment, sets)
    sweep.write_sweep_file(runs, experiment, sets)  # as `jaxlm sweep` does before any run starts
    assert sweep.run_index(runs, 0) == 0
    run = runs[0].path

    (wandb_file,) = (tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb")
    records = finished_wandb_records(wandb_file)
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (meta.project, meta.run_group, meta.display_name) == ("jaxlm-test", "wb_sweep", run.name)
    assert meta.run_id == (run / "wandb_id.txt").read_text().strip()
    config = {item.key: json.loads(item.value_json) for item in meta.config.update}
    assert config["train"]["loggers"] == ["tensorboard", "wandb"] and config["optim"]["lr"] == 0.002

    logged: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = r.history.item
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in items}
            for key, value in row.items():
                if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    logged.setdefault(key, []).append((row["_step"], value))
    tags = ("train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "val/loss", "val/perplexity")
    curves = report.read_curves(run / "tb", tags)
    assert set(curves) == set(tags) and [s for s, _ in curves["train/loss"]] == [2, 4]
    for tag in tags:
        # TensorBoard keeps a float32, W&B the float64 it was given: rounded, they are the same number
        wb = [(s, float(np.float32(v))) for s, v in logged[tag]]
        assert wb == curves[tag], tag

    # Resumed (as train.run does from a checkpoint), the run logs on under the same W&B id; with
    # W&B alone, no TensorBoard events are added.
    events = sorted((run / "tb").iterdir())
    log = RunLogger(run, 6, 4, ("wandb",), {"train": {"steps": 6}})
    log.scalars(6, {"loss": 1.5}, prefix="train/")
    log.close()
    assert sorted((run / "tb").iterdir()) == events
    (_, resumed) = sorted((tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb"))
    records = finished_wandb_records(resumed)
    assert [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"] == [meta.run_id]
    rows = [r.history.item for r in records if r.WhichOneof("record_type") == "history"]
    assert [{i.nested_key[0]: json.loads(i.value_json) for i in row}["train/loss"] for row in rows] == [1.5]


def test_wandb_asked_for_but_not_installed_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    rc = cli.main(["train", "experiments/tiny.py", "--set", "train.loggers=tensorboard,wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: train.loggers includes 'wandb'")
    assert "pip install 'jaxlm[wandb]'" in err[0]
    assert cli.main(["train", "experiments/tiny.py", "--set", "train.loggers=mlflow"]) == 2
    assert "choose one of ['tensorboard', 'wandb']" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Profiling.
# --------------------------------------------------------------------------------------------


def traced_steps(folder: Path) -> list[int]:
    """The step numbers of the ``train_step`` annotations in a trace folder's ``*.xplane.pb``,
    parsed by jax's own reader of the XSpace proto, the file TensorBoard's profile plugin opens."""
    (xplane,) = folder.glob("*.xplane.pb")
    assert b"train_step" in xplane.read_bytes()
    steps = []
    for plane in jax.profiler.ProfileData.from_file(str(xplane)).planes:
        for line in plane.lines:
            steps += [int(dict(e.stats)["step_num"]) for e in line.events if e.name == profile.STEP_NAME]
    return sorted(steps)


def test_train_profile_traces_the_steps_asked_for(tiny_data, tmp_path, capsys):
    """`--profile 5:7` traces steps 5 and 6 of 8 into <run>/profile/, each named train_step."""
    runs = tmp_path / "runs"
    args = ["train", "experiments/tiny.py", "--set", f"data.dir={tiny_data}", f"train.run_dir={runs}"]
    args += ["train.eval_every=0", "checkpoint.every=0", "mesh.data=8"]
    assert cli.main([*args, "train.steps=8", "--profile", "5:7"]) == 0
    (folder,) = (runs / "tiny" / "profile" / "plugins" / "profile").iterdir()
    assert traced_steps(folder) == [5, 6]
    assert f"profile: steps 5..6 traced into {folder}" in (runs / "tiny" / "log.txt").read_text()
    capsys.readouterr()
    # a window outside the steps a run trains (this one continues at step 9) is refused before
    # anything is written
    before = {p: p.read_bytes() for p in (runs / "tiny").rglob("*") if p.is_file()}
    assert cli.main([*args, "train.steps=10", "--profile", "8:10"]) == 2
    assert "steps 8..9 are not all among the steps this run trains, 9..10" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (runs / "tiny").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("text", ["0", "x", "3:3", "0:2", "4:2", "1:x"])
def test_profile_steps_refuses_what_is_not_a_window(text):
    with pytest.raises(cli.ConfigError, match="give a step count N >= 1"):
        profile.parse_steps(text)


def test_profile_n_is_the_n_steps_after_the_first_this_run_trains(tmp_path):
    assert profile.parse_steps("3") == (None, 3) and profile.parse_steps("5:8") == (5, 8)
    window = profile.run_window(tmp_path, profile.parse_steps("3"), 0, 10)  # a fresh run: steps 1..10
    assert (window.first, window.stop) == (2, 5)
    window = profile.run_window(tmp_path, profile.parse_steps("3"), 6, 10)  # resumed: steps 7..10
    assert (window.first, window.stop) == (8, 11)
    with pytest.raises(cli.ConfigError, match="steps 9..11 are not all among the steps this run trains"):
        profile.run_window(tmp_path, profile.parse_steps("3"), 7, 10)
    assert profile.run_window(tmp_path, None, 0, 10).log_dir is None  # no --profile: nothing traced


def test_bench_profile_names_each_traced_step(tiny_cfg, tmp_path):
    r = bench.run_bench(tiny_cfg, 1, 0, matmul_n=64, profile_dir=str(tmp_path / "prof"), ceiling=False)
    folder = Path(r["profile"]["trace"]).parent
    assert traced_steps(folder) == [1, 2, 3] and "jit_train_step" in r["profile"]["modules"]


# --------------------------------------------------------------------------------------------
# A real SLURM: the one-node cluster of launch/slurm_localhost.sh, which .ci/run starts.
# --------------------------------------------------------------------------------------------

TINY = ROOT / "experiments" / "tiny.py"
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL")


@pytest.fixture
def slurm():
    """A SLURM controller that answers, with a node that takes jobs. CI must have one (.ci/run
    installs Debian's slurm-wlm and munge and runs launch/slurm_localhost.sh), so there its absence
    fails, unless .ci/run itself said why it could not start one (JAXLM_NO_SLURM: not root, no
    apt-get, or the install failed; it prints a warning too); elsewhere the tests are skipped,
    saying how to start one."""
    how = "as root: apt-get install -y slurm-wlm munge && launch/slurm_localhost.sh"
    if shutil.which("sbatch") is None:
        problem = "sbatch is not on PATH"
    else:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        states = out.stdout.split()
        usable = [s for s in states if s.rstrip("*") in ("idle", "mixed", "allocated", "completing")]
        problem = "" if out.returncode == 0 and usable else f"sinfo: {(out.stderr or out.stdout).strip()!r}"
    if problem:
        if os.environ.get("CI") and not os.environ.get("JAXLM_NO_SLURM"):
            pytest.fail(f"no SLURM cluster in CI ({problem}); .ci/run must start one: {how}")
        why = os.environ.get("JAXLM_NO_SLURM")
        pytest.skip(f"no SLURM cluster here ({why or problem}); to run these tests, {how}")


def wait_for_job(job_id: str, timeout: float = 600) -> list[str]:
    """The final states of job ``job_id`` (of each task of an array), polled every 0.2 s: sooner
    than ``sbatch --wait``, which looks every few seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
        states = re.findall(r"\bJobState=(\S+)", out.stdout)
        if states and all(s in DONE for s in states):
            return states
        time.sleep(0.2)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"SLURM job {job_id} still running after {timeout} s: {out.stdout}")


def submitted_job(text: str) -> str:
    (job_id,) = re.findall(r"Submitted batch job (\d+)", text)
    return job_id


def test_slurm_sbatch_trains_2_processes_x_4_cpu_devices_like_one_process(slurm, tiny_data, tmp_path):
    """launch/slurm.sbatch as written, submitted with 2 tasks on one node: srun starts 2 processes
    that meet through SLURM's variables (jaxlm/distributed.py) and train on 2 x 4 fake CPU devices
    (CPU_DEVICES=4), one data-parallel mesh of 8. Its losses are this process's run on its 8."""
    sets = {
        "data.dir": tiny_data,
        "train.steps": "4",
        "train.log_every": "1",
        "train.eval_every": "4",
        "train.eval_batches": "1",
        "checkpoint.every": "0",
        "mesh.data": "8",
        "optim.eps": "1e-4",  # as in test_multiprocess: bounds how Adam magnifies rounding
    }
    env = dict(
        os.environ,
        CPU_DEVICES="4",
        JAXLM_PYTHON=sys.executable,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    )
    resources = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
    script = [str(ROOT / "launch" / "slurm.sbatch"), str(TINY)]
    script += [f"{k}={v}" for k, v in {**sets, "train.run_dir": str(tmp_path / "slurm")}.items()]
    submit = subprocess.run(
        ["sbatch", *resources, f"--output={tmp_path}/job-%j.out", *script],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job_id = submitted_job(submit.stdout)

    # Meanwhile, the same run here: one process, its 8 devices.
    cfg = apply_overrides(load_config(TINY), {**sets, "train.run_dir": str(tmp_path / "one")})
    ref = train.run(cfg, resume=False)

    states = wait_for_job(job_id)
    out = (tmp_path / f"job-{job_id}.out").read_text()
    assert states == ["COMPLETED"], out
    assert "jaxlm: 1 nodes x 2 processes" in out and "on 8 cpu device(s)" in out, out
    summary = json.loads((tmp_path / "slurm" / "tiny" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 4
    # Not bitwise: one program on 8 devices, but its all-reduces of the gradients run across two
    # processes (gloo) instead of within one, in another order. test_multiprocess derives rel=1e-5
    # for this model and batch: each step's n = 8 x 32 token terms rounded in another order,
    # ~sqrt(n) x eps = 1.9e-6 relative, through 4 Adam steps with optim.eps=1e-4.
    assert summary["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    assert summary["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)


def test_sweep_on_slurm_runs_its_array_to_the_end_and_reports(
    slurm, tiny_data, tmp_path, monkeypatch, capsys
):
    """`jaxlm sweep --executor slurm`: a job array of launch/slurm.sbatch --sweep, one task per run
    (2 at once, one process each), trains both runs to the end; `jaxlm report` tables them."""
    experiment = tmp_path / "slurm_sweep.py"
    experiment.write_text(
        textwrap.dedent(
            f'''
            """Run: - Expect: -"""
            from jaxlm import sweep
            from jaxlm.config import load_experiment

            def get_config():
                return load_experiment({str(TINY)!r}).get_config()

            def get_sweep():
                return sweep.grid({{"train.seed": [0, 1]}})
            '''
        )
    )
    sets = [f"data.dir={tiny_data}", f"train.run_dir={tmp_path / 'runs'}", "train.steps=3"]
    sets += ["train.log_every=1", "train.eval_every=3", "train.eval_batches=1", "checkpoint.every=0"]
    monkeypatch.setenv("CPU_DEVICES", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    # one task of one CPU each; --oversubscribe lifts the script's --exclusive, so both run at once
    resources = "--nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --gpus-per-node=0 --oversubscribe"
    args = ["sweep", str(experiment), "--set", *sets]
    assert cli.main([*args, "--executor", "slurm", "--parallel", "2", "--sbatch", resources]) == 0
    job_id = submitted_job(capsys.readouterr().out)
    states = wait_for_job(job_id)
    root = tmp_path / "runs" / "slurm_sweep"
    logs = "\n".join(p.read_text() for p in sorted(root.glob(f"slurm-{job_id}_*.out")))
    assert states == ["COMPLETED", "COMPLETED"], logs
    runs = sweep.expand(experiment, sets)
    for r in runs:
        summary = json.loads((r.path / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["step"] == 3, logs
    assert cli.main([*args, "--executor", "slurm"]) == 0  # nothing left to submit
    assert "2 run(s), 2 finished, 0 to run" in capsys.readouterr().out
    assert cli.main(["report", str(root)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and all(r.name in "\n".join(table) for r in runs), table
    assert all("finished" in line for line in table[1:]), table
