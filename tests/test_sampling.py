import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close, forward_terms, tol

from jaxlm import model, sampling
from jaxlm.cli import main as cli
from jaxlm.config import ConfigError, apply_overrides, preset

# A vocabulary that is padded (100 -> 128 rows) so padding columns are exercised too.
BASE = preset("tiny", vocab_size=100, vocab_multiple=64, compute_dtype="float32")
VARIANTS = {
    "learned-layernorm-gelu-bias-untied": dict(
        positions="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=False
    ),
    "rope-rmsnorm-swiglu-gqa": dict(positions="rope", n_kv_heads=2),
    "sinusoidal-mqa-untied": dict(positions="sinusoidal", n_kv_heads=1, tie_embeddings=False),
    "rope-qk_norm-gqa": dict(positions="rope", n_kv_heads=2, qk_norm=True),
    "learned-relu2": dict(positions="learned", mlp="relu2"),
    # windows of 3 and 4 tokens, far fewer than the up to 15 each row decodes over
    "learned-window": dict(positions="learned", norm="layernorm", use_bias=True, attention_window=3),
    "rope-window-global_every-gqa": dict(positions="rope", n_kv_heads=2, attention_window=4, global_every=2),
    # µP: the 1/head_dim attention scale and the logit multiplier on both paths (width 32, base 8)
    "rope-mup": dict(positions="rope", parametrization="mup", mup_base_width=8),
    # mixture of experts: layer 0 dense, layer 1 sparse (4 experts, top-2, dropless, shared expert)
    "rope-moe-every2-shared": dict(
        positions="rope", moe_experts=4, moe_top_k=2, moe_every=2, moe_shared_expert=True
    ),
}


def _model(name="rope-rmsnorm-swiglu-gqa", seed=0):
    cfg = dataclasses.replace(BASE, **VARIANTS[name])
    return cfg, model.init_params(cfg, jax.random.key(seed))


_forward = jax.jit(model.forward, static_argnums=4)


def _right_padded_forward(params, cfg, rows: list[list[int]]) -> np.ndarray:
    """model.forward on each row (right-padded: causal, so the padding changes no earlier logit)."""
    T = cfg.seq_len
    tokens = np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    return np.asarray(_forward(params, tokens, jnp.broadcast_to(jnp.arange(T), tokens.shape), None, cfg))


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decode_gives_full_forward_logits_at_every_step(name):
    """Prefill of a left-padded batch of different prompt lengths, then one token per step:
    every logit equals the full forward pass over that row alone."""
    cfg, params = _model(name)
    rng = np.random.default_rng(0)
    lens, steps = [3, 9, 5], 6
    rows = [rng.integers(0, cfg.vocab_size, n + steps).tolist() for n in lens]
    ref_BxTxV = _right_padded_forward(params, cfg, rows)
    tokens_BxP, pad_B = sampling.left_pad([r[:n] for r, n in zip(rows, lens, strict=True)])
    P = tokens_BxP.shape[1]
    cache = sampling.init_cache(cfg, len(rows), P + steps, jnp.float32)
    logits_BxPxV, cache = sampling.forward_cached(params, tokens_BxP, cache, jnp.int32(0), pad_B, cfg)
    # the cache attends over P + steps slots under a mask: other shapes, other summation orders
    n_terms = forward_terms(cfg)
    for b, n in enumerate(lens):
        assert_close(logits_BxPxV[b, pad_B[b] :], ref_BxTxV[b, :n], n_terms, err_msg=f"prefill row {b}")
    for i in range(steps):
        tok_Bx1 = np.array([[r[n + i]] for r, n in zip(rows, lens, strict=True)], np.int32)
        logits_Bx1xV, cache = sampling.forward_cached(params, tok_Bx1, cache, jnp.int32(P + i), pad_B, cfg)
        for b, n in enumerate(lens):
            assert_close(logits_Bx1xV[b, 0], ref_BxTxV[b, n + i], n_terms, err_msg=f"step {i} row {b}")


PROMPTS = [[5, 17, 3], [9, 1, 2, 40, 41, 42, 7, 8]]  # of different lengths: the first is left-padded


