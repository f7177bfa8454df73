"""GPT-2 small (124M) shape on the embedded corpus: the reference shape for benchmarks.

Run:      jaxlm train experiments/gpt2_124m.py --set mesh.data=-1
Expect:   on one H100, bf16 with cuDNN attention; on a CPU this is a benchmark shape, not a demo.
"""

from jaxlm.config import Config, DataConfig, OptimConfig, TrainConfig, preset


def get_config() -> Config:
    return Config(
        name="gpt2-124m",
        model=preset("gpt2-124m"),
        data=DataConfig(inputs=("shakespeare",), dir="data_cache/shakespeare-gpt2", tokenizer="gpt2"),
        optim=OptimConfig(lr=6e-4, warmup_steps=200),
        train=TrainConfig(steps=5000, batch_size=32, micro_batches=1, eval_every=500),
    )
