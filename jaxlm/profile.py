"""Profiling: steps under ``jax.profiler``, and the ops that took the time, read from the trace.

    jaxlm train EXPERIMENT.py --profile 3      # (or 5:8) into <run>/profile/
    jaxlm bench EXPERIMENT.py --profile DIR

write a trace that TensorBoard's profile plugin (``*.xplane.pb``; ``pip install
tensorboard-plugin-profile``, then ``tensorboard --logdir DIR``) opens, each step in it named
``train_step``. bench also writes ``perfetto_trace.json.gz`` (ui.perfetto.dev) and prints the 15
ops that took the most time.
"""

from __future__ import annotations

import collections
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxlm.config import ConfigError

PROFILE_STEPS = 3  # enough to see every op of the step; few, so the trace stays a small file
STEP_NAME = "train_step"  # each step's name in the trace: the profile plugin's step markers


def parse_steps(text: str) -> tuple[int | None, int]:
    """``--profile`` as ``(first, stop)``: "N" is ``(None, N)``, N steps after a run's first (which
    compiles); "A:B" is steps A to B - 1, as a Python range."""
    first, colon, stop = text.partition(":")
    try:
        span = (int(first), int(stop)) if colon else (None, int(text))
        ok = 1 <= span[0] < span[1] if colon else span[1] >= 1
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(
            f"--profile {text!r}: give a step count N >= 1 (e.g. 3) or steps A:B with 1 <= A < B (e.g. 5:8)"
        )
    return span


class TraceWindow:
    """Steps ``first`` to ``stop - 1`` of a loop traced into ``log_dir`` (jax.profiler's
    ``plugins/profile/<time>/``), each step under a ``StepTraceAnnotation`` named ``train_step``.
    ``call`` runs a step; the trace stops after the last one has finished on the device, or at
    ``close`` when the loop ends before it."""

    def __init__(self, log_dir: Path | str | None, first: int = 0, stop: int = 0, perfetto: bool = False):
        self.log_dir, self.first, self.stop, self.perfetto = log_dir, first, stop, perfetto
        self.tracing = False

    def call(self, step: int, fn: Callable, *args):
        if self.log_dir is not None and step == self.first:
            jax.profiler.start_trace(str(self.log_dir), create_perfetto_trace=self.perfetto)
            self.tracing = True
        with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step):
            out = fn(*args)
        if self.tracing and step == self.stop - 1:
            jax.block_until_ready(out)  # the last step's ops belong in the trace
            self.close()
        return out

    def done(self, step: int) -> bool:
        """Whether ``step`` was the last of the window: the trace is written."""
        return self.log_dir is not None and step == self.stop - 1

    def close(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()

    def folder(self) -> Path:
        """The newest trace folder, ``log_dir/plugins/profile/<time>/`` (a new one each trace)."""
        return max((Path(self.log_dir) / "plugins" / "profile").iterdir(), key=lambda p: p.stat().st_mtime)


def run_window(log_dir: Path, span: tuple[int | None, int] | None, start_step: int, last_step: int):
    """The ``TraceWindow`` of ``jaxlm train --profile`` for a run training steps ``start_step + 1``
    to ``last_step``; only process 0 traces (processes on one host would write the same file)."""
    if span is None or jax.process_index() != 0:
        return TraceWindow(None)
    first, stop = span
    if first is None:  # N steps after the first, whose compilation would fill the trace
        first, stop = start_step + 2, start_step + 2 + stop
    if not start_step < first < stop <= last_step + 1:
        raise ConfigError(
            f"--profile: steps {first}..{stop - 1} are not all among the steps this run trains, "
            f"{start_step + 1}..{last_step}; pick fewer or others"
        )
    return TraceWindow(log_dir, first, stop)


def profile_steps(step, state, batch, log_dir: str):
    """Run ``PROFILE_STEPS`` steps traced into ``log_dir``; (state, metrics, the trace's summary).

    The trace goes to ``log_dir/plugins/profile/<time>/`` (a new folder each time, nothing
    overwritten), readable by TensorBoard/XProf (``*.xplane.pb``) and by ui.perfetto.dev
    (``perfetto_trace.json.gz``), which ``trace_top_ops`` also reads."""
    window = TraceWindow(log_dir, 1, PROFILE_STEPS + 1, perfetto=True)
    for i in range(1, PROFILE_STEPS + 1):
        state, metrics = window.call(i, step, state, batch)
    trace = window.folder() / "perfetto_trace.json.gz"  # written by JAX, or the trace call raised
    summary = {"trace": str(trace), "steps": PROFILE_STEPS} | trace_top_ops(trace, steps=PROFILE_STEPS)
    return state, metrics, summary


def trace_top_ops(path: str | Path, n: int = 15, steps: int = 1) -> dict[str, Any]:
    """The ``n`` XLA ops that took the most time in a Chrome/Perfetto trace (``*.json.gz``).

    An op is a complete event ("ph": "X") naming its HLO instruction (``args.hlo_op``); its time is
    its own (less the ops nested in it, see ``_self_times``), summed over its calls (once per layer
    in the layer scan). Where the trace has devices (``/device:...``
    processes, GPU or TPU), only device time counts, and of it the ``XLA Ops`` line when there is
    one (one event per op, where the stream lines have one per kernel: counting both would count
    twice); on a CPU, ops run on host threads. ``modules`` names the XLA programs seen
    (``jit_train_step`` for the train step).
    """
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]

    def line(e):
        return thread.get((e["pid"], e.get("tid")), "")

    device = [e for e in spans if process.get(e["pid"], "").startswith("/device:")]
    xla_ops = [e for e in device if line(e) == "XLA Ops"]
    if xla_ops:
        ops, source = xla_ops, "device 'XLA Ops' line"
    else:
        has_op = [e for e in device or spans if "hlo_op" in e.get("args", {})]
        ops, source = has_op, "device kernels" if device else "host threads"
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e, self_us in _self_times(ops):
        total = totals[e.get("args", {}).get("hlo_op") or e["name"]]
        total[0] += self_us
        total[1] += 1
    all_us = sum(t for t, _ in totals.values())
    modules = {e["args"]["hlo_module"] for e in spans if "hlo_module" in e.get("args", {})}
    modules |= {e["name"] for e in device if line(e) == "XLA Modules"}
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    return {
        "source": source,
        "modules": sorted(modules),
        "op_ms_per_step": all_us / 1e3 / steps,
        "top_ops": [
            {
                "op": op,
                "ms_per_step": t / 1e3 / steps,
                "calls_per_step": c / steps,
                "fraction": t / (all_us or 1),
            }
            for op, (t, c) in top
        ],
    }


