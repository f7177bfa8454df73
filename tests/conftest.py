"""Tests run on 8 fake CPU devices so sharding tests always run (never skip) on any machine."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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
