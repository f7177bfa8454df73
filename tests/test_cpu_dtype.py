"""compute_dtype=auto on a CPU: the decision rule, the cache and its key, recovery from a bad
cache, and a run recording what auto resolved to. Timings are injected: what this CPU measures
must never decide a test (tests/conftest.py refuses a real measurement)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxlib
import pytest

from jaxlm import cpu_dtype, model, train
from jaxlm.config import preset


def timings(f32: float, bf16: float):
    """A measurement that returns these seconds and counts its calls."""

    def measure():
        measure.calls += 1
        return {"float32_s": f32, "bfloat16_s": bf16}

    measure.calls = 0
    return measure


def test_bfloat16_only_when_clearly_faster():
    # seconds per matmul are 1 / (TFLOP/s): the Xeon AMX figures of issue #15, then the EPYC's
    assert cpu_dtype.decide(float32_s=1 / 0.28, bfloat16_s=1 / 0.99) == "bfloat16"  # jax 0.12: 3.5x
    assert cpu_dtype.decide(float32_s=1 / 0.27, bfloat16_s=1 / 0.22) == "float32"  # bf16 slower
    assert cpu_dtype.MARGIN == 1.5
    assert cpu_dtype.decide(float32_s=1.5, bfloat16_s=1.0) == "bfloat16"  # exactly the margin
    assert cpu_dtype.decide(float32_s=1.4, bfloat16_s=1.0) == "float32"  # faster, not clearly


def test_cache_key_names_the_cpu_and_changes_with_the_jax_version():
    info = (
        "processor\t: 0\nmodel name\t: Intel Xeon 8480\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n"
    )
    old = cpu_dtype.machine_key(info, "jax 0.10.2 jaxlib 0.10.2")
    assert old == "Intel Xeon 8480 | amx_bf16 amx_tile avx2 avx512f | jax 0.10.2 jaxlib 0.10.2"
    assert cpu_dtype.machine_key(info, "jax 0.12.0.1 jaxlib 0.12.0.1") != old
    assert cpu_dtype.machine_key(info.replace(" amx_bf16 amx_tile", ""), "jax 0.10.2 jaxlib 0.10.2") != old
    assert f"jax {jax.__version__} jaxlib {jaxlib.__version__}" in cpu_dtype.machine_key(info)


def test_cache_is_reused_per_key_and_resolved_once_per_process(tmp_path, monkeypatch):
    path = tmp_path / "jaxlm" / "compute_dtype.json"
    fast_bf16 = timings(f32=1.0, bf16=0.2)
    assert cpu_dtype.resolve(path, "machine A", fast_bf16) == "bfloat16"
    assert cpu_dtype.resolve(path, "machine A", fast_bf16) == "bfloat16"
    assert fast_bf16.calls == 1  # the second answer came from the file
    slow_bf16 = timings(f32=1.0, bf16=1.2)
    assert cpu_dtype.resolve(path, "machine A, newer jax", slow_bf16) == "float32"
    entries = json.loads(path.read_text())
    assert {k: v["dtype"] for k, v in entries.items()} == {
        "machine A": "bfloat16",
        "machine A, newer jax": "float32",
    }
    assert entries["machine A"]["float32_s"] == 1.0 and entries["machine A"]["bfloat16_s"] == 0.2

    # Through model.compute_dtype: the user cache dir, and one resolution per process even if the
    # file goes away.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    measure = timings(f32=1.0, bf16=0.5)
    monkeypatch.setattr(cpu_dtype, "measure", measure)
    auto = preset("tiny", compute_dtype="auto")
    assert model.compute_dtype(auto) == jnp.bfloat16
    (tmp_path / "xdg" / "jaxlm" / "compute_dtype.json").unlink()
    assert model.compute_dtype(auto) == jnp.bfloat16 and measure.calls == 1
    assert model.compute_dtype(dataclasses.replace(auto, compute_dtype="float32")) == jnp.float32


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"machine A": {"dtype": "bfl',
        b"\xff\xfe junk",
        b"[1, 2]",
        b'{"machine A": {"dtype": "float64"}}',
    ],
    ids=["empty", "cut short", "not utf-8", "not an object", "unknown dtype"],
)
def test_a_corrupt_cache_is_measured_again_and_rewritten(tmp_path, content):
    path = tmp_path / "compute_dtype.json"
    path.write_bytes(content)
    measure = timings(f32=1.0, bf16=0.5)
    assert cpu_dtype.resolve(path, "machine A", measure) == "bfloat16" and measure.calls == 1
    assert json.loads(path.read_text())["machine A"]["dtype"] == "bfloat16"
    assert cpu_dtype.resolve(path, "machine A", measure) == "bfloat16" and measure.calls == 1
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # written atomically


def test_an_unwritable_cache_warns_and_still_answers(tmp_path):
    path = tmp_path / "compute_dtype.json"
    path.mkdir()  # a directory where the file should be: neither readable nor replaceable
    with pytest.warns(UserWarning, match="not cached in"):
        assert cpu_dtype.resolve(path, "machine A", timings(f32=1.0, bf16=2.0)) == "float32"


def test_importing_measures_nothing(tmp_path):
    code = "import jaxlm.train, jaxlm.model, jaxlm.sampling, jaxlm.bench, jaxlm.cli"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert list(tmp_path.iterdir()) == []  # no measurement, so no cache written


def test_a_run_records_the_resolved_dtype_and_its_resume_gets_the_same(tiny_cfg, monkeypatch):
    """Two processes on one machine: the first measures, the second resumes from the cached choice
    without measuring, so the run's numerics (and a bitwise resume) do not hang on timing noise."""
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, compute_dtype="auto"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1, eval_every=0))
    monkeypatch.setattr(cpu_dtype, "measure", timings(f32=1.0, bf16=2.0))
    assert train.run(cfg)["status"] == "finished"
    recorded = json.loads((cfg.run_path / "config.json").read_text())["model"]["compute_dtype"]
    assert recorded == "float32"  # not "auto"

    cpu_dtype.cpu_compute_dtype.cache_clear()  # a new process: only the file remains
    monkeypatch.setattr(cpu_dtype, "measure", timings(f32=1.0, bf16=0.1))  # would say bfloat16
    resumed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2))
    assert train.run(resumed)["status"] == "finished"
    log = (cfg.run_path / "log.txt").read_text()
    assert "resumed from" in log and "compute_dtype" not in log  # no change since the checkpoint
    assert log.count("float32 compute") == 2
