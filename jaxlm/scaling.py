"""Scaling laws fitted to a sweep's final val losses: ``jaxlm report --scaling runs/<sweep>``.

Two laws, fitted by least squares (``scipy.optimize.curve_fit``, started from the best point of a
grid over the exponents, where the law is linear in the other parameters):

    L(C)    = E + A * c^-alpha                       c = C / 1e15  (C in FLOPs)
    L(N, D) = E + A * n^-alpha + B * d^-beta         n = N / 1e6,  d = D / 1e9   (Chinchilla's
                                                     approach 3, Hoffmann et al. 2022)

Per run, from its ``config.json`` and ``summary.json``:

- N = ``lm.get(cfg.model).flop_params``: every parameter a token's forward multiplies by; the
  token and position lookup tables are left out, a tied output projection is counted (jaxlm/lm.py).
- D = steps x batch_size x seq_len, the tokens trained on.
- C = D x ``bench.flops_per_token(cfg.model)["total"]``: 6N plus the attention term 12·L·H·Q·T of
  jaxlm/bench.py, the same FLOPs the benchmark's MFU uses.

Uncertainties are 1 sigma, from the fit's covariance scaled by the residual variance (few runs make
them rough). The compute-optimal tokens per parameter comes from the L(N, D) fit when the runs vary
N and D/N independently (minimising L(N, D) under C = 6ND, the Chinchilla constraint, which leaves
out the attention term): N_opt grows as C^(beta / (alpha + beta)). Otherwise it is read off the
frontier of the runs: those that reach a lower loss than every run of less compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm import report
from jaxlm.config import ConfigError, from_dict
from jaxlm.files import read_json, write_json

UNIT_C, UNIT_N, UNIT_D = 1e15, 1e6, 1e9  # the fit's variables are C, N, D in these units
EXPONENTS = np.linspace(0.02, 1.5, 75)  # the starting grid; the fit itself is not bounded
VARIES = 0.1  # std of log(N) and of log(D/N) above which the runs vary both N and D (10%)


# ============================================================================================
# The laws and their fit.
# ============================================================================================


def law_c(c: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    return E + A * c**-alpha


def law_nd(nd: np.ndarray, E: float, A: float, B: float, alpha: float, beta: float) -> np.ndarray:
    n, d = nd
    return E + A * n**-alpha + B * d**-beta


@dataclasses.dataclass(frozen=True)
class Fit:
    law: str  # "L(C)" or "L(N, D)"
    names: tuple[str, ...]
    values: np.ndarray
    cov: np.ndarray
    rms: float  # root mean square residual, nats
    dof: int  # points minus parameters

    @property
    def errors(self) -> np.ndarray:
        return np.sqrt(np.diag(self.cov))

    def __getitem__(self, name: str) -> float:
        return float(self.values[self.names.index(name)])

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Loss at ``x`` (c, or (n, d)) and its 1-sigma uncertainty from the parameters' covariance."""
        f = law_c if self.law == "L(C)" else law_nd
        mean = f(x, *self.values)
        grad = _jacobian(lambda p: f(x, *p), self.values)
        return mean, np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", grad, self.cov, grad), 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "law": self.law,
            "units": {"C": UNIT_C, "N": UNIT_N, "D": UNIT_D},
            "values": dict(zip(self.names, self.values.tolist(), strict=True)),
            "errors": dict(zip(self.names, self.errors.tolist(), strict=True)),
            "rms": self.rms,
            "dof": self.dof,
        }


def _jacobian(f: Callable[[np.ndarray], Any], p: np.ndarray) -> np.ndarray:
    """d f / d p by central differences, steps relative to each parameter: [..., len(p)]."""
    cols = []
    for i in range(len(p)):
        h = 1e-6 * max(abs(p[i]), 1e-3)
        up, down = p.copy(), p.copy()
        up[i] += h
        down[i] -= h
        cols.append((np.asarray(f(up)) - np.asarray(f(down))) / (2 * h))
    return np.stack(cols, axis=-1)


