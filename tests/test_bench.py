"""The benchmark's arithmetic (FLOP count, peaks, rates), the compile-time/memory levers it relies on,
its profile summary, and benchmarks/gpu_suite.sh run end to end in its CPU dry run."""

import dataclasses
import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import bench, cli, lm, model, profile
from jaxlm.config import PRESETS, Config, TrainConfig, load_config, preset

ROOT = Path(__file__).resolve().parents[1]
# A figure recomputed from the JSON by the formula bench.py uses: float64, a few operations, each
# rounding by at most half an ulp, so equal to a few float64 eps.
F64_FEW_OPS = 4 * np.finfo(np.float64).eps
F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


def test_flop_count_matches_a_hand_count():
    # tiny (vocab 257, tied): per layer q,k,v,o 4*32*32 + swiglu 3*32*64 + two norms 2*32 = 10304;
    # 2 layers + final norm 32 + the tied output projection 257*32 = 28864 = N
    cfg = preset("tiny", vocab_size=257)
    assert lm.get(cfg).flop_params == 28_864
    assert bench.flops_per_token(cfg) == {
        "dense": 6 * 28_864,
        "attention": 12 * 2 * 4 * 8 * 32,  # L H Q T, no causal halving
        "total": 6 * 28_864 + 12 * 2 * 4 * 8 * 32,
    }
    # an untied output projection is the same matmul, so the same N
    assert lm.get(dataclasses.replace(cfg, tie_embeddings=False)).flop_params == 28_864
    # GPT-2 small: 124,439,808 params less 50257x768 token and 1024x768 position embeddings,
    # plus the 50257x768 output projection (the padded 50304 rows are not model work)
    gpt2 = PRESETS["gpt2-124m"]
    assert lm.get(gpt2).flop_params == 124_439_808 - 1024 * 768 == 123_653_376
    assert bench.flops_per_token(gpt2)["attention"] == 12 * 12 * 12 * 64 * 1024
    # sliding windows: a windowed layer's queries attend to W keys, a global layer's to seq_len
    local = dataclasses.replace(gpt2, attention_window=256, global_every=4)  # layers 3, 7, 11 global
    assert bench.flops_per_token(local)["attention"] == 12 * 12 * 64 * (3 * 1024 + 9 * 256)


def test_flop_count_matches_xla_cost_analysis():
    """XLA's count of a compiled forward+backward agrees with 6N + 12LHQT within 5%.

    One layer, because XLA's cost analysis counts a while loop (our layer scan) body once. XLA
    counts slightly more: the element-wise work (norms, rope, softmax, SwiGLU, cross-entropy)
    that the model-FLOP convention leaves out; that is about 1.3% here and shrinks as d_model grows.
    """
    cfg = preset(
        "tiny", n_layers=1, d_model=128, n_heads=4, n_kv_heads=2, d_ff=512, vocab_size=512,
        vocab_multiple=128, seq_len=64, compute_dtype="float32",
    )  # fmt: skip
    B, T = 2, 64
    batch = bench.synthetic_batch(
        Config(model=cfg, train=TrainConfig(batch_size=B)), np.random.default_rng(0)
    )
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    grad = jax.jit(jax.grad(lambda p, b: model.loss_sums(p, b, cfg, False)[0]))
    xla = grad.lower(params, batch).compile().cost_analysis()["flops"]
    ratio = xla / (bench.flops_per_token(cfg)["total"] * B * T)
    assert 1.0 <= ratio < 1.05, ratio