def test_greedy_is_deterministic_and_is_the_argmax_of_the_full_forward():
    cfg, params = _model("learned-layernorm-gelu-bias-untied")
    out = sampling.generate(params, cfg, PROMPTS, 10, temperature=0)
    assert out == sampling.generate(params, cfg, PROMPTS, 10, temperature=0)
    assert [len(r) for r in out] == [10, 10]
    # the reference: recompute the whole sequence; each token taken is its argmax, or ties with it
    # to the rounding by which cached decoding and the full forward may differ
    for prompt, new in zip(PROMPTS, out, strict=True):
        rows = [prompt + new[:i] for i in range(len(new))]
        for row, token in zip(rows, new, strict=True):
            logits_V = _right_padded_forward(params, cfg, [row])[0, len(row) - 1]
            assert logits_V[token] >= logits_V.max() - 2 * tol(np.abs(logits_V).max(), forward_terms(cfg))
    # a model trained with a fused kernel that takes no mask decodes with the masked xla attention
    fused = dataclasses.replace(cfg, attention="splash")
    assert sampling.generate(params, fused, PROMPTS, 10, temperature=0) == out


def test_generation_stops_at_the_end_of_document_token():
    cfg, params = _model("learned-layernorm-gelu-bias-untied")
    full = sampling.generate(params, cfg, PROMPTS, 10, temperature=0)
    # make row 0's first new token not seen before it the end-of-document token
    k = next(i for i, t in enumerate(full[0]) if i > 0 and t not in full[0][:i])
    eot = full[0][k]
    out = sampling.generate(params, cfg, PROMPTS, 10, temperature=0, eot_id=eot)
    assert out[0] == full[0][:k]
    assert out[1] == (full[1][: full[1].index(eot)] if eot in full[1] else full[1])


def test_sampling_is_reproducible_from_the_seed_and_rope_runs_past_the_window():
    cfg, params = _model("rope-rmsnorm-swiglu-gqa")
    # only learned positions stop at seq_len: 20 prompt + 14 new tokens need 33 positions of 32
    prompts = [list(range(1, 21)), [4, 5]]
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = sampling.generate(params, cfg, prompts, 14, seed=3, **kw)
    assert [len(r) for r in a] == [14, 14]
    assert a == sampling.generate(params, cfg, prompts, 14, seed=3, **kw)
    assert a != sampling.generate(params, cfg, prompts, 14, seed=4, **kw)


# --------------------------------------------------------------------------------------------
# The token choice, checked directly on constructed distributions over many seeds.
# --------------------------------------------------------------------------------------------

N_DRAWS = 4000
PROBS_V = np.array([0.30, 0.05, 0.25, 0.01, 0.15, 0.10, 0.02, 0.12])  # sorted: 0 2 4 7 5 1 6 3


@functools.cache
def _sampler(top_k: int):
    # temperature and top_p traced: one compilation per top_k for every test below
    return jax.jit(lambda keys, logits, t, p: sampling.sample_token(keys, logits, t, top_k, p))


def _draws(temperature, top_k, top_p) -> np.ndarray:
    keys_N = jax.random.split(jax.random.key(0), N_DRAWS)
    logits_NxV = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS_V, jnp.float32)), (N_DRAWS, len(PROBS_V)))
    return np.asarray(_sampler(top_k)(keys_N, logits_NxV, jnp.float32(temperature), jnp.float32(top_p)))


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_top_k_never_emits_a_token_outside_the_top_k(top_k):
    allowed = sorted(np.argsort(-PROBS_V)[:top_k].tolist())
    draws = _draws(1.0, top_k, 1.0)
    assert set(draws.tolist()) == set(allowed)  # never outside, and every one of them is drawn
    freq = np.bincount(draws, minlength=len(PROBS_V))[allowed] / N_DRAWS
    # atol 0.03: almost 4 binomial standard deviations, which are at most 0.5 / sqrt(N_DRAWS) = 0.008
    np.testing.assert_allclose(freq, PROBS_V[allowed] / PROBS_V[allowed].sum(), atol=0.03)


