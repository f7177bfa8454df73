"""Hugging Face ``transformers`` interop: export a checkpoint, import a model.

``jaxlm export`` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained``
loads as ``GPT2LMHeadModel`` (learned positions, LayerNorm, GELU-tanh MLP, biases) or
``LlamaForCausalLM`` (rope, RMSNorm, SwiGLU, GQA); ``jaxlm import`` turns such a directory back
into a jaxlm checkpoint that ``jaxlm train --resume`` continues. A model with an option neither
architecture has is refused, naming the option.

Neither direction needs torch, transformers or safetensors: safetensors is a JSON header and raw
little-endian bytes, written and read here. Export fetches one per-layer tensor at a time from the
(possibly sharded) params and writes it before fetching the next, so a model larger than one
device's memory, or than the host's, still exports. Every tensor is described once, in
``_gpt2_tensors`` / ``_llama_tensors``, with its conversion in both directions.

Layouts: jaxlm blocks are stacked on a leading layers axis; q [L,D,H,K], k/v [L,D,G,K],
o [L,H,K,D], up/gate [L,D,F], down [L,F,D], embed [V_padded,D], unembed [D,V_padded].
transformers' Llama stores nn.Linear weights [out, in]; GPT-2 stores Conv1D weights [in, out] and
fuses q, k, v into one c_attn [D, 3D]. Vocabulary padding rows are dropped on export and re-padded
with zeros on import (padding logits are masked, so those rows never matter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm.config import Config, ConfigError, MeshConfig, ModelConfig
from jaxlm.files import write_json

# ============================================================================================
# Which transformers architecture represents a model.
# ============================================================================================


def architecture(m: ModelConfig) -> str:
    """``"gpt2"`` or ``"llama"``; a ConfigError listing every option that neither represents."""
    if m.positions == "sinusoidal":
        raise ConfigError(
            "cannot export to Hugging Face: model.positions='sinusoidal': transformers' GPT-2 has learned "
            "positions and Llama has rope; no Hugging Face causal-LM architecture adds fixed sinusoids"
        )
    problems = []
    arch = "gpt2" if m.positions == "learned" else "llama"
    if arch == "gpt2":
        want = {"norm": "layernorm", "mlp": "gelu", "use_bias": True}
        why = "learned positions are GPT-2 (GPT2LMHeadModel), which has"
        if m.kv_heads != m.n_heads:
            problems.append(
                f"model.n_kv_heads={m.n_kv_heads} with learned positions: GPT-2 has no grouped-query "
                "attention (use n_kv_heads=None, or rope for a Llama model)"
            )
        if m.dim_per_head * m.n_heads != m.d_model:
            problems.append(
                f"model.head_dim={m.head_dim} with learned positions: GPT-2 needs head_dim = "
                f"d_model / n_heads = {m.d_model / m.n_heads:g}"
            )
    else:
        want = {"norm": "rmsnorm", "mlp": "swiglu"}
        why = "rope is Llama (LlamaForCausalLM), which has"
    for key, value in want.items():
        if getattr(m, key) != value:
            problems.append(
                f"model.{key}={getattr(m, key)!r} with model.positions={m.positions!r}: {why} {key}={value!r}"
            )
    if problems:
        raise ConfigError("cannot export to Hugging Face: " + "; ".join(problems))
    return arch


# ============================================================================================
# The tensor tables: each Hugging Face tensor, the jaxlm leaves it is made of, both conversions.
# ============================================================================================


@dataclass(frozen=True)
class Tensor:
    name: str
    """Hugging Face name; ``{i}`` stands for the layer index of a per-layer tensor."""
    parts: tuple[str, ...]
    """jaxlm param paths ("blocks/attn/q"); a per-layer tensor takes layer i of each."""
    shape: tuple[int, ...]
    to_hf: Callable[..., np.ndarray]
    """jaxlm part arrays (one layer of each) -> the HF array."""
    from_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    """The HF array -> the jaxlm part arrays (one layer of each)."""

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


def _same(name, part, shape):
    return Tensor(name, (part,), shape, lambda x: x, lambda x: (x,))


def _transposed(name, part, shape):
    return Tensor(name, (part,), shape, lambda x: x.T, lambda x: (x.T,))


def _vocab_rows(name, m: ModelConfig):
    """[V_padded, D] -> [V, D]: padding rows dropped, and re-added as zeros on import."""
    pad = m.padded_vocab - m.vocab_size
    return Tensor(
        name,
        ("embed",),
        (m.vocab_size, m.d_model),
        lambda e: e[: m.vocab_size],
        lambda e: (np.pad(e, ((0, pad), (0, 0))),),
    )


def _lm_head(m: ModelConfig):
    """Untied unembed [D, V_padded] -> lm_head.weight [V, D] (nn.Linear [out, in])."""
    pad = m.padded_vocab - m.vocab_size
    return Tensor(
        "lm_head.weight",
        ("unembed",),
        (m.vocab_size, m.d_model),
        lambda u: u[:, : m.vocab_size].T,
        lambda w: (np.pad(w.T, ((0, 0), (0, pad))),),
    )


def _gpt2_tensors(m: ModelConfig) -> list[Tensor]:
    D, H, K, F = m.d_model, m.n_heads, m.dim_per_head, m.d_ff
    h = "transformer.h.{i}."
    # c_attn is one Conv1D [D, 3D]: the columns are q | k | v, each head-major (H, K).
    c_attn = Tensor(
        h + "attn.c_attn.weight",
        ("blocks/attn/q", "blocks/attn/k", "blocks/attn/v"),
        (D, 3 * H * K),
        lambda q, k, v: np.concatenate([x.reshape(D, H * K) for x in (q, k, v)], axis=1),
        lambda w: tuple(x.reshape(D, H, K) for x in np.split(w, 3, axis=1)),
    )
    c_attn_bias = Tensor(
        h + "attn.c_attn.bias",
        ("blocks/attn/q_bias", "blocks/attn/k_bias", "blocks/attn/v_bias"),
        (3 * H * K,),
        lambda q, k, v: np.concatenate([x.reshape(-1) for x in (q, k, v)]),
        lambda b: tuple(x.reshape(H, K) for x in np.split(b, 3)),
    )
    c_proj = Tensor(
        h + "attn.c_proj.weight",
        ("blocks/attn/o",),
        (H * K, D),
        lambda o: o.reshape(H * K, D),
        lambda w: (w.reshape(H, K, D),),
    )
    out = [
        _vocab_rows("transformer.wte.weight", m),
        _same("transformer.wpe.weight", "pos_embed", (m.seq_len, D)),
        _same(h + "ln_1.weight", "blocks/attn_norm/scale", (D,)),
        _same(h + "ln_1.bias", "blocks/attn_norm/bias", (D,)),
        c_attn,
        c_attn_bias,
        c_proj,
        _same(h + "attn.c_proj.bias", "blocks/attn/o_bias", (D,)),
        _same(h + "ln_2.weight", "blocks/mlp_norm/scale", (D,)),
        _same(h + "ln_2.bias", "blocks/mlp_norm/bias", (D,)),
        _same(h + "mlp.c_fc.weight", "blocks/mlp/up", (D, F)),
        _same(h + "mlp.c_fc.bias", "blocks/mlp/up_bias", (F,)),
        _same(h + "mlp.c_proj.weight", "blocks/mlp/down", (F, D)),
        _same(h + "mlp.c_proj.bias", "blocks/mlp/down_bias", (D,)),
        _same("transformer.ln_f.weight", "final_norm/scale", (D,)),
        _same("transformer.ln_f.bias", "final_norm/bias", (D,)),
    ]
    return out if m.tie_embeddings else out + [_lm_head(m)]


def _llama_tensors(m: ModelConfig) -> list[Tensor]:
    D, H, G, K, F = m.d_model, m.n_heads, m.kv_heads, m.dim_per_head, m.d_ff
    a, p = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."

    def proj_in(name, part, N):  # [D, N, K] -> nn.Linear weight [N*K, D]
        return Tensor(
            name, (part,), (N * K, D), lambda x: x.reshape(D, N * K).T, lambda w: (w.T.reshape(D, N, K),)
        )

    def head_bias(name, part, N):
        return Tensor(name, (part,), (N * K,), lambda b: b.reshape(-1), lambda b: (b.reshape(N, K),))

    out = [
        _vocab_rows("model.embed_tokens.weight", m),
        _same("model.layers.{i}.input_layernorm.weight", "blocks/attn_norm/scale", (D,)),
        proj_in(a + "q_proj.weight", "blocks/attn/q", H),
        proj_in(a + "k_proj.weight", "blocks/attn/k", G),
        proj_in(a + "v_proj.weight", "blocks/attn/v", G),
        Tensor(
            a + "o_proj.weight",
            ("blocks/attn/o",),
            (D, H * K),
            lambda o: o.reshape(H * K, D).T,
            lambda w: (w.T.reshape(H, K, D),),
        ),
        _same("model.layers.{i}.post_attention_layernorm.weight", "blocks/mlp_norm/scale", (D,)),
        _transposed(p + "gate_proj.weight", "blocks/mlp/gate", (F, D)),
        _transposed(p + "up_proj.weight", "blocks/mlp/up", (F, D)),
        _transposed(p + "down_proj.weight", "blocks/mlp/down", (D, F)),
        _same("model.norm.weight", "final_norm/scale", (D,)),
    ]
    if m.use_bias:  # transformers' attention_bias + mlp_bias: every projection has a bias
        out += [
            head_bias(a + "q_proj.bias", "blocks/attn/q_bias", H),
            head_bias(a + "k_proj.bias", "blocks/attn/k_bias", G),
            head_bias(a + "v_proj.bias", "blocks/attn/v_bias", G),
            _same(a + "o_proj.bias", "blocks/attn/o_bias", (D,)),
            _same(p + "gate_proj.bias", "blocks/mlp/gate_bias", (F,)),
            _same(p + "up_proj.bias", "blocks/mlp/up_bias", (F,)),
            _same(p + "down_proj.bias", "blocks/mlp/down_bias", (D,)),
        ]
    return out if m.tie_embeddings else out + [_lm_head(m)]


def tensor_table(m: ModelConfig) -> list[Tensor]:
    """Every Hugging Face tensor of the model, in the order they are written."""
    return _gpt2_tensors(m) if architecture(m) == "gpt2" else _llama_tensors(m)


# ============================================================================================
# config.json in both directions.
# ============================================================================================


def hf_config(cfg: Config, eot_id: int | None, dtype: str) -> dict[str, Any]:
    """The transformers config.json of ``cfg.model`` (keys understood by transformers 4.45 to 5.x)."""
    m = cfg.model
    special = {"bos_token_id": eot_id, "eos_token_id": eot_id}
    common = {
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "torch_dtype": dtype,
        "use_cache": True,
        **special,
    }
    if architecture(m) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": m.seq_len,
            "n_embd": m.d_model,
            "n_layer": m.n_layers,
            "n_head": m.n_heads,
            "n_inner": m.d_ff,
            "activation_function": "gelu_new",  # the tanh approximation, jaxlm's GELU
            "layer_norm_epsilon": m.norm_eps,
            # jaxlm trains without dropout; keep fine-tuning in transformers the same.
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "attention_bias": m.use_bias,
        "attention_dropout": 0.0,
        "mlp_bias": m.use_bias,
        **common,
    }


ARCHITECTURE_KEYS = (
    "vocab_size",
    "seq_len",
    "n_layers",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "d_ff",
    "positions",
    "rope_theta",
    "norm",
    "norm_eps",
    "mlp",
    "use_bias",
    "tie_embeddings",
)
"""ModelConfig fields an imported model fixes; the others (padding, dtypes, attention backend,
remat, init) are training choices that come from --experiment or the defaults."""


def _refuse(src: str, key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{src}: {key}={value!r} {why}; jaxlm cannot import this model")


def model_fields_from_hf(hf: dict[str, Any], src: str = "config.json") -> dict[str, Any]:
    """The ARCHITECTURE_KEYS values of a transformers GPT-2 or Llama config.json."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            _refuse(src, "activation_function", act, "is not the tanh GELU jaxlm uses")
        for key, ok in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
        ):
            if hf.get(key, ok) != ok:
                _refuse(src, key, hf[key], f"is not supported (jaxlm needs {ok})")
        d = hf["n_embd"]
        return {
            "vocab_size": hf["vocab_size"],
            "seq_len": hf["n_positions"],
            "n_layers": hf["n_layer"],
            "d_model": d,
            "n_heads": hf["n_head"],
            "n_kv_heads": None,
            "head_dim": None,
            "d_ff": hf.get("n_inner") or 4 * d,
            "positions": "learned",
            "rope_theta": ModelConfig.rope_theta,
            "norm": "layernorm",
            "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            "mlp": "gelu",
            "use_bias": True,
            "tie_embeddings": hf.get("tie_word_embeddings", True),
        }
    if kind == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            _refuse(src, "hidden_act", hf["hidden_act"], "is not supported (jaxlm's SwiGLU uses silu)")
        # transformers 5 nests rope settings in rope_parameters; 4.x has rope_theta + rope_scaling.
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        for key, params in (("rope_parameters", rope), ("rope_scaling", scaling)):
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                _refuse(src, f"{key}.rope_type", rope_type, "(scaled rope) is not supported")
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            _refuse(
                src,
                "attention_bias/mlp_bias",
                (hf.get("attention_bias", False), hf.get("mlp_bias", False)),
                "differ; jaxlm's model.use_bias puts biases on all projections or none",
            )
        d, h = hf["hidden_size"], hf["num_attention_heads"]
        g = hf.get("num_key_value_heads") or h
        k = hf.get("head_dim") or d // h
        return {
            "vocab_size": hf["vocab_size"],
            "seq_len": hf["max_position_embeddings"],
            "n_layers": hf["num_hidden_layers"],
            "d_model": d,
            "n_heads": h,
            "n_kv_heads": None if g == h else g,
            "head_dim": None if k * h == d else k,
            "d_ff": hf["intermediate_size"],
            "positions": "rope",
            "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "norm": "rmsnorm",
            "norm_eps": hf.get("rms_norm_eps", 1e-6),
            "mlp": "swiglu",
            "use_bias": bool(hf.get("attention_bias", False)),
            "tie_embeddings": hf.get("tie_word_embeddings", False),
        }
    raise ConfigError(
        f"{src}: model_type={kind!r} is not supported; jaxlm imports 'gpt2' (GPT2LMHeadModel) and "
        "'llama' (LlamaForCausalLM)"
    )


