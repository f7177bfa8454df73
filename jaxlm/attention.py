"""Causal self-attention behind one function, with interchangeable backends.

``reference``: plain einsums with a float32 softmax (the ground truth the others are tested
against). ``blockwise``: the same einsums one query block at a time, skipping the score blocks
the causal mask would discard (the CPU default; self-attention only). ``xla``:
``jax.nn.dot_product_attention(implementation='xla')``. ``cudnn``: the cuDNN
flash-attention kernel (NVIDIA GPUs, bf16/fp16, causal only). ``splash``: the Pallas splash-attention
kernel (TPU; honours segment ids; sequence length a multiple of 128). ``auto`` picks the fastest
backend that supports the request. A backend that cannot honour a document (segment) mask or an
explicit mask is refused with a ConfigError, never silently run without it. On a mesh with a
context axis (``mesh.context > 1``) self-attention is ring attention (jaxlm/ring.py) whatever
``auto`` would pick; the other backends are refused there.

Sliding-window (local) attention, ``window=W > 0``: query t sees key s iff s <= t and t - s < W
(and, with segment ids, both lie in one document, where t - s is also the position difference).
Every backend honours it: reference and xla in their mask, blockwise by never computing the keys
before its query block's window, cudnn through ``jax.nn.dot_product_attention``'s
``local_window_size``, splash with a ``LocalMask``.

Shapes: B batch, T query positions, S key positions, H query heads, G kv heads, R = H // G, K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import ring
from jaxlm.config import ConfigError

BACKENDS = ("reference", "blockwise", "xla", "cudnn", "splash")
# Backends that cannot apply an explicit [B, T, S] mask (a key/value cache needs one).
NO_EXPLICIT_MASK = ("blockwise", "cudnn", "splash")
SPLASH_BLOCK = 128  # the splash kernel tiles T and S in blocks of (a multiple of) this


def causal_mask(T: int, S: int | None = None, window: int = 0) -> jax.Array:
    """[1, T, S] bool, the last query aligned to the last key: query t (at key index t + S - T)
    sees key s when 0 <= t + S - T - s, and, for ``window > 0``, t + S - T - s < window."""
    S = T if S is None else S
    distance_TxS = jnp.arange(T)[:, None] + (S - T) - jnp.arange(S)[None, :]
    visible_TxS = distance_TxS >= 0
    if window:
        visible_TxS &= distance_TxS < window
    return visible_TxS[None]


def document_causal_mask(
    q_segment_ids_BxT: jax.Array, kv_segment_ids_BxS: jax.Array, window: int = 0
) -> jax.Array:
    """[B, T, S] bool: ``causal_mask`` (with its window), and both in the same document."""
    T, S = q_segment_ids_BxT.shape[1], kv_segment_ids_BxS.shape[1]
    same_doc_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
    return causal_mask(T, S, window) & same_doc_BxTxS


def resolve_backend(
    backend: str,
    *,
    segment_ids: bool,
    dtype,
    seq_len: int,
    custom_mask: bool = False,
    platform: str | None = None,
) -> str:
    """The backend that will run: ``auto`` resolved, unsupported requests refused with a reason.

    ``segment_ids``: document masking is on. ``custom_mask``: the caller passes an explicit
    [B, T, S] mask (e.g. a key/value cache), which only ``reference`` and ``xla`` can apply.
    """
    platform = platform or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if backend == "auto":
        if platform == "gpu" and half and not segment_ids and not custom_mask:
            return "cudnn"
        if platform == "tpu" and not custom_mask and seq_len % SPLASH_BLOCK == 0:
            return "splash"
        if platform == "cpu" and not custom_mask:
            return "blockwise"
        return "xla"
    if backend not in BACKENDS:
        raise ConfigError(f"model.attention={backend!r} is unknown; choose one of {('auto',) + BACKENDS}")
    if backend in ("cudnn", "splash"):
        need = {"cudnn": "gpu", "splash": "tpu"}[backend]
        if platform != need:
            raise ConfigError(
                f"model.attention={backend!r} needs a {need.upper()}, but this run is on {platform!r}; "
                "use model.attention=auto or xla"
            )
    if backend in NO_EXPLICIT_MASK and custom_mask:
        raise ConfigError(
            f"model.attention={backend!r} cannot apply an explicit attention mask (as used with a "
            "key/value cache); use model.attention=auto or xla"
        )
    if backend == "cudnn":
        if segment_ids:
            raise ConfigError(
                "model.attention='cudnn' cannot honour document masking (segment ids); set "
                "data.document_masking=false or model.attention=auto (xla)"
            )
        if not half:
            raise ConfigError(
                f"model.attention='cudnn' needs bfloat16/float16 compute, got {jnp.dtype(dtype).name}; "
                "set model.compute_dtype=bfloat16 or model.attention=xla"
            )
    if backend == "splash" and seq_len % SPLASH_BLOCK:
        raise ConfigError(
            f"model.attention='splash' needs model.seq_len divisible by {SPLASH_BLOCK}, got {seq_len}; "
            "change the sequence length or use model.attention=xla"
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


def causal_blocks(T: int, max_blocks: int = 8, min_block: int = 128) -> list[tuple[int, int]]:
    """[start, end) query blocks for ``blockwise``: at most ``max_blocks`` (so the program stays
    small at any length), none shorter than ``min_block`` unless T is."""
    n = max(1, min(max_blocks, T // min_block))
    size = -(-T // n)
    return [(start, min(start + size, T)) for start in range(0, T, size)]


def _blockwise(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, window: int):
    """Causal self-attention one query block at a time, each over the keys up to its last query
    only: the score blocks above the diagonal, which the causal mask would throw away, are never
    computed (7/16 of the scores and their memory traffic at 8 blocks). With a window, neither are
    the keys before the block's first query's window."""
    outs = []
    for start, end in causal_blocks(q_BxTxHxK.shape[1]):
        lo = max(0, start - window + 1) if window else 0
        if segment_ids_BxT is None:
            mask_BxTxS = causal_mask(end - start, end - lo, window)
        else:
            seg_q, seg_kv = segment_ids_BxT[:, start:end], segment_ids_BxT[:, lo:end]
            mask_BxTxS = document_causal_mask(seg_q, seg_kv, window)
        q = q_BxTxHxK[:, start:end]
        outs.append(_reference(q, k_BxTxGxK[:, lo:end], v_BxTxGxK[:, lo:end], mask_BxTxS))
    return jnp.concatenate(outs, axis=1)


def splash_block_sizes(T: int):
    """Largest blocks up to 512 that tile T (T % 128 == 0 is checked by resolve_backend)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b = next(b for b in (512, 256, 128) if T % b == 0)
    return sa.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip


