"""Default experiment: a small GPT-2-style model on Shakespeare's works, GPT-2 BPE tokens.

Run:      jaxlm train experiments/shakespeare.py
Expect:   about 8 minutes on a 2-core CPU; val loss falls from ~10.8 to ~5.6 nats, well below the
          corpus's unigram entropy (~7.0 nats per token).
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig, preset


def get_config() -> Config:
    return Config(
        name="shakespeare",
        model=preset("gpt2-124m", seq_len=128, n_layers=4, d_model=256, n_heads=4, d_ff=1024),
        data=DataConfig(inputs=("shakespeare",), dir="data_cache/shakespeare-gpt2", tokenizer="gpt2"),
        optim=OptimConfig(lr=2e-3, warmup_steps=30, weight_decay=0.1),
        train=TrainConfig(steps=400, batch_size=16, log_every=20, eval_every=100, eval_batches=20),
        checkpoint=CheckpointConfig(every=200, keep=2),
    )
