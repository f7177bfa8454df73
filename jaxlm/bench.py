"""Benchmark the real train step on synthetic tokens: step time, tokens/s, TFLOP/s, MFU, memory.

    jaxlm bench experiments/gpt2_124m.py --steps 10 --warmup 2

The step is ``train.make_train_step`` on state from ``state.create_state``, sharded on the
configured mesh, fed random tokens (no data preparation). Warm-up steps are excluded from the
statistics and compilation is timed on its own.

Model FLOPs per token (fwd + bwd, the convention of Kaplan et al. and PaLM, no causal halving):

    6 * N  +  12 * L * H * Q * T

N counts every parameter a token's forward pass multiplies by: ``model.count_params(cfg,
embedding=False)`` (all blocks, norms and biases included, the untied output projection included)
plus ``vocab_size * d_model`` for a tied output projection, which the embedding count left out.
With experts (``model.moe_experts``) N is the active parameters: a token multiplies by its top-k
experts of a sparse layer, not by all of them (``model.inactive_expert_params``); the report says so.
Vocabulary padding is not counted (it is wasted work, not model work). The second term is the
attention scores and weighted sum (2 * 2 * T * Q per head and layer forward, x3 with backward),
counted over the full T x T square as PaLM does, though a causal mask makes half of it moot.

A Flax NNX module (``model.module``) counts N from its own declared parameters (lm.LM.flop_params:
all but its lookup tables, see jaxlm/nnx_model.py); its attention term is taken from the config's
n_layers, n_heads, head_dim and seq_len, which the module is built from, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import lm, model, profile, sharding, train
from jaxlm.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from jaxlm.state import create_state, state_shardings

# Dense bf16 peak TFLOP/s per device (no sparsity), matched as substrings of device_kind, first
# match wins (so "H100 PCIe" is tried before "H100", "v5 lite" before "v5").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of one device from the table, or None for unknown kinds (e.g. CPUs)."""
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def active_note(cfg: ModelConfig) -> str:
    """What N counts for a mixture of experts: the active parameters, of how many."""
    if not cfg.moe_experts:
        return ""
    return (
        f" active parameters (top-{cfg.moe_top_k} of {cfg.moe_experts} experts in {cfg.moe_layers} "
        f"sparse layers; {lm.get(cfg).count:,} in all)"
    )


