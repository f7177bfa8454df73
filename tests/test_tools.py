"""The usual tools: Weights & Biases beside TensorBoard (offline, read back from the run file it
writes), jax.profiler traces of `jaxlm train --profile` and `jaxlm bench --profile` naming the train
step, and a real one-node SLURM cluster running launch/slurm.sbatch and a sweep's job array."""

import json
import struct
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import bench, cli, profile, report, sweep

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Weights & Biases.
# --------------------------------------------------------------------------------------------


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
    pytest.importorskip("wandb", reason="wandb is in the test extra: pip install -e '.[test]'")
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
    records = read_wandb_records(wandb_file)
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
    """`--profile 5:7` traces steps 5 and 6 of 8 into <run>/profile/, each named train_step;
    `--profile 2` the 2 steps after the run's first."""
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
    assert profile.parse_steps("3") == (None, 3) and profile.parse_steps("5:8") == (5, 8)


def test_bench_profile_names_each_traced_step(tiny_cfg, tmp_path):
    r = bench.run_bench(tiny_cfg, 1, 0, matmul_n=64, profile_dir=str(tmp_path / "prof"), ceiling=False)
    folder = Path(r["profile"]["trace"]).parent
    assert traced_steps(folder) == [1, 2, 3] and "jit_train_step" in r["profile"]["modules"]
