"""Sweeps: declared next to a base config as data, expanded into runs, launched by an executor.

An experiment file may define ``get_sweep() -> Sweep`` beside ``get_config()``::

    def get_sweep():
        return sweep.grid({"optim.lr": [1e-3, 3e-3]}) * sweep.zipped({"model.n_layers": [1, 2],
                                                                       "model.d_model": [32, 64]})

``a * b`` is the product (every run of ``a`` with every run of ``b``), ``a + b`` the concatenation.
``sizes(base, [(d_model, n_layers), ...], head_dim=..., tokens_per_param=...)`` (or ``flops=``) is a
model-size axis for scaling laws, with each run's steps from its token budget (docs/scaling_laws.md).
Each run is a dict of overrides; it goes to ``<train.run_dir>/<sweep>/<readable name>-<hash>/``, so
re-running a sweep skips finished runs (``summary.json`` status ``finished``) and resumes the others
from their latest checkpoint. Every run is validated before any is launched.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jaxlm.config import (
    Config,
    ConfigError,
    apply_overrides,
    call_experiment,
    load_config,
    load_experiment,
    parse_set_args,
    to_dict,
)
from jaxlm.files import read_json, write_json

Overrides = dict[str, Any]  # {"section.field": value}
RESERVED = ("name", "train.run_dir")  # the sweep sets these for every run
SUMMARY, OVERRIDES, SWEEP_FILE = "summary.json", "overrides.json", "sweep.json"
ROOT = Path(__file__).resolve().parents[1]


# ============================================================================================
# Declaration: a sweep is a tuple of override dicts, combined with * and +.
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Sweep:
    runs: tuple[Overrides, ...]

    def __mul__(self, other: Sweep) -> Sweep:
        runs = []
        for a in self.runs:
            for b in other.runs:
                shared = sorted(set(a) & set(b))
                if shared:
                    raise ConfigError(
                        f"sweep product: both factors set {shared}; sweep each key in one factor"
                    )
                runs.append({**a, **b})
        return Sweep(tuple(runs))

    def __add__(self, other: Sweep) -> Sweep:
        return Sweep(self.runs + other.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Overrides]:
        return iter(self.runs)


def _axes(axes: dict[str, Sequence[Any]], what: str) -> dict[str, list[Any]]:
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"sweep.{what} needs a non-empty dict {{'section.field': [values]}}, got {axes!r}")
    out = {}
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ConfigError(f"sweep.{what}: values of {key!r} must be a list, got {values!r}")
        if not values:
            raise ConfigError(f"sweep.{what}: {key!r} has no values; give at least one")
        out[key] = list(values)
    return out


def grid(axes: dict[str, Sequence[Any]]) -> Sweep:
    """Every combination of the values: ``grid({"a": [1, 2], "b": [3, 4]})`` is 4 runs."""
    out = Sweep(({},))
    for key, values in _axes(axes, "grid").items():
        out = out * Sweep(tuple({key: v} for v in values))
    return out


def zipped(axes: dict[str, Sequence[Any]]) -> Sweep:
    """Values taken together, position by position: ``zipped({"a": [1, 2], "b": [3, 4]})`` is 2 runs."""
    axes = _axes(axes, "zipped")
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"sweep.zipped: every key needs the same number of values, got {lengths}")
    return Sweep(tuple(dict(zip(axes, values, strict=True)) for values in zip(*axes.values(), strict=True)))


def sizes(
    base: Config,
    shapes: Sequence[tuple[int, int]],
    *,
    head_dim: int,
    ffn_mult: int = 4,
    tokens_per_param: float | None = None,
    flops: float | None = None,
) -> Sweep:
    """A model-size axis: one run per ``(d_model, n_layers)`` of ``shapes``, with ``d_model // head_dim``
    heads, ``d_ff = ffn_mult * d_model`` and ``train.steps`` from a token budget, given as exactly one of

    - ``tokens_per_param``: D = tokens_per_param x N (N = ``lm.get(model).flop_params``), or
    - ``flops``: one compute budget C for every size, D = C / ``bench.flops_per_token(model)["total"]``
      (an isoFLOP profile; ``sizes(..., flops=a) + sizes(..., flops=b)`` for several);

    steps = D / (batch_size x seq_len) of ``base``, rounded to the nearest step (at least 1), so a
    ``--set`` of train.batch_size or model.seq_len does not change the steps: set those in ``base``.
    """
    from jaxlm import bench, lm

    if (tokens_per_param is None) == (flops is None):
        raise ConfigError("sweep.sizes needs exactly one of tokens_per_param= and flops=")
    if (tokens_per_param or flops) <= 0:
        raise ConfigError(f"sweep.sizes: the token budget must be > 0, got {tokens_per_param or flops}")
    tokens_per_step = base.train.batch_size * base.model.seq_len
    runs = []
    for shape in shapes:
        if not (isinstance(shape, (tuple, list)) and len(shape) == 2):
            raise ConfigError(f"sweep.sizes: each shape is (d_model, n_layers), got {shape!r}")
        d_model, n_layers = shape
        if d_model % head_dim:
            raise ConfigError(f"sweep.sizes: d_model={d_model} is not a multiple of head_dim={head_dim}")
        run = {
            "model.d_model": d_model,
            "model.n_layers": n_layers,
            "model.n_heads": d_model // head_dim,
            "model.d_ff": ffn_mult * d_model,
        }
        model_cfg = apply_overrides(base, run).model
        if tokens_per_param is not None:
            tokens = tokens_per_param * lm.get(model_cfg).flop_params
        else:
            tokens = flops / bench.flops_per_token(model_cfg)["total"]
        runs.append({**run, "train.steps": max(1, round(tokens / tokens_per_step))})
    return Sweep(tuple(runs))


@dataclasses.dataclass(frozen=True)
class uniform:  # lower case: reads like the function call it stands for in a declaration
    low: float
    high: float
    log: bool = False


def log_uniform(low: float, high: float) -> uniform:
    """Uniform in log space, for learning rates and other scales."""
    if not 0 < low < high:
        raise ConfigError(f"sweep.log_uniform({low}, {high}) needs 0 < low < high")
    return uniform(low, high, log=True)


def sample(space: dict[str, Sequence[Any] | uniform], n: int, seed: int = 0) -> Sweep:
    """``n`` random runs: a list is a uniform choice, ``uniform``/``log_uniform`` a float range.

    Floats are rounded to 3 significant digits so run names and tables stay readable; the same
    seed always gives the same runs.
    """
    import numpy as np

    if not isinstance(space, dict) or not space or n <= 0:
        raise ConfigError(f"sweep.sample needs a non-empty dict of choices and n > 0, got {space!r}, n={n}")
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(n):
        run = {}
        for key, dist in space.items():
            if isinstance(dist, uniform):
                if not dist.low < dist.high:
                    raise ConfigError(f"sweep.sample: {key!r} range needs low < high, got {dist}")
                lo, hi = (math.log(dist.low), math.log(dist.high)) if dist.log else (dist.low, dist.high)
                x = float(rng.uniform(lo, hi))
                run[key] = float(f"{math.exp(x) if dist.log else x:.3g}")
            else:
                choices = _axes({key: dist}, "sample")[key]
                run[key] = choices[int(rng.integers(len(choices)))]
        runs.append(run)
    return Sweep(tuple(runs))


# ============================================================================================
# Expansion: sweep + base config -> validated runs with names, directories and commands.
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Run:
    index: int
    name: str
    overrides: Overrides
    cfg: Config
    command: list[str]  # the ``jaxlm train`` command line that trains it

    @property
    def path(self) -> Path:
        return self.cfg.run_path


def _fmt(v: Any) -> str:
    """A value as ``--set`` text that parses back to the same value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, tuple) and any(isinstance(x, tuple | dict) for x in v):
        return json.dumps(v)  # containers of containers (data.mixture_schedule) parse as JSON
    if isinstance(v, tuple):
        return ",".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return ",".join(f"{k}:{_fmt(x)}" for k, x in v.items())
    return str(v)


