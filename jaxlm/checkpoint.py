"""Checkpoints with orbax: train state, data position and the resolved config in one step dir.

Layout: ``<run>/checkpoints/<step>/{state, data, config}``. ``state`` is {"step", "params",
"opt_state"}; ``config`` is the full resolved config as JSON, so a checkpoint describes itself:
sampling and evaluation need nothing but its path. The data position is one number, the global
step, from which the data pipeline derives every later batch, whatever the number of processes or
the mesh. There is no RNG state: nothing in training is random after init.

A step is written to ``<step>.orbax-checkpoint-tmp-*`` and renamed into place when every item is
on disk, so a directory named by a bare step number is complete; anything else is ignored. Old
checkpoints are deleted by this module, counting only complete ones, so a failed save (full disk)
never costs an earlier checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

from jaxlm.config import CheckpointConfig, ConfigError

ITEMS = ("state", "data", "config")
CHECKSUMS = "checksums.json"
JSON_FILES = (CHECKSUMS, "data/metadata", "config/metadata")  # ours, and the JSON items' files


class CheckpointError(ConfigError):
    """No readable checkpoint where one was expected; the message names the paths and the fix."""


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }


def _open(directory: Path, on_written: Callable[[], None] | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,  # retention is ours (see _collect_garbage): only complete steps count
        enable_async_checkpointing=True,  # a synchronous save is an async one waited for at once
        async_options=ocp.AsyncOptions(post_finalization_callback=on_written) if on_written else None,
        create=on_written is not None,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=_handlers())


def _file_checksums(step_dir: Path) -> dict[str, list[int]]:
    """{relative path: [bytes, crc32]} of every file of the items (orbax's own bookkeeping excluded)."""
    out = {}
    for item in ITEMS:
        for p in sorted((step_dir / item).rglob("*")):
            if p.is_file():
                crc = 0
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        crc = zlib.crc32(chunk, crc)
                out[str(p.relative_to(step_dir))] = [p.stat().st_size, crc]
    return out


def _invalid_json(path: Path) -> str | None:
    try:
        if path.is_file():
            json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path} is not valid JSON ({e})"
    return None


def verify(step_dir: str | Path) -> None:
    """Raise ValueError naming the first missing, truncated, corrupted or not-JSON file of a checkpoint.

    Orbax reads a bit-flipped array without complaint, so each checkpoint carries CRC32s of its files
    (``checksums.json``, written before the directory is renamed into place); one without is trusted,
    bar its JSON files, which must parse.
    """
    step_dir = Path(step_dir)
    bad_json = {name: why for name in JSON_FILES if (why := _invalid_json(step_dir / name))}
    listing = step_dir / CHECKSUMS
    trusted = CHECKSUMS in bad_json or not listing.is_file()
    expected = {} if trusted else json.loads(listing.read_text())
    actual = _file_checksums(step_dir) if expected else {}
    for name, (size, crc) in sorted(expected.items()):
        if name not in actual:
            raise ValueError(f"{step_dir / name} is missing")
        sizes = f"{actual[name][0]} bytes, {size} written"
        if name in bad_json:
            raise ValueError(f"{bad_json[name]}: {sizes}")
        if actual[name][0] != size:
            raise ValueError(
                f"{step_dir / name} is {'truncated' if actual[name][0] < size else 'too long'}: {sizes}"
            )
        if actual[name][1] != crc:
            raise ValueError(f"{step_dir / name} is corrupted: its CRC32 differs from the one written")
    if bad_json:
        raise ValueError(next(iter(bad_json.values())))


def complete_steps(directory: str | Path) -> list[int]:
    """Steps with a complete checkpoint in ``directory``, ascending (in-progress writes excluded)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def abstract_with_shardings(abstract_tree, shardings_tree):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings_tree
    )


def _flat(tree) -> dict[str, Any]:
    """{"params.blocks.attn.q": leaf}: NamedTuples, tuples and dicts alike, as orbax's metadata names them."""
    flat = traverse_util.flatten_dict(serialization.to_state_dict(tree), sep=".")
    return {k: v for k, v in flat.items() if v is not None}  # None is an empty node, as in jax.tree


def _config_changes(saved: dict, current: dict) -> list[str]:
    changes = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section), current.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                # As the saved JSON holds them: tuples are lists at any depth (data.mixture_schedule).
                va, vb = json.loads(json.dumps(a.get(key))), json.loads(json.dumps(b.get(key)))
                if va != vb:
                    changes.append(f"{section}.{key}: {va!r} -> {vb!r}")
        elif a != b:
            changes.append(f"{section}: {a!r} -> {b!r}")
    return changes


