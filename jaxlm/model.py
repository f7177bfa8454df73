"""A pure-functional decoder-only transformer.

Params are a plain nested dict of arrays. Every weight is declared once in ``param_decls`` with
its shape, logical axes and initializer; ``init_params``, the sharding of params and optimizer
state, weight-decay masks and parameter counts are all derived from that one declaration.
Transformer blocks are stacked on a leading ``layers`` axis and run with ``lax.scan``, so compile
time does not grow with depth.

Shape legend: B batch, T query positions, S key positions, D model, H query heads,
G key/value heads, R = H // G query heads per kv head, K head dim, F ffn hidden, V vocab, L layers,
E experts (mixture of experts: every ``moe_every``-th layer's MLP is ``moe_experts`` MLPs and a
router, jaxlm/moe.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import cpu_dtype, moe, ring
from jaxlm.attention import attend
from jaxlm.config import ModelConfig
from jaxlm.sharding import constrain

Params = dict[str, Any]


@dataclass(frozen=True)
class Weight:
    """One weight: its shape, logical axes (one per dimension), whether AdamW decays it, and its
    initializer. ``decay`` is said on every weight, never inferred from the shape: a per-head bias
    [L, H, K] has as many dimensions as a matrix but must not shrink towards zero."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    decay: bool
    init: str = "normal"  # normal | zeros | ones
    std: float = 0.0
    dtype: str | None = None  # None: model.param_dtype
    lr_mult: float = 1.0
    """Multiplies the optimizer's update of this weight (µP: base_width / width for hidden matrices)."""

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


TABLE_AXES = ("vocab", "positions")
"""Logical axes of the lookup tables and the output head: the rows of a token or position
embedding, the columns of the unembedding. (Outside the 6N of FLOPs as a table's first axis,
jaxlm/nnx_model.py; never Muon's, jaxlm/optim.py.)"""


def _norm_decl(cfg: ModelConfig, stacked: bool) -> dict[str, Weight]:
    lead, lead_axes = ((cfg.n_layers,), ("layers",)) if stacked else ((), ())
    decl = {"scale": Weight(lead + (cfg.d_model,), lead_axes + ("embed",), False, "ones")}
    if cfg.norm == "layernorm":
        decl["bias"] = Weight(lead + (cfg.d_model,), lead_axes + ("embed",), False, "zeros")
    return decl