def run_name(overrides: Overrides, hashed: Overrides) -> str:
    """``lr0.003_n_layers2-1a2b3c``: the swept values to read, a hash of all overrides to be unique."""
    parts = [f"{k.rsplit('.', 1)[-1]}{_fmt(v)}" for k, v in overrides.items()]
    readable = re.sub(r"[^A-Za-z0-9.+_-]", "", "_".join(parts))[:48] or "base"
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=repr).encode()).hexdigest()[:6]
    return f"{readable}-{digest}"


def sweep_name(experiment: str | Path) -> str:
    return Path(experiment).stem


def expand(experiment: str | Path, base_set: list[str] = ()) -> list[Run]:
    """Load ``get_sweep()`` from ``experiment`` and validate every run; raise before anything runs."""
    module = load_experiment(experiment)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"{experiment} has no get_sweep(); define one returning jaxlm.sweep.Sweep")
    sweep = call_experiment(experiment, module, "get_sweep")
    if not isinstance(sweep, Sweep):
        raise ConfigError(
            f"{experiment}: get_sweep() returned {type(sweep).__name__}, expected jaxlm.sweep.Sweep"
        )
    if not sweep.runs:
        raise ConfigError(f"{experiment}: get_sweep() expands to no runs; give every axis at least one value")
    base_overrides = parse_set_args(list(base_set))
    base = load_config(experiment, base_overrides)
    root = Path(base.train.run_dir) / sweep_name(experiment)
    # Base --set values are hashed too (resolved, so 1e-3 and 0.001 agree): changing them gives new runs.
    base_values = {k: _get(base, k) for k in base_overrides}
    runs, seen = [], {}
    for i, overrides in enumerate(sweep.runs):
        where = f"{experiment}: sweep run {i} {overrides}"
        bad = [k for k in overrides if k in RESERVED]
        if bad:
            raise ConfigError(f"{where}: the sweep sets {bad} itself; sweep other fields")
        try:
            cfg = apply_overrides(base, overrides)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        name = run_name(overrides, {**base_values, **{k: _get(cfg, k) for k in overrides}})
        if name in seen:
            raise ConfigError(f"{where}: same overrides as run {seen[name]}; remove the duplicate")
        seen[name] = i
        cfg = apply_overrides(cfg, {"name": name, "train.run_dir": str(root)})
        sets = [f"{k}={_fmt(v)}" for k, v in overrides.items()] + [f"name={name}", f"train.run_dir={root}"]
        # The child parses these strings; make sure it gets exactly the config validated here.
        if apply_overrides(base, parse_set_args(sets)) != cfg:
            raise ConfigError(f"{where}: a value does not survive the command line as text; use plain values")
        command = [sys.executable, "-m", "jaxlm.cli", "train", str(experiment), "--set", *base_set, *sets]
        runs.append(Run(i, name, dict(overrides), cfg, command))
    return runs


