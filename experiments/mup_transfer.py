"""µP learning-rate transfer: an lr sweep at widths 64-512 under both parametrizations (docs/mup.md).

Run:      jaxlm sweep experiments/mup_transfer.py --parallel 2
          jaxlm report runs/mup_transfer --x optim.lr --lines model.d_model --panels model.parametrization
Expect:   48 runs of 120 steps; on the shared 2-core CPU (load ~20) each took 2-6 minutes, nearly
          all start-up and compilation. Under µP the best lr is 2^-10 at every width and the whole
          loss curve is the same; under standard it moves down with the width (2^-10 at 64 and
          128, 2^-11 at 256 and 512). Figures and plot: docs/mup.md.
"""

from jaxlm import sweep
from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig, preset

WIDTHS = (64, 128, 256, 512)
HEAD_DIM = 32  # fixed: the heads grow with the width, as d_ff = 4 x width does
LRS = tuple(2.0**-k for k in range(13, 7, -1))  # 2^-13 .. 2^-8 (1.2e-4 .. 3.9e-3), a factor 2 apart


def get_config() -> Config:
    return Config(
        name="mup_transfer",
        # a 2-layer GPT-2 on bytes; mup_base_width 64: at width 64 both parametrizations nearly coincide
        model=preset(
            "gpt2-124m",
            vocab_size=257,
            vocab_multiple=1,
            seq_len=32,
            n_layers=2,
            d_model=64,
            n_heads=64 // HEAD_DIM,
            head_dim=HEAD_DIM,
            d_ff=256,
            mup_base_width=64,
        ),  # fmt: skip
        data=DataConfig(
            inputs=("shakespeare",), dir="data_cache/shakespeare-bytes", tokenizer="bytes", val_fraction=0.1
        ),
        # no weight decay and no clipping, so the learning rate alone sets the step size
        optim=OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.0, grad_clip=0.0),
        train=TrainConfig(steps=120, batch_size=8, log_every=20, eval_every=120, eval_batches=16),
        checkpoint=CheckpointConfig(every=0, keep=1, async_save=False),
    )


def get_sweep() -> sweep.Sweep:
    widths = sweep.zipped(
        {
            "model.d_model": list(WIDTHS),
            "model.n_heads": [w // HEAD_DIM for w in WIDTHS],
            "model.d_ff": [4 * w for w in WIDTHS],
        }
    )
    # width outermost, so an interrupted sweep has both parametrizations of the widths it reached
    return (
        widths
        * sweep.grid({"model.parametrization": ["standard", "mup"]})
        * sweep.grid({"optim.lr": list(LRS)})
    )
