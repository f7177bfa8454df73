"""Mixture of experts on the embedded corpus: the tiny model (byte tokens, 2 layers, d_model 32)
with 4 experts of d_ff 64 in every layer, top-2, dropless; the load-balancing loss keeps the
experts evenly used.

Run:      jaxlm train experiments/moe.py
Expect:   about a minute on a 2-core CPU; loss falls from ~5.5 (ln 257) to ~2.6 in 300 steps, and
          the experts keep near-equal shares of the tokens (train/moe/load/expert_<i> in
          TensorBoard): max/min load ratio ~1.2 at the last step (docs/scaling.md#experts).
Compare:  the dense model of equal active parameters is --set model.moe_experts=0 model.d_ff=128.
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig, preset


def get_config() -> Config:
    return Config(
        name="moe",
        model=preset("tiny", vocab_size=257, moe_experts=4, moe_top_k=2, moe_aux_loss=0.1),
        data=DataConfig(
            inputs=("shakespeare",), dir="data_cache/shakespeare-bytes", tokenizer="bytes", val_fraction=0.1
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=20),
        train=TrainConfig(steps=300, batch_size=8, log_every=10, eval_every=100, eval_batches=4),
        checkpoint=CheckpointConfig(every=100, keep=2),
    )
