"""Context parallelism: every sequence split over the mesh's ``context`` axis, attention by ring.

Layout (zig-zag). With C context shards the T positions are cut into 2C chunks of c = T / 2C and
shard i holds chunks i and 2C-1-i: each shard has as many early queries as late ones, so the
causal work is the same on every shard. ``to_zigzag`` permutes the sequence axis into that order;
the model does it to the batch before the embedding (jaxlm/model.py). Everything but attention is
position-wise and the loss is a sum over positions, so the order changes nothing else; rope and
learned positions come from ``batch["positions"]``, permuted with the tokens; the causal mask is
defined by each position's original index, never by its array index.

Ring attention. Each shard keeps its 2c queries; the K/V blocks, with their segment ids, go round
the ring with ``ppermute``, C - 1 hops, and at each hop the shard folds its queries against the
block it holds into a flash-attention partial (running max and sum, float32). The next hop's
``ppermute`` depends only on the block in hand, not on that step's compute, so XLA can overlap the
two. Of the C - 1 visiting blocks only half is visible, and only that half is computed: a block
from an earlier shard s < i has its chunk s before both of ours and its chunk 2C-1-s after both
(our queries against its first chunk); a block from a later shard s > i lies wholly between our
chunks (our late chunk against all of it). So every shard computes one diagonal block and C - 1
half-blocks. The mask inside each is computed from the original indices, the window and the
segment ids, so packed documents that cross a shard boundary stay exact.

Backward (a ``custom_vjp``, as in flash attention): only q, k, v, the output and the per-query
log-sum-exp are kept (O(T / C) per shard); the probabilities are recomputed block by block while
the K/V blocks go round the ring again, this time with their dK/dV accumulators, which come home
with one last hop. Differentiating the forward instead would keep every hop's probabilities. A
block and its gradient travel in one ppermute after the step that updated them, so the backward's
hops do not overlap its compute (sending K/V ahead of dK/dV would).

Shapes: B batch rows on this shard, T = 2c positions on this shard, H query heads, G kv heads,
R = H // G, K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ConfigError, ModelConfig

AXIS = "context"
F32 = jnp.float32
_NEG = float(jnp.finfo(F32).min)


def context_size() -> int:
    """Shards of the sequence axis under the current mesh (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or AXIS not in mesh.axis_names else int(mesh.shape[AXIS])


def backend_error(backend: str, C: int) -> str:
    return (
        f"model.attention={backend!r} cannot run with mesh.context={C}: attention over a sequence split "
        "on the context axis is ring attention (jaxlm/ring.py), which computes its own blocks; set "
        "model.attention=auto"
    )


def check_config(model: ModelConfig, C: int) -> None:
    """Refuse what context parallelism over C shards cannot run, one line naming the key and the fix."""
    if C == 1:
        return
    if model.module:
        raise ConfigError(
            f"mesh.context={C}: context parallelism (the zig-zag layout and ring attention) is built into "
            f"jaxlm's own transformer; model.module={model.module!r} cannot use it: set mesh.context=1"
        )
    zigzag_order(model.seq_len, C)
    if model.attention != "auto":
        raise ConfigError(backend_error(model.attention, C))


def zigzag_order(T: int, C: int) -> np.ndarray:
    """[T]: the original index of the position at each array index of the zig-zag layout."""
    if T % (2 * C):
        raise ConfigError(
            f"mesh.context={C} needs model.seq_len divisible by 2 x context = {2 * C} (the zig-zag layout "
            f"cuts a sequence into two chunks per shard), got {T}; change model.seq_len or mesh.context"
        )
    c = T // (2 * C)
    return np.concatenate([np.arange(c) + chunk * c for i in range(C) for chunk in (i, 2 * C - 1 - i)])


def to_zigzag(x: jax.Array, C: int, axis: int = 1) -> jax.Array:
    """The sequence axis of ``x`` in zig-zag order (shard i's positions contiguous, in shard order)."""
    return jnp.take(x, zigzag_order(x.shape[axis], C), axis=axis)


def from_zigzag(x: jax.Array, C: int, axis: int = 1) -> jax.Array:
    """The inverse of ``to_zigzag``: the sequence axis back in original order."""
    return jnp.take(x, np.argsort(zigzag_order(x.shape[axis], C)), axis=axis)


def _held(shard, c: int, C: int) -> jax.Array:
    """[2c] original indices of the positions ``shard`` holds (traced shard index)."""
    a = jnp.arange(c)
    return jnp.concatenate([shard * c + a, (2 * C - 1 - shard) * c + a])


def _visible(q_idx_T, k_idx_S, seg_q_BxT, seg_k_BxS, window: int) -> jax.Array:
    """[B, T, S] bool: key at original index s visible to the query at t (causal, window, document)."""
    distance_TxS = q_idx_T[:, None] - k_idx_S[None, :]
    visible_TxS = distance_TxS >= 0
    if window:
        visible_TxS &= distance_TxS < window
    return visible_TxS[None] & (seg_q_BxT[:, :, None] == seg_k_BxS[:, None, :])


def _scores(q_BxTxGxRxK, k_BxSxGxK, visible_BxTxS):
    s = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK, preferred_element_type=F32)
    s = s / jnp.sqrt(jnp.float32(q_BxTxGxRxK.shape[-1]))
    return jnp.where(visible_BxTxS[:, None, None], s, _NEG)