@functools.lru_cache(maxsize=16)
def _splash_kernel(H: int, T: int, window: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    # LocalMask((W - 1, 0)): q - (W - 1) <= kv <= q, causal and windowed; the kernel skips the
    # blocks wholly outside it
    one = sa.LocalMask((T, T), (window - 1, 0), offset=0) if window else sa.CausalMask((T, T))
    mask = sa.MultiHeadMask([one] * H)
    # Built outside any trace, so the mask tables the kernel keeps are constants: the cached kernel
    # is reused under later jits, into which values made under the first one would leak as tracers.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(
            mask, block_sizes=splash_block_sizes(T), head_shards=1, q_seq_shards=1, interpret=interpret
        )


def _splash(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxT, window: int, interpret: bool):
    """Pallas splash attention, vmapped over the batch, under shard_map when a mesh is set (a
    Pallas call cannot be partitioned automatically: each device runs it on its batch rows and heads)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    from jaxlm.sharding import logical_to_spec

    B, T, H, K = q_BxTxHxK.shape
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((B, T), jnp.int32)

    def local(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, seg_BxT):
        kernel = _splash_kernel(q_BxHxTxK.shape[1], T, window, interpret)
        # the kernel takes queries pre-scaled; grouped kv heads are shared by H // G query heads
        q_BxHxTxK = q_BxHxTxK * jnp.asarray(1 / np.sqrt(K), q_BxHxTxK.dtype)
        ids = sa.SegmentIds(q=seg_BxT, kv=seg_BxT)
        return jax.vmap(kernel)(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, segment_ids=ids)

    args = (
        q_BxTxHxK.transpose(0, 2, 1, 3),
        k_BxSxGxK.transpose(0, 2, 1, 3),
        v_BxSxGxK.transpose(0, 2, 1, 3),
        segment_ids_BxT.astype(jnp.int32),
    )
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        heads = logical_to_spec(("batch", "act_heads", None, None))
        ids = logical_to_spec(("batch", None))
        local = jax.shard_map(local, in_specs=(heads, heads, heads, ids), out_specs=heads, check_vma=False)
    return local(*args).transpose(0, 2, 1, 3)


def attend(
    q_BxTxHxK: jax.Array,
    k_BxSxGxK: jax.Array,
    v_BxSxGxK: jax.Array,
    mask_BxTxS: jax.Array | None = None,
    backend: str = "auto",
    *,
    segment_ids_BxT: jax.Array | None = None,
    window: int = 0,
    interpret: bool = False,
) -> jax.Array:
    """Multi-head (grouped-query) causal attention, the last query aligned to the last key.

    ``segment_ids_BxT`` (document masking): a query sees only earlier keys of its own segment;
    segment 0 (padding) sees only padding. ``window`` (static; 0: none): query t sees only the keys
    s with t - s < window. ``mask_BxTxS`` (True = visible) replaces the causal mask outright, for
    callers such as a key/value cache, which fold any window into it themselves; give either a
    mask, or segment ids and/or a window. ``interpret`` runs the splash kernel in the Pallas interpreter, so
    CPU tests can check it against the reference.
    """
    if mask_BxTxS is not None and segment_ids_BxT is not None:
        raise ValueError("attend: pass mask_BxTxS or segment_ids_BxT, not both")
    if mask_BxTxS is not None and window:
        raise ValueError("attend: fold the window into mask_BxTxS; an explicit mask replaces it")
    T, S = q_BxTxHxK.shape[1], k_BxSxGxK.shape[1]
    C = ring.context_size()
    if mask_BxTxS is None and C > 1:  # the sequence is split over the mesh's context axis
        if backend != "auto":
            raise ConfigError(ring.backend_error(backend, C))
        return ring.ring_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxT, window)
    impl = resolve_backend(
        backend,
        segment_ids=segment_ids_BxT is not None,
        custom_mask=mask_BxTxS is not None,
        dtype=q_BxTxHxK.dtype,
        seq_len=T,
        platform="tpu" if interpret else None,
    )
    if impl == "cudnn":
        # (W - 1, 0): the W - 1 keys before the query and none after (cuDNN's sliding window W)
        local = (window - 1, 0) if window else None
        return jax.nn.dot_product_attention(
            q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, is_causal=True, local_window_size=local, implementation="cudnn"
        )
    if impl == "splash":
        return _splash(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxT, window, interpret)
    if impl == "blockwise":
        return _blockwise(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxT, window)
    if segment_ids_BxT is not None:
        mask_BxTxS = document_causal_mask(segment_ids_BxT, segment_ids_BxT, window)
    elif mask_BxTxS is None:
        mask_BxTxS = causal_mask(T, S, window)
    if impl == "reference":
        return _reference(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS)
    return jax.nn.dot_product_attention(
        q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_BxTxS[:, None], implementation="xla"
    )
