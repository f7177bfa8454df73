"""Tiny preset for tests and local debugging: byte tokens, 2 layers, compiles in seconds.

Run:      jaxlm train experiments/tiny.py --set train.steps=50
Expect:   under a minute on a 2-core CPU; loss falls from ~5.5 (ln 257) to below ~3.5.
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig, preset


def get_config() -> Config:
    return Config(
        name="tiny",
        model=preset("tiny", vocab_size=257),
        # the same prepared directory and split as experiments/shakespeare.py
        data=DataConfig(
            inputs=("shakespeare",), dir="data_cache/shakespeare-bytes", tokenizer="bytes", val_fraction=0.1
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        train=TrainConfig(steps=100, batch_size=8, log_every=10, eval_every=50, eval_batches=4),
        checkpoint=CheckpointConfig(every=50, keep=2),
    )