def test_model_matmuls_account_for_every_model_flop():
    """The matmul shapes behind the 'matmuls alone' ceiling are the FLOP count's matmuls: 3 x their
    forward FLOPs is 6N + 12LHQT less the norm scales (the only parameters outside a matmul here)."""
    cfg = preset("tiny", vocab_size=256, vocab_multiple=1, n_kv_heads=2, n_layers=3)
    rows, T = 4, cfg.seq_len

    def step_flops(cfg, tensor=1):
        return sum(
            3 * 2 * b * m * k * n * count for _, b, m, k, n, count in bench.model_matmuls(cfg, rows, tensor)
        )

    norm_params = (2 * cfg.n_layers + 1) * cfg.d_model
    assert step_flops(cfg) == (bench.flops_per_token(cfg)["total"] - 6 * norm_params) * rows * T
    # tensor parallelism splits heads, ffn and vocabulary: each device does half the work
    assert 2 * step_flops(cfg, tensor=2) == step_flops(cfg)
    # chunked logits are the same work in pieces
    assert step_flops(dataclasses.replace(cfg, logits_chunk=32)) == step_flops(cfg)
    # experts: the matmuls are the active ones (top-k experts and the router of each sparse layer)
    sparse = dataclasses.replace(cfg, moe_experts=4, moe_top_k=2, moe_shared_expert=True, use_bias=False)
    assert step_flops(sparse) == (bench.flops_per_token(sparse)["total"] - 6 * norm_params) * rows * T
    # the padded vocabulary is work the hardware does (the model FLOPs leave it out)
    padded = dataclasses.replace(cfg, vocab_size=200, vocab_multiple=128)
    assert step_flops(padded) - step_flops(dataclasses.replace(padded, vocab_multiple=1)) == (
        3 * 2 * rows * T * cfg.d_model * 56
    )


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("TPU v4", 275.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5", 459.0),
        ("TPU v6 lite", 918.0),
        ("cpu", None),
    ],
)
def test_peak_table_matches_device_kind(kind, peak):
    assert bench.peak_tflops(kind) == peak


def test_synthetic_batch_packs_documents_like_the_pipeline():
    cfg = Config(model=preset("tiny"), train=TrainConfig(batch_size=16))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, document_masking=True))
    b = bench.synthetic_batch(cfg, np.random.default_rng(1))
    assert all(v.shape == (16, 32) for v in b.values())
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    seg, pos = b["segment_ids"], b["positions"]
    assert (np.diff(seg, axis=1) >= 0).all() and seg.min() == 1 and seg.max() > 1
    starts = np.c_[np.ones(16, bool), np.diff(seg, axis=1) > 0]
    assert (pos[starts] == 0).all() and (np.diff(pos, axis=1)[~starts[:, 1:]] == 1).all()