@pytest.mark.parametrize(
    "top_p, nucleus",
    [(0.25, {0}), (0.29, {0}), (0.31, {0, 2}), (0.69, {0, 2, 4}), (0.8, {0, 2, 4, 7}), (1.0, set(range(8)))],
)
def test_top_p_never_emits_a_token_outside_the_nucleus(top_p, nucleus):
    # The nucleus is the shortest run of most likely tokens whose mass reaches top_p.
    assert set(_draws(1.0, 0, top_p).tolist()) == nucleus


def test_nucleus_is_the_shortest_sorted_prefix_reaching_top_p():
    """The sort-free bisection against the definition, on random distributions of varied shape."""
    rng = np.random.default_rng(0)
    logits_NxV = rng.normal(size=(300, 50)) * rng.uniform(0.1, 5.0, size=(300, 1))
    top_p_N = rng.uniform(0.01, 1.0, size=300)
    kept_NxV = np.isfinite(jax.jit(jax.vmap(sampling.nucleus))(logits_NxV.astype(np.float32), top_p_N))
    for logits_V, top_p, kept_V in zip(logits_NxV, top_p_N, kept_NxV, strict=True):
        p_V = np.exp(logits_V - logits_V.max())
        p_V /= p_V.sum()
        order = np.argsort(-p_V)
        mass = np.cumsum(p_V[order])
        # float32 kernel, float64 reference: they agree while no prefix mass lies within the
        # kernel's rounding (softmax and mass sums, 2 x V terms of at most 1) of top_p
        assert np.abs(mass - top_p).min() > tol(1.0, 2 * len(p_V))
        n = int(np.searchsorted(mass, top_p)) + 1  # shortest prefix with mass >= top_p
        assert set(np.flatnonzero(kept_V)) == set(order[:n].tolist())


def test_top_k_then_top_p_and_temperature():
    # top-k 4 renormalises (0.30, 0.25, 0.15, 0.12) / 0.82; the nucleus of 0.6 is then {0, 2}
    assert set(_draws(1.0, 4, 0.6).tolist()) == {0, 2}
    # temperature 0.5 squares the probabilities: the draw frequencies follow p^2 / sum p^2
    freq = np.bincount(_draws(0.5, 0, 1.0), minlength=len(PROBS_V)) / N_DRAWS
    np.testing.assert_allclose(freq, PROBS_V**2 / (PROBS_V**2).sum(), atol=0.03)  # 4 sigma, as above
    # temperature 0 is the argmax, whatever the key
    logits_NxV = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS_V, jnp.float32)), (N_DRAWS, len(PROBS_V)))
    assert set(np.asarray(sampling.sample_token(None, logits_NxV, 0.0)).tolist()) == {0}


# --------------------------------------------------------------------------------------------
# Errors name the value and the fix.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
        (dict(top_k=-1), r"top_k=-1 must be in \[0, vocab size 100\]"),
        (dict(top_k=101), r"top_k=101 must be in \[0, vocab size 100\]"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be at least 1"),
        (dict(prompt_tokens=[[1, 2], []]), "prompt 1 is empty"),
        (
            dict(prompt_tokens=[[1] * 33]),
            "prompt 0 has 33 tokens, longer than the context window model.seq_len=32",
        ),
        (dict(prompt_tokens=[[1, 200]]), r"token ids \[200\] outside \[0, 100\)"),
        (dict(prompt_tokens=[[1] * 20], max_new_tokens=14), "lower max_new_tokens to at most 13"),
        (dict(eot_id=100), "eot_id=100 is outside the vocabulary"),
    ],
)
def test_invalid_arguments_are_refused_with_the_fix(kwargs, match):
    cfg, params = _model("learned-layernorm-gelu-bias-untied")
    args = dict(prompt_tokens=[[1, 2, 3]], max_new_tokens=4) | kwargs
    with pytest.raises(ConfigError, match=match):
        sampling.generate(params, cfg, **args)


# --------------------------------------------------------------------------------------------
# The CLI on a real (tiny) checkpoint.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data):
    from pathlib import Path

    from jaxlm import train
    from jaxlm.config import load_config

    run_dir = tmp_path_factory.mktemp("runs")
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "tiny.py")
    cfg = apply_overrides(
        cfg,
        {
            "train.run_dir": str(run_dir),
            "data.dir": tiny_data,
            "train.steps": "2",
            "train.eval_every": "0",
            "train.eval_batches": "2",
            "checkpoint.every": "0",
        },
    )
    summary = train.run(cfg)
    return cfg.run_path, summary


