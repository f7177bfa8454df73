"""Float tolerances from the arithmetic, written once for the whole suite.

Two computations of one quantity that sum their terms in different orders (sharded and on one
device, micro-batched and in one batch, blockwise and reference attention, cached decode and the
full forward) differ by rounding. Summing n terms in any order is off by at most (n - 1) * eps/2 *
sum|x| (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4), so two orders
differ by at most about n * eps * sum|x|; stages in sequence (a matmul, a softmax, another matmul)
add their lengths. We take sum|x| as the largest |value| of the reference, which holds while the
terms do not cancel much; using n, not the typical sqrt(n), leaves room for the cancelling they do.

Nothing here comes from one CPU's output: XLA's CPU kernels sum in another order per instruction
set (an AMD EPYC with AVX2 and an Intel Xeon with AVX-512 give different last digits), and both
sit far inside these bounds, while a real bug (a wrong count, a dropped micro-batch, a leaked
mask) moves values by percents, hundreds of times more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig

F32_EPS = float(jnp.finfo(jnp.float32).eps)  # 2**-23 = 1.19e-7
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2**-7 = 7.8e-3


def tol(magnitude, n_terms: float, eps: float = F32_EPS) -> float:
    """Largest rounding difference of two computations of a value of size ``magnitude`` from
    ``n_terms`` summed terms: magnitude x eps x n_terms."""
    return float(magnitude) * eps * n_terms


def assert_close(actual, reference, n_terms: float, eps: float = F32_EPS, err_msg: str = "") -> None:
    """``actual`` equals ``reference`` to ``tol(max|reference|, n_terms, eps)``, element by element."""
    reference = np.asarray(reference, np.float64)
    bound = tol(np.abs(reference).max(initial=0.0), n_terms, eps)
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        reference,
        rtol=0,
        atol=bound,
        err_msg=f"{err_msg} (bound: max|reference| x eps {eps:.3g} x {n_terms:.4g} terms = {bound:.3g})",
    )


def assert_trees_close(actual, reference, n_terms: float, eps: float = F32_EPS) -> None:
    """``assert_close`` leaf by leaf, each scaled by its own largest |value|."""
    assert jax.tree.structure(actual) == jax.tree.structure(reference)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(reference), strict=True
    ):
        assert_close(a, b, n_terms, eps, err_msg=jax.tree_util.keystr(path))


def attention_terms(head_dim: int, n_keys: int) -> int:
    """Behind one attention output: the scores over head_dim, then the softmax's denominator and
    its weighted sum of values over the keys (a blockwise kernel's rescaling adds one rounding per
    block, at most one per key)."""
    return head_dim + 2 * n_keys


def forward_terms(cfg: ModelConfig) -> int:
    """Summed terms behind one logit of ``model.forward``: per layer the attention norm, the q/k/v
    projections, the scores over head_dim, the softmax's denominator and its weighted sum over up
    to seq_len keys, the output projection, the MLP norm, its up/gate projections and the down
    projection over d_ff; then the final norm and the unembedding."""
    d, k = cfg.d_model, cfg.dim_per_head
    per_layer = d + d + attention_terms(k, cfg.seq_len) + cfg.n_heads * k + d + d + cfg.d_ff
    return cfg.n_layers * per_layer + 2 * d


def loss_terms(cfg: ModelConfig, n_tokens: int) -> int:
    """Behind a mean token loss: the forward, the log-sum-exp over the vocabulary, the mean."""
    return forward_terms(cfg) + cfg.padded_vocab + n_tokens


def grad_terms(cfg: ModelConfig, n_tokens: int) -> int:
    """Behind a gradient of the mean token loss: the backward pass retraces every stage of the
    forward (and the log-sum-exp), then each weight's gradient sums over all ``n_tokens``."""
    return 2 * forward_terms(cfg) + cfg.padded_vocab + n_tokens
