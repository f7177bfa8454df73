"""Profiling: a few steps under ``jax.profiler``, and the ops that took the time, read from the trace.

    jaxlm bench EXPERIMENT.py --profile DIR

writes a trace that TensorBoard's profile plugin (``*.xplane.pb``) and ui.perfetto.dev
(``perfetto_trace.json.gz``) open, and prints the 15 ops that took the most time.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path
from typing import Any

import jax

PROFILE_STEPS = 3  # enough to see every op of the step; few, so the trace stays a small file


def profile_steps(step, state, batch, log_dir: str):
    """Run ``PROFILE_STEPS`` steps under ``jax.profiler.trace``; (state, metrics, the trace's summary).

    The trace goes to ``log_dir/plugins/profile/<time>/`` (a new folder each time, nothing
    overwritten), readable by TensorBoard/XProf (``*.xplane.pb``) and by ui.perfetto.dev
    (``perfetto_trace.json.gz``), which ``trace_top_ops`` also reads."""
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(PROFILE_STEPS):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
    newest = max((Path(log_dir) / "plugins" / "profile").iterdir(), key=lambda p: p.stat().st_mtime)
    trace = newest / "perfetto_trace.json.gz"  # written by JAX, or the trace call raised
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
