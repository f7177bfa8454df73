"""Hugging Face interop: exported models give jaxlm's logits in transformers, imported ones give
transformers' logits in jaxlm, export -> import is bit-exact, what no HF architecture
represents is refused by name, and so is a model whose weights the tensor table (checked against
model.param_decls both ways) does not cover.

Two kinds of test. The fixture tests always run and need neither torch nor transformers:
tests/fixtures/hf/ holds tiny random transformers models (a tied GPT-2 and an untied Llama with
grouped-query attention) with the logits transformers computed for them, written by
tests/fixtures/make_hf_fixtures.py; jaxlm imports them, must reproduce those logits, and its export
must give back the same tensors. The live tests run transformers itself (CPU torch, float32) and
skip, with one line, where torch or transformers is not installed (.ci/run installs both)."""

import dataclasses
import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, cli, model, train
from jaxlm.config import CheckpointConfig, Config, ConfigError, DataConfig, ModelConfig, load_config, to_dict
from jaxlm.data.tokenizer import GPT2_DIR, get_tokenizer
from jaxlm.hf import arch, export, importer
from jaxlm.hf.config_json import ARCHITECTURE_KEYS, model_fields_from_hf
from jaxlm.hf.safetensors import SafetensorsDir
from jaxlm.state import make_tx

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
GPT2 = dict(positions="learned", norm="layernorm", mlp="gelu", use_bias=True)
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False)


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=300, vocab_multiple=64, seq_len=16, n_layers=2, d_model=32, n_heads=4, d_ff=64)
    return ModelConfig(**(base | kw))


