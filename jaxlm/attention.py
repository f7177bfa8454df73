"""Causal self-attention behind one function, with interchangeable backends.

``reference``: plain einsums with a float32 softmax (the ground truth the others are tested
against). ``xla``: ``jax.nn.dot_product_attention(implementation='xla')``. ``cudnn``: the cuDNN
flash-attention kernel (NVIDIA GPUs, bf16/fp16, causal only). ``auto`` picks the fastest backend
that supports the request. A backend that cannot honour a document (segment) mask is refused,
never silently run without it.

Shapes: B batch, T query positions, S key positions, H query heads, G kv heads, R = H // G, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.config import ConfigError

BACKENDS = ("reference", "xla", "cudnn")


def document_causal_mask(q_segment_ids_BxT: jax.Array, kv_segment_ids_BxS: jax.Array) -> jax.Array:
    """[B, T, S] bool: key s is visible to query t when s <= t and both lie in the same document."""
    T, S = q_segment_ids_BxT.shape[1], kv_segment_ids_BxS.shape[1]
    causal_TxS = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :]
    same_doc_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
    return causal_TxS[None] & same_doc_BxTxS


def causal_mask(T: int, S: int | None = None) -> jax.Array:
    S = T if S is None else S
    return (jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :])[None]


def resolve_backend(backend: str, has_mask: bool, dtype, platform: str | None = None) -> str:
    """The backend that will run: ``auto`` resolved, unsupported requests refused with a reason."""
    platform = platform or jax.default_backend()
    if backend == "auto":
        if platform == "gpu" and not has_mask and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
            return "cudnn"
        return "xla"
    if backend not in BACKENDS:
        raise ConfigError(f"model.attention={backend!r} is unknown; choose one of {('auto',) + BACKENDS}")
    if backend == "cudnn":
        if platform != "gpu":
            raise ConfigError(
                f"model.attention='cudnn' needs an NVIDIA GPU, but this run is on {platform!r}; "
                "use model.attention=auto or xla"
            )
        if has_mask:
            raise ConfigError(
                "model.attention='cudnn' cannot honour document masking (segment ids); set "
                "data.document_masking=false or model.attention=xla"
            )
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise ConfigError(
                f"model.attention='cudnn' needs bfloat16/float16 compute, got {jnp.dtype(dtype).name}; "
                "set model.compute_dtype=bfloat16 or model.attention=xla"
            )
    return backend


def _reference(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS):
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxSxGxK.shape[2]
    q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(K))
    scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxK.dtype)
    o_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK)
    return o_BxTxGxRxK.reshape(B, T, H, K)


def attend(
    q_BxTxHxK: jax.Array,
    k_BxSxGxK: jax.Array,
    v_BxSxGxK: jax.Array,
    mask_BxTxS: jax.Array | None = None,
    backend: str = "auto",
) -> jax.Array:
    """Multi-head (grouped-query) attention. ``mask=None`` means plain causal attention with the
    last query aligned to the last key; otherwise ``mask`` (True = visible) is used as given."""
    T, S = q_BxTxHxK.shape[1], k_BxSxGxK.shape[1]
    impl = resolve_backend(backend, mask_BxTxS is not None, q_BxTxHxK.dtype)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, is_causal=True, implementation="cudnn"
        )
    if mask_BxTxS is None:
        mask_BxTxS = causal_mask(T, S)
    if impl == "reference":
        return _reference(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS)
    return jax.nn.dot_product_attention(
        q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_BxTxS[:, None], implementation="xla"
    )