def param_decls(cfg: ModelConfig) -> Params:
    """The single declaration of every weight."""
    L, D, H, G, K, F, V = (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.kv_heads,
        cfg.dim_per_head,
        cfg.d_ff,
        cfg.padded_vocab,
    )
    std = cfg.init_std
    # µP for Adam (Tensor Programs V, Table 3): a hidden matrix (both dimensions grow with width)
    # has init variance ∝ 1/fan_in and learning rate ∝ 1/fan_in; relative to the base width that is
    # std / sqrt(m) and lr / m with m = d_model / base. Embeddings, the output projection (whose
    # 1/m is the logit multiplier of logits_from_hidden) and vectors keep std and lr.
    m = width_mult(cfg)
    out_std = std / math.sqrt(2 * L)  # GPT-2: residual projections scaled by depth

    def hidden_matrix(shape, axes, std_):
        return Weight(shape, axes, True, std=std_ / math.sqrt(m), lr_mult=1.0 / m)

    attn = {
        "q": hidden_matrix((L, D, H, K), ("layers", "embed", "heads", "head_dim"), std),
        "k": hidden_matrix((L, D, G, K), ("layers", "embed", "kv_heads", "head_dim"), std),
        "v": hidden_matrix((L, D, G, K), ("layers", "embed", "kv_heads", "head_dim"), std),
        "o": hidden_matrix((L, H, K, D), ("layers", "heads", "head_dim", "embed"), out_std),
    }
    Ld = L - cfg.moe_layers  # the layers with a dense MLP: all of them in a dense model
    mlp = {
        "up": hidden_matrix((Ld, D, F), ("layers", "embed", "mlp"), std),
        "down": hidden_matrix((Ld, F, D), ("layers", "mlp", "embed"), out_std),
    }
    if cfg.mlp == "swiglu":
        mlp["gate"] = hidden_matrix((Ld, D, F), ("layers", "embed", "mlp"), std)
    if cfg.qk_norm:  # one RMSNorm scale per head dimension, shared by the heads of a layer
        attn |= {
            "q_norm": Weight((L, K), ("layers", "head_dim"), False, "ones"),
            "k_norm": Weight((L, K), ("layers", "head_dim"), False, "ones"),
        }
    if cfg.use_bias:
        attn |= {
            "q_bias": Weight((L, H, K), ("layers", "heads", "head_dim"), False, "zeros"),
            "k_bias": Weight((L, G, K), ("layers", "kv_heads", "head_dim"), False, "zeros"),
            "v_bias": Weight((L, G, K), ("layers", "kv_heads", "head_dim"), False, "zeros"),
            "o_bias": Weight((L, D), ("layers", "embed"), False, "zeros"),
        }
        mlp |= {
            "up_bias": Weight((L, F), ("layers", "mlp"), False, "zeros"),
            "down_bias": Weight((L, D), ("layers", "embed"), False, "zeros"),
        }
        if cfg.mlp == "swiglu":
            mlp["gate_bias"] = Weight((L, F), ("layers", "mlp"), False, "zeros")
    decls: Params = {
        "embed": Weight((V, D), ("vocab", "embed"), True, std=std),
        "blocks": {
            "attn_norm": _norm_decl(cfg, stacked=True),
            "attn": attn,
            "mlp_norm": _norm_decl(cfg, stacked=True),
        },
        "final_norm": _norm_decl(cfg, stacked=False),
    }
    if Ld:
        decls["blocks"]["mlp"] = mlp
    if cfg.moe_experts:
        # The sparse layers' own stack [L / moe_every, ...]; the experts axis of a weight is a batch
        # of matrices (Muon orthogonalises each expert's own), split over the expert mesh axis.
        Lm, E = cfg.moe_layers, cfg.moe_experts
        experts = {
            "router": Weight((Lm, D, E), ("layers", "embed", "experts"), True, std=std),
            "up": hidden_matrix((Lm, E, D, F), ("layers", "experts", "embed", "mlp"), std),
            "down": hidden_matrix((Lm, E, F, D), ("layers", "experts", "mlp", "embed"), out_std),
        }
        if cfg.mlp == "swiglu":
            experts["gate"] = hidden_matrix((Lm, E, D, F), ("layers", "experts", "embed", "mlp"), std)
        if cfg.moe_shared_expert:
            experts["shared"] = {k: dataclasses.replace(w, shape=(Lm, *w.shape[1:])) for k, w in mlp.items()}
        decls["blocks"]["moe"] = experts
    if cfg.positions == "learned":
        decls["pos_embed"] = Weight((cfg.seq_len, D), ("positions", "embed"), True, std=std / 2)
    if not cfg.tie_embeddings:
        decls["unembed"] = Weight((D, V), ("embed", "vocab"), True, std=std)
    return decls


def width_mult(cfg: ModelConfig) -> float:
    """µP's width multiplier d_model / mup_base_width; 1 under the standard parametrization, where
    every std, learning rate and multiplier it divides stays exactly as it was."""
    return cfg.d_model / cfg.mup_base_width if cfg.parametrization == "mup" else 1.0


