"""Mixture of experts: top-k routing, its auxiliary losses, and the two ways tokens reach experts.

- ``dense_dispatch``: every token through every expert, combined with its routing weights (zero
  for an expert not chosen, or chosen but over capacity). E times the FLOPs of the active experts:
  the reference the tests hold ``dispatch`` to.
- ``dispatch``: each token's copies bucketed by expert into fixed [E, C, D] buffers (static
  shapes). Under a mesh it runs inside ``jax.shard_map``: one ``all_to_all`` over the ``expert``
  axis sends each bucket to the device that holds that expert, the device runs its E / X local
  experts, a second ``all_to_all`` brings the results home, where they are combined. Without a mesh
  the same buckets run without the collectives.

A routing group is the set of tokens whose copies compete for an expert's C slots: one device's
tokens under a mesh (GShard's groups), the whole batch without one. Dropless (capacity factor 0)
makes C the group's token count, so no copy is ever dropped and the groups do not matter.

Legend: N tokens, D model, F ffn hidden, E experts, K experts per token, A = K * N token copies
(assignments), C slots per expert in a group, X devices on the expert axis, El = E / X.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxlm.sharding import logical_to_spec

Act = Callable[[jax.Array, jax.Array | None], jax.Array]
"""(up, gate or None) -> the hidden activation of an MLP (``model.ffn_activation``)."""


class MoeStats(NamedTuple):
    """One sparse layer's routing statistics (zeros for a dense layer of an MoE model), summed
    over the layers of a forward pass."""

    aux: jax.Array
    """The load-balancing loss E * sum_e f_e * P_e (``load_balance_loss``)."""
    router_z: jax.Array
    """The router z-loss, mean over tokens of log²(sum_e exp(logit_e)) (``router_z_loss``)."""
    load_E: jax.Array
    """f_e: the fraction of token copies routed to each expert (before any drop)."""
    dropped: jax.Array
    """Token copies dropped for capacity."""
    assigned: jax.Array
    """Token copies routed (N * K)."""


def route(x_NxD: jax.Array, router_DxE: jax.Array, top_k: int):
    """(float32 router logits [N, E], probabilities [N, E], chosen experts [N, K] int32, their
    weights [N, K] float32). The weights are the probabilities renormalised over the K chosen
    (Mixtral's softmax-then-top-k-then-normalise); with K=1 the probability itself (Switch), so the
    main loss still trains the router."""
    logits_NxE = jnp.einsum("nd,de->ne", x_NxD, router_DxE, preferred_element_type=jnp.float32)
    probs_NxE = jax.nn.softmax(logits_NxE, axis=-1)
    top_NxK, expert_NxK = jax.lax.top_k(probs_NxE, top_k)
    weight_NxK = top_NxK / top_NxK.sum(-1, keepdims=True) if top_k > 1 else top_NxK
    return logits_NxE, probs_NxE, expert_NxK.astype(jnp.int32), weight_NxK


def load_balance_loss(probs_NxE: jax.Array, expert_NxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(E * sum_e f_e * P_e, f_E): f_e the fraction of the N * K choices naming expert e (a count,
    no gradient), P_e the mean router probability of e. 1 when both are uniform; only P carries
    gradient: d/dlogit_ne = (E / N) p_ne (f_e - sum_j f_j p_nj)."""
    N, E = probs_NxE.shape
    f_E = jax.nn.one_hot(expert_NxK, E, dtype=jnp.float32).sum((0, 1)) / (N * expert_NxK.shape[1])
    return E * jnp.sum(f_E * probs_NxE.mean(0)), f_E


def router_z_loss(logits_NxE: jax.Array) -> jax.Array:
    """ST-MoE's z-loss: mean over tokens of log²(sum_e exp(logit_e)); keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NxE, axis=-1)))


def capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Slots per expert for a group of ``n_tokens``: all of them when dropless (factor 0; a token
    names an expert at most once), else ceil(factor * N * K / E), at least 1, at most N."""
    if not factor:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * top_k / n_experts)))


def slots(expert_NxK: jax.Array, n_experts: int, cap: int):
    """(expert [A], slot [A], kept [A]) of every token copy, copies ordered choice-major (all first
    choices, then all second ones, ...), so a token's first choice is dropped only when N earlier
    first choices filled the expert. Copy a = k * N + n is token n's k-th choice."""
    e_A = expert_NxK.T.reshape(-1)
    onehot_AxE = jax.nn.one_hot(e_A, n_experts, dtype=jnp.int32)
    slot_A = (jnp.cumsum(onehot_AxE, axis=0) * onehot_AxE).sum(-1) - 1
    return e_A, slot_A, slot_A < cap


def experts_ffn(p: dict, x_SxExCxD: jax.Array, act: Act) -> jax.Array:
    """Each of E experts' MLP on its own C rows (S independent sets of them): [S, E, C, D]."""
    up = jnp.einsum("secd,edf->secf", x_SxExCxD, p["up"])
    gate = jnp.einsum("secd,edf->secf", x_SxExCxD, p["gate"]) if "gate" in p else None
    return jnp.einsum("secf,efd->secd", act(up, gate), p["down"])