def random_params(m: ModelConfig, seed: int = 0):
    """Random values in every leaf, so biases and norm scales (zeros and ones at init) matter.
    Drawn with numpy: compiling jax.random for every leaf would cost seconds per config."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: model.init_params(m, jax.random.key(0)))

    def one(path, a):
        x = 0.1 * rng.standard_normal(a.shape) + ("scale" in jax.tree_util.keystr(path))
        return jnp.asarray(x, a.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def write_checkpoint(tmp_path: Path, m: ModelConfig, tokenizer: str = "bytes", step: int = 3):
    """A run directory holding one checkpoint written as train.py writes it (no training)."""
    cfg = Config(
        name="src",
        model=m,
        data=DataConfig(tokenizer=tokenizer),
        checkpoint=CheckpointConfig(async_save=False),
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(tmp_path)))
    params = random_params(m)
    opt_state = jax.jit(make_tx(cfg).init)(params)
    state = {"step": jnp.array(step, jnp.int32), "params": params, "opt_state": opt_state}
    saver = checkpoint.Checkpointer(cfg.run_path / "checkpoints", cfg.checkpoint)
    assert saver.save(step, state, to_dict(cfg)) and saver.wait()
    saver.close()
    return cfg, params


F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


def logits_rtol(m: ModelConfig, n_tokens: int) -> float:
    """How far two float32 computations of the same logits (jaxlm's XLA, transformers' torch) may
    differ, as a fraction of the largest |logit|.

    A logit is the end of a chain of reductions that the two libraries sum in different orders; a
    length-n float32 sum is off by at most about n x eps of its terms' magnitude (the linear worst
    case; every normalisation brings activations back to the logits' scale). Per layer the chain is
    the norm (d_model), q/k/v (d_model), q.k (head_dim), the softmax and the weighted sum of values
    (n_tokens), the output projection (n_heads x head_dim), the norm (d_model), the MLP's input
    (d_model) and output (d_ff); then the final norm and the unembedding (d_model each)."""
    d, k = m.d_model, m.dim_per_head
    per_layer = 4 * d + k + n_tokens + m.n_heads * k + m.d_ff
    return F32_EPS * (m.n_layers * per_layer + 2 * d)


def assert_close(actual: np.ndarray, expected: np.ndarray, m: ModelConfig):
    """Logits [B, T, V] within logits_rtol of each other."""
    assert actual.shape == expected.shape
    rel = logits_rtol(m, expected.shape[1])
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert scale > 1.0, "logits too small to make the comparison meaningful"
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:.3g} x max |logit| {scale:.3g}"


def jaxlm_logits(params, m: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    """Float32 logits (compute_dtype pinned: logits_rtol is float32 arithmetic)."""
    m = dataclasses.replace(m, compute_dtype="float32")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(
        jax.jit(model.forward, static_argnums=4)(params, jnp.asarray(tokens), positions, None, m)
    )


def assert_same_params(imported, original, m: ModelConfig):
    """Bit-exact, except the vocabulary padding rows: dropped on export, zeros on import."""
    flat_a, flat_b = jax.tree.leaves_with_path(imported), jax.tree.leaves_with_path(original)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, a), (_, b) in zip(flat_a, flat_b, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        name = jax.tree_util.keystr(path)
        if name == "['embed']":
            a, pad, b = a[: m.vocab_size], a[m.vocab_size :], b[: m.vocab_size]
        elif name == "['unembed']":
            a, pad, b = a[:, : m.vocab_size], a[:, m.vocab_size :], b[:, : m.vocab_size]
        else:
            pad = np.zeros(0)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert not pad.any(), f"{name}: padding rows are not zero"


def assert_same_tensors(directory: Path, reference: Path):
    """The Hugging Face tensors of two model directories: the same names, dtypes and bits."""
    a, b = SafetensorsDir(directory), SafetensorsDir(reference)
    assert sorted(a.where) == sorted(b.where)
    for name in b.where:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def hf_fields(directory: Path) -> dict:
    """The jaxlm architecture a transformers config.json describes."""
    return model_fields_from_hf(json.loads((directory / "config.json").read_text()))


# --------------------------------------------------------------------------------------------
# Fixtures (no torch): transformers' models and logits, stored, imported and exported by jaxlm.
# --------------------------------------------------------------------------------------------

FIXTURE_MODELS = ["gpt2", "llama-gqa"]


def load_fixture(name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """(model directory, tokens [B, T], transformers' float32 logits [B, T, V] for them)."""
    src = FIXTURES / name
    return src, np.load(src / "tokens.npy"), np.load(src / "logits.npy")


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_fixture_import_reproduces_transformers_logits_and_exports_the_same_tensors(tmp_path, name):
    src, tokens, want = load_fixture(name)
    cfg = importer.import_config(src, tmp_path / "runs" / name, tokenizer="bytes")
    m = cfg.model
    assert {k: getattr(m, k) for k in ARCHITECTURE_KEYS} == hf_fields(src)
    if name == "gpt2":
        assert m.positions == "learned" and m.tie_embeddings and m.use_bias
    else:  # what the Llama fixture is there for: GQA, untied, a rope_theta that is not the default
        assert m.kv_heads < m.n_heads and not m.tie_embeddings and m.rope_theta == 500.0
    assert m.padded_vocab > m.vocab_size  # the padding rows are dropped and re-added on the way
    params = importer.params_from_hf(SafetensorsDir(src), m, str(src))
    assert_close(jaxlm_logits(params, m, tokens), want, m)

    # Export is transposes, reshapes and slices of the same float32 values: bit for bit.
    out = tmp_path / "hf"
    export.export(jax.tree.map(jnp.asarray, params), cfg, out)
    assert_same_tensors(out, src)
    assert hf_fields(out) == hf_fields(src)


def test_cli_import_of_fixture_exports_back_and_training_resumes(tmp_path, tiny_data):
    src, tokens, want = load_fixture("llama-gqa")
    run = tmp_path / "runs" / "llama"
    experiment = ROOT / "experiments" / "tiny.py"
    sets = [f"data.dir={tiny_data}", "train.steps=2", "train.eval_every=0", "mesh.data=8"]
    argv = ["import", "--from", str(src), "--out", str(run), "--experiment", str(experiment), "--set", *sets]
    assert cli.main(argv) == 0
    cfg, params, _, _ = checkpoint.load_params(run)
    assert cfg.model.n_kv_heads == 2 and not cfg.model.tie_embeddings and cfg.data.tokenizer == "bytes"
    assert cfg.model.seq_len == load_config(experiment).model.seq_len  # rope: the experiment's window
    assert_close(jaxlm_logits(params, cfg.model, tokens), want, cfg.model)

    out = tmp_path / "hf"  # through the checkpoint and back: the same tensors, the same model
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert_same_tensors(out, src)
    assert hf_fields(out) == hf_fields(src) | {"seq_len": cfg.model.seq_len}

    resumed = load_config(run / "experiment.py")
    assert to_dict(resumed) == to_dict(cfg)
    summary = train.run(resumed, resume=True)
    assert summary["step"] == 2 and np.isfinite(summary["train_loss"])
    assert checkpoint.complete_steps(run / "checkpoints")[-1] == 2
    log = (run / "log.txt").read_text()  # the checkpoint is exactly what train.py would restore
    assert "optimizer state not restored" not in log and "config changed" not in log, log


# --------------------------------------------------------------------------------------------
# Export (no torch): sharded files, export -> import is bit-exact, bfloat16 is the rounded tensors.
# --------------------------------------------------------------------------------------------

EXPORT_CASES = {
    "gpt2-tied-sharded": (small(**GPT2), "20KB"),
    "gpt2-untied": (small(**GPT2, tie_embeddings=False, norm_eps=1e-3), "2GB"),
    "llama-gqa-tied": (small(**LLAMA, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-6), "2GB"),
    "llama-untied-bias-headdim": (
        small(**LLAMA | dict(use_bias=True), tie_embeddings=False, n_kv_heads=1, head_dim=16),
        "30KB",
    ),
    # Mixtral: jaxlm's dropless top-2 experts in every layer (transformers' fused expert tensors).
    "mixtral-top2": (small(**LLAMA, n_kv_heads=2, moe_experts=4, moe_top_k=2, tie_embeddings=False), "2GB"),
}


def export_case(tmp_path: Path, case: str, capsys) -> tuple[ModelConfig, Config, dict, Path]:
    """A random checkpoint of EXPORT_CASES[case] exported by `jaxlm export`: (model, config, params, dir)."""
    m, shard = EXPORT_CASES[case]
    cfg, params = write_checkpoint(tmp_path, m)
    out = tmp_path / "hf"
    argv = ["export", "--checkpoint", str(cfg.run_path), "--out", str(out)]
    assert cli.main(argv + ["--max-shard-size", shard]) == 0
    assert "no transformers equivalent" in capsys.readouterr().out  # bytes tokenizer: no files
    assert not (out / "vocab.json").exists()
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (shard != "2GB")
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) > 1 and all((out / f).is_file() for f in files)
    return m, cfg, params, out


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_round_trips_bit_exact(tmp_path, case, capsys):
    m, cfg, params, out = export_case(tmp_path, case, capsys)
    # Import (checkpoint writing aside, which the CLI test covers) gives the params back.
    back = importer.import_config(out, tmp_path / "runs" / "back", tokenizer="bytes").model
    assert {k: getattr(back, k) for k in ARCHITECTURE_KEYS} == {k: getattr(m, k) for k in ARCHITECTURE_KEYS}
    assert_same_params(importer.params_from_hf(SafetensorsDir(out), back), params, m)

    if case == "llama-gqa-tied":  # --dtype bfloat16: the same tensors, rounded
        export.export(params, cfg, tmp_path / "bf16", dtype="bfloat16")
        assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
        f32, bf16 = SafetensorsDir(out), SafetensorsDir(tmp_path / "bf16")
        assert set(f32.where) == set(bf16.where)
        for name in f32.where:
            assert bf16[name].dtype == jnp.bfloat16
            np.testing.assert_array_equal(bf16[name], f32[name].astype(jnp.bfloat16))