def is_weight(x) -> bool:
    return isinstance(x, Weight)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random params from the declarations; jit this with out_shardings to init sharded."""
    decls = param_decls(cfg)
    leaves, treedef = jax.tree.flatten(decls, is_leaf=is_weight)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)

    def one(w: Weight, k):
        if w.init == "zeros":
            return jnp.zeros(w.shape, dtype)
        if w.init == "ones":
            return jnp.ones(w.shape, dtype)
        return (w.std * jax.random.normal(k, w.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [one(w, k) for w, k in zip(leaves, keys, strict=True)])


def total_params(decls: Params) -> int:
    return sum(math.prod(w.shape) for w in jax.tree.leaves(decls, is_leaf=is_weight))


def count_params(cfg: ModelConfig, *, embedding: bool = True) -> int:
    """Parameters as published: vocabulary padding rows are not counted.

    ``embedding=False`` leaves out the token and position embeddings (the 6N of the FLOP count);
    an untied output projection is counted either way.
    """
    total = total_params(param_decls(cfg))
    pad_rows = cfg.padded_vocab - cfg.vocab_size
    total -= pad_rows * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if not embedding:
        total -= cfg.vocab_size * cfg.d_model
        if cfg.positions == "learned":
            total -= cfg.seq_len * cfg.d_model
    return total


# --------------------------------------------------------------------------------------------
# Layers: pure functions of (params, inputs, the few settings they need).
# --------------------------------------------------------------------------------------------


def inactive_expert_params(cfg: ModelConfig) -> int:
    """Expert parameters a token's forward does not multiply by: the E - K experts it is not routed
    to, in each sparse layer (0 for a dense model). Active parameters are the rest."""
    if not cfg.moe_experts:
        return 0
    per_expert = cfg.d_model * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    return cfg.moe_layers * (cfg.moe_experts - cfg.moe_top_k) * per_expert


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The dtype of activations and matmuls; "auto" is bfloat16 on GPU/TPU and, on a CPU, whichever
    a cached measurement found faster (jaxlm/cpu_dtype.py)."""
    if cfg.compute_dtype != "auto":
        return jnp.dtype(cfg.compute_dtype)
    if jax.default_backend() != "cpu":
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(cpu_dtype.cpu_compute_dtype())


def norm(p: Params, x_BxTxD: jax.Array, kind: str, eps: float) -> jax.Array:
    """LayerNorm or RMSNorm, computed in float32 whatever the compute dtype."""
    x = x_BxTxD.astype(jnp.float32)
    if kind == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)
    x = x * p["scale"].astype(jnp.float32)
    if "bias" in p:
        x = x + p["bias"].astype(jnp.float32)
    return x.astype(x_BxTxD.dtype)


