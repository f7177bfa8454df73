"""The ``jaxlm`` command: help screens, fast parsing, and one ``error:`` line for every mistake."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, cli, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.py"


def _one_line(text: str, prefix: str = "error: ") -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), text
    return lines[0]


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------


def test_help_describes_every_command_and_no_command_is_a_usage_error(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (summary, *_) in cli.COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(summary)}$", out, re.M), (name, out)
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: jaxlm") and "train" in captured.err
    assert cli.main(["trian"]) == 2
    assert "invalid choice: 'trian'" in _one_line(capsys.readouterr().err)


def _option_blocks(help_text: str) -> dict[str, str]:
    """{"--seed": "--seed SEED random seed ... (default: 0)"} from a help screen, whitespace joined."""
    options = help_text.split("\noptions:\n", 1)[1]
    blocks = re.split(r"\n  (?=-)", "\n" + options)
    return {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks if b.strip().startswith("-")}


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_has_help_and_shows_its_default(name, capsys):
    assert cli.main([name, "--help"]) == 0
    blocks = _option_blocks(capsys.readouterr().out)
    parser = argparse.ArgumentParser()
    cli.COMMANDS[name][2](parser)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        block = blocks[action.option_strings[0]]
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        if action.required or action.nargs == 0 or action.default == []:
            continue  # nothing to default: required, a flag, or a repeatable list
        if action.default is None:  # then the help says in words what happens without it
            assert "default:" in block, block
        else:
            assert f"(default: {action.default})" in block, block


def test_sample_help_describes_max_new_tokens_and_seed(capsys):
    assert cli.main(["sample", "--help"]) == 0
    blocks = _option_blocks(capsys.readouterr().out)
    assert "tokens to generate per sample (default: 100)" in blocks["--max-new-tokens"]
    assert "same seed gives the same samples (default: 0)" in blocks["--seed"]


def test_train_help_says_a_run_continues_from_its_latest_checkpoint(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "continues from its latest checkpoint by default" in " ".join(out.split())
    assert "(default: continue from the run's latest checkpoint" in _option_blocks(out)["--resume"]


def test_help_and_argument_errors_import_no_heavy_module():
    """Every command's --help (and a bad argument) is answered before jax, orbax or grain load."""
    code = """
import contextlib, io, sys
from jaxlm import cli
for name in cli.COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main([name, "--help"]) == 0, name
    assert out.getvalue().startswith(f"usage: jaxlm {name}"), out.getvalue()
with contextlib.redirect_stderr(io.StringIO()):
    assert cli.main(["bench", "--steps", "ten", "experiments/tiny.py"]) == 2
heavy = {"jax", "jaxlib", "flax", "optax", "orbax", "grain", "tensorflow", "torch", "transformers"}
print(sorted(heavy & {m.split(".")[0] for m in sys.modules}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=os.environ)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# --------------------------------------------------------------------------------------------
# Experiment files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, source, where, needle",
    [
        ("train", "def get_config(:\n    return None\n", ":1: syntax error, ", "'def get_config(:'"),
        ("train", "import jaxlm\nimport no_such_module\n", ":2: running it failed", "ModuleNotFoundError"),
        (
            "train",
            'def get_config():\n    sizes = {}\n    return sizes["d"]\n',
            ":3: get_config() failed",
            "KeyError: 'd'",
        ),
        (
            "sweep",
            "def get_config(): ...\n\n\ndef get_sweep():\n    return 1 / 0\n",
            ":5: get_sweep() failed",
            "ZeroDivisionError",
        ),
    ],
)
def test_a_broken_experiment_file_is_one_line_naming_file_line_and_exception(
    tmp_path, capsys, command, source, where, needle
):
    exp = tmp_path / "broken.py"
    exp.write_text(source)
    assert cli.main([command, str(exp)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {exp}{where}") and needle in line, line


# --------------------------------------------------------------------------------------------
# A diverging run: one error line, the checkpoints before it intact
# --------------------------------------------------------------------------------------------

DIVERGES_AT = 5  # checkpoints every 2 steps: 2 and 4 are good; 6 would hold the diverged state


def _diverging(make_train_step):
    """make_train_step whose update of step DIVERGES_AT blows up, as an overflowing gradient does."""

    def make(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def step(state, batch, *stop_flags):
            state, metrics = step_fn(state, batch, *stop_flags)
            if int(state.step) == DIVERGES_AT:
                state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
                metrics = {**metrics, "grad_norm": jnp.float32(jnp.nan)}
            return state, metrics

        return step

    return make


@pytest.fixture(scope="module")
def diverged_run(tiny_data, tmp_path_factory) -> tuple[Path, int, str]:
    """(run dir, exit code, stderr) of `jaxlm train` (tiny keeps 2 checkpoints) diverging at step 5."""
    runs = tmp_path_factory.mktemp("runs")
    sets = [f"data.dir={tiny_data}", f"train.run_dir={runs}", "name=diverged", "mesh.data=8"]
    sets += ["train.steps=8", "train.log_every=1", "train.eval_every=0", "checkpoint.every=2"]
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stderr(err):
        m.setattr(train, "make_train_step", _diverging(train.make_train_step))
        rc = cli.main(["train", str(TINY), "--set", *sets])
    return runs / "diverged", rc, err.getvalue()


def test_a_diverging_run_ends_in_one_error_line_and_keeps_earlier_checkpoints(diverged_run):
    run, rc, err = diverged_run
    ckpts = run / "checkpoints"
    assert checkpoint.complete_steps(ckpts) == [2, 4]  # 6 was never written, so 2 was not rotated out
    for step in (2, 4):
        checkpoint.verify(ckpts / str(step))
    _, params, step, _ = checkpoint.load_params(run)
    assert step == 4 and all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params))
    assert rc == 1
    line = _one_line(err)
    assert line.startswith(f"error: training diverged at step {DIVERGES_AT} (loss "), line
    assert "gradient norm nan" in line and "lower optim.lr" in line and str(ckpts) in line


# --------------------------------------------------------------------------------------------
# Unreadable checkpoints
# --------------------------------------------------------------------------------------------


def _garble(step_dir: Path) -> Path:
    path = step_dir / "config" / "metadata"
    path.write_text('{"model": {"n_layers": 2,, ')
    return path


def test_garbled_json_in_the_only_checkpoints_is_named_with_a_next_step(
    diverged_run, tiny_data, tmp_path, capsys
):
    run = tmp_path / "diverged"
    shutil.copytree(diverged_run[0], run)
    ckpts = run / "checkpoints"
    garbled = [_garble(ckpts / s) for s in ("2", "4")]
    before = _snapshot(run)

    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", "x"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{garbled[1]} is not valid JSON" in line and "truncated" not in line, line
    assert f"mv {ckpts} {ckpts}.unreadable" in line and "--checkpoint" in line, line

    sets = [f"data.dir={tiny_data}", f"train.run_dir={tmp_path}", "name=diverged", "mesh.data=8"]
    assert cli.main(["train", str(TINY), "--set", *sets]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"every checkpoint in {ckpts} is unreadable" in line and f"{garbled[0]} is not valid JSON" in line
    assert "nothing was changed" in line and f"mv {ckpts} " in line and "--set name=" in line, line
    assert _snapshot(run) == before


# --------------------------------------------------------------------------------------------
# Prepare: undecodable input, progress bar
# --------------------------------------------------------------------------------------------


def test_a_binary_file_named_txt_is_refused_and_the_output_dir_is_untouched(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("A plain text corpus.\n" * 50)
    out = tmp_path / "out"
    prepare = ["prepare", "--tokenizer", "bytes", "--out", str(out), "--input"]
    assert cli.main([*prepare, str(tmp_path / "good.txt")]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    rng = np.random.default_rng(0)
    binary = tmp_path / "weights.txt"
    binary.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())

    args = [*prepare, str(tmp_path / "*.txt")]
    assert cli.main(args) == 2
    line = _one_line(capsys.readouterr().err)
    share = re.search(r": (\d+) of its 4000 bytes \((\d+\.\d)%\) are not valid UTF-8", line)
    assert line.startswith(f"error: input {str(binary)!r}") and share, line
    assert 20 < float(share[2]) < 80 and "max_undecodable=0.01" in line and "--max-undecodable" in line
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.txt", "out", "weights.txt"]  # no temp dir

    assert cli.main([*args, "--max-undecodable", "0.9"]) == 0  # accepted above the share, with a warning
    (warning,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert f"{binary} {int(share[1]) / 4000:.2%} ({share[1]} of 4000 bytes)" in warning, warning
    assert "good.txt" not in warning


def test_a_large_binary_file_is_refused_after_its_first_piece(tmp_path, capsys, monkeypatch):
    from jaxlm.data import prepare as prepare_mod

    monkeypatch.setattr(prepare_mod, "_PIECE_BYTES", 1000)
    big = tmp_path / "big.txt"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes())
    read, real = [], prepare_mod._read_text

    def counted(path):
        for piece in real(path):
            read.append(piece[2])
            yield piece

    monkeypatch.setattr(prepare_mod, "_read_text", counted)
    assert (
        cli.main(["prepare", "--input", str(big), "--tokenizer", "bytes", "--out", str(tmp_path / "o")]) == 2
    )
    assert "of the first 1000 bytes" in _one_line(capsys.readouterr().err)
    assert sum(read) == 1000  # stopped there, not at the end of the file
    assert not (tmp_path / "o").exists()


def test_max_undecodable_is_validated(capsys):
    assert cli.main(["train", str(TINY), "--set", "data.max_undecodable=2"]) == 2
    assert "data.max_undecodable: must be in [0, 1], got 2.0" in _one_line(capsys.readouterr().err)


def test_the_prepare_progress_bar_shows_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    (tmp_path / "a.txt").write_text("Some text.\n" * 20)
    args = ["prepare", "--input", str(tmp_path / "a.txt"), "--tokenizer", "bytes", "--workers", "0"]
    assert cli.main([*args, "--out", str(tmp_path / "log")]) == 0
    assert capsys.readouterr().err == ""  # stderr is a pipe or file here: no bar in the log
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert cli.main([*args, "--out", str(tmp_path / "tty")]) == 0
    assert "prepare: 100%" in sys.stderr.getvalue()