def test_cli_samples_from_a_checkpoint_reproducibly(tiny_run, capsys):
    run_path, _ = tiny_run
    args = ["sample", "--checkpoint", str(run_path), "--prompt", "ROMEO:", "--prompt", "To be"]
    args += ["--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "50", "--num-samples", "2"]
    assert cli(args + ["--seed", "1"]) == 0
    first = capsys.readouterr()
    samples = first.out.split("\n---------------\n")[:-1]
    assert len(samples) == 4
    assert all(s.startswith(p) for s, p in zip(samples, ["ROMEO:"] * 2 + ["To be"] * 2, strict=True))
    assert all(len(s) <= len("ROMEO:") + 12 for s in samples[:2])  # bytes: one char at most per token
    assert "step 2:" in first.err
    # the same seed, via a step directory this time, gives the same text
    step_dir = run_path / "checkpoints" / "2"
    assert cli(args[:2] + [str(step_dir)] + args[3:] + ["--seed", "1"]) == 0
    assert capsys.readouterr().out == first.out


def test_cli_sample_errors(tiny_run, tmp_path, capsys):
    run_path, _ = tiny_run
    assert cli(["sample", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    ok = ["sample", "--checkpoint", str(run_path)]
    assert cli(ok + ["--prompt", ""]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert cli(ok) == 2
    assert "pass --prompt TEXT or --prompts-file FILE" in capsys.readouterr().err
    assert cli(ok + ["--prompt", "x", "--num-samples", "0"]) == 2
    assert "num_samples=0 must be at least 1" in capsys.readouterr().err
    assert cli(ok + ["--prompt", "x" * 40]) == 2  # the tiny model's window is 32 bytes
    assert "longer than the context window" in capsys.readouterr().err
    assert cli(ok + ["--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p=0.0 must be in (0, 1]" in capsys.readouterr().err
    assert cli(ok + ["--prompts-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt' does not exist" in capsys.readouterr().err


def test_cli_eval_reproduces_the_logged_val_loss(tiny_run, capsys, tmp_path):
    run_path, summary = tiny_run
    assert cli(["eval", "--checkpoint", str(run_path)]) == 0
    out = capsys.readouterr().out
    # the trainer's eval program on the same mesh, batches and restored weights: the same bits
    assert f"| loss {summary['val_loss']:.4f} |" in out
    assert "val split" in out and "2 batches of 8" in out
    assert cli(["eval", "--checkpoint", str(run_path), "--split", "train", "--batches", "1"]) == 0
    assert "train split" in capsys.readouterr().out
    assert cli(["eval", "--checkpoint", str(run_path), "--data", str(tmp_path)]) == 2
    assert "holds no prepared data" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(run_path), "--batch-size", "3"]) == 2
    assert "--batch-size=3 must be a positive multiple of the 8 devices" in capsys.readouterr().err


def test_a_model_without_a_cache_decodes_by_full_forward_to_the_same_tokens(monkeypatch):
    """The path for models without a key/value cache (Flax NNX modules): the whole window runs
    forward per token, left padding as segment 0. On the built-in model with its cache switched
    off it must pick the same greedy tokens as the cached decode, for prompts of different lengths."""
    from jaxlm import lm

    # A config of its own: decode is jitted on cfg, and the patched interface must be traced afresh.
    cfg = dataclasses.replace(BASE, **VARIANTS["rope-rmsnorm-swiglu-gqa"], init_std=0.5)
    params = model.init_params(cfg, jax.random.key(7))
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [42]]
    cached = sampling.generate(params, cfg, prompts, 12, temperature=0.0)
    uncached = dataclasses.replace(lm.get(cfg), kv_cache=False)
    monkeypatch.setattr(lm, "get", lambda c: uncached if c == cfg else lm.get.__wrapped__(c))
    full = sampling.generate(params, cfg, prompts, 12, temperature=0.0)
    assert full == cached and len({tuple(r) for r in full}) > 1
    with pytest.raises(ConfigError, match="window is model.seq_len=32"):
        sampling.generate(params, cfg, prompts, 30, temperature=0.0)  # 7 + 30 - 1 > 32