def rope(x_BxTxNxK: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (as in Llama / Hugging Face)."""
    K = x_BxTxNxK.shape[-1]
    freq_K2 = theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    angle_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * freq_K2
    sin, cos = jnp.sin(angle_BxTxK2)[:, :, None, :], jnp.cos(angle_BxTxK2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxK.dtype)


def sinusoidal(positions_BxT: jax.Array, d_model: int) -> jax.Array:
    """The fixed sin/cos position encoding of 'Attention is all you need'."""
    freq = 10000.0 ** (-jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    angle_BxTxD2 = positions_BxT[..., None].astype(jnp.float32) * freq
    out = jnp.zeros(positions_BxT.shape + (d_model,), jnp.float32)
    out = out.at[..., 0::2].set(jnp.sin(angle_BxTxD2))
    return out.at[..., 1::2].set(jnp.cos(angle_BxTxD2[..., : d_model // 2]))


def qkv(p: Params, x_BxTxD: jax.Array, positions_BxT: jax.Array, cfg: ModelConfig):
    """Project to queries, keys and values (with rotary positions applied when configured)."""
    q_BxTxHxK = jnp.einsum("btd,dhk->bthk", x_BxTxD, p["q"])
    k_BxTxGxK = jnp.einsum("btd,dgk->btgk", x_BxTxD, p["k"])
    v_BxTxGxK = jnp.einsum("btd,dgk->btgk", x_BxTxD, p["v"])
    if "q_bias" in p:
        q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = (
            q_BxTxHxK + p["q_bias"],
            k_BxTxGxK + p["k_bias"],
            v_BxTxGxK + p["v_bias"],
        )
    if cfg.qk_norm:  # over head_dim, before the rotation (as Qwen3 / OLMo 2 do)
        q_BxTxHxK = norm({"scale": p["q_norm"]}, q_BxTxHxK, "rmsnorm", cfg.norm_eps)
        k_BxTxGxK = norm({"scale": p["k_norm"]}, k_BxTxGxK, "rmsnorm", cfg.norm_eps)
    if cfg.positions == "rope":
        q_BxTxHxK = rope(q_BxTxHxK, positions_BxT, cfg.rope_theta)
        k_BxTxGxK = rope(k_BxTxGxK, positions_BxT, cfg.rope_theta)
    if cfg.parametrization == "mup":
        # µP scores q·k by 1/head_dim (q and k become correlated in training, so their dot product
        # grows like head_dim, not its root); attend divides by sqrt(head_dim), this the other root.
        q_BxTxHxK = q_BxTxHxK * q_BxTxHxK.shape[-1] ** -0.5
    q_BxTxHxK = constrain(q_BxTxHxK, ("batch", "seq", "act_heads", None))
    return q_BxTxHxK, k_BxTxGxK, v_BxTxGxK


def attn_out(p: Params, o_BxTxHxK: jax.Array) -> jax.Array:
    y_BxTxD = jnp.einsum("bthk,hkd->btd", o_BxTxHxK, p["o"])
    return y_BxTxD + p["o_bias"] if "o_bias" in p else y_BxTxD


def ffn_activation(kind: str, up_xF: jax.Array, gate_xF: jax.Array | None) -> jax.Array:
    """The hidden activation of an MLP (dense or expert) of ``model.mlp``'s kind."""
    if kind == "swiglu":
        return jax.nn.silu(gate_xF) * up_xF
    if kind == "relu2":
        return jnp.square(jax.nn.relu(up_xF))  # ReLU squared (Primer; modded-nanogpt)
    return jax.nn.gelu(up_xF, approximate=True)  # GPT-2's tanh GELU


def mlp(p: Params, x_BxTxD: jax.Array, kind: str) -> jax.Array:
    up_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, p["up"])
    if "up_bias" in p:
        up_BxTxF = up_BxTxF + p["up_bias"]
    gate_BxTxF = None
    if kind == "swiglu":
        gate_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, p["gate"])
        if "gate_bias" in p:
            gate_BxTxF = gate_BxTxF + p["gate_bias"]
    h_BxTxF = constrain(ffn_activation(kind, up_BxTxF, gate_BxTxF), ("batch", "seq", "act_mlp"))
    y_BxTxD = jnp.einsum("btf,fd->btd", h_BxTxF, p["down"])
    return y_BxTxD + p["down_bias"] if "down_bias" in p else y_BxTxD


def moe_mlp(p: Params, x_BxTxD: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, moe.MoeStats]:
    """A sparse layer's MLP: route each token to its top-k experts (jaxlm/moe.py's dispatch,
    expert parallel under a mesh), plus the shared expert if any; and the layer's routing stats."""
    B, T, D = x_BxTxD.shape
    K = cfg.moe_top_k
    logits_NxE, probs_NxE, expert_NxK, weight_NxK = moe.route(x_BxTxD.reshape(-1, D), p["router"], K)
    aux, load_E = moe.load_balance_loss(probs_NxE, expert_NxK)
    experts = {k: p[k] for k in ("up", "gate", "down") if k in p}
    act = lambda up, gate: ffn_activation(cfg.mlp, up, gate)
    y_BxTxD, dropped = moe.dispatch(
        x_BxTxD,
        expert_NxK.reshape(B, T, K),
        weight_NxK.reshape(B, T, K).astype(x_BxTxD.dtype),
        experts,
        act,
        cfg.moe_capacity_factor,
    )
    if "shared" in p:
        y_BxTxD = y_BxTxD + mlp(p["shared"], x_BxTxD, cfg.mlp)
    stats = moe.MoeStats(
        aux, moe.router_z_loss(logits_NxE), load_E, dropped.astype(jnp.float32), jnp.float32(B * T * K)
    )
    return y_BxTxD, stats


def no_moe_stats(cfg: ModelConfig) -> moe.MoeStats | None:
    """A dense layer's stats in an MoE model (zeros, so summing over layers counts the sparse ones);
    None in a dense model."""
    if not cfg.moe_experts:
        return None
    zero = jnp.zeros((), jnp.float32)
    return moe.MoeStats(zero, zero, jnp.zeros((cfg.moe_experts,), jnp.float32), zero, zero)