def _get(cfg: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    value = getattr(cfg, section)
    return getattr(value, name) if name else value


def read_summary(path: Path) -> dict[str, Any] | None:
    return read_json(path / SUMMARY)


def is_finished(run: Run) -> bool:
    summary = read_summary(run.path)
    return summary is not None and summary.get("status") == "finished"


def config_changes(run: Run) -> list[str]:
    """Fields whose value in the run's saved ``config.json`` differs from the expansion's (e.g. after
    the experiment file was edited), as ``section.field: old -> new``."""
    saved = read_json(run.path / "config.json")
    if saved is None:
        return []
    now = json.loads(json.dumps(to_dict(run.cfg)))  # tuples as lists, like the saved file
    return [
        f"{section}.{key}: {saved[section].get(key)!r} -> {value!r}"
        for section, fields in now.items()
        if isinstance(fields, dict) and isinstance(saved.get(section), dict)
        for key, value in fields.items()
        if saved[section].get(key) != value
    ]


def record(run: Run) -> None:
    """Write ``overrides.json`` (what the report shows) before the run starts."""
    run.path.mkdir(parents=True, exist_ok=True)
    write_json(
        run.path / OVERRIDES,
        {"index": run.index, "keys": list(run.overrides), "overrides": run.overrides, "command": run.command},
    )


def record_failure(run: Run, error: str, returncode: int | None = None) -> None:
    summary = read_summary(run.path) or {}
    summary.update(status="failed", error=error[-4000:], returncode=returncode)
    write_json(run.path / SUMMARY, summary)


def prepare_data(runs: list[Run]) -> None:
    """Prepare each distinct data directory once, here, so concurrent runs never race to write it."""
    from jaxlm.data import pipeline
    from jaxlm.data.prepare import DataError

    for data_cfg, model_cfg in dict.fromkeys((r.cfg.data, r.cfg.model) for r in runs):
        try:
            pipeline.ensure_prepared(data_cfg, model_cfg)
        except DataError as e:
            raise ConfigError(str(e)) from None


def write_sweep_file(runs: list[Run], experiment: str | Path, base_set: list[str]) -> Path:
    root = runs[0].path.parent
    root.mkdir(parents=True, exist_ok=True)
    path = root / SWEEP_FILE
    write_json(
        path,
        {
            "experiment": str(experiment),
            "set": list(base_set),
            "runs": [{"index": r.index, "name": r.name, "overrides": r.overrides} for r in runs],
        },
    )
    return path


# ============================================================================================
# Local executor: one subprocess per run, N at a time on disjoint device subsets.
# ============================================================================================


def probe_devices() -> tuple[str, int]:
    """(backend, device count), asked of a child process so this one never holds an accelerator."""
    out = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend(), jax.local_device_count())"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"could not list JAX devices:\n{out.stderr[-2000:]}")
    backend, count = out.stdout.split()[-2:]
    return backend, int(count)