def _self_times(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """Each event with its duration (microseconds) less that of the events nested in it on its own
    thread: a ``while`` op (the layer scan) encloses its body's ops, which are counted themselves."""
    out: list[list[Any]] = []
    by_line: dict[tuple[Any, Any], list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        by_line[e["pid"], e.get("tid")].append(e)
    for line in by_line.values():
        open_: list[tuple[float, list[Any]]] = []  # (end, entry) of the events enclosing the current one
        for e in sorted(line, key=lambda e: (e["ts"], -e["dur"])):
            while open_ and open_[-1][0] <= e["ts"]:
                open_.pop()
            entry = [e, e["dur"]]
            if open_:
                open_[-1][1][1] -= e["dur"]  # only the innermost parent: it holds e directly
            open_.append((e["ts"] + e["dur"], entry))
            out.append(entry)
    return [(e, max(us, 0.0)) for e, us in out]


def top_ops_report(p: dict[str, Any]) -> str:
    lines = [
        f"  profile          {p['steps']} steps traced: {p['trace']}",
        f"  top {len(p['top_ops'])} ops        of {p['op_ms_per_step']:.3f} ms of ops a step ({p['source']}; "
        f"modules: {', '.join(p['modules']) or 'none named'})",
    ]
    for o in p["top_ops"]:
        lines.append(
            f"    {o['ms_per_step']:9.3f} ms {100 * o['fraction']:5.1f}% x{o['calls_per_step']:<5g} {o['op']}"
        )
    return "\n".join(lines)