class KVCache(NamedTuple):
    """One layer's key/value cache for decoding: ``S`` slots, the new T keys/values go to slots
    [start, start + T), and ``mask_BxTxS`` (True = visible) must hide the slots not yet written."""

    k_BxSxGxK: jax.Array
    v_BxSxGxK: jax.Array
    start: jax.Array
    mask_BxTxS: jax.Array


def windowed_layers(cfg: ModelConfig) -> np.ndarray:
    """[L] bool: the layers that attend within ``cfg.attention_window``; the rest attend over the
    whole causal context. Every layer without global_every, else all but every global_every-th."""
    layer_L = np.arange(cfg.n_layers)
    if not cfg.attention_window:
        return np.zeros(cfg.n_layers, bool)
    if not cfg.global_every:
        return np.ones(cfg.n_layers, bool)
    return (layer_L + 1) % cfg.global_every != 0


def block(
    p: Params,
    x_BxTxD: jax.Array,
    positions_BxT: jax.Array,
    cfg: ModelConfig,
    *,
    segment_ids_BxT: jax.Array | None = None,
    cache: KVCache | None = None,
    windowed: jax.Array | bool = False,
) -> tuple[jax.Array, KVCache | None, moe.MoeStats | None]:
    """One pre-norm transformer block, x + attn(norm(x)) then x + mlp(norm(x)), for training and
    decoding alike: with ``cache=None`` the T positions attend to each other (causal, within their
    segment when ``segment_ids`` are given); with a cache they attend over the cache after writing
    their own keys/values into it. ``windowed`` (this layer's entry of ``windowed_layers``, traced
    under the layer scan) limits attention to ``cfg.attention_window``. A layer whose params hold
    ``moe`` (not ``mlp``) is sparse. Returns (x, the updated cache or None, the layer's routing
    stats: ``no_moe_stats`` for a dense layer)."""
    W = cfg.attention_window
    if not W or not cfg.global_every:  # every layer alike: static, so each backend sees it when traced
        windowed = bool(W)

    def self_attend(window: int):
        return lambda q, k, v: attend(
            q, k, v, backend=cfg.attention, segment_ids_BxT=segment_ids_BxT, window=window
        )

    with jax.named_scope("attention"):
        h = norm(p["attn_norm"], x_BxTxD, cfg.norm, cfg.norm_eps)
        q, k, v = qkv(p["attn"], h, positions_BxT, cfg)
        if cache is None and isinstance(windowed, bool):
            o_BxTxHxK = self_attend(W if windowed else 0)(q, k, v)
        elif cache is None:  # windowed and global layers in one scan: the layer's flag picks one
            o_BxTxHxK = jax.lax.cond(windowed, self_attend(W), self_attend(0), q, k, v)
        else:
            write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache.start, 1)
            cache = cache._replace(k_BxSxGxK=write(cache.k_BxSxGxK, k), v_BxSxGxK=write(cache.v_BxSxGxK, v))
            mask_BxTxS = cache.mask_BxTxS
            if W:  # a row's slots are its positions shifted by its padding: slot distance is token distance
                T, S = q.shape[1], cache.k_BxSxGxK.shape[1]
                distance_TxS = (cache.start + jnp.arange(T))[:, None] - jnp.arange(S)[None, :]
                mask_BxTxS = mask_BxTxS & ((distance_TxS < W) | ~jnp.asarray(windowed))[None]
            o_BxTxHxK = attend(q, cache.k_BxSxGxK, cache.v_BxSxGxK, mask_BxTxS, cfg.attention)
        x_BxTxD = x_BxTxD + attn_out(p["attn"], o_BxTxHxK)
    with jax.named_scope("mlp"):
        h = norm(p["mlp_norm"], x_BxTxD, cfg.norm, cfg.norm_eps)
        if "moe" in p:
            y_BxTxD, stats = moe_mlp(p["moe"], h, cfg)
        else:
            y_BxTxD, stats = mlp(p["mlp"], h, cfg.mlp), no_moe_stats(cfg)
        x_BxTxD = x_BxTxD + y_BxTxD
    if cache is None:  # a decode batch is not split like a training batch
        x_BxTxD = constrain(x_BxTxD, ("batch", "seq", "act_embed"))
    return x_BxTxD, cache, stats


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def cast(params: Params, dtype) -> Params:
    return jax.tree.map(lambda w: w.astype(dtype), params)


