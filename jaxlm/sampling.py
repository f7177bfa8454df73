"""Sampling from a trained model: prefill the prompt once, then one token per step with a key/value cache.

The whole decode is one jitted function: a prefill pass over the prompts, then a ``lax.while_loop``
that feeds one token per step, so nothing recompiles per token and the host is not involved
until the end. Prompts of different lengths are left-padded to the longest: row b's prompt fills
cache slots [pad_b, P) at positions 0..n_b-1, and the pad slots are masked out of every query.
All rows then write slot P + i - 1 at step i, so the cache is updated with one scalar offset.

Shapes: B batch, P longest prompt, N new tokens, S cache slots (P + N - 1: the last sampled token
is never fed back), L layers, G kv heads, K head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import lm, model
from jaxlm.attention import NO_EXPLICIT_MASK
from jaxlm.config import ConfigError, ModelConfig

Cache = dict[str, jax.Array]  # {"k": [L, B, S, G, K], "v": [L, B, S, G, K]}


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> Cache:
    shape = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _decode_cfg(cfg: ModelConfig) -> ModelConfig:
    # Cached attention needs an explicit mask, which some backends cannot take.
    return dataclasses.replace(cfg, attention="xla") if cfg.attention in NO_EXPLICIT_MASK else cfg


def hidden_cached(
    params: model.Params,
    tokens_BxT: jax.Array,
    cache: Cache,
    start: jax.Array,
    pad_B: jax.Array,
    cfg: ModelConfig,
) -> tuple[jax.Array, Cache]:
    """Final-normed hidden states [B, T, D] of tokens at cache slots [start, start + T).

    Row b's slot s holds position s - pad_b; a query sees the written slots up to its own that
    are not padding (a pad query sees only itself, so no softmax row is empty), and in a windowed
    layer only the last ``model.attention_window`` of them.
    """
    cfg = _decode_cfg(cfg)
    T, S = tokens_BxT.shape[1], cache["k"].shape[2]
    slot_T = start + jnp.arange(T)
    positions_BxT = jnp.maximum(slot_T[None, :] - pad_B[:, None], 0)
    s_1x1xS, t_1xTx1 = jnp.arange(S)[None, None, :], slot_T[None, :, None]
    mask_BxTxS = (s_1x1xS <= t_1xTx1) & ((s_1x1xS >= pad_B[:, None, None]) | (s_1x1xS == t_1xTx1))
    params = model.cast(params, model.compute_dtype(cfg))
    x_BxTxD = model.embed(params, tokens_BxT, positions_BxT, cfg)

    def layer(carry, p_layer, windowed):
        x_BxTxD, k_LxBxSxGxK, v_LxBxSxGxK, layer_i = carry
        layer_cache = model.KVCache(k_LxBxSxGxK[layer_i], v_LxBxSxGxK[layer_i], start, mask_BxTxS)
        x_BxTxD, layer_cache, _ = model.block(
            p_layer, x_BxTxD, positions_BxT, cfg, cache=layer_cache, windowed=windowed
        )
        # Write back only the T new slots, so the cache is updated in place, not copied per step.
        at = (layer_i, 0, start, 0, 0)
        new_k = jax.lax.dynamic_slice_in_dim(layer_cache.k_BxSxGxK, start, T, 1)[None]
        new_v = jax.lax.dynamic_slice_in_dim(layer_cache.v_BxSxGxK, start, T, 1)[None]
        k_LxBxSxGxK = jax.lax.dynamic_update_slice(k_LxBxSxGxK, new_k, at)
        v_LxBxSxGxK = jax.lax.dynamic_update_slice(v_LxBxSxGxK, new_v, at)
        return (x_BxTxD, k_LxBxSxGxK, v_LxBxSxGxK, layer_i + 1), None

    init = (x_BxTxD, cache["k"], cache["v"], jnp.zeros((), jnp.int32))
    (x_BxTxD, k, v, _), _ = model.scan_layers(layer, init, params["blocks"], cfg)
    x_BxTxD = model.norm(params["final_norm"], x_BxTxD, cfg.norm, cfg.norm_eps)
    return x_BxTxD, {"k": k, "v": v}


def logits(params: model.Params, x_BxTxD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Float32 logits [B, T, vocab_size], exactly as ``model.forward`` computes them."""
    return model.logits_from_hidden(model.cast(params, x_BxTxD.dtype), x_BxTxD, cfg)[..., : cfg.vocab_size]