# --------------------------------------------------------------------------------------------
# Live transformers (CPU torch, float32): skipped where torch or transformers is not installed.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    """The transformers module for the live tests (torch must import too)."""
    why = "no torch/transformers: live test skipped (README, 'Run the tests', says how to install them)"
    pytest.importorskip("torch", reason=why)
    return pytest.importorskip("transformers", reason=why)


def load_hf(transformers, directory: Path):
    """from_pretrained with every transformers log record captured; none is allowed."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = transformers.logging.get_logger("transformers")
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, output_loading_info=True
        )
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    return hf_model.eval()


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens).long()).logits.numpy()


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_fixture_logits_are_what_transformers_computes(transformers, name):
    """The stored logits are transformers' for the stored weights (with the installed version:
    a fixture made stale by a change in transformers fails here)."""
    src, tokens, want = load_fixture(name)
    assert_close(hf_logits(load_hf(transformers, src), tokens), want, ModelConfig(**hf_fields(src)))


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_transformers_with_jaxlm_logits(transformers, tmp_path, case, capsys):
    m, _, params, out = export_case(tmp_path, case, capsys)
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (3, m.seq_len))
    assert_close(hf_logits(load_hf(transformers, out), tokens), jaxlm_logits(params, m, tokens), m)


def test_gpt2_tokenizer_files_load_in_transformers_and_import_detects_them(transformers, tmp_path):
    """A randomly initialised transformers GPT-2 with GPT-2's vocabulary: imported with the gpt2
    tokenizer detected, its logits reproduced by jaxlm, and exported back with tokenizer files."""
    import torch

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=8, n_embd=16, n_layer=1, n_head=2, layer_norm_epsilon=1e-5
    )
    src_model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in src_model.parameters():
            p.normal_(0.0, 0.3)
    src = tmp_path / "src"
    src_model.save_pretrained(src)
    shutil.copyfile(GPT2_DIR / "encoder.json", src / "vocab.json")
    shutil.copyfile(GPT2_DIR / "vocab.bpe", src / "merges.txt")

    run = tmp_path / "runs" / "gpt2"
    cfg = importer.import_model(src, run)["config"]
    assert cfg.data.tokenizer == "gpt2" and cfg.model.vocab_size == 50257 and cfg.model.seq_len == 8
    params = checkpoint.load_params(run).params
    tokens = np.random.default_rng(1).integers(0, 50257, (2, 8))
    assert_close(jaxlm_logits(params, cfg.model, tokens), hf_logits(src_model.eval(), tokens), cfg.model)

    out = tmp_path / "hf"
    summary = export.export_checkpoint(run, out)
    assert summary["tokenizer"] == [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "Hello world, it's jaxlm!\n  Ünïcödé  tokens<|endoftext|>"
    assert tok(text)["input_ids"] == get_tokenizer("gpt2").encode(text.replace("<|endoftext|>", "")) + [50256]
    assert tok.eos_token_id == 50256 == json.loads((out / "config.json").read_text())["eos_token_id"]
    assert_close(hf_logits(load_hf(transformers, out), tokens), hf_logits(src_model, tokens), cfg.model)
    assert_same_tensors(out, src)  # transformers -> jaxlm checkpoint -> transformers: bit-exact


def test_fixture_script_writes_models_that_import_with_their_logits(transformers, tmp_path):
    """make_hf_fixtures.py run with the installed torch + transformers: what this transformers
    version saves (config keys, tensor names) imports into jaxlm with the logits it computed."""
    path = FIXTURES.parent / "make_hf_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_hf_fixtures", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(script.MODELS) == sorted(FIXTURE_MODELS)
    for name in script.MODELS:
        src = tmp_path / name
        m = ModelConfig(**hf_fields(src))
        params = importer.params_from_hf(SafetensorsDir(src), m, str(src))
        assert_close(jaxlm_logits(params, m, np.load(src / "tokens.npy")), np.load(src / "logits.npy"), m)


# --------------------------------------------------------------------------------------------
# Refusals: named options, nothing written.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(LLAMA, positions="sinusoidal"), "model.positions='sinusoidal'"),
        (dict(LLAMA, norm="layernorm"), "model.norm='layernorm'"),
        (dict(LLAMA, mlp="gelu"), "model.mlp='gelu'"),
        (dict(GPT2, n_kv_heads=2), "model.n_kv_heads=2"),
        (dict(GPT2, use_bias=False), "model.use_bias=False"),
        (dict(GPT2, norm="rmsnorm"), "model.norm='rmsnorm'"),
        (dict(GPT2, mlp="swiglu"), "model.mlp='swiglu'"),
        (dict(GPT2, head_dim=16), "model.head_dim=16"),
        (dict(LLAMA, qk_norm=True), "model.qk_norm=True"),
        (dict(GPT2, qk_norm=True), "model.qk_norm=True"),
        (dict(LLAMA, mlp="relu2"), "model.mlp='relu2'"),
        (dict(GPT2, mlp="relu2"), "model.mlp='relu2'"),
        (dict(LLAMA, attention_window=4), "model.attention_window=4: GPT-2 and Llama attend over the whole"),
        (dict(GPT2, attention_window=4, global_every=2), "model.attention_window=4 (global_every=2)"),
        (dict(LLAMA, moe_experts=4, moe_shared_expert=True), "model.moe_shared_expert=True: a shared expert"),
        (dict(LLAMA, moe_experts=4, moe_every=2), "model.moe_every=2: dense layers between sparse ones"),
        (dict(LLAMA, moe_experts=4, moe_capacity_factor=1.25), "(Mixtral is dropless)"),
        (dict(LLAMA, moe_experts=4, moe_top_k=1), "model.moe_top_k=1"),
    ],
)
def test_unrepresentable_options_are_refused_by_name(kw, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        arch.architecture(small(**kw))


def test_z_loss_is_training_only_and_exports():
    """The z-loss shapes training, not the weights: a model trained with it exports as without it."""
    for kw, want in ((LLAMA, "llama"), (GPT2, "gpt2")):
        m = small(**kw, z_loss=1e-4)
        assert arch.architecture(m) == want
        arch.tensor_table(m)  # the table check passes too


def test_refused_export_writes_nothing(tmp_path):
    """Refusals come before any parameter is fetched (params=None is never touched)."""
    cfg = Config(model=small(**dict(LLAMA, norm="layernorm")))
    with pytest.raises(ConfigError, match="model.norm='layernorm'"):
        export.export(None, cfg, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export.export(None, Config(model=small(**LLAMA)), tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def edit_config(directory: Path, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_import_refusals(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "llama-gqa", src)
    run = tmp_path / "runs" / "x"

    def refused(match, tokenizer="bytes", **kw):
        with pytest.raises(ConfigError, match=match):
            importer.import_model(src, run, tokenizer, **kw)
        assert not run.exists()

    refused("pass --tokenizer", tokenizer=None)
    refused("model.d_model=64 differs", overrides={"model.d_model": "64"})
    edit_config(src, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    refused("rope_scaling.rope_type='llama3'")
    edit_config(src, rope_scaling=None, hidden_act="gelu")
    refused("hidden_act='gelu'")
    edit_config(src, hidden_act="silu", intermediate_size=64)
    refused(r"mlp.gate_proj.weight' has shape \(48, 32\) but config.json implies \(64, 32\)")
    edit_config(src, intermediate_size=48, model_type="bert")
    refused("model_type='bert' is not supported")
    edit_config(src, model_type="llama", num_hidden_layers=1)
    refused(r"tensors \['model.layers.1.input_layernorm.weight'")
    edit_config(src, num_hidden_layers=3)
    refused("'model.layers.2.input_layernorm.weight' is missing")
    edit_config(src, num_hidden_layers=2, vocab_size=200)
    refused("has 257 tokens but the model only 200")


# --------------------------------------------------------------------------------------------
# The tensor table against model.param_decls, both ways: a weight the table does not cover, an
# entry whose param is gone, a shape the conversion does not give: refused by name.
# --------------------------------------------------------------------------------------------

TABLE_CASES = {  # the four tables: GPT-2 and Llama, each tied and untied, Llama with and without biases
    "gpt2-tied": small(**GPT2),
    "gpt2-untied": small(**GPT2, tie_embeddings=False),
    "llama-tied": small(**LLAMA),
    "llama-untied-bias": small(**LLAMA | dict(use_bias=True), tie_embeddings=False),
}


def patch_decls(monkeypatch, edit):
    """model.param_decls with ``edit(decls, m)`` applied: the model changed, its HF table not."""
    declared = model.param_decls

    def patched(m):
        decls = declared(m)
        edit(decls, m)
        return decls

    monkeypatch.setattr(model, "param_decls", patched)


def assert_both_refuse(m: ModelConfig, tmp_path: Path, *names: str):
    """Export and import refuse ``m`` naming each of ``names``, before touching a tensor (export
    gets no params, import no tensors) and with nothing written."""
    match = "".join(f"(?=.*{re.escape(n)})" for n in names)
    with pytest.raises(ConfigError, match=match):
        export.export(None, Config(model=m), tmp_path / "hf")
    with pytest.raises(ConfigError, match=match):
        importer.params_from_hf({}, m)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_a_declared_weight_without_a_table_entry_is_refused_by_name(monkeypatch, tmp_path, case):
    m = TABLE_CASES[case]
    arch.tensor_table(m)  # the real declarations pass

    def add_q_norm(decls, m):
        decls["blocks"]["attn"]["q_norm"] = model.Weight(
            (m.n_layers, m.dim_per_head), ("layers", None), False
        )

    patch_decls(monkeypatch, add_q_norm)
    assert_both_refuse(m, tmp_path, "param 'blocks/attn/q_norm' (2, 8) has no tensor")


# Per table, a param it maps that is then removed from the declarations (where the tables differ:
# fused c_attn.bias, lm_head of an untied model, SwiGLU's gate, Llama's biases).
GONE = {
    "gpt2-tied": ("blocks/attn/k_bias", "transformer.h.{i}.attn.c_attn.bias"),
    "gpt2-untied": ("unembed", "lm_head.weight"),
    "llama-tied": ("blocks/mlp/gate", "model.layers.{i}.mlp.gate_proj.weight"),
    "llama-untied-bias": ("blocks/attn/o_bias", "model.layers.{i}.self_attn.o_proj.bias"),
}


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_a_table_entry_without_a_declared_weight_is_refused_by_name(monkeypatch, tmp_path, case):
    path, tensor = GONE[case]

    def remove(decls, m):
        *parents, last = path.split("/")
        node = decls
        for key in parents:
            node = node[key]
        del node[last]

    patch_decls(monkeypatch, remove)
    assert_both_refuse(
        TABLE_CASES[case], tmp_path, f"tensor {tensor!r} maps to {path!r}, which model.param_decls"
    )


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_a_declared_shape_the_table_does_not_give_is_refused_by_name(monkeypatch, tmp_path, case):
    m = TABLE_CASES[case]

    def widen_up(decls, m):
        decls["blocks"]["mlp"]["up"] = model.Weight(
            (m.n_layers, m.d_model, m.d_ff + 1), ("layers", "embed", "mlp"), True
        )

    patch_decls(monkeypatch, widen_up)
    tensor = (
        "transformer.h.{i}.mlp.c_fc.weight"
        if case.startswith("gpt2")
        else "model.layers.{i}.mlp.up_proj.weight"
    )
    assert_both_refuse(m, tmp_path, f"tensor {tensor!r} has shape", "gives (")


def test_a_param_in_two_table_entries_is_refused(monkeypatch, tmp_path):
    m = TABLE_CASES["llama-tied"]
    real = arch._llama_tensors
    monkeypatch.setattr(
        arch, "_llama_tensors", lambda m: real(m) + [arch._same("extra.weight", "final_norm/scale", (32,))]
    )
    assert_both_refuse(
        m, tmp_path, "param 'final_norm/scale' is in both tensor 'model.norm.weight' and 'extra.weight'"
    )


def test_import_checks_from_hf_against_the_declarations(monkeypatch):
    """from_hf is checked on the tensors it converts: an entry whose from_hf forgets its transpose
    gives up [L, F, D] for the declared [L, D, F], and import stops naming the param."""
    real = arch._llama_tensors

    def no_transpose(m):
        return [
            dataclasses.replace(t, from_hf=lambda w: (w,)) if t.name.endswith("up_proj.weight") else t
            for t in real(m)
        ]

    monkeypatch.setattr(arch, "_llama_tensors", no_transpose)
    src = FIXTURES / "llama-gqa"
    m = ModelConfig(**hf_fields(src))
    with pytest.raises(AssertionError, match=re.escape("blocks/mlp/up: (2, 48, 32), declared (2, 32, 48)")):
        importer.params_from_hf(SafetensorsDir(src), m, str(src))


def test_cli_refuses_a_model_whose_weights_the_table_does_not_cover(monkeypatch, tmp_path, capsys):
    """One error line naming the weight, no traceback, nothing written: `jaxlm export` of a
    checkpoint and `jaxlm import` of a fixture, with a weight added to the declarations."""
    m = TABLE_CASES["llama-tied"]
    cfg, _ = write_checkpoint(tmp_path, m)

    def add_scale(decls, m):
        decls["embed_norm"] = {"scale": model.Weight((m.d_model,), ("embed",), False, "ones")}

    patch_decls(monkeypatch, add_scale)
    out, run = tmp_path / "hf", tmp_path / "runs" / "imported"
    assert cli.main(["export", "--checkpoint", str(cfg.run_path), "--out", str(out)]) != 0
    assert (
        cli.main(["import", "--from", str(FIXTURES / "llama-gqa"), "--out", str(run), "--tokenizer", "bytes"])
        != 0
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(
        e.startswith("error: ") and "'embed_norm/scale' (32,) has no tensor" in e for e in err
    )
    assert not out.exists() and not run.exists()


def test_export_refuses_a_flax_nnx_module_by_name():
    m = dataclasses.replace(load_config(ROOT / "experiments" / "nnx_gpt.py").model)
    with pytest.raises(ConfigError, match=r"cannot export model.module='experiments/nnx_gpt.py:GPT'"):
        arch.architecture(m)
