"""The held-out size of experiments/scaling.py: trained after the fit, to test its prediction.

Run:      jaxlm sweep experiments/scaling_held_out.py
          jaxlm report --scaling runs/scaling --predict runs/scaling_held_out/*/
Expect:   15 min on a busy 2-core CPU; val loss 1.97 nats per byte, where the fit of the 5 smaller
          sizes predicts 2.20 +- 0.05 (docs/scaling_laws.md).
"""

from pathlib import Path

from jaxlm import sweep
from jaxlm.config import Config, load_experiment

study = load_experiment(Path(__file__).with_name("scaling.py"))


def get_config() -> Config:
    return study.get_config()


def get_sweep() -> sweep.Sweep:
    return sweep.sizes(get_config(), study.HELD_OUT, head_dim=16, tokens_per_param=10)