def device_envs(parallel: int, backend: str, count: int, env: dict[str, str]) -> list[dict[str, str]]:
    """Environment overrides giving each of ``parallel`` concurrent runs its own slice of devices."""
    if parallel == 1:
        return [{}]
    if backend == "cpu":
        # CPU "devices" are slices of the same cores, so any N works: each run gets count // N (>= 1).
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
        flag = f"--xla_force_host_platform_device_count={max(1, count // parallel)}"
        return [{"XLA_FLAGS": f"{flags} {flag}".strip()} for _ in range(parallel)]
    if count % parallel:
        valid = [d for d in range(1, count + 1) if count % d == 0]
        raise ConfigError(
            f"--parallel {parallel} does not split {count} {backend} devices evenly; use one of {valid}"
        )
    per = count // parallel
    if backend in ("gpu", "cuda", "rocm"):
        var = "HIP_VISIBLE_DEVICES" if backend == "rocm" else "CUDA_VISIBLE_DEVICES"
        visible = env.get(var, "").split(",") if env.get(var) else [str(i) for i in range(count)]
        return [{var: ",".join(visible[g * per : (g + 1) * per])} for g in range(parallel)]
    raise ConfigError(
        f"--parallel > 1 is not supported on {backend}; run one at a time or use --executor slurm"
    )


