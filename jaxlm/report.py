"""Sweep results: a table sorted by val loss, the same as CSV, and a PNG of the loss curves.

The numbers come from each run's TensorBoard events (``<run>/tb``; TensorBoard pointed at the sweep
directory shows the same curves); the status comes from ``summary.json`` and the swept values from
``overrides.json``, both written by ``jaxlm sweep``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
from pathlib import Path
from typing import Any

from jaxlm.config import ConfigError
from jaxlm.files import read_json

TAGS = ("train/loss", "val/loss", "train/tokens_per_s")
Curve = list[tuple[int, float]]  # (step, value) in step order


@dataclasses.dataclass
class RunResult:
    name: str
    overrides: dict[str, Any]
    status: str  # finished | failed | interrupted (events but no summary) | pending (nothing yet)
    curves: dict[str, Curve]
    error: str = ""

    def last(self, tag: str) -> float | None:
        curve = self.curves.get(tag)
        return curve[-1][1] if curve else None

    @property
    def train_loss(self) -> float | None:
        return self.last("train/loss")

    @property
    def val_loss(self) -> float | None:
        return self.last("val/loss")

    @property
    def best_val_loss(self) -> float | None:
        curve = self.curves.get("val/loss")
        return min(v for _, v in curve) if curve else None

    @property
    def tokens_per_s(self) -> float | None:
        """Median over logged steps, leaving out the first, which includes compilation."""
        values = [v for _, v in self.curves.get("train/tokens_per_s", [])]
        return statistics.median(values[1:] or values) if values else None

    @property
    def step(self) -> int | None:
        curve = self.curves.get("train/loss")
        return curve[-1][0] if curve else None


def read_curves(tb_dir: Path, tags: tuple[str, ...] = TAGS) -> dict[str, Curve]:
    """Scalars of ``tags`` from the event files in ``tb_dir``, with the steps a resumed run redid
    replaced: once any tag goes back to step s, every earlier event at step >= s is dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    if not tb_dir.is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0}, purge_orphaned_data=False)
    acc.Reload()
    events = []  # (wall_time, step, tag, value) in the order they were written
    for tag in set(tags) & set(acc.Tags()["tensors"]):
        for e in acc.Tensors(tag):
            events.append((e.wall_time, e.step, tag, float(tensor_util.make_ndarray(e.tensor_proto))))
    events.sort(key=lambda e: e[0])
    kept: list[tuple[float, int, str, float]] = []
    top = -1  # highest step kept so far; after a purge it is the step that caused it
    for event in events:
        if event[1] < top:
            kept = [e for e in kept if e[1] < event[1]]
        kept.append(event)
        top = event[1]
    curves: dict[str, Curve] = {}
    for _, step, tag, value in kept:
        curves.setdefault(tag, []).append((step, value))
    return {tag: sorted(curve) for tag, curve in curves.items()}


def run_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; pass a sweep directory such as runs/<sweep>")
    if (path / "tb").is_dir() or (path / "summary.json").is_file():
        return [path]  # a single run
    dirs = sorted(
        d for d in path.iterdir() if d.is_dir() and any((d / f).exists() for f in ("overrides.json", "tb"))
    )
    if not dirs:
        raise ConfigError(f"{path} holds no runs (no */overrides.json or */tb); run `jaxlm sweep` first")
    return dirs


def load(path: str | Path) -> list[RunResult]:
    """Every run under ``path``, best final val loss first (runs without one last)."""
    results = []
    for d in run_dirs(Path(path)):
        summary = read_json(d / "summary.json") or {}
        curves = read_curves(d / "tb")
        status = summary.get("status") or ("interrupted" if curves else "pending")
        record = read_json(d / "overrides.json") or {}  # JSON objects lose key order; "keys" keeps it
        overrides = {k: record["overrides"][k] for k in record.get("keys", record.get("overrides", {}))}
        results.append(RunResult(d.name, overrides, status, curves, summary.get("error") or ""))
    return sorted(results, key=lambda r: (r.val_loss is None, r.val_loss or 0.0, r.name))