def embed(params: Params, tokens_BxT: jax.Array, positions_BxT: jax.Array, cfg: ModelConfig) -> jax.Array:
    # Gather the FSDP-split model dimension of the tables first (ZeRO-3, like every weight): a
    # lookup into a table split on D cannot produce batch-split rows without a full reshuffle.
    table_VxD = constrain(params["embed"], ("vocab", "act_embed"))
    x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0)
    if cfg.positions == "learned":
        pos_PxD = constrain(params["pos_embed"], ("positions", "act_embed"))
        x_BxTxD = x_BxTxD + jnp.take(pos_PxD, positions_BxT, axis=0)
    elif cfg.positions == "sinusoidal":
        x_BxTxD = x_BxTxD + sinusoidal(positions_BxT, cfg.d_model).astype(x_BxTxD.dtype)
    return constrain(x_BxTxD, ("batch", "seq", "act_embed"))


def decoder(
    params: Params,
    x_BxTxD: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None,
    cfg: ModelConfig,
) -> jax.Array:
    """The block stack and final norm over input embeddings; params already in the compute dtype.

    ``segment_ids=None`` is plain causal attention; otherwise attention stays within each segment
    (document), and padding (segment 0) sees only padding.
    """

    return _decoder(params, x_BxTxD, positions_BxT, segment_ids_BxT, cfg)[0]


def _decoder(params, x_BxTxD, positions_BxT, segment_ids_BxT, cfg: ModelConfig):
    """``decoder``, and the routing stats summed over the layers (None for a dense model)."""
    x_BxTxD, _, stats = _blocks(params, x_BxTxD, positions_BxT, segment_ids_BxT, cfg, keep=False)
    return norm(params["final_norm"], x_BxTxD, cfg.norm, cfg.norm_eps), stats


