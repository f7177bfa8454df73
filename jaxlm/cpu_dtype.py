"""``compute_dtype=auto`` on a CPU: bfloat16 only where it is measured to be clearly faster.

Whether bfloat16 matmuls beat float32 on a CPU depends on the CPU *and* on the jax version: on an
AMD EPYC they are slower, on an Intel Xeon with AMX 3.5x faster under jax 0.12 but slower under
jax 0.10 (BENCHMARKS.md). So the choice is a quick measurement (a jitted matmul in each dtype,
well under a second), taken at most once per process, never at import, and cached in
``$XDG_CACHE_HOME/jaxlm/compute_dtype.json`` (default ``~/.cache/jaxlm/``) under a key naming the
CPU model, its matmul-relevant flags and the jax/jaxlib versions, so every run on one machine with
one jax gets the same choice (resume stays bitwise) and a jax upgrade measures again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from jaxlm.files import read_json, write_json

# bfloat16 only when its matmul takes at most 1/MARGIN of float32's: a step is more than its
# matmuls (norms, softmax and the loss stay float32, and bfloat16 adds casts), so a small matmul
# gain is no gain end to end, and a choice near 1x would flip with the machine's load.
MARGIN = 1.5
SIZE = 1024  # a 1024^3 matmul: 2.1 GFLOP, a few ms per dtype on a CPU core
REPEATS = 5

# x86 (lscpu/cpuinfo "flags") and Arm ("Features") flags that decide matmul speed in either dtype
_RELEVANT_FLAG = re.compile(r"amx|avx|bf16|fp16|fma|sve|i8mm|asimd|neon")


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxlm" / "compute_dtype.json"


def machine_key(cpuinfo: str | None = None, versions: str | None = None) -> str:
    """'CPU model | matmul flags | jax X jaxlib Y': what the measured choice depends on."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("cpu part") or platform.processor() or platform.machine()
    all_flags = (fields.get("flags") or fields.get("features") or "").split()
    flags = sorted(f for f in all_flags if _RELEVANT_FLAG.search(f))
    if versions is None:
        versions = f"jax {jax.__version__} jaxlib {jaxlib.__version__}"
    return f"{model} | {' '.join(flags)} | {versions}"


def decide(float32_s: float, bfloat16_s: float) -> str:
    """The rule: bfloat16 only if its matmul is at least MARGIN times faster."""
    return "bfloat16" if bfloat16_s * MARGIN <= float32_s else "float32"


def measure(size: int = SIZE, repeats: int = REPEATS) -> dict[str, float]:
    """Median seconds of a jitted size^3 matmul in each dtype, compiled and warmed up first; the two
    dtypes alternate, so load from other processes falls on both alike."""
    # Eager even when the first use of "auto" comes while a model is being traced.
    with jax.ensure_compile_time_eval():
        matmul = jax.jit(lambda a, b: a @ b)
        x = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
        inputs = {"float32": x, "bfloat16": x.astype(jnp.bfloat16)}
        for a in inputs.values():
            matmul(a, a).block_until_ready()  # compile, warm up
        times: dict[str, list[float]] = {name: [] for name in inputs}
        for _ in range(repeats):
            for name, a in inputs.items():
                start = time.perf_counter()
                matmul(a, a).block_until_ready()
                times[name].append(time.perf_counter() - start)
    return {f"{name}_s": statistics.median(ts) for name, ts in times.items()}


@contextlib.contextmanager
def _locked(path: Path):
    """Processes of one machine measure one at a time, so they all end up with the one cached
    choice. Without a lock (not Unix, a cache dir that cannot be created) each measures alone."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 (closed below)
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing


def _entries(path: Path) -> dict:
    """The cache's entries; {} when it is missing, unreadable or not a JSON object (cut short,
    binary junk, a directory), which then gets measured again and rewritten."""
    try:
        entries = read_json(path)
    except (OSError, ValueError):  # ValueError: bytes that are not UTF-8
        return {}
    return entries if isinstance(entries, dict) else {}


def _cached(path: Path, key: str) -> str | None:
    entry = _entries(path).get(key)
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    return dtype if dtype in ("float32", "bfloat16") else None


def resolve(path: Path, key: str, measure: Callable[[], dict[str, float]]) -> str:
    """The cached choice for ``key`` in ``path``, else measure, decide and cache it. A missing,
    corrupt or unreadable cache is measured again and rewritten; a cache that cannot be written
    costs a warning and a measurement in the next process, never the run."""
    if (dtype := _cached(path, key)) is not None:
        return dtype
    with _locked(path):
        if (dtype := _cached(path, key)) is not None:  # another process measured while we waited
            return dtype
        seconds = measure()
        dtype = decide(seconds["float32_s"], seconds["bfloat16_s"])
        entries = _entries(path)  # other machines' and jax versions' choices stay
        entries[key] = {"dtype": dtype, **seconds, "margin": MARGIN, "measured": time.strftime("%Y-%m-%d")}
        try:
            write_json(path, entries)
        except OSError as e:
            warnings.warn(f"compute_dtype=auto: {dtype}, but not cached in {path}: {e}", stacklevel=2)
    return dtype


@functools.cache
def cpu_compute_dtype() -> str:
    """float32 or bfloat16 for this CPU and jax: cached on disk, and resolved once per process."""
    return resolve(cache_path(), machine_key(), lambda: measure())