def _fit(
    f: Callable[..., np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    columns: Callable[[np.ndarray, Sequence[float]], list[np.ndarray]],
    names: tuple[str, ...],
    law: str,
) -> Fit:
    """Least squares of ``y ~ f(x, *linear, *exponents)``, ``f`` linear in all but the exponents."""
    from scipy.optimize import curve_fit

    n_exp = sum(1 for n in names if n in ("alpha", "beta"))  # the exponents come last
    grid = list(itertools.product(EXPONENTS, repeat=n_exp))
    X_GxPxK = np.stack([np.column_stack([np.ones_like(y), *columns(x, e)]) for e in grid])
    coef_GxK = np.einsum("gkp,p->gk", np.linalg.pinv(X_GxPxK), y)  # least squares at each grid point
    sse_G = np.sum((np.einsum("gpk,gk->gp", X_GxPxK, coef_GxK) - y) ** 2, axis=1)
    start = int(np.nanargmin(sse_G))
    try:
        values, cov = curve_fit(
            f, x, y, p0=[*coef_GxK[start], *grid[start]], xtol=1e-12, ftol=1e-12, gtol=1e-12, maxfev=20000
        )
    except RuntimeError as e:  # no convergence: say so in one line rather than print a fit that is not one
        raise ConfigError(
            f"fitting {law} to {len(y)} losses did not converge ({e}); check the runs for a diverged one"
        ) from None
    residual = y - f(x, *values)
    return Fit(law, names, values, cov, float(np.sqrt(np.mean(residual**2))), len(y) - len(names))


def fit_c(C: np.ndarray, L: np.ndarray) -> Fit:
    """L(C) = E + A (C/1e15)^-alpha from compute ``C`` (FLOPs) and losses ``L``."""
    c = np.asarray(C, float) / UNIT_C
    return _fit(law_c, c, np.asarray(L, float), lambda c, e: [c ** -e[0]], ("E", "A", "alpha"), "L(C)")


def fit_nd(N: np.ndarray, D: np.ndarray, L: np.ndarray) -> Fit:
    """L(N, D) = E + A (N/1e6)^-alpha + B (D/1e9)^-beta from parameters ``N``, tokens ``D``, losses ``L``."""
    nd = np.stack([np.asarray(N, float) / UNIT_N, np.asarray(D, float) / UNIT_D])
    return _fit(
        law_nd,
        nd,
        np.asarray(L, float),
        lambda nd, e: [nd[0] ** -e[0], nd[1] ** -e[1]],
        ("E", "A", "B", "alpha", "beta"),
        "L(N, D)",
    )


def optimal_tokens_per_param(fit: Fit, C: float) -> tuple[float, float]:
    """D/N minimising the L(N, D) ``fit`` at compute C = 6ND, with its 1-sigma uncertainty."""

    def ratio(p: np.ndarray) -> float:
        _, A, B, alpha, beta = p
        nd = C / (6 * UNIT_N * UNIT_D)  # n * d at this compute
        # d/dn [A n^-alpha + B (nd/n)^-beta] = 0
        n = (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * nd ** (beta / (alpha + beta))
        return (nd / n) * UNIT_D / (n * UNIT_N)

    value = ratio(fit.values)
    grad = _jacobian(ratio, fit.values)
    return float(value), float(math.sqrt(max(grad @ fit.cov @ grad, 0.0)))


def frontier(C: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Indices of the runs with a lower loss than every run of less compute, by compute."""
    out, best = [], math.inf
    for i in np.argsort(C, kind="stable"):
        if L[i] < best:
            out.append(int(i))
            best = L[i]
    return np.array(out, int)


def varies_both(N: np.ndarray, D: np.ndarray) -> bool:
    """Whether N and D/N both vary, so that L(N, D) can tell the two exponents apart; each of N and D
    needs 3 distinct values too (through 2 points, E + B * d^-beta fits for any beta)."""
    N, D = np.asarray(N, float), np.asarray(D, float)
    distinct = len(set(N)) >= 3 and len(set(D)) >= 3
    return bool(distinct and np.std(np.log(N)) > VARIES and np.std(np.log(D / N)) > VARIES)


# ============================================================================================
# Runs: N, D and C of each, from its recorded config.
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    path: Path
    N: int
    D: int
    C: float
    loss: float | None  # final val loss; None when the run has none (yet)
    status: str


def point(run_dir: Path) -> Point:
    """N, D, C and the final val loss of the run in ``run_dir``, from its config.json and summary.json."""
    from jaxlm import bench, lm

    saved = read_json(run_dir / "config.json")
    if saved is None:
        raise ConfigError(f"{run_dir} has no config.json; train it first (jaxlm sweep or jaxlm train)")
    cfg = from_dict(saved)
    summary = read_json(run_dir / "summary.json") or {}
    status = summary.get("status", "pending")
    steps = summary.get("step") or cfg.train.steps
    D = steps * cfg.train.batch_size * cfg.model.seq_len
    C = float(D * bench.flops_per_token(cfg.model)["total"])
    loss = summary.get("val_loss") if status == "finished" else None
    return Point(run_dir.name, run_dir, lm.get(cfg.model).flop_params, D, C, loss, status)


def load_points(sweep_dir: str | Path) -> list[Point]:
    """Every run of the sweep that has started training (has a config.json), by name."""
    return [point(d) for d in report.run_dirs(Path(sweep_dir)) if (d / "config.json").is_file()]


def fit_points(points: list[Point], where: str) -> dict[str, Any]:
    """The fits of the finished runs among ``points``: L(C) always, L(N, D) when both vary."""
    done = sorted((p for p in points if p.status == "finished" and p.loss is not None), key=lambda p: p.C)
    if not done:
        finished = sum(p.status == "finished" for p in points)
        raise ConfigError(
            f"{where}: none of its {len(points)} run(s) has a final val loss ({finished} finished); the "
            "fit needs finished runs with a val split (data.val_fraction > 0)"
        )
    if len(done) < 4:
        raise ConfigError(
            f"{where}: {len(done)} finished run(s) with a val loss; fitting L(C) = E + A*C^-alpha needs "
            "at least 4 (3 parameters and a degree of freedom for their uncertainties): add sizes"
        )
    N, D, C, L = (np.array([getattr(p, k) for p in done], float) for k in ("N", "D", "C", "loss"))
    out: dict[str, Any] = {"runs": done, "c": fit_c(C, L), "frontier": [done[i] for i in frontier(C, L)]}
    if varies_both(N, D):
        if len(done) >= 6:
            out["nd"] = fit_nd(N, D, L)
        else:
            out["nd_note"] = f"L(N, D) has 5 parameters and needs at least 6 runs, not {len(done)}"
    return out


# ============================================================================================
# The report.
# ============================================================================================


def _params(fit: Fit, units: str) -> list[str]:
    lines = [f"{fit.law} = {units}   (rms residual {fit.rms:.4f} nats, {fit.dof} degrees of freedom)"]
    for name, v, e in zip(fit.names, fit.values, fit.errors, strict=True):
        lines.append(f"  {name:5s} = {v:.4g} ± {e:.2g}")
    return lines


def predictions(fits: dict[str, Any], held_out: list[Point]) -> list[dict[str, Any]]:
    """Predicted (1 sigma) and measured final val loss of each run left out of the fit."""
    out = []
    for p in held_out:
        mean, sigma = fits["c"].predict(np.array(p.C / UNIT_C))
        h = {"name": p.name, "N": p.N, "D": p.D, "C": p.C, "predicted": float(mean), "sigma": float(sigma)}
        if "nd" in fits:
            mean, sigma = fits["nd"].predict(np.array([p.N / UNIT_N, p.D / UNIT_D]))
            h.update(predicted_nd=float(mean), sigma_nd=float(sigma))
        out.append({**h, "measured": p.loss, "status": p.status})
    return out


def text(fits: dict[str, Any], held_out: list[Point]) -> str:
    runs = fits["runs"]
    on_frontier = {p.name for p in fits["frontier"]}
    fitted, _ = fits["c"].predict(np.array([p.C for p in runs]) / UNIT_C)
    lines = [
        "| run | N | D | D/N | C (FLOP) | val loss | L(C) fit | frontier |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for p, f in zip(runs, fitted, strict=True):
        lines.append(
            f"| {p.name} | {p.N:,} | {p.D:,} | {p.D / p.N:.1f} | {p.C:.3e} | {p.loss:.4f} | {f:.4f} | "
            f"{'yes' if p.name in on_frontier else ''} |"
        )
    lines += ["", *_params(fits["c"], "E + A * (C / 1e15 FLOP)^-alpha")]
    C_max = max(p.C for p in runs)
    if "nd" in fits:
        lines += ["", *_params(fits["nd"], "E + A * (N / 1e6)^-alpha + B * (D / 1e9)^-beta")]
        nd = fits["nd"]
        ratio, err = optimal_tokens_per_param(nd, C_max)
        a = nd["beta"] / (nd["alpha"] + nd["beta"])
        lines.append(
            f"compute-optimal tokens per parameter at C = {C_max:.3g} FLOP (the largest run): {ratio:.3g} ± "
            f"{err:.2g} (from L(N, D) under C = 6ND; N_opt grows as C^{a:.3f})"
        )
    else:
        best = max(fits["frontier"], key=lambda p: p.C)
        ratios = np.array([p.D / p.N for p in runs])
        lines.append("")
        if "nd_note" in fits:
            lines.append(f"no L(N, D) fit: {fits['nd_note']}")
        if np.std(np.log(ratios)) <= VARIES:
            lines.append(
                f"compute-optimal tokens per parameter: not measured; every run has about the same D/N "
                f"({ratios.min():.3g} to {ratios.max():.3g}), so the frontier cannot tell (sweep two or "
                "more tokens_per_param at each size to fit L(N, D))"
            )
        else:
            lines.append(
                f"compute-optimal tokens per parameter from the frontier of the runs: {best.D / best.N:.3g} "
                f"(run {best.name}, the frontier's largest compute)"
            )
    if held_out:
        lines += ["", "held out of the fit:"]
        for h in predictions(fits, held_out):
            line = f"  {h['name']}: N {h['N']:,}, D {h['D']:,}, C {h['C']:.3e}: L(C) predicts "
            line += f"{h['predicted']:.4f} ± {h['sigma']:.4f}"
            if "predicted_nd" in h:
                line += f", L(N, D) {h['predicted_nd']:.4f} ± {h['sigma_nd']:.4f}"
            if h["measured"] is None:
                line += f"; not measured ({h['status']})"
            else:
                line += f"; measured {h['measured']:.4f}"
                line += (
                    f" ({(h['measured'] - h['predicted']) / h['sigma']:+.1f} sigma)" if h["sigma"] > 0 else ""
                )
            lines.append(line)
    return "\n".join(lines)


def plot(fits: dict[str, Any], held_out: list[Point], path: Path) -> None:
    """Val loss against compute: the runs, the L(C) fit with its 1-sigma band, the frontier."""
    from matplotlib.figure import Figure

    runs = fits["runs"]
    C = np.array([p.C for p in runs])
    everything = [*C, *(p.C for p in held_out)]
    grid = np.geomspace(min(everything) / 1.5, max(everything) * 1.5, 200)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    fc = fits["c"]
    mean, sigma = fc.predict(grid / UNIT_C)
    label = f"L(C) = {fc['E']:.3f} + {fc['A']:.3g}·(C/1e15)^-{fc['alpha']:.3f}"
    ax.plot(grid, mean, "-", color="C0", label=label)
    ax.fill_between(grid, mean - sigma, mean + sigma, color="C0", alpha=0.2, lw=0)
    front = fits["frontier"]
    ax.step(
        [p.C for p in front],
        [p.loss for p in front],
        "-",
        where="post",
        color="C2",
        lw=1,
        label="frontier of the runs",
    )
    if "nd" in fits:
        nd = fits["nd"]

        def optimum(c: float) -> float:
            ratio = optimal_tokens_per_param(nd, c)[0]
            n = math.sqrt(c / 6 / ratio)  # C = 6ND, D = ratio * N
            return float(nd.predict(np.array([n / UNIT_N, ratio * n / UNIT_D]))[0])

        ax.plot(grid, [optimum(c) for c in grid], "--", color="C3", lw=1, label="compute-optimal L(N, D)")
    ax.plot(C, [p.loss for p in runs], "o", color="k", ms=5, label="runs (fitted)")
    for p in runs:
        ax.annotate(f"{p.N / 1e3:.0f}k", (p.C, p.loss), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, p in enumerate(held_out):
        m, s = fc.predict(np.array(p.C / UNIT_C))
        ax.errorbar(
            [p.C], [m], yerr=[s], fmt="x", color="C1", ms=8, capsize=3, label="predicted" if i == 0 else None
        )
        if p.loss is not None:
            ax.plot([p.C], [p.loss], "*", color="C1", ms=11, label="held out, measured" if i == 0 else None)
    ax.set_xscale("log")
    ax.set(
        xlabel="training compute C (FLOP)", ylabel="final val loss (nats/token)", title="loss against compute"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def main(args: argparse.Namespace) -> int:
    """``jaxlm report --scaling SWEEP_DIR [--predict RUN_DIR ...] [--out DIR]``."""
    where = str(args.sweep_dir)
    fits = fit_points(load_points(args.sweep_dir), where)
    held_out = [point(Path(d)) for d in args.predict or []]
    print(f"scaling laws of {len(fits['runs'])} finished run(s) in {where}\n")
    print(text(fits, held_out))
    out = Path(args.out or args.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(fits, held_out, out / "scaling_law.png")
    record = {
        "runs": [
            {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(p).items()}
            for p in fits["runs"]
        ],
        "L(C)": fits["c"].as_dict(),
        "L(N, D)": fits["nd"].as_dict() if "nd" in fits else None,
        "held_out": predictions(fits, held_out),
    }
    write_json(out / "scaling_law.json", record)
    print(f"\nwrote {out / 'scaling_law.png'} and {out / 'scaling_law.json'}")
    return 0
