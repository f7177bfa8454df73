"""Sweeps: declaration and expansion, bad input refused before anything runs, the local and SLURM
executors, failures recorded, and a real 4-run sweep of the tiny preset end to end with a report."""

import csv
import dataclasses
import json
import math
import shutil
import statistics
import sys
import textwrap
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from tolerances import F32_EPS

from jaxlm import cli, report, sweep
from jaxlm.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SWEEP_TINY = ROOT / "experiments" / "sweep_tiny.py"
FAST = [
    "train.steps=6",
    "train.eval_every=3",
    "train.log_every=1",
    "train.eval_batches=2",
    "checkpoint.every=3",
]


def base_set(tiny_data: str, tmp_path: Path) -> list[str]:
    return [f"data.dir={tiny_data}", f"train.run_dir={tmp_path / 'runs'}", *FAST]


def write_experiment(tmp_path: Path, sweep_body: str, name: str = "exp") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(
        textwrap.dedent(
            f'''
            """Run: - Expect: -"""
            from jaxlm import sweep
            from jaxlm.config import load_experiment

            def get_config():
                return load_experiment({str(ROOT / "experiments" / "tiny.py")!r}).get_config()

            def get_sweep():
                return {sweep_body}
            '''
        )
    )
    return path


# --------------------------------------------------------------------------------------------
# Declaration.
# --------------------------------------------------------------------------------------------


def test_grid_zip_product_and_concatenation():
    g = sweep.grid({"optim.lr": [1e-3, 3e-3], "model.n_layers": [1, 2, 3]})
    assert len(g) == 6
    assert {(r["optim.lr"], r["model.n_layers"]) for r in g} == {
        (lr, n) for lr in (1e-3, 3e-3) for n in (1, 2, 3)
    }
    z = sweep.zipped({"model.n_layers": [1, 2], "model.d_model": [32, 64]})
    assert list(z) == [{"model.n_layers": 1, "model.d_model": 32}, {"model.n_layers": 2, "model.d_model": 64}]
    both = sweep.grid({"optim.lr": [1e-3, 3e-3]}) * z
    assert len(both) == 4 and {"optim.lr": 3e-3, "model.n_layers": 2, "model.d_model": 64} in list(both)
    assert len(both + z) == 6
    with pytest.raises(ConfigError, match="same number of values"):
        sweep.zipped({"model.n_layers": [1, 2], "model.d_model": [32]})
    with pytest.raises(ConfigError, match=r"both factors set \['model.n_layers'\]"):
        g * z
    with pytest.raises(ConfigError, match="'optim.lr' has no values"):
        sweep.grid({"optim.lr": []})


def test_random_sampling_is_seeded_and_in_range():
    space = {
        "optim.lr": sweep.log_uniform(1e-4, 1e-1),
        "model.n_layers": [1, 2, 4],
        "optim.b1": sweep.uniform(0.8, 0.9),
    }
    a, b = sweep.sample(space, 16, seed=3), sweep.sample(space, 16, seed=3)
    assert a == b and a != sweep.sample(space, 16, seed=4)
    assert len(a) == 16
    for run in a:
        assert 1e-4 <= run["optim.lr"] <= 1e-1 and 0.8 <= run["optim.b1"] <= 0.9
        assert run["model.n_layers"] in (1, 2, 4) and type(run["model.n_layers"]) is int
    assert len({r["optim.lr"] for r in a}) > 8  # actually random, not one value repeated
    assert {r["model.n_layers"] for r in a} == {1, 2, 4}


