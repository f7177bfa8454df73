"""Speedrun: experiments/shakespeare.py's val loss (1.95 nats per byte) in less wall time.

Run:      jaxlm train experiments/speedrun.py
Compare:  python benchmarks/speedrun.py --repeats 2   (alternates it with the default on one machine)
Expect:   val loss 1.9079 at step 400, where it stops (<= train.target_val_loss); 819,200 tokens,
          0.40x the default's 2,048,000 (val 1.9479 at its step 500). Wall time: estimated 0.45-0.6x
          the default's, not yet measured side by side: a step costs 0.5-0.7x a default step
          (`jaxlm bench`, alternating, load average 3-10: 892-1196 ms against 1060-2673 ms), and
          it evaluates once instead of five times. Measured under load (2026-12-01, load
          average 15-22 on the 2 cores): 3,083 s for all 500 steps, evaluating every 100.
          Without the target it goes on to 1.8829 at step 500.

The same size class as the default (4 layers, d_model 192, d_ff 768, 1.82M parameters, seq 128).
What changes, and why each buys wall time on a CPU:
- Half the batch (16 x 128) at the same 500-step schedule: a step costs about half, and this small
  model learns almost as much per update from 2K tokens as from 4K. Val loss at step 100/200/300:
  2.26/2.10/1.98, against the default's 2.54/2.32/2.13 with twice the tokens.
- qk_norm bounds the attention logits, so twice the peak lr (6e-3, warmup 20) trains stably,
  decayed to 0. A 300-step schedule to 0 did worse at step 300 (1.99) than this one (1.98): the
  steps at a high lr matter more here than an early decay.
- rope, rmsnorm, no biases, relu² MLP (Primer): no dearer a step than learned positions,
  layernorm and tanh-GELU.
- One evaluation before the target, at step 400 (the default's 512 windows: eval_batches x
  batch_size = 32 x 16): each costs about ten steps; the run stops there. Every evaluation of the
  default is kept (benchmarks/speedrun.py changes nothing but the target and the run directory).
"""

from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig, preset

SHAPE = dict(vocab_size=257, seq_len=128, n_layers=4, d_model=192, n_heads=6, d_ff=768)
ARCH = dict(positions="rope", norm="rmsnorm", use_bias=False, mlp="relu2", qk_norm=True)
TARGET = dict(target_val_loss=1.95)  # the default's val loss at its step 500: stop on reaching it


def get_config() -> Config:
    return Config(
        name="speedrun",
        model=preset("gpt2-124m", remat="save_matmuls", **SHAPE, **ARCH),
        data=DataConfig(
            inputs=("shakespeare",), dir="data_cache/shakespeare-bytes", tokenizer="bytes", val_fraction=0.1
        ),
        optim=OptimConfig(lr=6e-3, warmup_steps=20, min_lr_ratio=0.0, weight_decay=0.1),
        # eval_batches x batch_size = 512 windows, the default's 16 x 32: the same validation tokens
        train=TrainConfig(steps=500, batch_size=16, log_every=25, eval_every=400, eval_batches=32, **TARGET),
        checkpoint=CheckpointConfig(every=0, keep=1),
    )
