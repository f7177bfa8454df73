"""Learning-rate sweep of the tiny preset: 5 log-spaced rates, one dimension, so the report also
plots val loss against the rate (docs/img/sweep_example.png).

Run:      jaxlm sweep experiments/sweep_lr.py --parallel 2 && jaxlm report runs/sweep_lr
Expect:   about 2.5 minutes on a 2-core CPU (--parallel 2); val loss is lowest at lr 1e-2 (~3.16),
          ~3.27 at 3e-3 and above, ~3.6 at 1e-3.
"""

from pathlib import Path

from jaxlm import sweep
from jaxlm.config import Config, load_experiment


def get_config() -> Config:
    return load_experiment(Path(__file__).with_name("tiny.py")).get_config()


def get_sweep() -> sweep.Sweep:
    return sweep.grid({"optim.lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]})
