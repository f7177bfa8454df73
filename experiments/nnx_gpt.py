"""A GPT written as a Flax NNX module, trained by jaxlm: tiny.py's data, sizes and settings.

Run:      jaxlm train experiments/nnx_gpt.py --set train.steps=50
Expect:   under a minute on a 2-core CPU; loss falls from ~5.5 (ln 257) to val loss ~3.36 at step
          50, as experiments/tiny.py's built-in transformer of the same sizes (SwiGLU MLP) does.

``model.module`` names the class below; jaxlm builds it as ``GPT(cfg, rngs=nnx.Rngs(key))`` and
calls ``gpt(tokens_BxT, positions=..., segment_ids=...) -> logits``. Each parameter names one
logical axis per dimension (jaxlm/sharding.py's RULES), from which jaxlm derives FSDP and tensor
parallelism; see docs/nnx.md.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import attention, model
from jaxlm.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, preset


def normal(std: float, axes: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def rms_norm(cfg: ModelConfig, dtypes: dict, rngs: nnx.Rngs) -> nnx.RMSNorm:
    # float32 statistics and output whatever the compute dtype
    scale_init = nnx.with_partitioning(nnx.initializers.ones, ("embed",))
    return nnx.RMSNorm(
        cfg.d_model,
        epsilon=cfg.norm_eps,
        scale_init=scale_init,
        dtype=jnp.float32,
        param_dtype=dtypes["param_dtype"],
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Causal multi-head self-attention with rotary positions; heads split over tensor parallelism."""

    def __init__(self, cfg: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
        D, H, K, std = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.init_std
        # d model, h heads, k head dim: one logical axis per dimension of each kernel.
        proj = lambda: nnx.Einsum(
            "btd,dhk->bthk",
            (D, H, K),
            kernel_init=normal(std, ("embed", "heads", "head_dim")),
            rngs=rngs,
            **dtypes,
        )
        self.q, self.k, self.v = proj(), proj(), proj()
        # GPT-2: residual projections scaled down with depth
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.o = nnx.Einsum(
            "bthk,hkd->btd",
            (H, K, D),
            kernel_init=normal(out_std, ("heads", "head_dim", "embed")),
            rngs=rngs,
            **dtypes,
        )
        self.theta, self.backend = cfg.rope_theta, cfg.attention

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
        q_BxTxHxK = model.rope(self.q(x_BxTxD), positions_BxT, self.theta)
        k_BxTxHxK = model.rope(self.k(x_BxTxD), positions_BxT, self.theta)
        # segment_ids (document masking): each token sees only earlier tokens of its own document
        o_BxTxHxK = attention.attend(
            q_BxTxHxK, k_BxTxHxK, self.v(x_BxTxD), backend=self.backend, segment_ids_BxT=segment_ids_BxT
        )
        return self.o(o_BxTxHxK)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
        D, F, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.up = nnx.Linear(
            D, F, use_bias=False, kernel_init=normal(std, ("embed", "mlp")), rngs=rngs, **dtypes
        )
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.down = nnx.Linear(
            F, D, use_bias=False, kernel_init=normal(out_std, ("mlp", "embed")), rngs=rngs, **dtypes
        )

    def __call__(self, x_BxTxD):
        return self.down(jax.nn.gelu(self.up(x_BxTxD), approximate=True))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
        self.attn_norm, self.attn = rms_norm(cfg, dtypes, rngs), Attention(cfg, dtypes, rngs)
        self.mlp_norm, self.mlp = rms_norm(cfg, dtypes, rngs), MLP(cfg, dtypes, rngs)

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
        h = self.attn_norm(x_BxTxD).astype(x_BxTxD.dtype)
        x_BxTxD = x_BxTxD + self.attn(h, positions_BxT, segment_ids_BxT)
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD).astype(x_BxTxD.dtype))


class GPT(nnx.Module):
    """Token embedding, pre-norm blocks, final RMSNorm, logits through the tied embedding."""

    tied_output = True  # the embedding is also the output projection: jaxlm counts it in the 6N FLOPs

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtypes = dict(dtype=model.compute_dtype(cfg), param_dtype=jnp.dtype(cfg.param_dtype))
        # padded_vocab rows (a multiple of model.vocab_multiple) split evenly over tensor parallelism;
        # jaxlm drops the logits past vocab_size.
        self.embed = nnx.Embed(
            cfg.padded_vocab,
            cfg.d_model,
            embedding_init=normal(cfg.init_std, ("vocab", "embed")),
            rngs=rngs,
            **dtypes,
        )
        self.blocks = nnx.List([Block(cfg, dtypes, rngs) for _ in range(cfg.n_layers)])
        self.norm = rms_norm(cfg, dtypes, rngs)

    def __call__(self, tokens_BxT, *, positions, segment_ids=None):
        x_BxTxD = self.embed(tokens_BxT)
        for block in self.blocks:
            x_BxTxD = block(x_BxTxD, positions, segment_ids)
        return self.embed.attend(self.norm(x_BxTxD).astype(x_BxTxD.dtype))


def get_config() -> Config:
    return Config(
        name="nnx_gpt",
        model=preset("tiny", vocab_size=257, module="experiments/nnx_gpt.py:GPT"),
        # the same prepared directory and split as experiments/tiny.py and experiments/shakespeare.py
        data=DataConfig(
            inputs=("shakespeare",), dir="data_cache/shakespeare-bytes", tokenizer="bytes", val_fraction=0.1
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        train=TrainConfig(steps=100, batch_size=8, log_every=10, eval_every=50, eval_batches=4),
        checkpoint=CheckpointConfig(every=50, keep=2),
    )