# ============================================================================================
# Table and CSV.
# ============================================================================================


def swept_keys(results: list[RunResult]) -> list[str]:
    return list(dict.fromkeys(k for r in results for k in r.overrides))


def rows(results: list[RunResult]) -> tuple[list[str], list[list[Any]]]:
    keys = swept_keys(results)
    header = ["run", *keys, "train loss", "val loss", "best val loss", "tokens/s", "steps", "status"]
    body = [
        [
            r.name,
            *[r.overrides.get(k) for k in keys],
            r.train_loss,
            r.val_loss,
            r.best_val_loss,
            r.tokens_per_s,
            r.step,
            r.status,
        ]
        for r in results
    ]
    return header, body


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def table(results: list[RunResult]) -> str:
    """A Markdown table: aligned on a terminal, pasteable into a document."""
    header, body = rows(results)
    cells = [header] + [[_cell(v) for v in row] for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [
        i > 0 and all(isinstance(row[i], (int, float)) or row[i] is None for row in body)
        for i in range(len(header))
    ]

    def line(row: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True)
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join("-" * (w + 1) + ":" if n else "-" * (w + 2) for w, n in zip(widths, numeric, strict=True))
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def write_csv(results: list[RunResult], path: Path) -> None:
    header, body = rows(results)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "error"])
        for row, r in zip(body, results, strict=True):
            writer.writerow(["" if v is None else v for v in row] + [r.error])


# ============================================================================================
# Plot.
# ============================================================================================


def _label(r: RunResult) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r.overrides.items()) or r.name