# ============================================================================================
# Saving: async writes, retention, failures that never cost an earlier checkpoint.
# ============================================================================================


class Checkpointer:
    """Writes ``<run>/checkpoints/<step>``: asynchronously (``save`` returns once the arrays are
    copied off the device), keeping the last ``keep`` complete checkpoints plus every one whose
    step is a multiple of ``keep_every``. A failed save is reported through ``say`` and training
    goes on."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, say: Callable[[str], None] = print):
        self.directory = Path(directory).absolute()
        self.cfg, self.say = cfg, say
        self.primary = jax.process_index() == 0
        if self.primary:
            self.directory.mkdir(parents=True, exist_ok=True)
            for p in self.directory.iterdir():  # leftovers of a killed run: never complete, safe to drop
                if ".orbax-checkpoint-tmp" in p.name or ".deleting-" in p.name:
                    shutil.rmtree(p, ignore_errors=True)
        self.in_flight: int | None = None  # step being written in the background
        self.failed: list[int] = []
        self.mngr = _open(self.directory, on_written=self._write_checksums)

    def save(self, step: int, state, config: dict[str, Any]) -> bool:
        """Start writing ``state`` as ``step``; False (and an error through ``say``) if it failed."""
        self._settle()  # one write at a time: orbax would wait for the previous one here anyway
        self.in_flight = step
        try:
            self.mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave({"step": step}),
                    config=ocp.args.JsonSave(config),
                ),
                force=True,
            )
        except Exception as e:  # full disk, lost mount, ...: lose this save, not the run
            self.in_flight = None
            self._failed(step, e)
            return False
        if not self.cfg.async_save:
            self._settle()
            return step not in self.failed
        return True

    def wait(self) -> bool:
        """Block until the last save is on disk; False if it failed."""
        step = self.in_flight
        self._settle()
        return step is None or step not in self.failed

    def close(self) -> None:
        self._settle()
        self.mngr.close()

    def _settle(self) -> None:
        if self.in_flight is None:
            return
        step, error = self.in_flight, None
        try:
            self.mngr.wait_until_finished()
        except Exception as e:
            error = e
        self.in_flight = None
        if step not in complete_steps(self.directory):
            self._failed(step, error or OSError("the write did not complete; see the error logged above"))
        self._collect_garbage()

    def _write_checksums(self) -> None:
        """Runs in orbax's background thread once every item is written, before the rename."""
        if self.primary:
            (tmp,) = self.directory.glob(f"{self.in_flight}.orbax-checkpoint-tmp*")
            (tmp / CHECKSUMS).write_text(json.dumps(_file_checksums(tmp)))

    def _failed(self, step: int, error: BaseException) -> None:
        self.failed.append(step)
        self.say(
            f"error: checkpoint of step {step} in {self.directory} failed: {type(error).__name__}: {error}. "
            f"Earlier checkpoints are untouched ({complete_steps(self.directory) or 'none yet'}); "
            "training continues and the next save tries again."
        )
        if self.primary:
            for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(p, ignore_errors=True)
        self.mngr.reload()

    def _collect_garbage(self) -> None:
        steps = complete_steps(self.directory)
        keep = set(steps[-self.cfg.keep :])
        if self.cfg.keep_every:
            keep |= {s for s in steps if s % self.cfg.keep_every == 0}
        if self.primary:
            for s in steps:
                if s not in keep:
                    # Rename first: a half-deleted directory must never look like a checkpoint.
                    doomed = self.directory / f"{s}.deleting-{time.time_ns()}"
                    (self.directory / str(s)).rename(doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
        self.mngr.reload()


# ============================================================================================
# Restoring: latest readable checkpoint, checked against the config before any array is read.
# ============================================================================================


def _read_config(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def check_model(saved_meta: dict[str, Any], abstract_params, where: Path, changes: list[str]) -> None:
    """Raise a ConfigError naming the first parameter whose shape differs (checkpoint vs config)."""
    want = _flat(abstract_params)
    have = {k[len("params.") :]: v for k, v in saved_meta.items() if k.startswith("params.")}
    model_changes = [c for c in changes if c.startswith("model.")]
    why = f" (model config changed: {'; '.join(model_changes)})" if model_changes else ""
    fix = "train with the checkpoint's model settings, or give the run another name to start fresh"
    for name in sorted(set(want) | set(have)):
        if name not in have:
            raise ConfigError(f"parameter {name!r} of the config is not in checkpoint {where}{why}; {fix}")
        if name not in want:
            raise ConfigError(f"checkpoint {where} has parameter {name!r} that the config lacks{why}; {fix}")
        if tuple(have[name].shape) != tuple(want[name].shape):
            raise ConfigError(
                f"parameter {name!r} has shape {tuple(have[name].shape)} in checkpoint {where} but "
                f"{tuple(want[name].shape)} in the config{why}; {fix}"
            )


def _restore_one(
    mngr: ocp.CheckpointManager, step: int, abstract_state, config: dict, fresh_opt_state
) -> tuple[Any, list[str]]:
    where = Path(mngr.directory) / str(step)
    verify(where)
    saved_config = _read_config(mngr, step)
    meta = _flat(mngr.item_metadata(step)["state"].tree)
    changes = _config_changes(saved_config, config)
    check_model(meta, abstract_state["params"], where, changes)
    want_opt = {k: tuple(v.shape) for k, v in _flat({"opt_state": abstract_state["opt_state"]}).items()}
    have_opt = {k: tuple(v.shape) for k, v in meta.items() if k.startswith("opt_state.")}
    if want_opt == have_opt:
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        state = state["state"]
        notes = [f"resumed from {where}: params, optimizer state and step {step}"]
    else:
        target = {"step": abstract_state["step"], "params": abstract_state["params"]}
        state = _partial_restore(mngr, step, target)
        state["opt_state"] = fresh_opt_state(state["params"])
        new = sorted(set(want_opt.items()) - set(have_opt.items()))
        notes = [
            f"resumed from {where}: params and step {step}; optimizer state NOT restored, its structure "
            f"changed ({len(new)} of {len(want_opt)} entries differ, e.g. {[k for k, _ in new[:3]]}): "
            "moments and schedule count start fresh"
        ]
    if changes:
        notes.append(f"config changed since that checkpoint (new values apply now): {'; '.join(changes)}")
    data = mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    if int(data["step"]) != int(state["step"]):
        raise ValueError(f"{where}: data position {data['step']} != state step {int(state['step'])}")
    return state, notes


def _partial_restore(mngr: ocp.CheckpointManager, step: int, target) -> dict:
    args = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    # Partial restore needs the PyTree handler; the manager's state handler is the Standard one.
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        return dict(ckptr.restore(Path(mngr.directory) / str(step) / "state", args=args))


def _brief(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def _set_aside(directory: Path, step: int) -> Path:
    dest = directory / f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        (directory / str(step)).rename(dest)
    return dest


def restore(
    directory: str | Path, abstract_state, config: dict[str, Any], fresh_opt_state: Callable[[Any], Any]
) -> tuple[Any, int, list[str]]:
    """The latest readable checkpoint in ``directory`` placed like ``abstract_state`` (ShapeDtypeStructs
    with .sharding, so any mesh works) -> (state, step, notes for the log).

    An unreadable (truncated, corrupted) checkpoint is moved aside to ``<step>.unreadable-<time>`` and
    the previous one is used, with a note naming both. A model whose parameter shapes differ from the
    checkpoint is a ConfigError before any array is read. If the optimizer state no longer has the
    checkpoint's structure, params and step are restored and ``fresh_opt_state(params)`` supplies it.
    """
    directory = Path(directory).absolute()
    steps = complete_steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}")
    mngr = _open(directory)
    bad: list[tuple[int, str]] = []
    try:
        for step in reversed(steps):
            try:
                state, notes = _restore_one(mngr, step, abstract_state, config, fresh_opt_state)
            except ConfigError:  # the config does not fit: falling back would not help
                raise
            except Exception as e:  # unreadable: truncated file, bad JSON, checksum, missing item
                bad.append((step, _brief(e)))
                continue
            for s, err in bad:
                aside = _set_aside(directory, s)
                notes.insert(
                    0,
                    f"warning: checkpoint {directory / str(s)} is unreadable ({err}); moved it to {aside} "
                    f"and resumed from the previous one, {directory / str(step)}",
                )
            return state, step, notes
    finally:
        mngr.close()
    errors = "; ".join(f"step {s}: {err}" for s, err in bad)
    raise CheckpointError(
        f"every checkpoint in {directory} is unreadable ({errors}); nothing was changed. To start the run "
        f"over, move them away (mv {directory} {directory}.unreadable) and run again; to keep the run as "
        "it is, train under another name (--set name=NEW)"
    )


# ============================================================================================
# Params only: sampling, evaluation, export.
# ============================================================================================


def resolve(path: str | Path) -> tuple[Path, int]:
    """A run dir, its checkpoints/ dir or one step dir -> (checkpoints dir, step)."""
    p = Path(path).absolute()
    if p.name.isdigit() and (p / "state").is_dir():
        return p.parent, int(p.name)
    for root in (p / "checkpoints", p):
        steps = complete_steps(root)
        if steps:
            return root, steps[-1]
    raise FileNotFoundError(
        f"no checkpoint found at {str(path)!r}; pass a run directory (runs/NAME), its checkpoints/ "
        "directory or one step directory (runs/NAME/checkpoints/STEP)"
    )


class Loaded(NamedTuple):
    cfg: Any
    params: Any
    step: int
    mesh: jax.sharding.Mesh
    """Where the params are: ``sharding.loading_mesh`` over the devices asked for."""


def load_params(path: str | Path, devices: Sequence[jax.Device] | None = None) -> Loaded:
    """(config, params, step, mesh) from a checkpoint alone. Params are placed on
    ``sharding.loading_mesh`` over ``devices`` (default all): split over fsdp as far as the model
    allows, so a model too large for one device still loads. Optimizer state is not read.

    Given a run or checkpoints directory, an unreadable latest checkpoint falls back to the
    previous one with a warning; given a step directory, that step or an error.
    """
    from jaxlm import lm, sharding
    from jaxlm.config import from_dict

    root, step = resolve(path)
    explicit = Path(path).absolute() == root / str(step)
    candidates = [step] if explicit else [s for s in reversed(complete_steps(root)) if s <= step]
    errors = []
    mngr = _open(root)
    try:
        for s in candidates:
            try:
                verify(root / str(s))
                cfg = from_dict(_read_config(mngr, s))
                model = lm.get(cfg.model)
                mesh = sharding.loading_mesh(cfg.model, model.decls, devices)
                abstract = model.abstract_params()
                shard = sharding.shardings(mesh, model.logical_axes(), abstract)
                params = _partial_restore(mngr, s, {"params": abstract_with_shardings(abstract, shard)})
            except ConfigError:
                raise
            except Exception as e:
                errors.append(f"{root / str(s)}: {_brief(e)}")
                continue
            if errors:
                print(
                    f"warning: skipped unreadable checkpoint(s) {'; '.join(errors)}; loaded {root / str(s)}",
                    file=sys.stderr,
                )
            return Loaded(cfg, params["params"], s, mesh)
    finally:
        mngr.close()
    fix = (
        f"pass {root}, not one step, to fall back to an earlier checkpoint"
        if explicit and len(complete_steps(root)) > 1
        else f"no earlier checkpoint to fall back to: pass another --checkpoint, or retrain (move {root} "
        f"away, e.g. mv {root} {root}.unreadable, and run jaxlm train again)"
    )
    raise CheckpointError(f"no readable checkpoint at {str(path)!r} ({'; '.join(errors)}); {fix}")


# ============================================================================================
# Preemption: the first SIGTERM/SIGINT asks the loop to stop after its step; a second exits now.
# ============================================================================================


class StopRequest:
    """Installs SIGTERM/SIGINT handlers until ``restore()``: the first signal sets ``signal`` (the
    loop checks ``requested()`` after each step); a second exits at once with 128 + its number.

    Several processes may see their signals at different steps yet must stop at the same one, and
    asking each other after a step would make the host wait for that step. So every step carries
    each process's flag in (``flags(mesh)``) and returns their maximum among its metrics, which the
    loop reads one step late anyway; that agreed value, passed to ``requested``, is the same on
    every process at the same step. The stop then comes a step or two after the signal."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signal: str | None = None  # name of the signal that asked to stop
        self.previous = {}
        self._flags: dict = {}  # (mesh, flag) -> the device array flags() returns
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            print(f"\n{name} again: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = name
        print(
            f"\n{name}: finishing this step and writing a checkpoint; {name} again exits at once",
            file=sys.stderr,
            flush=True,
        )

    def flags(self, mesh: jax.sharding.Mesh) -> jax.Array:
        """This process's flag (1: a signal came) as int32[mesh.size], one element on each device
        of ``mesh``, so its max over the array is the max over processes. Each of the two arrays is
        built once: a step that takes one neither copies nor waits."""
        key = (mesh, self.signal is not None)
        if key not in self._flags:
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
            self._flags[key] = jax.make_array_from_callback(
                (mesh.size,), sharding, lambda _: np.full((1,), key[1], np.int32)
            )
        return self._flags[key]

    def requested(self, agreed: bool = False) -> bool:
        """Whether to stop after this step. One process: as soon as a signal came. Several: when
        ``agreed``, the max of every process's ``flags`` fed to a step whose metrics were read."""
        if jax.process_count() == 1:
            return self.signal is not None
        if agreed and self.signal is None:
            self.signal = "a signal to another process"
        return agreed

    def restore(self) -> None:
        """Reinstate the handlers that were there before."""
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}