def test_size_axis_sets_the_shape_and_the_steps_of_its_token_budget():
    from jaxlm import bench, lm
    from jaxlm.config import apply_overrides, load_config

    base = load_config(ROOT / "experiments" / "tiny.py")  # batch 8 x seq_len 32: 256 tokens a step
    runs = list(sweep.sizes(base, [(32, 1), (64, 3)], head_dim=16, tokens_per_param=20))
    assert [{k: v for k, v in r.items() if k != "train.steps"} for r in runs] == [
        {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 128},
        {"model.d_model": 64, "model.n_layers": 3, "model.n_heads": 4, "model.d_ff": 256},
    ]
    for run in runs:
        model_cfg = apply_overrides(base, run).model
        tokens = run["train.steps"] * 256
        assert abs(tokens - 20 * lm.get(model_cfg).flop_params) <= 128  # rounded to the nearest step
    assert runs[1]["train.steps"] > 5 * runs[0]["train.steps"]  # the budget grows with N

    iso = list(sweep.sizes(base, [(32, 1), (64, 3)], head_dim=16, flops=1e13))
    for run in iso:  # one compute budget: fewer steps for the larger model
        per_step = bench.flops_per_token(apply_overrides(base, run).model)["total"] * 256
        assert abs(run["train.steps"] * per_step - 1e13) <= per_step / 2
    assert iso[0]["train.steps"] > iso[1]["train.steps"]

    with pytest.raises(ConfigError, match="exactly one of tokens_per_param= and flops="):
        sweep.sizes(base, [(32, 1)], head_dim=16)
    with pytest.raises(ConfigError, match="d_model=40 is not a multiple of head_dim=16"):
        sweep.sizes(base, [(40, 1)], head_dim=16, tokens_per_param=20)


def test_run_names_are_readable_unique_and_change_with_base_overrides(tiny_data, tmp_path):
    runs = sweep.expand(SWEEP_TINY, base_set(tiny_data, tmp_path))
    names = [r.name for r in runs]
    assert len(set(names)) == 4 and names[0].startswith("lr0.001_n_layers1-")
    assert names == [r.name for r in sweep.expand(SWEEP_TINY, base_set(tiny_data, tmp_path))]  # stable
    assert all(r.path == tmp_path / "runs" / "sweep_tiny" / r.name for r in runs)
    assert runs[3].cfg.optim.lr == 3e-3 and runs[3].cfg.model.n_layers == 2 and runs[3].cfg.train.steps == 6
    longer = sweep.expand(SWEEP_TINY, [*base_set(tiny_data, tmp_path), "train.steps=7"])
    assert not set(names) & {r.name for r in longer}