# ============================================================================================
# safetensors, without the safetensors package: an 8-byte header length, a JSON header, raw bytes.
# ============================================================================================

_ST_DTYPES = {"F32": np.dtype("float32"), "F16": np.dtype("float16"), "BF16": np.dtype(jax.numpy.bfloat16)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _write_safetensors(
    path: Path, specs: list[tuple[str, tuple[int, ...], np.dtype]], arrays: Iterator[np.ndarray]
) -> None:
    """Write ``arrays`` (produced one at a time, in ``specs`` order) as one safetensors file."""
    assert sys.byteorder == "little", "safetensors is little-endian; this host is not"
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers checks "format"
    offset = 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _ST_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), arr in zip(specs, arrays, strict=True):
            if arr.shape != shape or arr.dtype != dtype:
                raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, declared {shape} {dtype}")
            f.write(np.ascontiguousarray(arr).view(np.uint8))  # little-endian hosts only


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsDir:
    """The tensors of a Hugging Face model directory (one file or an index of shards), memory-mapped."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            bins = sorted(p.name for p in directory.glob("*.bin"))
            hint = (
                f" (found {bins}: load it in transformers and save_pretrained(DIR, safe_serialization=True))"
                if bins
                else ""
            )
            raise FileNotFoundError(
                f"{directory} has no model.safetensors or model.safetensors.index.json{hint}"
            )
        self.where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for name in files:
            header, start = _read_header(directory / name)
            for key, info in header.items():
                if info["dtype"] not in _ST_DTYPES:
                    raise ConfigError(
                        f"{directory / name}: tensor {key} has dtype {info['dtype']}; jaxlm reads "
                        f"{sorted(_ST_DTYPES)}"
                    )
                self.where[key] = (directory / name, info, start)

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, start = self.where[name]
        begin, end = info["data_offsets"]
        dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ConfigError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {dtype}")
        return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 (bytes); as transformers does."""
    t = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, scale in units.items():
        if t.endswith(unit):
            t, mult = t[: -len(unit)], scale
            break
    else:
        mult = 1
    try:
        value = float(t) * mult
    except ValueError:
        raise ConfigError(f"--max-shard-size={text!r} is not a size; write e.g. 2GB, 500MB or 1GiB") from None
    if value <= 0:
        raise ConfigError(f"--max-shard-size={text!r} must be positive")
    return int(value)