def plot(results: list[RunResult], path: Path) -> None:
    """Loss curves of every run; for a one-dimensional sweep, also val loss against the swept value."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed (Agg)

    keys = swept_keys(results)
    one_dim = len(keys) == 1 and any(r.val_loss is not None for r in results)
    fig = Figure(figsize=(11 if one_dim else 7, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if one_dim else 1, squeeze=False)[0]
    ax = axes[0]
    for i, r in enumerate(results):
        color = f"C{i % 10}"
        if train := r.curves.get("train/loss"):
            ax.plot(*zip(*train, strict=True), color=color, lw=1, alpha=0.6)
        if val := r.curves.get("val/loss"):
            ax.plot(*zip(*val, strict=True), "o--", color=color, ms=3, lw=1.2)
        ax.plot(
            [], [], color=color, label=f"{_label(r)} ({r.status})" if r.status != "finished" else _label(r)
        )
    ax.set(xlabel="step", ylabel="loss", title="train loss (lines), val loss (dots)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if one_dim:
        key = keys[0]
        points = sorted((r.overrides[key], r.val_loss) for r in results if key in r.overrides and r.val_loss)
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax = axes[1]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        positions = xs if numeric else range(len(xs))
        ax.plot(positions, ys, "o-")
        if not numeric:
            ax.set_xticks(list(positions), [str(x) for x in xs])
        elif xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="final val loss", title=f"val loss against {key}")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def grouped(
    results: list[RunResult], x: str, lines: str | None = None, panels: str | None = None
) -> dict[Any, dict[Any, list[tuple[Any, float]]]]:
    """{panel value: {line value: [(x, final val loss), ...] in x order}} over the runs with a val
    loss; ``lines``/``panels`` None put every run in one line/panel. Each key must be swept."""
    keys = swept_keys(results)
    for flag, key in (("--x", x), ("--lines", lines), ("--panels", panels)):
        if key is not None and key not in keys:
            raise ConfigError(f"report {flag} {key}: not a swept key of these runs; swept keys: {keys}")
    out: dict[Any, dict[Any, list[tuple[Any, float]]]] = {}
    for r in results:
        if r.val_loss is None or x not in r.overrides:
            continue
        panel = r.overrides.get(panels) if panels else None
        line = r.overrides.get(lines) if lines else None
        out.setdefault(panel, {}).setdefault(line, []).append((r.overrides[x], r.val_loss))
    order = lambda vs: sorted(vs, key=lambda v: (not _numeric([v]), v if _numeric([v]) else str(v)))  # noqa: E731
    return {
        p: {line: sorted(out[p][line], key=lambda xy: xy[0]) for line in order(out[p])} for p in order(out)
    }


def best_x(groups: dict[Any, dict[Any, list[tuple[Any, float]]]]) -> dict[Any, dict[Any, Any]]:
    """{panel: {line: the x of the lowest final val loss}}."""
    return {
        p: {line: min(pts, key=lambda xy: xy[1])[0] for line, pts in lines.items()}
        for p, lines in groups.items()
    }


def plot_against(
    groups: dict[Any, dict[Any, list[tuple[Any, float]]]],
    path: Path,
    x: str,
    lines: str | None = None,
    panels: str | None = None,
) -> None:
    """Final val loss against the swept ``x``, a line per value of ``lines``, a panel per value of
    ``panels`` (shared axes, so the panels compare), each line's best point ringed; e.g. µP's
    learning-rate transfer: ``--x optim.lr --lines model.d_model --panels model.parametrization``.
    ``groups`` is ``grouped(results, x, lines, panels)``, not empty."""
    from matplotlib.figure import Figure

    best = best_x(groups)
    fig = Figure(figsize=(4.6 * len(groups) + 1, 4), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    line_values = list(dict.fromkeys(v for g in groups.values() for v in g))
    xs = [xy[0] for g in groups.values() for pts in g.values() for xy in pts]
    log = _numeric(xs) and min(xs) > 0 and max(xs) / min(xs) >= 10
    for ax, (panel, group) in zip(axes, groups.items(), strict=True):
        for line, pts in group.items():
            color = f"C{line_values.index(line) % 10}"
            label = f"{lines.rsplit('.', 1)[-1]}={line}" if lines else None
            ax.plot(*zip(*pts, strict=True), "o-", color=color, ms=4, label=label)
            ax.plot([best[panel][line]], [min(y for _, y in pts)], "o", ms=10, mfc="none", color=color)
        if log:
            ax.set_xscale("log", base=2)
        title = f"{panels.rsplit('.', 1)[-1]}={panel}" if panels else f"val loss against {x}"
        ax.set(xlabel=x, title=title)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("final val loss (rings: best per line)")
    fig.savefig(path, dpi=90)


# ============================================================================================
# The command.
# ============================================================================================


def main(args: argparse.Namespace) -> int:
    """``jaxlm report`` with the arguments ``jaxlm.cli`` parsed."""
    if args.scaling:
        from jaxlm import scaling

        return scaling.main(args)
    if args.predict:
        raise ConfigError("--predict names runs left out of a scaling fit; use it with --scaling")
    if (args.lines or args.panels) and not args.x:
        raise ConfigError("report --lines/--panels need --x KEY, the swept key to plot val loss against")
    results = load(args.sweep_dir)
    out = Path(args.out or args.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(table(results))
    for r in results:
        if r.status == "failed":
            print(f"\n{r.name} failed:\n  " + "\n  ".join(r.error.strip().splitlines()[-5:]))
    write_csv(results, out / "report.csv")
    plot(results, out / "report.png")
    written = [out / "report.csv", out / "report.png"]
    if args.x:
        groups = grouped(results, args.x, args.lines, args.panels)
        if not groups:
            raise ConfigError(f"report --x {args.x}: no run with a final val loss yet; nothing to plot")
        print(f"\nbest {args.x} (lowest final val loss):")
        for panel, by_line in best_x(groups).items():
            for line, value in by_line.items():
                where = ", ".join(f"{k}={v}" for k, v in ((args.panels, panel), (args.lines, line)) if k)
                print(f"  {where or 'all runs'}: {value}")
        written.append(out / f"report_{args.x.rsplit('.', 1)[-1]}.png")
        plot_against(groups, written[-1], args.x, args.lines, args.panels)
    print(f"\nwrote {', '.join(map(str, written[:-1]))} and {written[-1]}")
    return 0