def run_process(run: Run, env_extra: dict[str, str], stop: threading.Event | None = None) -> str:
    """Train ``run`` in a child process logging to ``<run>/output.log``; return its final status."""
    record(run)
    log_path = run.path / "output.log"
    env = {**os.environ, **env_extra}
    try:
        with open(log_path, "a") as log:
            log.write(f"$ {shlex.join(run.command)}\n")
            log.flush()
            rc = subprocess.run(run.command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    except OSError as e:
        record_failure(run, f"could not start {run.command[0]}: {e}")
        return "failed"
    summary = read_summary(run.path) or {}
    if rc == 0 and summary.get("status"):
        return summary["status"]  # "finished", or e.g. "stopped by SIGTERM" with a checkpoint to resume
    if stop is not None and stop.is_set():
        return "interrupted"  # Ctrl-C reached the child too; not its fault, the next sweep resumes it
    tail = log_path.read_text(errors="replace").splitlines()[-30:]
    record_failure(run, "\n".join(tail), rc)
    return "failed"


def run_local(runs: list[Run], parallel: int = 1, envs: list[dict[str, str]] | None = None) -> dict[str, str]:
    """Run every run, ``parallel`` at a time; a failure is recorded and the others go on.

    On Ctrl-C no further run starts; the running ones (which get the SIGINT too) checkpoint and stop.
    """
    envs = envs or [{}] * parallel
    free = list(range(parallel))
    lock, stop = threading.Lock(), threading.Event()
    results: dict[str, str] = {}
    start = time.perf_counter()

    def work(run: Run) -> None:
        if stop.is_set():
            return
        with lock:
            slot = free.pop()
        try:
            t0 = time.perf_counter()
            status = run_process(run, envs[slot], stop)
        finally:
            with lock:
                free.append(slot)
        with lock:
            results[run.name] = status
            took = time.perf_counter() - t0
            print(f"[{len(results)}/{len(runs)}] {status:8s} {run.name}  ({took:.0f} s)", flush=True)
            if status == "failed":
                print(f"    see {run.path / 'output.log'}", flush=True)

    pool = ThreadPoolExecutor(parallel)
    try:
        for future in [pool.submit(work, r) for r in runs]:
            future.result()
    except KeyboardInterrupt:
        stop.set()
        print("interrupted: letting the running runs checkpoint; run the sweep again to resume", flush=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    print(f"{len(runs)} run(s) in {time.perf_counter() - start:.0f} s", flush=True)
    return results


# ============================================================================================
# SLURM executor: launch/slurm.sbatch as a job array; task i runs ``jaxlm sweep EXP --run-index i``.
# ============================================================================================

SBATCH_SCRIPT = ROOT / "launch" / "slurm.sbatch"


def sbatch_command(
    runs: list[Run], experiment: str | Path, base_set: list[str], parallel: int, sbatch_args: str = ""
) -> list[str]:
    """``sbatch`` of launch/slurm.sbatch with ``--sweep``: one array task per unfinished run, each
    with the script's resources (its ``#SBATCH`` lines, overridden by ``sbatch_args``) and its
    environment set-up; the array's name and output files are the sweep's."""
    root = runs[0].path.parent.absolute()
    indices = ",".join(str(r.index) for r in runs)
    throttle = f"%{parallel}" if parallel > 1 else ""
    try:
        options = shlex.split(sbatch_args)
    except ValueError as e:
        raise ConfigError(f"--sbatch {sbatch_args!r}: {e}; quote it as one shell string") from None
    return [
        "sbatch",
        f"--job-name={root.name}",
        f"--array={indices}{throttle}",
        f"--output={root}/slurm-%A_%a.out",
        *options,  # after the sweep's own: the user's word is the last
        str(SBATCH_SCRIPT),
        "--sweep",
        str(Path(experiment).absolute()),
        *base_set,
    ]


def submit_slurm(
    runs: list[Run], experiment: str | Path, base_set: list[str], parallel: int, sbatch_args: str = ""
) -> str:
    if shutil.which("sbatch") is None:
        raise ConfigError("--executor slurm needs sbatch on PATH; run on a SLURM login node")
    command = sbatch_command(runs, experiment, base_set, parallel, sbatch_args)
    print(f"$ {shlex.join(command)}", flush=True)
    # The job gets this environment (sbatch's --export=ALL), and this interpreter runs jaxlm there.
    env = {**os.environ, "JAXLM_PYTHON": sys.executable}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise ConfigError(f"sbatch refused the sweep's job array: {(out.stderr or out.stdout).strip()}")
    print(out.stdout.strip(), flush=True)
    return out.stdout


def run_index(runs: list[Run], index: int) -> int:
    """Train run ``index`` in this process (a SLURM array task); a failure is recorded, then raised."""
    if not 0 <= index < len(runs):
        raise ConfigError(f"--run-index {index} is out of range; the sweep has runs 0..{len(runs) - 1}")
    run = runs[index]
    if is_finished(run):
        print(f"{run.name} already finished; nothing to do", flush=True)
        return 0
    import jax

    from jaxlm import train

    record(run)
    try:
        train.run(run.cfg, resume=None)
    except BaseException as e:
        if jax.process_index() == 0:
            record_failure(run, f"{type(e).__name__}: {e}", 1)
        raise
    return 0


# ============================================================================================
# The command.
# ============================================================================================


def main(args: argparse.Namespace) -> int:
    """``jaxlm sweep`` with the arguments ``jaxlm.cli`` parsed."""
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    if args.sbatch and args.executor != "slurm":
        raise ConfigError(f"--sbatch {args.sbatch!r} is for --executor slurm; add it, or drop --sbatch")

    runs = expand(args.experiment, args.set)
    if args.run_index is not None:
        return run_index(runs, args.run_index)
    pending = [r for r in runs if not is_finished(r)]
    root = runs[0].path.parent
    print(f"sweep {root}: {len(runs)} run(s), {len(runs) - len(pending)} finished, {len(pending)} to run")
    todo = {r.name for r in pending}
    for r in runs:
        saved = any(p.name.isdigit() for p in (r.path / "checkpoints").glob("*"))
        state = "finished" if r.name not in todo else "resume" if saved else "new"
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in r.overrides.items())
        print(f"  {r.index:3d}  {state:8s}  {r.name:40s}  {shown}")
        if state == "finished" and (changed := config_changes(r)):
            changed = "; ".join(changed[:3])
            print(f"       warning: finished with another config ({changed}); delete {r.path} to retrain")
    if args.dry_run or not pending:
        return 0
    write_sweep_file(runs, args.experiment, args.set)
    prepare_data(pending)
    if args.executor == "slurm":
        submit_slurm(pending, args.experiment, args.set, args.parallel, args.sbatch)
        return 0
    envs = device_envs(args.parallel, *probe_devices(), os.environ) if args.parallel > 1 else None
    try:
        results = run_local(pending, args.parallel, envs)
    except KeyboardInterrupt:
        return 130
    unfinished = {name: status for name, status in results.items() if status != "finished"}
    if unfinished:
        print(
            f"{len(unfinished)} run(s) did not finish: {unfinished}; the errors are in their summary.json "
            "and output.log; run the sweep again to retry them",
            file=sys.stderr,
        )
        return 1
    print(f"all finished; jaxlm report {root}")
    return 0
