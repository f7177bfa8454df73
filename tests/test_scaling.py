"""Scaling-law fits: known parameters recovered from synthetic losses (exactly without noise, within
a few sigma of the reported uncertainty with it), the compute optimum against a brute-force search,
and ``jaxlm report --scaling`` on fake run directories (no training)."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxlm import cli, lm, scaling, sweep
from jaxlm.config import apply_overrides, load_config, to_dict
from jaxlm.files import write_json

ROOT = Path(__file__).resolve().parents[1]
TRUE_C = {"E": 1.7, "A": 0.35, "alpha": 0.12}  # L(C), C in units of 1e15 FLOP
TRUE_ND = {"E": 1.6, "A": 0.4, "B": 0.1, "alpha": 0.35, "beta": 0.3}  # L(N, D), N / 1e6, D / 1e9
# Noise-free, the fit stops when a step changes the parameters by less than xtol = 1e-12 relative;
# float64 residuals (eps 2.2e-16) through Jacobians of condition number <= ~1e6 move them by ~1e-10.
# 1e-6 relative leaves four orders of margin and still fails on any wrong law, unit or start.
RTOL = 1e-6
SIGMAS = 4  # a correct 1-sigma error puts each parameter within 4 sigma with probability 0.99994


def law_nd_data(N, D):
    return scaling.law_nd(np.stack([N / scaling.UNIT_N, D / scaling.UNIT_D]), **TRUE_ND)


def nd_design():
    N = np.repeat(np.geomspace(2e4, 2e6, 5), 3)
    return N, N * np.tile([5.0, 20.0, 80.0], 5)  # 5 sizes x 3 tokens per parameter


def check(fit, true, noisy):
    for name, value in true.items():
        got, err = fit[name], fit.errors[fit.names.index(name)]
        if noisy:
            assert abs(got - value) < SIGMAS * err, (name, got, value, err)
            assert err < 0.2 * abs(value), (name, err)  # the uncertainty says something
        else:
            assert got == pytest.approx(value, rel=RTOL), name


@pytest.mark.parametrize("noisy", [False, True])
def test_fit_c_recovers_known_parameters(noisy):
    C = np.geomspace(1e11, 1e14, 16)
    L = scaling.law_c(C / scaling.UNIT_C, **TRUE_C)
    if noisy:
        L = L + np.random.default_rng(0).normal(0, 0.003, L.shape)
    fit = scaling.fit_c(C, L)
    check(fit, TRUE_C, noisy)
    assert fit.dof == 13


@pytest.mark.parametrize("noisy", [False, True])
def test_fit_nd_recovers_known_parameters(noisy):
    N, D = nd_design()
    L = law_nd_data(N, D)
    if noisy:
        L = L + np.random.default_rng(1).normal(0, 0.003, L.shape)
    fit = scaling.fit_nd(N, D, L)
    check(fit, TRUE_ND, noisy)
    assert scaling.varies_both(N, D)
    assert not scaling.varies_both(N, 20 * N)  # a fixed tokens per parameter cannot separate them
    assert not scaling.varies_both(N, np.where(N > 1e5, 1e7, 1e6))  # nor two token counts


def test_compute_optimal_tokens_per_param_is_the_minimum_along_c_equals_6nd():
    N, D = nd_design()
    fit = scaling.fit_nd(N, D, law_nd_data(N, D))
    C = 3e15
    ratio, err = scaling.optimal_tokens_per_param(fit, C)
    # brute force: L(N, C / 6N) on a fine grid of N
    grid = np.geomspace(1e3, 1e9, 200_001)
    best_N = grid[np.argmin(law_nd_data(grid, C / (6 * grid)))]
    # the grid's spacing (6 decades in 2e5 steps: 7e-5 relative in N) bounds the brute force;
    # D/N = C / (6 N^2) moves twice as much
    assert ratio == pytest.approx(C / (6 * best_N**2), rel=3e-4)
    assert err < 1e-3 * ratio  # noise-free fit: the covariance is ~0


def test_frontier_keeps_runs_beating_all_cheaper_ones():
    C = np.array([4.0, 1.0, 2.0, 3.0, 5.0])
    L = np.array([2.5, 3.0, 2.8, 2.9, 2.4])
    assert scaling.frontier(C, L).tolist() == [1, 2, 0, 4]  # C=3 loses to C=2


# --------------------------------------------------------------------------------------------
# jaxlm report --scaling on fake run directories.
# --------------------------------------------------------------------------------------------


def fake_run(root: Path, d_model: int, n_layers: int, steps: int, law=law_nd_data, **summary) -> Path:
    """A run directory as jaxlm sweep leaves it, whose final val loss follows ``law``."""
    base = load_config(ROOT / "experiments" / "tiny.py")
    cfg = apply_overrides(
        base,
        {
            "model.d_model": d_model,
            "model.n_layers": n_layers,
            "model.n_heads": d_model // 16,
            "model.d_ff": 4 * d_model,
            "train.steps": steps,
        },
    )
    path = root / f"d{d_model}_l{n_layers}_s{steps}"
    path.mkdir(parents=True)
    write_json(path / "config.json", to_dict(cfg))
    write_json(path / "overrides.json", {"keys": [], "overrides": {}})
    N = lm.get(cfg.model).flop_params
    D = steps * cfg.train.batch_size * cfg.model.seq_len
    record = {"status": "finished", "step": steps, "val_loss": float(law(np.array(N), np.array(D)))}
    write_json(path / "summary.json", {**record, **summary})
    return path


def test_report_scaling_prints_the_fits_and_predicts_a_held_out_run(tmp_path, capsys):
    sweep_dir = tmp_path / "runs" / "study"
    base = load_config(ROOT / "experiments" / "tiny.py")
    shapes = [(32, 1), (32, 2), (48, 2), (64, 2)]
    # two tokens per parameter at each size: N and D/N vary, so L(N, D) is fitted
    runs = sweep.sizes(base, shapes, head_dim=16, tokens_per_param=5)
    runs += sweep.sizes(base, shapes, head_dim=16, tokens_per_param=40)
    for run in runs:
        fake_run(sweep_dir, run["model.d_model"], run["model.n_layers"], run["train.steps"])
    held = fake_run(tmp_path / "runs" / "held", 96, 3, 2000)
    out = tmp_path / "out"
    rc = cli.main(["report", "--scaling", str(sweep_dir), "--predict", str(held), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "scaling laws of 8 finished run(s)" in printed
    assert "L(C) = E + A * (C / 1e15 FLOP)^-alpha" in printed
    assert "L(N, D) = E + A * (N / 1e6)^-alpha + B * (D / 1e9)^-beta" in printed
    assert "compute-optimal tokens per parameter at C =" in printed
    assert f"{held.name}: N " in printed and "measured" in printed
    record = json.loads((out / "scaling_law.json").read_text())
    for name, value in TRUE_ND.items():  # noise-free losses: the fit is the law
        assert record["L(N, D)"]["values"][name] == pytest.approx(value, rel=RTOL), name
    [h] = record["held_out"]
    assert h["predicted_nd"] == pytest.approx(h["measured"], rel=RTOL)
    assert len(record["runs"]) == 8 and record["L(C)"]["dof"] == 5
    assert (out / "scaling_law.png").stat().st_size > 10_000


def test_report_scaling_at_one_tokens_per_param_says_the_optimum_is_not_measured(tmp_path, capsys):
    sweep_dir = tmp_path / "study"
    base = load_config(ROOT / "experiments" / "tiny.py")
    shapes = [(32, 1), (32, 2), (48, 2), (64, 2)]
    for run in sweep.sizes(base, shapes, head_dim=16, tokens_per_param=10):
        fake_run(sweep_dir, run["model.d_model"], run["model.n_layers"], run["train.steps"])
    fake_run(sweep_dir, 64, 3, 10, status="failed", val_loss=None)  # left out of the fit
    assert cli.main(["report", "--scaling", str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    assert "scaling laws of 4 finished run(s)" in printed and "L(N, D) =" not in printed
    assert "compute-optimal tokens per parameter: not measured" in printed
    assert (sweep_dir / "scaling_law.png").is_file()


def test_report_scaling_refuses_too_few_runs_or_no_val_loss(tmp_path, capsys):
    sweep_dir = tmp_path / "study"
    for d_model in (32, 48, 64):
        fake_run(sweep_dir, d_model, 2, 100)
    fake_run(sweep_dir, 64, 3, 100, status="failed")
    assert cli.main(["report", "--scaling", str(sweep_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "3 finished run(s) with a val loss" in err and "at least 4" in err
    assert not (sweep_dir / "scaling_law.png").exists()  # nothing written by a refused fit

    no_val = tmp_path / "no_val"
    for d_model in (32, 48, 64, 80):
        fake_run(no_val, d_model, 2, 100, val_loss=None)
    assert cli.main(["report", "--scaling", str(no_val)]) == 2
    err = capsys.readouterr().err
    assert "none of its 4 run(s) has a final val loss (4 finished)" in err and "data.val_fraction" in err

    assert cli.main(["report", str(sweep_dir), "--predict", str(no_val)]) == 2
    assert "use it with --scaling" in capsys.readouterr().err


def test_a_fit_that_does_not_converge_is_one_error(monkeypatch):
    import scipy.optimize

    def no_convergence(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found: Number of calls to function has reached maxfev")

    monkeypatch.setattr(scipy.optimize, "curve_fit", no_convergence)
    C = np.geomspace(1e11, 1e14, 5)
    with pytest.raises(scaling.ConfigError, match=r"fitting L\(C\) to 5 losses did not converge"):
        scaling.fit_c(C, scaling.law_c(C / scaling.UNIT_C, **TRUE_C))