def flops_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Model FLOPs of forward + backward per token: {"dense": 6N, "attention": 12LHQT, "total"}.

    T is the keys a query's layer may attend to, counted in full as PaLM's MFU does (not halved for
    the causal mask): seq_len in a global layer, ``attention_window`` in a windowed one."""
    dense = 6 * lm.get(cfg).flop_params
    windowed = int(model.windowed_layers(cfg).sum())
    keys = (cfg.n_layers - windowed) * cfg.seq_len + windowed * min(cfg.attention_window, cfg.seq_len)
    attention = 12 * cfg.n_heads * cfg.dim_per_head * keys
    return {"dense": dense, "attention": attention, "total": dense + attention}


def _best_seconds(f, *args, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one untimed call (the peak, not a typical run)."""
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _timed_matmul(b: int, m: int, k: int, n: int, dtype, repeats: int) -> float:
    """Seconds of one jitted [b, m, k] @ [b, k, n] matmul (b = 1 is a plain matmul)."""
    x = jax.random.normal(jax.random.key(0), (b, m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(jax.random.key(1), (b, k, n), jnp.float32).astype(dtype)
    return _best_seconds(jax.jit(jnp.matmul), x, w, repeats=repeats)


def matmul_tflops(n: int, dtype, repeats: int = 10) -> float:
    """Measured peak: TFLOP/s of the fastest of ``repeats`` jitted n x n x n matmuls."""
    return 2 * n**3 / _timed_matmul(1, n, n, n, dtype, repeats) / 1e12


def model_matmuls(cfg: ModelConfig, rows: int, tensor: int = 1) -> list[tuple[str, int, int, int, int, int]]:
    """The matmuls of one forward pass on one device: (name, batch, m, k, n, count), each computing
    out[batch, m, n] = x[batch, m, k] @ w[batch, k, n], ``count`` times a step. ``rows`` sequences
    per device; heads, ffn and vocabulary split ``tensor`` ways. The backward pass repeats each
    with the same FLOPs twice: the input gradient and the weight gradient."""
    L, D, T, K = cfg.n_layers, cfg.d_model, cfg.seq_len, cfg.dim_per_head
    H, G = cfg.n_heads // tensor, max(1, cfg.kv_heads // tensor)
    F, V = cfg.d_ff // tensor, -(-cfg.padded_vocab // tensor)
    M = rows * T
    chunk = cfg.logits_chunk if 0 < cfg.logits_chunk < M else M
    # A sparse layer's tokens each pass through top-k experts (and the shared one): as many MLPs.
    Lm = cfg.moe_layers
    mlps = L - Lm + Lm * (cfg.moe_top_k + cfg.moe_shared_expert)
    router = [("router", 1, M, D, cfg.moe_experts, Lm)] if Lm else []
    return router + [
        ("q", 1, M, D, H * K, L),
        ("k, v", 1, M, D, G * K, 2 * L),
        ("attention scores", rows * H, T, K, T, L),
        ("attention sum", rows * H, T, T, K, L),
        ("o", 1, M, H * K, D, L),
        ("mlp in", 1, M, D, F, (2 if cfg.mlp == "swiglu" else 1) * mlps),
        ("mlp out", 1, M, F, D, mlps),
        ("logits", 1, chunk, D, V, -(-M // chunk)),
    ]


def matmul_ceiling(
    cfg: ModelConfig, rows: int, tensor: int, dtype, peak_tflops: float, repeats: int = 3
) -> dict[str, float]:
    """The step's own matmul shapes, each timed alone (forward, input- and weight-gradient forms):
    the rate the step would reach if it did nothing but its matmuls. Small models are bound by
    this, not by the 2048^3 peak (their d_model-wide matmuls run far below it).

    A shape too small to time is batched (``reps`` copies in one call, up to ~2 ms of work at
    ``peak_tflops`` and 256 MB of operands), so the launch overhead of a lone call does not count
    against the kernel.
    """
    flops = seconds = 0.0
    itemsize = jnp.dtype(dtype).itemsize
    for _, b, m, k, n, count in model_matmuls(cfg, rows, tensor):
        for mm, kk, nn in ((m, k, n), (m, n, k), (k, m, n)):  # out = x @ w, dx = dy @ w^T, dw = x^T @ dy
            one = 2 * b * mm * kk * nn
            operand_bytes = b * (mm * kk + kk * nn + mm * nn) * itemsize
            reps = max(1, min(int(peak_tflops * 1e12 * 2e-3 // one), int(256e6 // operand_bytes)))
            flops += one * count
            seconds += _timed_matmul(b * reps, mm, kk, nn, dtype, repeats) / reps * count
    return {"tflops": flops / seconds / 1e12, "flops_per_step": flops, "seconds_per_step": seconds}


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random tokens shaped like a pipeline batch; with document masking, 1-4 documents a row."""
    B, T, V = cfg.train.batch_size, cfg.model.seq_len, cfg.model.vocab_size
    tokens = rng.integers(0, V, (B, T + 1), dtype=np.int32)
    seg = np.ones((B, T), np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    if cfg.data.document_masking:
        for r in range(B):
            cuts = np.sort(rng.choice(np.arange(1, T), rng.integers(0, min(4, T)), replace=False))
            for i, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, T], strict=True)):
                seg[r, a:b], pos[r, a:b] = i + 1, np.arange(b - a)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((B, T), np.float32),
        "segment_ids": seg,
        "positions": pos,
    }


def peak_memory() -> tuple[float, str]:
    """(peak GiB, what was measured): device peak where the runtime reports it, else process RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device peak_bytes_in_use"
    # ru_maxrss is KiB on Linux: the whole process (host), not a device figure
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (no device stats)"


def run_bench(
    cfg: Config,
    steps: int = 10,
    warmup: int = 2,
    matmul_n: int | None = None,
    profile_dir: str | None = None,
    ceiling: bool = True,
) -> dict[str, Any]:
    """Compile and time the train step; returns the figures ``report`` prints. With ``profile_dir``,
    ``profile.PROFILE_STEPS`` more steps are traced there after the timed ones (see ``profile.py``);
    ``ceiling=False`` skips the "matmuls alone" ceiling (dozens of small compiles; a sweep needs
    it once, for its best point)."""
    if steps < 1 or warmup < 0:
        raise ConfigError(f"bench: --steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_divisible(cfg.model, lm.get(cfg.model).decls, mesh)
    sharding.micro_batch_rows(cfg.train, mesh)  # refuses a batch the mesh cannot split evenly
    with jax.set_mesh(mesh):  # scoped: a benchmark must not leave a global mesh behind
        return _timed_run(cfg, mesh, steps, warmup, matmul_n, profile_dir, ceiling)


def _timed_run(
    cfg: Config,
    mesh,
    steps: int,
    warmup: int,
    matmul_n: int | None,
    profile_dir: str | None,
    ceiling: bool,
) -> dict[str, Any]:
    state_sh = state_shardings(cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    state = create_state(cfg, state_sh)
    batch = {
        k: jax.device_put(v, batch_sh) for k, v in synthetic_batch(cfg, np.random.default_rng(0)).items()
    }

    t0 = time.perf_counter()
    step = train.make_train_step(cfg, state_sh, batch_sh).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0

    param_dtypes = sorted({x.dtype.name for x in jax.tree.leaves(state.params)})
    times, first = [], state
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    donated = all(x.is_deleted() for x in jax.tree.leaves(first))  # updated in place, no second copy
    del first
    traced = None
    if profile_dir is not None:  # after the timed steps, so tracing costs them nothing
        state, metrics, traced = profile.profile_steps(step, state, batch, profile_dir)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"bench: loss is {loss}; the benchmark step is broken")

    n_dev = mesh.devices.size
    dev = jax.devices()[0]
    cdtype = model.compute_dtype(cfg.model)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    median = float(np.median(times))
    tok_s_dev = tokens / median / n_dev
    fpt = flops_per_token(cfg.model)
    tflops_dev = fpt["total"] * tok_s_dev / 1e12
    peak = peak_tflops(dev.device_kind)
    n = matmul_n or (2048 if dev.platform == "cpu" else 8192)
    measured = matmul_tflops(n, cdtype)
    rows = sharding.micro_batch_rows(cfg.train, mesh)
    # The ceiling times the built-in transformer's matmul shapes; a user's module has its own.
    ceiling = ceiling and not cfg.model.module
    c = matmul_ceiling(cfg.model, rows, mesh.shape["tensor"], cdtype, measured) if ceiling else None
    mem_gib, mem_kind = peak_memory()
    return {
        "name": cfg.name,
        "device": f"{n_dev} x {dev.device_kind} ({dev.platform})",
        "compute_dtype": jnp.dtype(cdtype).name,
        "param_dtypes": param_dtypes,
        "donated_state": donated,
        "attention": cfg.model.attention,
        "batch": [cfg.train.batch_size, cfg.model.seq_len],
        "steps": steps,
        "warmup": warmup,
        "compile_s": compile_s,
        "step_s": {
            "median": median,
            "p10": float(np.percentile(times, 10)),
            "p90": float(np.percentile(times, 90)),
        },
        "tokens_per_s_per_device": tok_s_dev,
        "flops_per_token": fpt,
        "flop_params": lm.get(cfg.model).flop_params,
        "active": active_note(cfg.model),
        "model": lm.get(cfg.model).name,
        "model_tflops_per_device": tflops_dev,
        "peak_tflops": peak,
        "mfu": tflops_dev / peak if peak else None,
        "matmul": {"n": n, "dtype": jnp.dtype(cdtype).name, "tflops": measured},
        "fraction_of_matmul_peak": tflops_dev / measured,
        "matmul_ceiling": None
        if c is None
        else {
            "tflops": c["tflops"],
            "fraction_of_matmul_peak": c["tflops"] / measured,
            "step_fraction": tflops_dev / c["tflops"],
        },
        "peak_memory_gib": mem_gib,
        "peak_memory_kind": mem_kind,
        "loss": loss,
    } | ({"profile": traced} if traced else {})


# Largest error, relative to the largest reference value, that counts as agreement.
PARITY_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def attention_parity(cfg: ModelConfig, rows: int = 2, repeats: int = 5) -> list[dict[str, Any]]:
    """Every attention backend against the float32 reference on this device, at the model's heads,
    head dim, sequence length, compute dtype and sliding window (model.attention_window, applied
    to every row when set): causal batches, and packed ones (segment ids).

    For each backend and batch kind: the largest error of the output and of dq, dk, dv, relative to
    the largest reference value, whether that is within ``PARITY_TOLERANCE``, and the forward +
    backward time. A backend this device or dtype cannot run, or that cannot honour the request,
    is listed with the reason it was refused. This is how the GPU/TPU-only kernels (cudnn, splash)
    are checked where they exist; on a CPU it checks reference, blockwise and xla.

    One more row, ``cudnn+mask`` on packed batches (``"probe": True``, never a failure of the
    check): JAX's cuDNN kernel given the document mask as an explicit mask, which the ``cudnn``
    backend refuses to rely on. On a GPU it says whether that kernel keeps the documents separate
    (agrees with the reference) in this JAX version, or the error it raised.
    """
    from jaxlm.attention import BACKENDS, attend, document_causal_mask, resolve_backend

    T, H, G, K = cfg.seq_len, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    dtype = model.compute_dtype(cfg)
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (rows, T, H, K), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (rows, T, G, K), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (rows, T, G, K), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(kg, (rows, T, H, K), jnp.float32)
    packed = synthetic_batch(
        Config(model=cfg, train=TrainConfig(batch_size=rows), data=DataConfig(document_masking=True)),
        np.random.default_rng(0),
    )["segment_ids"]
    tol = PARITY_TOLERANCE[jnp.dtype(dtype).name]

    def fwd_bwd(attn, compute):
        def f(q, k, v):
            return attn(q.astype(compute), k.astype(compute), v.astype(compute)).astype(jnp.float32)

        def run(q, k, v):
            o, pullback = jax.vjp(f, q, k, v)
            return (o, *pullback(cotangent))

        return jax.jit(run)

    def measure(attn, want) -> dict[str, Any]:
        f = fwd_bwd(attn, dtype)
        got = f(q, k, v)
        errors = {
            name: float(jnp.abs(a - b).max() / jnp.abs(b).max())
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True)
        }
        seconds = _best_seconds(f, q, k, v, repeats=repeats)
        return {"errors": errors, "ok": max(errors.values()) <= tol, "ms": 1e3 * seconds}

    def backend(name, seg):  # with the model's sliding window, if it has one
        return lambda q, k, v: attend(q, k, v, backend=name, segment_ids_BxT=seg, window=cfg.attention_window)

    results, want, seg_packed = [], {}, jnp.asarray(packed)
    for kind, seg in (("causal", None), ("packed", seg_packed)):
        want[kind] = fwd_bwd(backend("reference", seg), jnp.float32)(q, k, v)
        for name in BACKENDS:
            row: dict[str, Any] = {"backend": name, "batch": kind, "dtype": jnp.dtype(dtype).name}
            try:
                resolve_backend(name, segment_ids=seg is not None, dtype=dtype, seq_len=T)
            except ConfigError as e:
                results.append(row | {"refused": str(e)})
                continue
            results.append(row | measure(backend(name, seg), want[kind]))

    probe = {"backend": "cudnn+mask", "batch": "packed", "dtype": jnp.dtype(dtype).name, "probe": True}
    if jax.default_backend() != "gpu":
        results.append(probe | {"refused": f"needs a GPU, but this run is on {jax.default_backend()!r}"})
        return results
    mask_Bx1xTxS = document_causal_mask(seg_packed, seg_packed)[:, None]
    masked = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xTxS, implementation="cudnn")
    try:
        results.append(probe | measure(masked, want["packed"]))
    except Exception as e:  # a probe reports whatever JAX raised (unsupported shape, mask, version)
        results.append(probe | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    return results


def parity_report(results: list[dict[str, Any]]) -> str:
    lines = ["attention backends against the float32 reference (error: max |diff| / max |reference|)"]
    for r in results:
        head = f"  {r['backend']:<10} {r['batch']:<7} {r['dtype']:<9}"
        head += " (probe)" if r.get("probe") else ""
        if "refused" in r or "error" in r:
            lines.append(
                f"{head} {'refused' if 'refused' in r else 'error'}: {r.get('refused', r.get('error'))}"
            )
            continue
        e = r["errors"]
        errs = "  ".join(f"{k} {v:.1e}" for k, v in e.items())
        lines.append(f"{head} {'ok  ' if r['ok'] else 'FAIL'} {errs}  fwd+bwd {r['ms']:.2f} ms")
    return "\n".join(lines)


def report(r: dict[str, Any]) -> str:
    s, c = r["step_s"], r["matmul_ceiling"]
    mfu = (
        f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f}" if r["mfu"] is not None else "n/a (no table peak)"
    )
    alone = (
        "not measured (--skip-ceiling, or a model.module whose matmul shapes jaxlm does not know)"
        if c is None
        else f"{c['tflops']:.3f} TFLOP/s ({100 * c['fraction_of_matmul_peak']:.1f}% of the peak): the "
        f"step's own matmul shapes timed alone; step reaches {100 * c['step_fraction']:.1f}% of it"
    )
    return "\n".join(
        [
            f"bench {r['name']}: {r['device']}, batch {r['batch'][0]} x {r['batch'][1]}, "
            f"{r['steps']} steps after {r['warmup']} warm-up",
            f"  numerics         {r['compute_dtype']} compute on {'/'.join(r['param_dtypes'])} params, "
            f"attention={r['attention']}, state donated: {'yes' if r['donated_state'] else 'NO'}",
            f"  compile          {r['compile_s']:.1f} s",
            f"  step time        median {1e3 * s['median']:.1f} ms  (p10 {1e3 * s['p10']:.1f}, "
            f"p90 {1e3 * s['p90']:.1f})",
            f"  tokens/s/device  {r['tokens_per_s_per_device']:,.0f}",
            f"  model FLOPs/tok  {r['flops_per_token']['total']:,} (6N = {r['flops_per_token']['dense']:,}, "
            f"attention {r['flops_per_token']['attention']:,} = 12 x model.n_layers x n_heads x head_dim x "
            f"seq_len; N = {r['flop_params']:,}{r['active']}, {r['model']})",
            f"  TFLOP/s/device   {r['model_tflops_per_device']:.3f}",
            f"  MFU              {mfu} TFLOP/s",
            f"  matmul peak      {r['matmul']['tflops']:.3f} TFLOP/s measured ({r['matmul']['n']}^3 "
            f"{r['matmul']['dtype']}); step reaches {100 * r['fraction_of_matmul_peak']:.1f}% of it",
            f"  matmuls alone    {alone}",
            f"  peak memory      {r['peak_memory_gib']:.2f} GiB ({r['peak_memory_kind']})",
        ]
        + ([profile.top_ops_report(r["profile"])] if "profile" in r else [])
    )


def bench_main(args: argparse.Namespace) -> int:
    """``jaxlm bench`` with the arguments ``jaxlm.cli`` parsed."""
    from jaxlm.config import load_config

    cfg = load_config(args.experiment, args.set)
    if args.attention_parity and args.profile:
        raise ConfigError("--profile traces the train step, which --attention-parity does not run; drop one")
    if args.attention_parity:
        r: Any = attention_parity(cfg.model)
        print(parity_report(r))
        code = 0 if all(x.get("ok", True) for x in r if not x.get("probe")) else 1
    else:
        r = run_bench(cfg, args.steps, args.warmup, args.matmul_n, args.profile, not args.skip_ceiling)
        code = 0
        print(report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    sys.stdout.flush()
    return code