# ============================================================================================
# Export.
# ============================================================================================


def _leaf(params: dict, path: str):
    for key in path.split("/"):
        params = params[key]
    return params


def _to_host(x: jax.Array) -> np.ndarray:
    """One array to this host, gathered from every process when it spans several."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _sharded_mesh(m: ModelConfig) -> jax.sharding.Mesh:
    """All devices, params split over fsdp as far as d_model allows: a model too large for one
    device still loads."""
    from jaxlm import sharding

    n = jax.device_count()
    fsdp = math.gcd(n, m.d_model)
    return sharding.make_mesh(MeshConfig(data=n // fsdp, fsdp=fsdp, tensor=1))


def tokenizer_files(spec: str) -> Path | None:
    """The directory with encoder.json + vocab.bpe of a BPE tokenizer spec, or None (bytes)."""
    from jaxlm.data.tokenizer import GPT2_DIR

    if spec == "bytes":
        return None
    return GPT2_DIR if spec == "gpt2" else Path(spec)


def _write_tokenizer(out: Path, spec: str, seq_len: int) -> list[str]:
    """GPT2Tokenizer files for a BPE tokenizer; nothing for bytes. Returns the names written."""
    src = tokenizer_files(spec)
    if src is None:
        return []
    shutil.copyfile(src / "encoder.json", out / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", out / "merges.txt")
    eot = "<|endoftext|>"
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": seq_len,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


def _shards(specs: list[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int) -> list[list[int]]:
    """Group tensor indices into files of at most ``max_bytes`` (a larger tensor gets its own)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def export(
    params: dict,
    cfg: Config,
    out: str | Path,
    max_shard_size: int = 2 * 10**9,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Write ``params`` (possibly sharded across devices and processes) as a transformers model
    directory ``out``; returns a summary. ``out`` must not exist or be empty; it appears only
    once complete. Every process must call this; process 0 writes."""
    m = cfg.model
    table = tensor_table(m)  # refuses unrepresentable options before anything is fetched
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new directory or delete it")
    np_dtype = np.dtype(jax.numpy.dtype(m.param_dtype if dtype == "auto" else dtype))
    if np_dtype not in _ST_NAMES:
        raise ConfigError(f"--dtype={dtype!r}: choose auto, float32, bfloat16 or float16")
    from jaxlm.data.tokenizer import get_tokenizer

    try:
        eot = get_tokenizer(cfg.data.tokenizer).eot_id
    except (ValueError, FileNotFoundError):  # a tokenizer directory that is gone: ids unknown
        eot = None

    # Whole-model tensors first, then layer by layer: one layer is sliced out of the stacked
    # params at a time (one compiled slice for all layers), and each of its leaves is fetched
    # only when the tensor that needs it is written.
    order = [(t, None) for t in table if not t.per_layer]
    order += [(t, i) for i in range(m.n_layers) for t in table if t.per_layer]
    specs = [(t.name.format(i=i), t.shape, np_dtype) for t, i in order]
    take_layer = jax.jit(
        lambda blocks, i: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), blocks)
    )
    layer: list = [None, None]  # [index, that layer's params on device]

    def produce(indices: list[int]) -> Iterator[np.ndarray]:
        for j in indices:
            t, i = order[j]
            if i is None:
                host = [_to_host(_leaf(params, p)) for p in t.parts]
            else:
                if layer[0] != i:
                    layer[:] = [None, None]  # free the previous layer first
                    layer[:] = [i, take_layer(params["blocks"], i)]
                host = [_to_host(_leaf(layer[1], p.removeprefix("blocks/"))) for p in t.parts]
            yield np.asarray(t.to_hf(*host)).astype(np_dtype)

    writer = jax.process_index() == 0
    tmp = out.parent / f".{out.name}.partial"
    if writer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    groups = _shards(specs, max_shard_size)
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    )
    for name, group in zip(names, groups, strict=True):
        arrays = produce(group)
        if writer:
            _write_safetensors(tmp / name, [specs[j] for j in group], arrays)
        else:  # other processes take part in the gathers
            for _ in arrays:
                pass
    total = sum(math.prod(s) * d.itemsize for _, s, d in specs)
    tokenizer: list[str] = []
    if writer:
        if len(groups) > 1:
            weight_map = {specs[j][0]: name for name, g in zip(names, groups, strict=True) for j in g}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf = hf_config(
            cfg, eot, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[_ST_NAMES[np_dtype]]
        )
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        tokenizer = _write_tokenizer(tmp, cfg.data.tokenizer, m.seq_len)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    return {
        "architecture": "GPT2LMHeadModel" if architecture(m) == "gpt2" else "LlamaForCausalLM",
        "files": names,
        "bytes": total,
        "tensors": len(specs),
        "tokenizer": tokenizer,
    }


def _load_sharded(checkpoint: str | Path):
    """checkpoint.load_params with params split over as many devices as d_model allows (the config,
    and so d_model, is only known inside load_params: try the widest fsdp first)."""
    from jaxlm import checkpoint as ckpt
    from jaxlm import sharding

    n = jax.device_count()
    for fsdp in [d for d in range(n, 0, -1) if n % d == 0]:
        mesh = sharding.make_mesh(MeshConfig(data=n // fsdp, fsdp=fsdp, tensor=1))
        try:
            return ckpt.load_params(checkpoint, mesh)
        except ConfigError as e:
            if fsdp == 1 or "not divisible" not in str(e):
                raise
    raise AssertionError("unreachable: fsdp=1 always divides")


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, max_shard_size: int = 2 * 10**9, dtype: str = "auto"
) -> dict[str, Any]:
    """``jaxlm export``: a run or step directory -> a transformers model directory."""
    cfg, params, step = _load_sharded(checkpoint)
    return export(params, cfg, out, max_shard_size, dtype) | {"step": step}


# ============================================================================================
# Import.
# ============================================================================================


def _ignorable(name: str, m: ModelConfig) -> bool:
    """Tensors of some checkpoints that are not weights: GPT-2's causal-mask buffers, old Llama
    rotary frequencies, and the copy of the embedding that some tied checkpoints store as lm_head."""
    buffers = name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
    return buffers or (m.tie_embeddings and name == "lm_head.weight")


def params_from_hf(tensors, m: ModelConfig, src: str = "the model") -> dict:
    """jaxlm params (numpy, ``m.param_dtype``) from a name -> array mapping of Hugging Face tensors.

    Every tensor of the architecture must be present with its exact shape, and every tensor
    present must be used: nothing is silently dropped or invented.
    """
    names = list(tensors.where) if isinstance(tensors, SafetensorsDir) else list(tensors)
    if architecture(m) == "gpt2":  # the original GPT-2 checkpoints have no "transformer." prefix
        rename = {n: n if n.startswith(("transformer.", "lm_head.")) else "transformer." + n for n in names}
    else:
        rename = {n: n for n in names}
    by_name = {new: old for old, new in rename.items()}
    dtype = np.dtype(jax.numpy.dtype(m.param_dtype))
    used, flat = set(), {}
    for t in tensor_table(m):
        layers = []
        for i in range(m.n_layers) if t.per_layer else [None]:
            name = t.name.format(i=i)
            if name not in by_name:
                raise ConfigError(
                    f"{src}: tensor {name!r} is missing; this is not a complete {architecture(m)} model"
                )
            x = tensors[by_name[name]]
            if tuple(x.shape) != t.shape:
                raise ConfigError(
                    f"{src}: tensor {name!r} has shape {tuple(x.shape)} but config.json implies {t.shape}"
                )
            used.add(name)
            layers.append(t.from_hf(np.asarray(x)))
        for k, part in enumerate(t.parts):
            stacked = np.stack([p[k] for p in layers]) if t.per_layer else layers[0][k]
            flat[part] = stacked.astype(dtype)
    extra = sorted(n for n in by_name if n not in used and not _ignorable(n, m))
    if extra:
        raise ConfigError(
            f"{src}: tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} are not part of the "
            f"{architecture(m)} architecture jaxlm maps; refusing to drop them"
        )
    params: dict = {}
    for path, x in flat.items():
        node = params
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = x
    from jaxlm import model

    want = jax.tree.map(
        lambda w: w.shape, model.param_decls(m), is_leaf=lambda x: isinstance(x, model.Weight)
    )
    have = jax.tree.map(lambda x: x.shape, params)
    if want != have:  # a table/declaration mismatch: a bug here, not in the user's files
        raise AssertionError(f"params from {src} do not match model.param_decls:\n{have}\n!=\n{want}")
    return params


def _same_bpe(directory: Path, reference: Path) -> bool:
    """Whether the HF tokenizer files (vocab.json, merges.txt) are the BPE files in ``reference``."""
    try:
        vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        merges = (directory / "merges.txt").read_text(encoding="utf-8").split()
    except (OSError, ValueError):
        return False
    ref_vocab = json.loads((reference / "encoder.json").read_text(encoding="utf-8"))
    return vocab == ref_vocab and merges == (reference / "vocab.bpe").read_text(encoding="utf-8").split()


def _pick_tokenizer(src: Path, vocab_size: int, given: str | None, experiment: Config | None) -> str:
    from jaxlm.data.tokenizer import GPT2_DIR

    if given:
        return given
    if vocab_size == 50257 and _same_bpe(src, GPT2_DIR):
        return "gpt2"
    if experiment is not None:
        return experiment.data.tokenizer
    found = (
        "the GPT-2 tokenizer files differ" if (src / "vocab.json").is_file() else "no vocab.json/merges.txt"
    )
    raise ConfigError(
        f"{src}: cannot tell the tokenizer (vocab_size={vocab_size}, {found}); pass --tokenizer "
        "gpt2 | bytes | DIR (a directory with vocab.bpe + encoder.json)"
    )


def import_config(
    src: str | Path,
    out: str | Path,
    tokenizer: str | None = None,
    experiment: str | Path | None = None,
    overrides: dict[str, str] | None = None,
) -> Config:
    """The jaxlm Config of a transformers model directory: the architecture from its config.json,
    everything else from ``experiment`` (or the defaults), then ``overrides``; the run is ``out``."""
    from jaxlm.config import apply_overrides, load_config

    src, out = Path(src), Path(out)
    path = src / "config.json"
    if not path.is_file():
        raise ConfigError(f"--from {src}: no config.json; pass a directory written by save_pretrained")
    fields = model_fields_from_hf(json.loads(path.read_text()), str(path))
    base = load_config(experiment) if experiment else Config()
    if experiment and fields["positions"] == "rope":  # rope has no position table: seq_len is a choice
        fields["seq_len"] = base.model.seq_len
    tok = _pick_tokenizer(src, fields["vocab_size"], tokenizer, base if experiment else None)
    data = dataclasses.replace(base.data, tokenizer=tok)
    if not experiment:
        data = dataclasses.replace(data, dir=f"data_cache/shakespeare-{Path(tok).name}")
    cfg = dataclasses.replace(
        base,
        name=out.name,
        model=dataclasses.replace(base.model, **fields),
        data=data,
        train=dataclasses.replace(base.train, run_dir=str(out.parent)),
    )
    cfg = apply_overrides(cfg, dict(overrides or {}))
    for key in ARCHITECTURE_KEYS:
        if key == "seq_len" and fields["positions"] == "rope":
            continue
        if getattr(cfg.model, key) != fields[key]:
            raise ConfigError(
                f"model.{key}={getattr(cfg.model, key)!r} differs from the imported model's {fields[key]!r} "
                f"({path}); an imported model's architecture cannot be overridden"
            )
    if (cfg.name, cfg.train.run_dir) != (out.name, str(out.parent)):
        raise ConfigError("name and train.run_dir are set by --out; do not override them")
    from jaxlm.data.tokenizer import get_tokenizer

    try:
        tok_vocab = get_tokenizer(cfg.data.tokenizer).vocab_size
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: {e}") from None
    if tok_vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer!r} has {tok_vocab} tokens but the model only "
            f"{cfg.model.vocab_size}; pass the --tokenizer the model was trained with"
        )
    return cfg


_EXPERIMENT = '''"""Continue pre-training {src}, imported from Hugging Face by `jaxlm import`.

Run:      jaxlm train {out}/experiment.py --resume
Expect:   training starts at step 1 from the imported weights (fresh optimizer, warmup included).
"""

from jaxlm.config import from_dict

CONFIG = {config}


def get_config():
    return from_dict(CONFIG)
'''


def import_model(
    src: str | Path,
    out: str | Path,
    tokenizer: str | None = None,
    experiment: str | Path | None = None,
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``jaxlm import``: a transformers GPT-2 or Llama directory -> a jaxlm run directory ``out``
    holding a step-0 checkpoint (params + fresh optimizer state), config.json and experiment.py."""
    import pprint

    import jax.numpy as jnp

    from jaxlm import checkpoint, train
    from jaxlm.config import to_dict

    src, out = Path(src), Path(out)
    cfg = import_config(src, out, tokenizer, experiment, overrides)
    params_np = params_from_hf(SafetensorsDir(src), cfg.model, str(src))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new run directory")

    # Place params sharded (as training would) and build the fresh optimizer state next to them.
    mesh = _sharded_mesh(cfg.model)
    sh = train.state_shardings(cfg, mesh)
    params = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
        params_np,
        sh["params"],
    )
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"]),
        "params": params,
        "opt_state": jax.jit(train.make_tx(cfg).init, out_shardings=sh["opt_state"])(params),
    }
    created = not out.exists()
    errors: list[str] = []
    saver = checkpoint.Checkpointer(
        out / "checkpoints", dataclasses.replace(cfg.checkpoint, async_save=False), say=errors.append
    )
    try:
        ok = saver.save(0, state, to_dict(cfg)) and saver.wait()
    finally:
        saver.close()
    if not ok:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise OSError(f"writing the checkpoint to {out} failed: {' '.join(errors)}")
    if jax.process_index() == 0:
        write_json(out / "config.json", to_dict(cfg))  # as jaxlm train writes a run's config.json
        config = pprint.pformat(to_dict(cfg), width=100, sort_dicts=False)
        (out / "experiment.py").write_text(_EXPERIMENT.format(src=src, out=out, config=config))
    return {"config": cfg, "tensors": sum(1 for _ in jax.tree.leaves(params_np))}