@functools.partial(jax.jit, static_argnames="cfg")
def forward_cached(
    params: model.Params,
    tokens_BxT: jax.Array,
    cache: Cache,
    start: jax.Array,
    pad_B: jax.Array,
    cfg: ModelConfig,
) -> tuple[jax.Array, Cache]:
    """Logits [B, T, V] of T tokens written at cache slots [start, start + T), and the new cache."""
    x_BxTxD, cache = hidden_cached(params, tokens_BxT, cache, start, pad_B, cfg)
    return logits(params, x_BxTxD, cfg), cache


# --------------------------------------------------------------------------------------------
# Choosing the next token.
# --------------------------------------------------------------------------------------------


def _static(x, value: float) -> bool:
    """Whether ``x`` is the Python number ``value``: Python numbers pick the cheapest code path,
    arrays (traced values, e.g. in a test sweeping top_p under one compilation) are applied as given."""
    return isinstance(x, (int, float)) and x == value


def nucleus(logits_C: jax.Array, top_p) -> jax.Array:
    """``logits_C`` with every token outside the nucleus of mass ``top_p`` set to -inf.

    The nucleus is the fewest most likely tokens whose probability reaches top_p: those with
    p >= tau for the largest threshold tau that still keeps mass top_p (ties at tau all stay). tau
    is found by bisection over the float32 bit patterns of p (ordered like the values, as p >= 0):
    exact after 32 halvings, and no sort, which for a 50k vocabulary is slow on CPU.
    """
    p_C = jax.nn.softmax(logits_C)
    bits_C = jax.lax.bitcast_convert_type(p_C, jnp.int32)

    def halve(_, lo_hi):
        # invariant: the tokens with bits >= lo hold mass >= top_p; those with bits >= hi do not
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        keeps = jnp.where(bits_C >= mid, p_C, 0.0).sum() >= top_p
        return jnp.where(keeps, mid, lo), jnp.where(keeps, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.int32(0), bits_C.max() + 1))
    return jnp.where(bits_C >= lo, logits_C, -jnp.inf)


def _sample_one(key: jax.Array, logits_V: jax.Array, temperature, top_k: int, top_p) -> jax.Array:
    logits_V = logits_V.astype(jnp.float32) / temperature
    cand_ids_C = None
    if top_k:  # exactly k candidates, even with ties
        logits_V, cand_ids_C = jax.lax.top_k(logits_V, top_k)
    if not _static(top_p, 1.0):
        logits_V = nucleus(logits_V, top_p)  # renormalised within the top k, as in Hugging Face
    i = jax.random.categorical(key, logits_V)
    return i if cand_ids_C is None else cand_ids_C[i]