def dense_dispatch(x_NxD, expert_NxK, weight_NxK, p: dict, act: Act, capacity_factor: float = 0.0):
    """(y [N, D], dropped copies): every token through every expert, masked. The reference."""
    N, K = expert_NxK.shape
    E = p["up"].shape[0]
    e_A, _, kept_A = slots(expert_NxK, E, capacity(N, K, E, capacity_factor))
    w_A = weight_NxK.T.reshape(-1) * kept_A
    combine_NxE = jnp.zeros((N, E), jnp.float32).at[jnp.tile(jnp.arange(N), K), e_A].add(w_A)
    out_ExNxD = experts_ffn(p, jnp.broadcast_to(x_NxD, (1, E, N, x_NxD.shape[-1])), act)[0]
    y_NxD = jnp.einsum("end,ne->nd", out_ExNxD, combine_NxE.astype(out_ExNxD.dtype))
    return y_NxD, jnp.sum(~kept_A)


def _bucketed(x_NxD, expert_NxK, weight_NxK, p, act, n_experts, cap, expert_axis, tensor_axes):
    """One group's tokens through their experts via [E, cap, D] buffers; inside shard_map the
    buffers cross ``expert_axis`` by all_to_all and ``p`` holds this device's El experts (its F
    split over ``tensor_axes``, summed after the down projection)."""
    N, K = expert_NxK.shape
    D = x_NxD.shape[-1]
    e_A, slot_A, kept_A = slots(expert_NxK, n_experts, cap)
    slot_A = jnp.where(kept_A, slot_A, cap)  # out of range: the scatter drops it
    tok_A = jnp.tile(jnp.arange(N), K)
    buf_ExCxD = jnp.zeros((n_experts, cap, D), x_NxD.dtype).at[e_A, slot_A].set(x_NxD[tok_A], mode="drop")
    if expert_axis:  # block j of E goes to device j; received: [sender, my El experts, C, D]
        buf_ExCxD = jax.lax.all_to_all(buf_ExCxD, expert_axis, 0, 0, tiled=True)
    El = p["up"].shape[0]
    out_SxElxCxD = experts_ffn(p, buf_ExCxD.reshape(-1, El, cap, D), act)
    if tensor_axes:
        out_SxElxCxD = jax.lax.psum(out_SxElxCxD, tensor_axes)
    out_ExCxD = out_SxElxCxD.reshape(n_experts, cap, D)
    if expert_axis:
        out_ExCxD = jax.lax.all_to_all(out_ExCxD, expert_axis, 0, 0, tiled=True)
    w_A = (weight_NxK.T.reshape(-1) * kept_A).astype(out_ExCxD.dtype)
    out_AxD = out_ExCxD[e_A, jnp.minimum(slot_A, cap - 1)] * w_A[:, None]
    return out_AxD.reshape(K, N, D).sum(0), jnp.sum(~kept_A)


def _mesh_axes(spec_entry) -> tuple[str, ...]:
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry or ())


def dispatch(x_BxTxD, expert_BxTxK, weight_BxTxK, p: dict, act: Act, capacity_factor: float):
    """(y [B, T, D], dropped copies): the bucketed dispatch, expert parallel under a mesh whose
    batch and positions split evenly into the tokens' shards (training, evaluation); otherwise (no
    mesh, or a decode batch of a row or two) one group of all the tokens, partitioned by XLA."""
    B, T, D = x_BxTxD.shape
    K = expert_BxTxK.shape[-1]
    E = p["up"].shape[0]

    def group(x_bxtxD, e_bxtxK, w_bxtxK, p_group, expert_axis, tensor_axes):
        b, t = x_bxtxD.shape[:2]
        args = (x_bxtxD.reshape(b * t, D), e_bxtxK.reshape(b * t, K), w_bxtxK.reshape(b * t, K), p_group)
        cap = capacity(b * t, K, E, capacity_factor)
        y_NxD, dropped = _bucketed(*args, act, E, cap, expert_axis, tensor_axes)
        return y_NxD.reshape(b, t, D), dropped

    mesh = jax.sharding.get_abstract_mesh()
    tok = None if mesh.empty else logical_to_spec(("batch", "seq", None), mesh=mesh)
    ways = lambda entry: math.prod(mesh.shape[a] for a in _mesh_axes(entry))
    if tok is None or B % ways(tok[0]) or T % ways(tok[1]):
        return group(x_BxTxD, expert_BxTxK, weight_BxTxK, p, None, ())
    w_in = logical_to_spec(("experts", None, "mlp"), mesh=mesh)
    w_out = logical_to_spec(("experts", "mlp", None), mesh=mesh)
    p_specs = {k: w_out if k == "down" else w_in for k in p}
    expert_axis, tensor_axes = _mesh_axes(w_in[0]), _mesh_axes(w_in[2])

    def local(x, e, w, p_local):
        y, dropped = group(x, e, w, p_local, expert_axis or None, tensor_axes)
        return y, dropped.reshape(1, 1)

    y_BxTxD, dropped = jax.shard_map(
        local, in_specs=(tok, tok, tok, p_specs), out_specs=(tok, PartitionSpec(tok[0], tok[1]))
    )(x_BxTxD, expert_BxTxK, weight_BxTxK, p)
    return y_BxTxD, dropped.sum()