def _fold(carry, q_BxTxGxRxK, k_BxSxGxK, v_BxSxGxK, visible_BxTxS):
    """One block into the running (max, sum, weighted values) of the online softmax."""
    m_BxGxRxT, l_BxGxRxT, acc_BxGxRxTxK = carry
    s = _scores(q_BxTxGxRxK, k_BxSxGxK, visible_BxTxS)
    m_new = jnp.maximum(m_BxGxRxT, s.max(-1))
    # where, not exp alone: a query with no visible key yet has m_new = _NEG and exp(0) = 1
    p = jnp.where(visible_BxTxS[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
    rescale = jnp.exp(m_BxGxRxT - m_new)
    pv = jnp.einsum("bgrts,bsgk->bgrtk", p.astype(v_BxSxGxK.dtype), v_BxSxGxK, preferred_element_type=F32)
    return m_new, l_BxGxRxT * rescale + p.sum(-1), acc_BxGxRxTxK * rescale[..., None] + pv


def _grads(q, do, lse, delta, k, v, visible):
    """(dq, dk, dv) of one block, float32, from the saved log-sum-exp (flash attention's backward)."""
    scale = 1 / jnp.sqrt(jnp.float32(q.shape[-1]))
    p = jnp.where(visible[:, None, None], jnp.exp(_scores(q, k, visible) - lse[..., None]), 0.0)
    dv = jnp.einsum("bgrts,btgrk->bsgk", p.astype(do.dtype), do, preferred_element_type=F32)
    dp = jnp.einsum("btgrk,bsgk->bgrts", do, v, preferred_element_type=F32)
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("bgrts,bsgk->btgrk", ds.astype(k.dtype), k, preferred_element_type=F32)
    dk = jnp.einsum("bgrts,btgrk->bsgk", ds.astype(q.dtype), q, preferred_element_type=F32)
    return dq, dk, dv


def _hop(x, C: int):
    """Every shard's ``x`` to the next shard of the ring."""
    return jax.lax.ppermute(x, AXIS, [(d, (d + 1) % C) for d in range(C)])


def _halves(x, axis: int = 1):
    """A shard's two chunks (its early and its late one) along the position axis."""
    c = x.shape[axis] // 2
    return jax.lax.slice_in_dim(x, 0, c, axis=axis), jax.lax.slice_in_dim(x, c, 2 * c, axis=axis)


# The (our chunk, its chunk) pairs a ring step computes, all others being wholly in the future:
# on the diagonal (our own block) both early/late pairs but (early, late); a block from an
# earlier shard: both our chunks against its early one; from a later shard: our late chunk
# against both of its. Every pair is c x c scores, so no step holds more than one such block.
_DIAGONAL, _EARLIER, _LATER = ((0, 0), (1, 0), (1, 1)), ((0, 0), (1, 0)), ((1, 0), (1, 1))


def _forward(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, C: int, window: int):
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxTxGxK.shape[2]
    c = T // 2
    me = jax.lax.axis_index(AXIS)
    q = _halves(q_BxTxHxK.reshape(B, T, G, H // G, K))
    q_idx, q_seg = _halves(_held(me, c, C), axis=0), _halves(seg_BxT)
    empty = (
        jnp.full((B, G, H // G, c), _NEG, F32),
        jnp.zeros((B, G, H // G, c), F32),
        jnp.zeros((B, G, H // G, c, K), F32),
    )

    def step(pairs, block, k_idx, carry):
        k, v, seg = (_halves(x) for x in block)
        k_idx = _halves(k_idx, axis=0)
        carry = list(carry)
        for a, b in pairs:
            vis = _visible(q_idx[a], k_idx[b], q_seg[a], seg[b], window)
            carry[a] = _fold(carry[a], q[a], k[b], v[b], vis)
        return tuple(carry)

    block = (k_BxTxGxK, v_BxTxGxK, seg_BxT)
    carry = step(_DIAGONAL, block, _held(me, c, C), (empty, empty))
    # A Python loop, unrolled: XLA:CPU aborts on collective-permutes inside a scan's while loop
    # (more participants than devices at one rendezvous), and C is a handful of steps.
    for hop in range(1, C):
        block = _hop(block, C)  # the next hop needs only this block: XLA may overlap it with the step
        src = (me - hop) % C
        earlier, later = (
            functools.partial(step, pairs, block, _held(src, c, C)) for pairs in (_EARLIER, _LATER)
        )
        carry = jax.lax.cond(src < me, earlier, later, carry)
    (m0, l0, acc0), (m1, l1, acc1) = carry
    m_BxGxRxT, sum_BxGxRxT = jnp.concatenate([m0, m1], 3), jnp.concatenate([l0, l1], 3)
    acc_BxGxRxTxK = jnp.concatenate([acc0, acc1], 3)
    o_BxTxHxK = (acc_BxGxRxTxK / sum_BxGxRxT[..., None]).transpose(0, 3, 1, 2, 4).reshape(B, T, H, K)
    return o_BxTxHxK.astype(q_BxTxHxK.dtype), m_BxGxRxT + jnp.log(sum_BxGxRxT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, C: int, window: int):
    return _forward(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, C, window)[0]


def _ring_fwd(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, C, window):
    o, lse = _forward(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, C, window)
    return o, (q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, o, lse)


def _ring_bwd(C, window, res, do_BxTxHxK):
    q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, o_BxTxHxK, lse_BxGxRxT = res
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxTxGxK.shape[2]
    c = T // 2
    grouped = lambda x: x.reshape(B, T, G, H // G, K)
    q, do, o = grouped(q_BxTxHxK), grouped(do_BxTxHxK.astype(q_BxTxHxK.dtype)), grouped(o_BxTxHxK)
    delta_BxGxRxT = jnp.einsum("btgrk,btgrk->bgrt", do.astype(F32), o.astype(F32))
    q, do = _halves(q), _halves(do)
    lse, delta = _halves(lse_BxGxRxT, axis=3), _halves(delta_BxGxRxT, axis=3)
    me = jax.lax.axis_index(AXIS)
    q_idx, q_seg = _halves(_held(me, c, C), axis=0), _halves(seg_BxT)

    def step(pairs, block, k_idx, dq, dkv):
        k, v, seg = (_halves(x) for x in block)
        k_idx = _halves(k_idx, axis=0)
        dq, (dk, dv) = list(dq), (list(dkv[0]), list(dkv[1]))
        for a, b in pairs:
            vis = _visible(q_idx[a], k_idx[b], q_seg[a], seg[b], window)
            gq, gk, gv = _grads(q[a], do[a], lse[a], delta[a], k[b], v[b], vis)
            dq[a], dk[b], dv[b] = dq[a] + gq, dk[b] + gk, dv[b] + gv
        return tuple(dq), (tuple(dk), tuple(dv))

    zeros = lambda x: tuple(jnp.zeros(h.shape, F32) for h in _halves(x))
    block = (k_BxTxGxK, v_BxTxGxK, seg_BxT)
    dq, dkv = step(_DIAGONAL, block, _held(me, c, C), zeros(grouped(q_BxTxHxK)), (zeros(k_BxTxGxK),) * 2)
    for hop in range(1, C):
        block, dkv = _hop((block, dkv), C)  # each block travels with its gradient so far
        src = (me - hop) % C
        earlier, later = (
            functools.partial(step, pairs, block, _held(src, c, C)) for pairs in (_EARLIER, _LATER)
        )
        dq, dkv = jax.lax.cond(src < me, earlier, later, dq, dkv)
    (dk, dv) = _hop(dkv, C)  # the C-th hop brings each block's gradient back to its shard
    return (
        jnp.concatenate(dq, 1).reshape(B, T, H, K).astype(q_BxTxHxK.dtype),
        jnp.concatenate(dk, 1).astype(k_BxTxGxK.dtype),
        jnp.concatenate(dv, 1).astype(v_BxTxGxK.dtype),
        None,
    )


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q_BxTxHxK: jax.Array,
    k_BxTxGxK: jax.Array,
    v_BxTxGxK: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    window: int = 0,
) -> jax.Array:
    """Causal self-attention of a batch whose sequence axis is in zig-zag order (``to_zigzag``) and
    split over the current mesh's context axis; ``segment_ids``/``window`` as in ``attention.attend``."""
    from jaxlm.sharding import logical_to_spec

    mesh = jax.sharding.get_abstract_mesh()
    C = context_size()
    B, T = q_BxTxHxK.shape[:2]
    zigzag_order(T, C)  # refuses a length the layout cannot cut
    if segment_ids_BxT is None:  # one document per row: the segment test passes everywhere
        segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    heads = logical_to_spec(("batch", "seq", "act_heads", None), mesh=mesh)
    kv_heads = logical_to_spec(("batch", "seq", "act_kv_heads", None), mesh=mesh)
    ids = logical_to_spec(("batch", "seq"), mesh=mesh)
    local = jax.shard_map(
        lambda q, k, v, seg: _ring(q, k, v, seg, C, window),
        in_specs=(heads, kv_heads, kv_heads, ids),
        out_specs=heads,
        check_vma=False,
    )
    return local(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT.astype(jnp.int32))