def test_bench_command_reports_consistent_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(
        [
            "bench",
            "experiments/tiny.py",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--json",
            str(out),
            "--matmul-n",
            "256",
        ]
        + ["--set", "data.document_masking=true", "train.batch_size=16", "model.compute_dtype=bfloat16"]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "compile" in text and "MFU" in text and "process peak RSS" in text
    tokens = 16 * 32
    assert r["device"].startswith("8 x ")  # the configured mesh: all 8 fake devices
    s = r["step_s"]
    assert 0 < s["p10"] <= s["median"] <= s["p90"] and r["compile_s"] > 0
    approx = lambda x: pytest.approx(x, rel=F64_FEW_OPS)
    assert r["tokens_per_s_per_device"] == approx(tokens / s["median"] / 8)
    assert r["model_tflops_per_device"] == approx(197_760 * r["tokens_per_s_per_device"] / 1e12)
    assert r["mfu"] is None and r["peak_tflops"] is None  # a CPU has no table peak...
    # ...so the step is measured against a matmul measured on the same device
    assert r["fraction_of_matmul_peak"] == approx(r["model_tflops_per_device"] / r["matmul"]["tflops"])
    assert r["matmul"] == {"n": 256, "dtype": "bfloat16", "tflops": r["matmul"]["tflops"]}
    # and against its own matmul shapes timed alone, the ceiling small models are bound by
    c = r["matmul_ceiling"]
    assert c["tflops"] > 0 and "matmuls alone" in text
    assert c["fraction_of_matmul_peak"] == approx(c["tflops"] / r["matmul"]["tflops"])
    assert c["step_fraction"] == approx(r["model_tflops_per_device"] / c["tflops"])
    # memory levers: bf16 compute on fp32 master weights, state updated in place (donated)
    assert r["compute_dtype"] == "bfloat16" and r["param_dtypes"] == ["float32"] and r["donated_state"]
    # Random tokens on a random init: logits ~ N(0, d_model * init_std^2 = 32 * 0.02^2 = 0.0128), so
    # the loss starts about half that variance (0.006) above ln 257, and 3 steps on random tokens
    # cannot take it far from there (no float tolerance: a bound on what the model can learn).
    assert r["peak_memory_gib"] > 0 and abs(r["loss"] - np.log(257)) < 0.05


def test_bench_refuses_bad_arguments(capsys):
    cfg = load_config("experiments/tiny.py", ["train.batch_size=4"])
    with pytest.raises(bench.ConfigError, match="--steps"):
        bench.run_bench(cfg, steps=0)
    with pytest.raises(bench.ConfigError, match="train.batch_size=4"):
        bench.run_bench(cfg, steps=1)  # 4 rows cannot be split over 8 devices
    # the parity check runs no train step, so there is none to profile
    assert cli.main(["bench", "experiments/tiny.py", "--attention-parity", "--profile", "p"]) == 2
    assert capsys.readouterr().err.startswith("error: --profile traces the train step")


def test_layer_scan_keeps_the_program_size_independent_of_depth():
    """Layers run under lax.scan: 8 layers lower to the same program as 2 (so compile time too)."""
    sizes = []
    for L in (2, 8):
        cfg = preset("tiny", n_layers=L)
        batch = bench.synthetic_batch(
            Config(model=cfg, train=TrainConfig(batch_size=2)), np.random.default_rng(0)
        )
        params = jax.eval_shape(lambda cfg=cfg: model.init_params(cfg, jax.random.key(0)))
        f = jax.jit(jax.grad(lambda p, b, cfg=cfg: model.loss_sums(p, b, cfg, False)[0]))
        sizes.append(len(f.lower(params, batch).as_text()))
    assert abs(sizes[1] - sizes[0]) < 0.01 * sizes[0], sizes


def test_attention_parity_command_checks_every_backend_this_device_runs(tmp_path, capsys):
    out = tmp_path / "parity.json"
    rc = cli.main(["bench", "experiments/tiny.py", "--attention-parity", "--json", str(out)])
    assert rc == 0
    rows = {(r["backend"], r["batch"]): r for r in json.loads(out.read_text())}
    # float32 against the float32 reference: an output element is reached through at most K + 2T
    # roundings (the score's K products, the softmax's T terms, the weighted sum's T), a gradient
    # through as many again; relative to the largest reference value, that bounds the error.
    T, K = 32, 8  # tiny: seq_len 32, d_model 32 over 4 heads; float32 compute on a CPU
    tol = 2 * (K + 2 * T) * F32_EPS  # 1.7e-5
    for backend in ("reference", "blockwise", "xla"):  # what a CPU runs, causal and packed
        for batch in ("causal", "packed"):
            r = rows[backend, batch]
            assert r["ok"] and max(r["errors"].values()) <= tol and r["ms"] > 0
    # the accelerator kernels are listed with the reason they did not run here, not dropped
    assert "needs a GPU" in rows["cudnn", "causal"]["refused"]
    assert "needs a TPU" in rows["splash", "packed"]["refused"]
    # and so is the probe of cuDNN with an explicit document mask, which never fails the check
    assert rows["cudnn+mask", "packed"]["probe"] and "needs a GPU" in rows["cudnn+mask", "packed"]["refused"]
    assert "FAIL" not in capsys.readouterr().out


def test_attention_parity_fails_a_backend_that_drops_the_document_mask(monkeypatch, capsys):
    """A blockwise that ignored segment ids would agree on causal batches and must fail on packed ones."""
    from jaxlm import attention

    original = attention._blockwise
    monkeypatch.setattr(attention, "_blockwise", lambda q, k, v, seg, window: original(q, k, v, None, window))
    rc = cli.main(["bench", "experiments/tiny.py", "--attention-parity"])
    text = capsys.readouterr().out
    assert rc == 1
    lines = {tuple(line.split()[:2]): line for line in text.splitlines()[1:]}
    assert " ok " in lines["blockwise", "causal"] and "FAIL" in lines["blockwise", "packed"]
    assert " ok " in lines["xla", "packed"]


def test_bench_and_decode_paths_import_without_grain():
    """The GPU machine has no grain: jaxlm bench, its profile and bench_decode must not need it."""
    code = (
        "import sys; sys.modules['grain'] = None\n"  # any `import grain` now raises ImportError
        "import jaxlm.cli, jaxlm.bench, jaxlm.sampling, jaxlm.model, jaxlm.config"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _write_trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)


def _meta(pid, name, tid=None):
    if tid is None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def _op(pid, tid, name, ts, dur, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def test_trace_top_ops_counts_each_op_once_and_only_its_own_time(tmp_path):
    """A GPU-shaped trace: ops on the device's 'XLA Ops' line, the same ops again as kernels on a
    stream line, a while loop enclosing its body's ops, and host events that are not device time."""
    kernels = [_op(1, 7, "sm90_gemm", 10, 30, hlo_op="fusion.1", hlo_module="jit_train_step")]
    xla_ops = [
        _op(1, 2, "while.3", 0, 100),  # the layer scan: its body's two fusions run inside it
        _op(1, 2, "fusion.1", 10, 30),
        _op(1, 2, "fusion.1", 50, 30),
        _op(1, 2, "dot.2", 110, 20),
    ]
    host = [_op(2, 9, "PjitFunction(train_step)", 0, 500), _op(2, 9, "fusion.1", 0, 400, hlo_op="fusion.1")]
    meta = [
        _meta(1, "/device:GPU:0"),
        _meta(1, "Stream #7(Compute)", 7),
        _meta(1, "XLA Ops", 2),
        _meta(1, "XLA Modules", 3),
        _meta(2, "/host:CPU"),
        _meta(2, "python", 9),
    ]
    module = [_op(1, 3, "jit_train_step(42)", 0, 130)]
    _write_trace(tmp_path / "gpu.json.gz", meta + kernels + xla_ops + host + module)
    r = profile.trace_top_ops(tmp_path / "gpu.json.gz", n=2, steps=2)
    assert r["source"] == "device 'XLA Ops' line"
    assert r["modules"] == ["jit_train_step", "jit_train_step(42)"]
    # the while loop's own time is 100 - 2 x 30; all ops, per step: (100 + 20) / 2 microseconds
    assert r["op_ms_per_step"] == pytest.approx(0.060, rel=F64_FEW_OPS)
    assert [(o["op"], o["calls_per_step"]) for o in r["top_ops"]] == [("fusion.1", 1), ("while.3", 0.5)]
    assert [o["ms_per_step"] for o in r["top_ops"]] == pytest.approx([0.030, 0.020], rel=F64_FEW_OPS)
    assert [o["fraction"] for o in r["top_ops"]] == pytest.approx([0.5, 1 / 3], rel=F64_FEW_OPS)

    # without an 'XLA Ops' line the stream kernels, named by their HLO op, are the device time
    _write_trace(tmp_path / "kernels.json.gz", meta[:2] + meta[4:] + kernels + host)
    r = profile.trace_top_ops(tmp_path / "kernels.json.gz")
    assert r["source"] == "device kernels" and r["top_ops"][0]["op"] == "fusion.1"
    assert r["op_ms_per_step"] == pytest.approx(0.030, rel=F64_FEW_OPS)


def _suite(*args, env=None):
    import os

    env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def test_gpu_suite_refuses_bad_arguments_and_a_machine_without_a_gpu(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text('{"earlier": "results"}')
    run = _suite("--dry-run", done)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "summary.json" in run.stderr
    assert (done / "summary.json").read_text() == '{"earlier": "results"}'  # left as it was
    run = _suite("--fast", tmp_path / "x")
    assert run.returncode == 2 and "unknown option '--fast'" in run.stderr
    run = _suite(env={"OUT": ""})
    assert run.returncode == 2 and "no OUTDIR" in run.stderr
    # the real run on this CPU: refused before any benchmark, what it found still returned
    out = tmp_path / "real"
    run = _suite(out)
    assert run.returncode == 3 and "error: no GPU here (jax backend 'cpu')" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "suite.log"]


def test_gpu_suite_dry_run_runs_every_item_and_returns_few_files(tmp_path):
    """benchmarks/gpu_suite.sh --dry-run: every item end to end on the CPU at tiny shapes."""
    out = tmp_path / "out"
    run = _suite("--dry-run", out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # what the device tool returns: at most 8 files, no folders
    files = sorted(p.name for p in out.iterdir())
    assert files == ["profile.trace.json.gz", "results.tar.gz", "suite.log", "summary.json"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "dry-run" and all(i["status"] == "ok" for i in s["items"].values()), s["items"]
    for item in s["items"]:  # one JSON and one log per item
        assert {f"{item}.json", f"{item}.log"} <= names, item

    # 1. parity: the CPU backends agree (bf16 here); cuDNN is refused, with the reason, not dropped
    p = s["attention_parity"]
    assert p["all_ok"] and "needs a GPU" in p["cudnn_causal"]["refused"]
    assert "needs a GPU" in p["cudnn_packed"]["refused"] and p["cudnn_mask_probe"]["probe"]
    # 2, 3. the sweeps: every point measured, the best one named; no MFU (a CPU has no table peak)
    assert len(s["gpt2_124m"]["points"]) == 2 and len(s["llama_1b"]["points"]) == 1
    for key in ("gpt2_124m", "llama_1b"):
        m = s[key]
        best = max(m["points"], key=lambda r: r["tokens_per_s_per_device"])
        assert m["best"] == best["name"] and m["best_mfu"] is None and m["meets_target"] is None
        assert all(r["tokens_per_s_per_device"] > 0 and r["mfu"] is None for r in m["points"])
    # 4. the profile: of the fastest 124M point, naming the train step and its ops
    prof = s["profile"]
    assert prof["point"] == s["gpt2_124m"]["best"]
    assert prof["file"] == "profile.trace.json.gz" and "jit_train_step" in prof["modules"]
    assert len(prof["top_ops"]) == 15 and all(o["ms_per_step"] > 0 for o in prof["top_ops"])
    assert sum(o["fraction"] for o in prof["top_ops"]) <= 1
    assert profile.trace_top_ops(out / "profile.trace.json.gz", steps=3)["top_ops"] == prof["top_ops"]
    log = (out / "suite.log").read_text()
    assert prof["top_ops"][0]["op"] in log and "top 15 ops" in log
    # 5. decode (one batch size in the dry run)
    assert [r["batch"] for r in s["decode"]["rows"]] == [2]
    assert all(r["new_tokens_per_s"] > 0 for r in s["decode"]["rows"])


def test_gpu_suite_plan_fits_eight_minutes_and_its_overrides_are_valid():
    """The real run's commands, without a GPU: a typo in an override must not cost GPU time."""
    run = _suite("--plan")
    assert run.returncode == 0, run.stderr
    lines = [line.split("\t") for line in run.stdout.splitlines()]
    items = {name: int(limit) for name, limit, _ in lines if not name.startswith(("gpt2_124m_", "llama_1b_"))}
    assert list(items) == ["env", "parity", "gpt2_124m", "llama_1b", "profile", "decode"]
    assert sum(items.values()) <= 8 * 60 - 10  # 10 s left for the summary and the packing
    swept: dict[str, set] = {}
    for name, _, command in lines:
        if " bench " not in command:
            continue
        args = command.split()
        cfg = load_config(args[args.index("bench") + 1], args[args.index("--set") + 1 :])  # or ConfigError
        assert cfg.model.compute_dtype == "bfloat16"
        if "--attention-parity" not in args:
            assert cfg.model.attention == "auto"
            # the preset's own shape (seq 1024 for GPT-2, 2048 for llama-1b), only the sweep's keys changed
            assert dataclasses.replace(cfg.model, remat="none", compute_dtype="auto") == PRESETS[cfg.name], (
                name
            )
            swept.setdefault(cfg.name, set()).add((cfg.train.batch_size, cfg.model.remat))
    for preset_name in ("gpt2-124m", "llama-1b"):  # over two batch sizes and two remat settings
        batches, remats = zip(*swept[preset_name], strict=True)
        assert len(set(batches)) >= 2 and len(set(remats)) >= 2, swept
    assert "--batch 1 64" in dict((n, c) for n, _, c in lines)["decode"]
