"""Tests run on 8 fake CPU devices so sharding tests always run (never skip) on any machine."""

import os

# LLVM without optimisation (-O0): the suite is made of compiles of tiny programs, and -O0 cuts
# their time (2-core AMD EPYC, 2026-12-02: tests/test_checkpoint.py 135 -> 91 CPU-s, measured with
# a compilation cache in both runs; the three multi-process tests 154 -> 72 s wall). It changes the
# programs' numerics in the last bits, which every tolerance here allows for: they follow from the
# arithmetic, not from one compiler's output. (A persistent compilation cache would save more, but
# XLA:CPU executables loaded from it deadlocked in their all-reduce rendezvous on 8 fake devices:
# "Expected 8 threads to join the rendezvous, but only 7 of them arrived".)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; XLA_FLAGS was set too late"

import dataclasses  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """The embedded corpus prepared once per test session with the byte tokenizer."""
    from jaxlm.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare-bytes"
    prepare(["shakespeare"], "bytes", str(out), val_fraction=0.1, progress=False)
    return str(out)


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    """experiments/tiny.py on the prepared corpus, writing runs under tmp_path, on one device."""
    from pathlib import Path

    from jaxlm.config import apply_overrides, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "tiny.py")
    cfg = apply_overrides(cfg, {"data.dir": tiny_data, "train.run_dir": str(tmp_path / "runs")})
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=8))


@pytest.fixture(autouse=True)
def _no_measured_compute_dtype(monkeypatch, tmp_path_factory):
    """compute_dtype=auto on a CPU is whichever dtype this CPU measures faster, so a test that
    relied on it would pass on one machine and fail on another (bfloat16 on an Intel AMX CI host
    against float32 tolerances). A test that resolves it without injecting timings fails here;
    the cache is a fresh directory, so neither the user's cache nor another test's answer hides it."""
    from jaxlm import cpu_dtype

    def refuse():
        raise AssertionError(
            "this test resolved model.compute_dtype='auto' on a CPU, which depends on the machine: "
            "state compute_dtype (the tiny preset does), or inject timings as tests/test_cpu_dtype.py does"
        )

    monkeypatch.setattr(cpu_dtype, "measure", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    cpu_dtype.cpu_compute_dtype.cache_clear()
    yield
    cpu_dtype.cpu_compute_dtype.cache_clear()
