"""Scaling-law study on the embedded Shakespeare (byte tokens): 5 sizes at 10 tokens per parameter,
fitted, and one larger size held out of the fit to test its prediction (docs/scaling_laws.md).

Run:      jaxlm sweep experiments/scaling.py && jaxlm report --scaling runs/scaling
          jaxlm sweep experiments/scaling_held_out.py   # the larger size, left out of the fit
          jaxlm report --scaling runs/scaling --predict runs/scaling_held_out/*/
Expect:   20 min for the 5 sizes on a busy 2-core CPU (val loss 3.19 down to 2.23 nats per byte),
          15 min for the held-out one (1.97, below the fit's 2.20 +- 0.05); docs/scaling_laws.md.
"""

from jaxlm import sweep
from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig, preset

FITTED = [(32, 1), (32, 2), (48, 2), (64, 2), (64, 3)]  # (d_model, n_layers): 21k to 164k parameters
HELD_OUT = [(80, 3)]  # 251k parameters, 2.2x the compute of the largest fitted size


def get_config() -> Config:
    return Config(
        name="scaling",
        model=preset("gpt2-124m", vocab_size=257, seq_len=128, n_layers=2, d_model=64, n_heads=4, d_ff=256),
        data=DataConfig(
            inputs=("shakespeare",), dir="data_cache/shakespeare-bytes", tokenizer="bytes", val_fraction=0.1
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.1),
        # the whole val split (144k bytes) once, at the end: the fit needs a final loss, not a curve
        train=TrainConfig(steps=100, batch_size=16, log_every=25, eval_every=0, eval_batches=0),
        checkpoint=CheckpointConfig(every=500, keep=1),
    )


def get_sweep() -> sweep.Sweep:
    return sweep.sizes(get_config(), FITTED, head_dim=16, tokens_per_param=10)
