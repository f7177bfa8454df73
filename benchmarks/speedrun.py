"""Wall time and tokens to the default experiment's val loss: experiments/speedrun.py against
experiments/shakespeare.py, alternating on one machine (default, speedrun, default, speedrun, ...).

    python benchmarks/speedrun.py --repeats 2                  # the measurement (~30 min idle)
    python benchmarks/speedrun.py --repeats 1 --target 10 \\
        --set train.steps=4 train.eval_every=2 train.eval_batches=1   # a dry run, a minute

Each run is ``jaxlm train EXPERIMENT --set train.target_val_loss=TARGET`` in a fresh run directory
(``--out``), so it stops at its first evaluation at or below the target and its wall time (the
whole command: start-up, compilation, data, evaluations, checkpoints) is its time to the target.
Tokens to the target are step x batch x seq_len at that evaluation. A run that ends above the
target is reported as not reaching it. Run it on an otherwise idle machine: the load average
before each run is printed beside it. ``--set`` overrides apply to both experiments alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(experiment: str, name: str, out: Path, target: float, sets: list[str]) -> dict:
    """One ``jaxlm train`` run; its wall time, and from its run directory the step, tokens and val
    loss at which it stopped."""
    overrides = [f"name={name}", f"train.run_dir={out}", f"train.target_val_loss={target}", *sets]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "train", experiment, "--set", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {experiment} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    run = out / name
    summary = json.loads((run / "summary.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    val = summary["val_loss"]
    reached = val is not None and val <= target
    return {
        "experiment": experiment,
        "wall_s": wall,
        "reached": reached,
        "step": summary["step"],
        "tokens": summary["step"] * cfg["train"]["batch_size"] * cfg["model"]["seq_len"],
        "val_loss": val,
        "compute_dtype": cfg["model"]["compute_dtype"],
        "load_before": load,
    }


def describe(label: str, r: dict) -> str:
    to_target = (
        f"to target {r['wall_s']:7.1f} s, {r['tokens']:>9,} tokens (step {r['step']})"
        if r["reached"]
        else f"target NOT reached (ran {r['wall_s']:.1f} s, {r['tokens']:,} tokens)"
    )
    return (
        f"{label:<22} {to_target} | final val loss {r['val_loss']:.4f} | "
        f"{r['compute_dtype']} | load before {r['load_before']:.1f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs (default, speedrun)")
    p.add_argument("--target", type=float, default=1.95, help="val loss, nats per byte")
    p.add_argument("--default", default="experiments/shakespeare.py")
    p.add_argument("--speedrun", default="experiments/speedrun.py")
    p.add_argument("--out", type=Path, default=None, help="fresh directory for the runs")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for both")
    args = p.parse_args()
    if args.repeats < 1:
        sys.exit("error: --repeats must be >= 1")
    out = (args.out or ROOT / "runs" / time.strftime("speedrun-bench-%Y%m%d-%H%M%S")).resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: --out {out} is not empty; name a fresh directory")
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.repeats} x ({args.default}, {args.speedrun}) to val loss <= {args.target}; runs in {out}")

    pairs = []
    for i in range(1, args.repeats + 1):
        pair = {}
        for kind, experiment in (("default", args.default), ("speedrun", args.speedrun)):
            r = train(experiment, f"{kind}-{i}", out, args.target, args.set)
            print(describe(f"{kind} {i}/{args.repeats}", r), flush=True)
            pair[kind] = r
        pairs.append(pair)

    both = [q for q in pairs if q["default"]["reached"] and q["speedrun"]["reached"]]
    print(f"\n{len(both)} of {len(pairs)} pairs reached the target in both runs")
    if both:
        for key, unit in (("wall_s", "s"), ("tokens", "tokens")):
            d = statistics.median(q["default"][key] for q in both)
            s = statistics.median(q["speedrun"][key] for q in both)
            ratio = statistics.median(q["speedrun"][key] / q["default"][key] for q in both)
            print(
                f"{'wall time' if key == 'wall_s' else 'tokens'} to target: default {d:,.1f} {unit}, "
                f"speedrun {s:,.1f} {unit}; speedrun/default {ratio:.3f} (median of the pairs' ratios)"
            )
    if args.json:
        args.json.write_text(json.dumps({"target": args.target, "pairs": pairs}, indent=2))


if __name__ == "__main__":
    main()