# --------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing written.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, needle",
    [
        ('sweep.grid({"optim.lrr": [1e-3]})', "unknown config key 'optim.lrr'; valid keys in 'optim'"),
        (
            'sweep.grid({"model.n_layers": [2, 2.5]})',
            "sweep run 1 {'model.n_layers': 2.5}: model.n_layers=2.5",
        ),
        ('sweep.grid({"model.n_heads": [4, 3]})', "sweep run 1 {'model.n_heads': 3}: model.d_model"),
        ("sweep.Sweep(())", "expands to no runs"),
        ('sweep.grid({"name": ["a"]})', "the sweep sets ['name'] itself"),
        ('sweep.grid({"optim.lr": [1e-3, 0.001]})', "same overrides as run 0"),
        ('{"optim.lr": [1e-3]}', "returned dict, expected jaxlm.sweep.Sweep"),
    ],
)
def test_bad_sweeps_fail_before_anything_runs(tiny_data, tmp_path, capsys, body, needle):
    exp = write_experiment(tmp_path, body)
    assert cli.main(["sweep", str(exp), "--set", *base_set(tiny_data, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(exp) in err
    assert not (tmp_path / "runs").exists()


def test_bad_base_override_and_parallel_are_refused(tiny_data, tmp_path, capsys):
    sets = base_set(tiny_data, tmp_path)
    assert cli.main(["sweep", str(SWEEP_TINY), "--set", *sets, "train.steps=ten"]) == 2
    assert "train.steps='ten' is not an integer" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--parallel 3 does not split 8 gpu devices evenly; use one of"):
        sweep.device_envs(3, "gpu", 8, {})
    assert not (tmp_path / "runs").exists()


def test_device_subsets_are_disjoint():
    envs = sweep.device_envs(2, "cpu", 8, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
    assert envs == [{"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=4"}] * 2
    envs = sweep.device_envs(2, "gpu", 4, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert envs == [{"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
    assert sweep.device_envs(4, "gpu", 8, {})[3] == {"CUDA_VISIBLE_DEVICES": "6,7"}
    # CPU devices share the same cores: any N runs at once, each with at least one device.
    assert (
        sweep.device_envs(3, "cpu", 1, {}) == [{"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}] * 3
    )


# --------------------------------------------------------------------------------------------
# Failures are recorded and do not stop the others; SLURM arrays.
# --------------------------------------------------------------------------------------------


def test_a_failed_run_is_recorded_and_the_others_go_on(tiny_data, tmp_path, capsys):
    runs = sweep.expand(SWEEP_TINY, base_set(tiny_data, tmp_path))
    crash = [sys.executable, "-c", "import sys; print('boom: out of memory'); sys.exit(3)"]
    finish = [
        sys.executable,
        "-c",
        "import json, sys; open(sys.argv[1], 'w').write(json.dumps({'status': 'finished'}))",
    ]
    runs = [
        dataclasses.replace(r, command=crash if r.index == 1 else [*finish, str(r.path / "summary.json")])
        for r in runs
    ]
    results = sweep.run_local(runs, parallel=2)
    assert [results[r.name] for r in runs] == ["finished", "failed", "finished", "finished"]
    failed = json.loads((runs[1].path / "summary.json").read_text())
    assert (
        failed["status"] == "failed"
        and failed["returncode"] == 3
        and "boom: out of memory" in failed["error"]
    )
    assert cli.main(["report", str(runs[0].path.parent)]) == 0
    out = capsys.readouterr().out
    assert f"{runs[1].name} failed:" in out and "boom: out of memory" in out
    # A failure inside an array task (here: data that cannot be prepared) is recorded the same way.
    bad = dataclasses.replace(
        runs[0],
        cfg=dataclasses.replace(
            runs[0].cfg,
            data=dataclasses.replace(runs[0].cfg.data, dir=str(tmp_path / "nodata"), inputs=("missing.txt",)),
        ),
    )
    (bad.path / "summary.json").unlink()
    with pytest.raises(ValueError, match="missing.txt"):
        sweep.run_index([bad], 0)
    summary = json.loads((bad.path / "summary.json").read_text())
    assert summary["status"] == "failed" and "missing.txt" in summary["error"]


def test_slurm_executor_submits_one_array_task_per_unfinished_run(tiny_data, tmp_path, monkeypatch, capsys):
    """The array is launch/slurm.sbatch itself (its resources and environment set-up), in --sweep
    mode, with sbatch options of --sbatch over its #SBATCH lines. (tests/test_tools.py runs it on a
    real one-node cluster.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(
        f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path}/args\n'
        f'echo "$JAXLM_PYTHON" > {tmp_path}/py\necho "Submitted batch job 42"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    sets = base_set(tiny_data, tmp_path)
    runs = sweep.expand(SWEEP_TINY, sets)
    runs[2].path.mkdir(parents=True)
    (runs[2].path / "summary.json").write_text('{"status": "finished"}')
    args = ["sweep", str(SWEEP_TINY), "--set", *sets, "--executor", "slurm", "--parallel", "2"]
    assert cli.main([*args, "--sbatch", "--nodes=1 --time=0:10:00"]) == 0
    assert "Submitted batch job 42" in capsys.readouterr().out
    root = runs[0].path.parent
    assert (tmp_path / "args").read_text().splitlines() == [
        "--job-name=sweep_tiny",
        "--array=0,1,3%2",
        f"--output={root}/slurm-%A_%a.out",
        "--nodes=1",
        "--time=0:10:00",
        str(ROOT / "launch" / "slurm.sbatch"),
        "--sweep",
        str(SWEEP_TINY),
        *sets,
    ]
    assert (tmp_path / "py").read_text().strip() == sys.executable  # the job runs this interpreter
    assert cli.main(["sweep", str(SWEEP_TINY), "--set", *sets, "--sbatch", "--nodes=1 --x=1"]) == 2
    assert "is for --executor slurm" in capsys.readouterr().err
    # An array task of a finished run does nothing.
    assert cli.main(["sweep", str(SWEEP_TINY), "--set", *sets, "--run-index", "2"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert cli.main(["sweep", str(SWEEP_TINY), "--set", *sets, "--run-index", "4"]) == 2
    assert "runs 0..3" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# End to end: a real 4-run sweep, an interruption, a resume, the report.
# --------------------------------------------------------------------------------------------


def tb_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def test_sweep_of_the_tiny_preset_end_to_end(tiny_data, tmp_path, capsys):
    sets = base_set(tiny_data, tmp_path)
    root = tmp_path / "runs" / "sweep_tiny"
    args = ["sweep", str(SWEEP_TINY), "--set", *sets]

    assert cli.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 run(s), 0 finished, 4 to run" in out
    for line in ("optim.lr=0.001 model.n_layers=1", "optim.lr=0.003 model.n_layers=2"):
        assert line in out
    assert not root.exists()

    assert cli.main([*args, "--parallel", "2"]) == 0, capsys.readouterr()
    runs = sweep.expand(SWEEP_TINY, sets)
    for r in runs:
        summary = json.loads((r.path / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["step"] == 6, (r.path / "output.log").read_text()
        assert json.loads((r.path / "config.json").read_text())["optim"]["lr"] == r.overrides["optim.lr"]
    assert "on 4 cpu device(s)" in (runs[0].path / "log.txt").read_text()  # --parallel 2 split the 8

    # Interrupt run 1 after its step-3 checkpoint: what a crash before the final save leaves.
    crashed = runs[1]
    (crashed.path / "summary.json").unlink()
    shutil.rmtree(crashed.path / "checkpoints" / "6")
    mtimes = {r.name: (r.path / "summary.json").stat().st_mtime_ns for r in runs if r is not crashed}
    capsys.readouterr()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "4 run(s), 3 finished, 1 to run" in out and f"resume    {crashed.name}" in out
    assert mtimes == {r.name: (r.path / "summary.json").stat().st_mtime_ns for r in runs if r is not crashed}
    assert "step 3 -> 6" in (crashed.path / "log.txt").read_text()
    assert json.loads((crashed.path / "summary.json").read_text())["status"] == "finished"

    # The report: numbers equal the TensorBoard events and summary.json, best val loss first.
    assert cli.main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert (
        "| optim.lr | model.n_layers | train loss | val loss | best val loss | tokens/s | steps | status"
        in out
    )
    with open(root / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["run"] for row in table] == sorted(
        (r.name for r in runs), key=lambda n: json.loads((root / n / "summary.json").read_text())["val_loss"]
    )
    for row in table:
        run, summary = root / row["run"], json.loads((root / row["run"] / "summary.json").read_text())
        assert row["status"] == "finished" and int(row["steps"]) == 6
        assert float(row["optim.lr"]) == json.loads((run / "config.json").read_text())["optim"]["lr"]
        for column, key in (
            ("train loss", "train_loss"),
            ("val loss", "val_loss"),
            ("best val loss", "best_val_loss"),
        ):
            # the table reads TensorBoard's float32 copy of summary.json's number: one rounding
            assert float(row[column]) == pytest.approx(summary[key], rel=F32_EPS)
        if row["run"] != crashed.name:  # one event file: TensorBoard's own reading is the reference
            assert float(row["val loss"]) == tb_scalars(run, "val/loss")[-1][1]
            assert float(row["train loss"]) == tb_scalars(run, "train/loss")[-1][1]
            speeds = [v for _, v in tb_scalars(run, "train/tokens_per_s")]
            assert float(row["tokens/s"]) == statistics.median(speeds[1:])
    # The resumed run logged steps 4..6 twice; the report keeps the second, resumed, copy only.
    resumed = next(r for r in report.load(root) if r.name == crashed.name)
    assert [s for s, _ in resumed.curves["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in resumed.curves["val/loss"]] == [3, 6]
    png = (root / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 150_000

    # A finished run whose saved config differs from the expansion (the experiment file was edited)
    # is not retrained silently: the listing says so.
    saved = json.loads((runs[0].path / "config.json").read_text())
    saved["optim"]["b1"] = 0.5
    (runs[0].path / "config.json").write_text(json.dumps(saved))
    assert cli.main([*args, "--dry-run"]) == 0
    assert "warning: finished with another config (optim.b1: 0.5 -> 0.9)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The report's val loss against one swept key, a line and a panel per value of two others.
# --------------------------------------------------------------------------------------------


def _fake_run(root: Path, overrides: dict, val_loss: float | None, status: str = "finished") -> None:
    """A run directory as `jaxlm sweep` leaves it, without training: overrides, summary, events."""
    from tensorboard.summary import Writer

    run = root / "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in overrides.items())
    run.mkdir(parents=True)
    (run / "overrides.json").write_text(json.dumps({"keys": list(overrides), "overrides": overrides}))
    (run / "summary.json").write_text(json.dumps({"status": status}))
    tb = Writer(str(run / "tb"))
    tb.add_scalar("train/loss", 9.0, 10)
    if val_loss is not None:
        tb.add_scalar("val/loss", val_loss, 10)
    tb.close()


def test_report_plots_val_loss_against_a_key_with_lines_and_panels(tmp_path, capsys):
    root = tmp_path / "mup_transfer"
    # best lr: standard 0.004 at width 64 and 0.001 at 256; mup 0.004 at both (a parabola per line)
    for par, width, best in [
        ("standard", 64, 0.004),
        ("standard", 256, 0.001),
        ("mup", 64, 0.004),
        ("mup", 256, 0.004),
    ]:
        for lr in (0.001, 0.002, 0.004, 0.008):
            loss = 2.0 + (math.log2(lr) - math.log2(best)) ** 2 / 10 + width / 1000
            overrides = {"model.d_model": width, "model.parametrization": par, "optim.lr": lr}
            _fake_run(root, overrides, loss)
    _fake_run(root, {"model.d_model": 256, "model.parametrization": "mup", "optim.lr": 0.016}, None, "failed")
    groups = report.grouped(report.load(root), "optim.lr", "model.d_model", "model.parametrization")
    assert list(groups) == ["mup", "standard"] and list(groups["mup"]) == [64, 256]
    assert [lr for lr, _ in groups["mup"][256]] == [0.001, 0.002, 0.004, 0.008]  # the failed run has no loss
    assert report.best_x(groups) == {"mup": {64: 0.004, 256: 0.004}, "standard": {64: 0.004, 256: 0.001}}

    args = [
        "report",
        str(root),
        "--x",
        "optim.lr",
        "--lines",
        "model.d_model",
        "--panels",
        "model.parametrization",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "model.parametrization=standard, model.d_model=256: 0.001" in out
    assert "model.parametrization=mup, model.d_model=256: 0.004" in out
    assert (root / "report_lr.png").read_bytes().startswith(b"\x89PNG")

    assert cli.main(["report", str(root), "--x", "optim.b1"]) == 2
    assert (
        "report --x optim.b1: not a swept key of these runs; swept keys: ['model.d_model'"
        in capsys.readouterr().err
    )
    assert cli.main(["report", str(root), "--lines", "model.d_model"]) == 2
    assert "--lines/--panels need --x" in capsys.readouterr().err
