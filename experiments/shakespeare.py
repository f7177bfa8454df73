"""Default experiment: a small GPT-style model on Shakespeare's works, byte-level tokens.

Run:      jaxlm train experiments/shakespeare.py
Expect:   6-10 minutes on a 2-core CPU; val loss falls from ~5.6 (ln 257) to ~1.95 nats per byte,
          far below the corpus's unigram entropy (3.33 nats per byte, printed at the start).
          GPT-2 BPE instead: --set data.tokenizer=gpt2 data.dir=data_cache/shakespeare-gpt2
          model.vocab_size=50257 (slower on a CPU: the 50K-way output layer dominates).
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig, preset

# a 4-layer GPT-2; remat recomputes element-wise work in the backward: 20% faster on a CPU (BENCHMARKS.md)
SHAPE = dict(vocab_size=257, seq_len=128, n_layers=4, d_model=192, n_heads=6, d_ff=768)


def get_config() -> Config:
    return Config(
        name="shakespeare",
        model=preset("gpt2-124m", remat="save_matmuls", **SHAPE),
        data=DataConfig(
            inputs=("shakespeare",), dir="data_cache/shakespeare-bytes", tokenizer="bytes", val_fraction=0.1
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1),
        train=TrainConfig(steps=500, batch_size=32, log_every=25, eval_every=100, eval_batches=16),
        checkpoint=CheckpointConfig(every=250, keep=2),
    )