def sample_token(
    keys_B: jax.Array, logits_BxV: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """One token per row: argmax when ``temperature == 0``; otherwise a draw from
    softmax(logits / temperature) restricted to the ``top_k`` most likely tokens (0: all) and then
    to the nucleus of mass ``top_p`` (1.0: all). Row b uses ``keys_B[b]``. ``top_k`` is static;
    ``temperature`` (when not 0) and ``top_p`` may be traced."""
    if _static(temperature, 0):
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    one = functools.partial(_sample_one, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.vmap(one)(keys_B, logits_BxV).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# The decode loop: prefill, then a while_loop of single-token steps.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p"))
def decode(
    params: model.Params,
    tokens_BxP: jax.Array,
    pad_B: jax.Array,
    key: jax.Array,
    eot_id: jax.Array,
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> jax.Array:
    """[B, N] new tokens for left-padded prompts; after a row emits ``eot_id`` (-1: never stop)
    the rest of the row is ``eot_id``, and the loop ends early once every row has stopped."""
    B, P = tokens_BxP.shape
    N = max_new_tokens
    S = P + N - 1  # slots: the last sampled token is never fed back
    if lm.get(cfg).kv_cache:
        params = model.cast(params, model.compute_dtype(cfg))  # once, not per step
        state = init_cache(cfg, B, S, model.compute_dtype(cfg))

        def forward_at(cache, tokens_BxT, start):
            """Logits [B, V] of the last of T tokens written at slots [start, start + T)."""
            x_BxTxD, cache = hidden_cached(params, tokens_BxT, cache, start, pad_B, cfg)
            return logits(params, x_BxTxD[:, -1], cfg), cache
    else:
        # A model without a key/value cache (a user's nnx.Module): the whole window runs forward
        # for every token. Pad slots form segment 0, which sees only itself; later, unwritten
        # slots are hidden by causality.
        full = lm.get(cfg).logits
        slot_1xS = jnp.arange(S)[None, :]
        positions_BxS = jnp.maximum(slot_1xS - pad_B[:, None], 0)
        segments_BxS = (slot_1xS >= pad_B[:, None]).astype(jnp.int32)
        state = jnp.zeros((B, S), jnp.int32)

        def forward_at(buf_BxS, tokens_BxT, start):
            buf_BxS = jax.lax.dynamic_update_slice_in_dim(buf_BxS, tokens_BxT.astype(jnp.int32), start, 1)
            logits_BxSxV = full(params, buf_BxS, positions_BxS, segments_BxS)
            last = start + tokens_BxT.shape[1] - 1
            return jax.lax.dynamic_index_in_dim(logits_BxSxV, last, 1, keepdims=False), buf_BxS

    # Row r's draw at step i uses fold_in(fold_in(key, r), i): reproducible from the seed.
    row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B))

    def pick(i, logits_BxV):
        keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, i)
        return sample_token(keys_B, logits_BxV, temperature, top_k, top_p)

    logits_BxV, state = forward_at(state, tokens_BxP, jnp.int32(0))
    tok_B = pick(0, logits_BxV)
    out_BxN = jnp.full((B, N), jnp.maximum(eot_id, 0), jnp.int32).at[:, 0].set(tok_B)
    done_B = tok_B == eot_id

    def cond(carry):
        i, _, _, done_B, _ = carry
        return (i < N) & ~jnp.all(done_B)

    def step(carry):
        i, state, tok_B, done_B, out_BxN = carry
        logits_BxV, state = forward_at(state, tok_B[:, None], P + i - 1)
        tok_B = jnp.where(done_B, eot_id, pick(i, logits_BxV))
        out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, tok_B[:, None], i, 1)
        return i + 1, state, tok_B, done_B | (tok_B == eot_id), out_BxN

    carry = (jnp.int32(1), state, tok_B, done_B, out_BxN)
    return jax.lax.while_loop(cond, step, carry)[-1]


# --------------------------------------------------------------------------------------------
# Python API.
# --------------------------------------------------------------------------------------------


def check_sampling_args(
    vocab_size: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float
) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if not temperature >= 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")
    if not 0 <= top_k <= vocab_size:
        raise ConfigError(f"top_k={top_k} must be in [0, vocab size {vocab_size}] (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")


def check_prompts(prompt_tokens: list[list[int]], max_new_tokens: int, cfg: ModelConfig) -> None:
    if not prompt_tokens:
        raise ConfigError("no prompts given; pass at least one prompt")
    for i, p in enumerate(prompt_tokens):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty; sampling needs at least one token of context")
        if len(p) > cfg.seq_len:
            raise ConfigError(
                f"prompt {i} has {len(p)} tokens, longer than the context window model.seq_len="
                f"{cfg.seq_len}; shorten it to at most {cfg.seq_len} tokens"
            )
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ConfigError(f"prompt {i} holds token ids {bad[:5]} outside [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompt_tokens)
    # Learned positions end at seq_len; a model without a cache runs its whole window forward.
    windowed = cfg.positions == "learned" or not lm.get(cfg).kv_cache
    if windowed and longest + max_new_tokens - 1 > cfg.seq_len:
        raise ConfigError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} needs "
            f"{longest + max_new_tokens - 1} positions but this model's window is model.seq_len="
            f"{cfg.seq_len}; lower max_new_tokens to at most {cfg.seq_len - longest + 1} or shorten the "
            "prompt"
        )