def scan_layers(body, carry, blocks: Params, cfg: ModelConfig):
    """``lax.scan`` of ``body(carry, p_layer, windowed) -> (carry, y)`` over the L layers in order,
    y stacked [L, ...]: training, evaluation and cached decoding walk the layers through this one
    function. A dense model is one scan over the stacked blocks. With experts every ``moe_every``-th
    layer is sparse and has other params, so the scan runs over groups of moe_every layers (the
    dense ones, then the sparse one), each group's layers unrolled."""
    windowed_L = jnp.asarray(windowed_layers(cfg))
    if not cfg.moe_experts:
        return jax.lax.scan(lambda c, xs: body(c, *xs), carry, (blocks, windowed_L))
    k, L = cfg.moe_every, cfg.n_layers
    grouped = lambda tree, n: jax.tree.map(lambda w: w.reshape(L // k, n, *w.shape[1:]), tree)
    common = grouped({name: blocks[name] for name in ("attn_norm", "attn", "mlp_norm")}, k)
    dense = grouped(blocks["mlp"], k - 1) if k > 1 else None

    def group(c, xs):
        common_g, dense_g, moe_g, windowed_k = xs
        ys = []
        for i in range(k):
            layer_i = lambda tree, i=i: jax.tree.map(lambda w: w[i], tree)
            p = layer_i(common_g) | ({"moe": moe_g} if i == k - 1 else {"mlp": layer_i(dense_g)})
            c, y = body(c, p, windowed_k[i])
            ys.append(y)
        return c, jax.tree.map(lambda *y: jnp.stack(y), *ys)

    carry, ys = jax.lax.scan(group, carry, (common, dense, blocks["moe"], windowed_L.reshape(L // k, k)))
    return carry, jax.tree.map(lambda y: y.reshape(L, *y.shape[2:]), ys)


def _blocks(params, x_BxTxD, positions_BxT, segment_ids_BxT, cfg: ModelConfig, *, keep: bool):
    """The scan over the blocks, each with its windowed flag: (the last residual stream,
    [L, B, T, D] every block's if ``keep``, the routing stats summed over the layers or None)."""

    def body(x, p_layer, windowed):
        x, _, stats = block(
            p_layer, x, positions_BxT, cfg, segment_ids_BxT=segment_ids_BxT, windowed=windowed
        )
        return x, (x if keep else None, stats)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    x_BxTxD, (kept, stats_L) = scan_layers(body, x_BxTxD, params["blocks"], cfg)
    return x_BxTxD, kept, jax.tree.map(lambda s: s.sum(0), stats_L)


def residual_streams(params: Params, tokens_BxT: jax.Array, positions_BxT: jax.Array, cfg: ModelConfig):
    """[L, B, T, D]: the residual stream after each block (the µP coordinate check reads their RMS)."""
    C = ring.context_size()
    if C > 1:
        tokens_BxT, positions_BxT = (ring.to_zigzag(x, C) for x in (tokens_BxT, positions_BxT))
    params = cast(params, compute_dtype(cfg))
    x_BxTxD = embed(params, tokens_BxT, positions_BxT, cfg)
    x_LxBxTxD = _blocks(params, x_BxTxD, positions_BxT, None, cfg, keep=True)[1]
    return ring.from_zigzag(x_LxBxTxD, C, axis=2) if C > 1 else x_LxBxTxD


def hidden_and_moe_stats(
    params: Params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None,
    cfg: ModelConfig,
) -> tuple[jax.Array, moe.MoeStats | None]:
    """Final-normed hidden states [B, T, D] in the compute dtype, and the routing stats summed over
    the sparse layers (None for a dense model)."""
    params = cast(params, compute_dtype(cfg))
    x_BxTxD = embed(params, tokens_BxT, positions_BxT, cfg)
    return _decoder(params, x_BxTxD, positions_BxT, segment_ids_BxT, cfg)


def hidden(
    params: Params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None,
    cfg: ModelConfig,
) -> jax.Array:
    """Final-normed hidden states [B, T, D] in the compute dtype."""
    return hidden_and_moe_stats(params, tokens_BxT, positions_BxT, segment_ids_BxT, cfg)[0]


def unembed_matrix(params: Params) -> jax.Array:
    """[D, V_padded]: the output projection, the transposed embedding when tied."""
    return params["unembed"] if "unembed" in params else params["embed"].T


def logits_from_hidden(params: Params, x_NxD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Float32 logits over the padded vocabulary; padding columns are -inf."""
    w_DxV = unembed_matrix(params).astype(x_NxD.dtype)
    logits = jnp.einsum("...d,dv->...v", x_NxD, w_DxV, preferred_element_type=jnp.float32)
    if cfg.parametrization == "mup":  # µP's output multiplier 1/m: the readout's lr and init stay
        logits = logits * (1.0 / width_mult(cfg))
    if cfg.padded_vocab != cfg.vocab_size:
        valid_V = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
        logits = jnp.where(valid_V, logits, -jnp.inf)
    return logits


def forward(
    params: Params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None,
    cfg: ModelConfig,
) -> jax.Array:
    """Float32 logits [B, T, vocab_size] for every position."""
    C = ring.context_size()
    if C > 1:  # attention on a context mesh takes the zig-zag order (jaxlm/ring.py)
        tokens_BxT, positions_BxT = (ring.to_zigzag(x, C) for x in (tokens_BxT, positions_BxT))
        segment_ids_BxT = None if segment_ids_BxT is None else ring.to_zigzag(segment_ids_BxT, C)
    x_BxTxD = hidden(params, tokens_BxT, positions_BxT, segment_ids_BxT, cfg)
    if C > 1:
        x_BxTxD = constrain(ring.from_zigzag(x_BxTxD, C), ("batch", "seq", "act_embed"))
    logits = logits_from_hidden(cast(params, x_BxTxD.dtype), x_BxTxD, cfg)
    return constrain(logits, ("batch", "seq", "act_vocab"))[..., : cfg.vocab_size]


class LossSums(NamedTuple):
    """Sums over the target tokens of one batch; divide by ``count`` for the means. The training
    objective is ``(xent + cfg.z_loss * z) / count``; evaluation reports ``xent / count``."""

    xent: jax.Array
    """Sum of masked token cross-entropies."""
    z: jax.Array
    """Sum of masked log²Z, Z the softmax normaliser (the z-loss before its coefficient)."""
    count: jax.Array
    """Number of target tokens (the loss mask's sum)."""
    moe: moe.MoeStats | None = None
    """Mixture of experts (None for a dense model): aux, router_z and load_E are the means over the
    sparse layers times ``count``, so summed over micro-batches and divided by the total count they
    are the count-weighted means (exactly the batch's with one micro-batch); dropped and assigned
    are token copies summed over the layers. The objective adds ``cfg.moe_aux_loss * aux +
    cfg.moe_router_z_loss * router_z``."""


def token_xent_and_lse(logits_NxV: jax.Array, targets_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy, log Z) per token from float32 logits [..., V] and targets [...]."""
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[..., None], axis=-1)[..., 0]
    return lse_N - target_logit_N, lse_N


def masked_sums(xent_N: jax.Array, lse_N: jax.Array, mask_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropies, sum of log²Z) over the tokens where the float mask is 1."""
    return (xent_N * mask_N).sum(), (jnp.square(lse_N) * mask_N).sum()


def loss_sums(
    params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, document_masking: bool
) -> LossSums:
    """The masked cross-entropy and log²Z sums and the number of target tokens for one batch.

    With ``cfg.logits_chunk > 0`` the logits are computed chunk by chunk under remat, so the
    float32 [tokens, vocab] matrix never exists in full, neither forward nor backward.

    On a mesh with a context axis the batch's positions are first put in zig-zag order, which
    ring attention needs (jaxlm/ring.py); the sums over positions do not depend on their order.
    """
    C = ring.context_size()
    if C > 1:
        batch = {k: ring.to_zigzag(v, C) if v.ndim > 1 else v for k, v in batch.items()}
    segment_ids = batch["segment_ids"] if document_masking else None
    x_BxTxD, stats = hidden_and_moe_stats(params, batch["inputs"], batch["positions"], segment_ids, cfg)
    params_c = cast(params, x_BxTxD.dtype)
    D = x_BxTxD.shape[-1]
    x_NxD = x_BxTxD.reshape(-1, D)
    targets_N = batch["targets"].reshape(-1)
    mask_N = batch["loss_mask"].reshape(-1).astype(jnp.float32)
    n = x_NxD.shape[0]
    chunk = cfg.logits_chunk

    def sums(x_MxD, t_M, m_M):
        return masked_sums(*token_xent_and_lse(logits_from_hidden(params_c, x_MxD, cfg), t_M), m_M)

    count = mask_N.sum()
    if stats is not None:  # means over the sparse layers, weighted by this batch's targets
        per_target = lambda s: s * (count / cfg.moe_layers)
        stats = stats._replace(
            aux=per_target(stats.aux), router_z=per_target(stats.router_z), load_E=per_target(stats.load_E)
        )
    if chunk <= 0 or chunk >= n:
        return LossSums(*sums(x_NxD, targets_N, mask_N), count, stats)
    pad = -n % chunk
    x_CxMxD = jnp.pad(x_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, D)
    t_CxM = jnp.pad(targets_N, (0, pad)).reshape(-1, chunk)
    m_CxM = jnp.pad(mask_N, (0, pad)).reshape(-1, chunk)

    @jax.checkpoint
    def one_chunk(total, xs):
        return jax.tree.map(jnp.add, total, sums(*xs)), None

    zero = jnp.zeros((), jnp.float32)
    (xent, z), _ = jax.lax.scan(one_chunk, (zero, zero), (x_CxMxD, t_CxM, m_CxM))
    return LossSums(xent, z, count, stats)