# ============================================================================================
# Command line.
# ============================================================================================


def export_main(args: argparse.Namespace) -> int:
    """``jaxlm export`` with the arguments ``jaxlm.cli`` parsed."""
    s = export_checkpoint(args.checkpoint, args.out, parse_size(args.max_shard_size), args.dtype)
    print(
        f"wrote {args.out}: {s['architecture']} from step {s['step']}, {s['tensors']} tensors, "
        f"{s['bytes'] / 1e6:.1f} MB in {len(s['files'])} file(s)"
    )
    if s["tokenizer"]:
        print(f"tokenizer: {', '.join(s['tokenizer'])} (transformers' GPT2Tokenizer)")
    else:
        print(
            "tokenizer: none written; the byte tokenizer has no transformers equivalent: feed token ids "
            "directly (UTF-8 byte values 0-255, 256 = end of document)"
        )
    return 0


def import_main(args: argparse.Namespace) -> int:
    """``jaxlm import`` with the arguments ``jaxlm.cli`` parsed."""
    from jaxlm.config import parse_set_args

    s = import_model(args.src, args.out, args.tokenizer, args.experiment, parse_set_args(args.set))
    cfg = s["config"]
    m = cfg.model
    print(
        f"imported {args.src} into {args.out}: {m.n_layers} layers, d_model {m.d_model}, vocab "
        f"{m.vocab_size}, tokenizer {cfg.data.tokenizer!r}, step-0 checkpoint"
    )
    print(f"continue pre-training:  jaxlm train {Path(args.out) / 'experiment.py'} --resume")
    return 0