def left_pad(prompt_tokens: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """([B, P] int32 prompts right-aligned, [B] pad lengths); pad slots hold token 0 (masked out)."""
    P = max(len(p) for p in prompt_tokens)
    tokens_BxP = np.zeros((len(prompt_tokens), P), np.int32)
    for b, p in enumerate(prompt_tokens):
        tokens_BxP[b, P - len(p) :] = p
    return tokens_BxP, np.array([P - len(p) for p in prompt_tokens], np.int32)


def generate(
    params: model.Params,
    cfg_model: ModelConfig,
    prompt_tokens: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eot_id: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt: up to ``max_new_tokens``, ending before ``eot_id`` if it is drawn.

    ``temperature=0`` is greedy. The same seed and arguments give the same tokens; row r of a batch
    draws with its own key, so a prompt's sample does not depend on the prompts batched with it
    unless they change its row index.
    """
    check_sampling_args(cfg_model.vocab_size, max_new_tokens, temperature, top_k, top_p)
    check_prompts(prompt_tokens, max_new_tokens, cfg_model)
    if eot_id is not None and not 0 <= eot_id < cfg_model.vocab_size:
        raise ConfigError(f"eot_id={eot_id} is outside the vocabulary [0, {cfg_model.vocab_size})")
    tokens_BxP, pad_B = left_pad(prompt_tokens)
    out_BxN = decode(
        params,
        jnp.asarray(tokens_BxP),
        jnp.asarray(pad_B),
        jax.random.key(seed),
        jnp.int32(-1 if eot_id is None else eot_id),
        cfg=cfg_model,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )
    rows = np.asarray(out_BxN).tolist()
    if eot_id is None:
        return rows
    return [row[: row.index(eot_id)] if eot_id in row else row for row in rows]


# --------------------------------------------------------------------------------------------
# From a checkpoint (what ``jaxlm sample`` runs).
# --------------------------------------------------------------------------------------------


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """``--prompt`` values, then one prompt per non-empty line of ``--prompts-file``."""
    prompts = list(prompts)
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise ConfigError(
                f"--prompts-file {prompts_file!r} does not exist; give a text file, one prompt a line"
            )
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt given; pass --prompt TEXT or --prompts-file FILE")
    return prompts


def sample_checkpoint(
    path: str | Path,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
) -> dict[str, Any]:
    """Completions of each prompt (``num_samples`` each) from the checkpoint at ``path`` alone.

    Returns {"step", "completions": [[text] * num_samples] * prompts, "new_tokens", "seconds"}.
    """
    from jaxlm import checkpoint
    from jaxlm.data.tokenizer import get_tokenizer

    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples} must be at least 1")
    # Decoding is latency-bound: one device, params replicated there.
    cfg, params, step, mesh = checkpoint.load_params(path, jax.devices()[:1])
    check_sampling_args(cfg.model.vocab_size, max_new_tokens, temperature, top_k, top_p)
    tok = get_tokenizer(cfg.data.tokenizer)
    prompt_tokens = [tok.encode(p) for p in prompts for _ in range(num_samples)]
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # the model's sharding constraints refer to the mesh the params are on
        new = generate(
            params, cfg.model, prompt_tokens, max_new_tokens, temperature, top_k, top_p, seed, tok.eot_id
        )
    seconds = time.perf_counter() - start
    texts = [tok.decode(t) for t in new]
    completions = [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
    return {"step": step, "completions": completions, "new_tokens": sum(map(len, new)), "seconds": seconds}
