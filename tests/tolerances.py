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

import math

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


def newton_schulz_terms(
    m: int, n: int, input_terms: int = 0, steps: int = 5, coeffs=(3.4445, -4.7750, 2.0315)
) -> float:
    """Behind one entry of Muon's orthogonalisation of an m x n matrix (m <= n), ``steps`` quintic
    Newton-Schulz iterations X <- aX + (bA + cA²)X, A = XXᵀ, on X0 = G / ||G||_F; returned as a
    count of terms of size 1, so ``tol(1, newton_schulz_terms(m, n))`` bounds an entry.

    X0's singular values lie in [0, 1] and p(s) = as + bs³ + cs⁵ keeps them in [0, 1.21]. An
    iteration rounds sums over n (A), m (A²) and m ((bA + cA²)X) terms of size up to
    (|a| + |b| r² + |c| r⁴) r, r = 1.21; a perturbation of iterate k reaches the output through
    steps - k more iterations, amplified by at most the Lipschitz constant of p composed that many
    times on [-r, r] (the iteration is p on the singular values: for an odd p the matrix map is as
    Lipschitz as p itself). The norm's rounding (a sum of mn squares, then a square root) rescales X0,
    and the whole iteration maps a rescaling s -> s(1 + e) to at most max s |(p^steps)'(s)| e.
    ``input_terms`` roundings of each entry of G before (Muon's momentum) move X0 by at most
    input_terms x eps x ||X0||_F <= input_terms x eps x sqrt(m) in norm, amplified by the gain of
    all the iterations. The gains are computed here from p on a fine grid."""
    a, b, c = coeffs
    r = 1.21
    p = lambda s: a * s + b * s**3 + c * s**5
    dp = lambda s: a + 3 * b * s**2 + 5 * c * s**4
    s = np.linspace(0.0, r, 100_001)
    gains, dx = [], np.ones_like(s)
    for _ in range(steps + 1):
        gains.append(float(np.abs(dx).max()))  # gains[j]: Lipschitz constant of p^j on [0, r]
        dx, s = dx * dp(s), p(s)
    s0 = np.linspace(0.0, 1.0, 100_001)
    dx, s = np.ones_like(s0), s0.copy()
    for _ in range(steps):
        dx, s = dx * dp(s), p(s)
    scale_gain = float(np.abs(dx * s0).max())
    per_step = (n + 2 * m) * (abs(a) + abs(b) * r**2 + abs(c) * r**4) * r
    return (
        scale_gain * m * n / 2
        + gains[steps] * input_terms * math.sqrt(m)
        + sum(gains[steps - k] * per_step for k in range(1, steps + 1))
    )
