"""Hugging Face interop: exported models give jaxlm's logits in transformers, imported ones give
transformers' logits in jaxlm, export -> import is bit-exact, and what no HF architecture
represents is refused by name. torch/transformers run on CPU in float32."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxlm import checkpoint, cli, hf, model, train
from jaxlm.config import CheckpointConfig, Config, ConfigError, DataConfig, ModelConfig, load_config, to_dict
from jaxlm.data.tokenizer import GPT2_DIR, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
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
    opt_state = jax.jit(train.make_tx(cfg).init)(params)
    state = {"step": jnp.array(step, jnp.int32), "params": params, "opt_state": opt_state}
    saver = checkpoint.Checkpointer(cfg.run_path / "checkpoints", cfg.checkpoint)
    assert saver.save(step, state, to_dict(cfg)) and saver.wait()
    saver.close()
    return cfg, params


def jaxlm_logits(params, m: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(
        jax.jit(model.forward, static_argnums=4)(params, jnp.asarray(tokens), positions, None, m)
    )


def load_hf(directory: Path):
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
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens)).logits.numpy()


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4):
    assert actual.shape == expected.shape
    err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert scale > 1.0, "logits too small to make the comparison meaningful"
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x max |logit| {scale:.3g}"


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


# --------------------------------------------------------------------------------------------
# Export: logits match transformers; export -> import is bit-exact.
# --------------------------------------------------------------------------------------------

EXPORT_CASES = {
    "gpt2-tied-sharded": (small(**GPT2), "20KB"),
    "gpt2-untied": (small(**GPT2, tie_embeddings=False, norm_eps=1e-3), "2GB"),
    "llama-gqa-tied": (small(**LLAMA, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-6), "2GB"),
    "llama-untied-bias-headdim": (
        small(**LLAMA | dict(use_bias=True), tie_embeddings=False, n_kv_heads=1, head_dim=16),
        "30KB",
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_matches_transformers_and_round_trips(tmp_path, case, capsys):
    m, shard = EXPORT_CASES[case]
    cfg, params = write_checkpoint(tmp_path, m)
    out = tmp_path / "hf"
    argv = ["export", "--checkpoint", str(cfg.run_path), "--format", "hf", "--out", str(out)]
    assert cli.main(argv + ["--max-shard-size", shard]) == 0
    assert "no transformers equivalent" in capsys.readouterr().out  # bytes tokenizer: no files
    assert not (out / "vocab.json").exists()
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (shard != "2GB")
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) > 1 and all((out / f).is_file() for f in files)

    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (3, m.seq_len))
    hf_model = load_hf(out)
    assert_close(hf_logits(hf_model, tokens), jaxlm_logits(params, m, tokens))

    # Import (checkpoint writing aside, which the other tests cover) gives the params back.
    back = hf.import_config(out, tmp_path / "runs" / "back", tokenizer="bytes").model
    assert {k: getattr(back, k) for k in hf.ARCHITECTURE_KEYS} == {
        k: getattr(m, k) for k in hf.ARCHITECTURE_KEYS
    }
    assert_same_params(hf.params_from_hf(hf.SafetensorsDir(out), back), params, m)

    if case == "llama-gqa-tied":  # --dtype bfloat16: the same tensors, rounded
        hf.export(params, cfg, tmp_path / "bf16", dtype="bfloat16")
        assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
        f32, bf16 = hf.SafetensorsDir(out), hf.SafetensorsDir(tmp_path / "bf16")
        assert set(f32.where) == set(bf16.where)
        for name in f32.where:
            assert bf16[name].dtype == jnp.bfloat16
            np.testing.assert_array_equal(bf16[name], f32[name].astype(jnp.bfloat16))


def test_gpt2_tokenizer_files_load_in_transformers_and_import_detects_them(tmp_path):
    """A randomly initialised transformers GPT-2 with GPT-2's vocabulary: imported with the gpt2
    tokenizer detected, its logits reproduced by jaxlm, and exported back with tokenizer files."""
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
    cfg = hf.import_model(src, run)["config"]
    assert cfg.data.tokenizer == "gpt2" and cfg.model.vocab_size == 50257 and cfg.model.seq_len == 8
    _, params, _ = checkpoint.load_params(run)
    tokens = np.random.default_rng(1).integers(0, 50257, (2, 8))
    assert_close(jaxlm_logits(params, cfg.model, tokens), hf_logits(src_model.eval(), tokens))

    out = tmp_path / "hf"
    summary = hf.export_checkpoint(run, out)
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
    assert_close(hf_logits(load_hf(out), tokens), hf_logits(src_model, tokens))
    before, after = hf.SafetensorsDir(src), hf.SafetensorsDir(out)
    assert set(before.where) == set(after.where)
    for name in before.where:  # transformers -> jaxlm checkpoint -> transformers: bit-exact
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


# --------------------------------------------------------------------------------------------
# Import: a random transformers Llama reproduced in jaxlm, and training continues from it.
# --------------------------------------------------------------------------------------------


def random_llama(directory: Path, vocab_size: int, **kw) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **kw,
    )
    hf_model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0.0, 0.3)
    hf_model.save_pretrained(directory)
    return hf_model.eval()


def test_import_llama_reproduces_logits_and_training_resumes(tmp_path, tiny_data):
    src = tmp_path / "src"
    hf_model = random_llama(src, vocab_size=257)
    run = tmp_path / "runs" / "llama"
    experiment = ROOT / "experiments" / "tiny.py"
    sets = [f"data.dir={tiny_data}", "train.steps=2", "train.eval_every=0", "mesh.data=8"]
    argv = ["import", "--from", str(src), "--out", str(run), "--experiment", str(experiment), "--set", *sets]
    assert cli.main(argv) == 0
    cfg, params, _ = checkpoint.load_params(run)
    assert cfg.model.n_kv_heads == 2 and not cfg.model.tie_embeddings and cfg.data.tokenizer == "bytes"
    assert cfg.model.seq_len == load_config(experiment).model.seq_len  # rope: the experiment's window
    tokens = np.random.default_rng(2).integers(0, 257, (2, cfg.model.seq_len))
    assert_close(jaxlm_logits(params, cfg.model, tokens), hf_logits(hf_model, tokens))

    resumed = load_config(run / "experiment.py")
    assert to_dict(resumed) == to_dict(cfg)
    summary = train.run(resumed, resume=True)
    assert summary["step"] == 2 and np.isfinite(summary["train_loss"])
    assert checkpoint.complete_steps(run / "checkpoints")[-1] == 2
    log = (run / "log.txt").read_text()  # the checkpoint is exactly what train.py would restore
    assert "optimizer state not restored" not in log and "config changed" not in log, log


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
    ],
)
def test_unrepresentable_options_are_refused_by_name(kw, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        hf.architecture(small(**kw))


def test_refused_export_writes_nothing(tmp_path):
    """Refusals come before any parameter is fetched (params=None is never touched)."""
    cfg = Config(model=small(**dict(LLAMA, norm="layernorm")))
    with pytest.raises(ConfigError, match="model.norm='layernorm'"):
        hf.export(None, cfg, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        hf.export(None, Config(model=small(**LLAMA)), tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def edit_config(directory: Path, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_import_refusals(tmp_path):
    src = tmp_path / "src"
    random_llama(src, vocab_size=300)
    run = tmp_path / "runs" / "x"

    def refused(match, tokenizer="bytes", **kw):
        with pytest.raises(ConfigError, match=match):
            hf.import_model(src, run, tokenizer, **kw)
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
