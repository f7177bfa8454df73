"""Learning rate x depth sweep of the tiny preset: 4 runs, the example of docs/sweeps.md.

Run:      jaxlm sweep experiments/sweep_tiny.py --parallel 2 && jaxlm report runs/sweep_tiny
Expect:   about 2 minutes on a 2-core CPU; all 4 runs finish; lr 3e-3 beats 1e-3 at both depths
          (val loss ~3.25 vs ~3.6, from ~5.5 at the start).
"""

from pathlib import Path

from jaxlm import sweep
from jaxlm.config import Config, load_experiment


def get_config() -> Config:
    return load_experiment(Path(__file__).with_name("tiny.py")).get_config()


def get_sweep() -> sweep.Sweep:
    return sweep.grid({"optim.lr": [1e-3, 3e-3], "model.n_layers": [1, 2]})
