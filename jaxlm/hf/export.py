"""``jaxlm export``: jaxlm params (possibly sharded across devices and processes) -> a directory
that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, with no torch needed here.

Export fetches one per-layer tensor at a time from the params and writes it before fetching the
next, so a model larger than one device's memory, or than the host's, still exports.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxlm.config import Config, ConfigError
from jaxlm.hf import safetensors
from jaxlm.hf.arch import HF_CLASSES, architecture, tensor_table
from jaxlm.hf.config_json import hf_config


def _to_host(x: jax.Array) -> np.ndarray:
    """One array to this host, gathered from every process when it spans several."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
    if np_dtype not in safetensors.NAMES:
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

    flat = traverse_util.flatten_dict(params, sep="/")

    def produce() -> Iterator[np.ndarray]:
        for t, i in order:
            if i is None:
                host = [_to_host(flat[p]) for p in t.parts]
            else:
                if layer[0] != i:
                    layer[:] = [None, None]  # free the previous layer first
                    layer[:] = [i, traverse_util.flatten_dict(take_layer(params["blocks"], i), sep="/")]
                host = [_to_host(layer[1][p.removeprefix("blocks/")]) for p in t.parts]
            yield np.asarray(t.to_hf(*host)).astype(np_dtype)

    writer = jax.process_index() == 0  # the other processes take part in the gathers
    tmp = out.parent / f".{out.name}.partial"
    if writer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    names = safetensors.write_dir(tmp, specs, produce(), max_shard_size, write=writer)
    tokenizer: list[str] = []
    if writer:
        hf = hf_config(cfg, eot, np_dtype.name)  # float32, bfloat16 or float16, as torch names them
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        tokenizer = _write_tokenizer(tmp, cfg.data.tokenizer, m.seq_len)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    return {
        "architecture": HF_CLASSES[architecture(m)],
        "files": names,
        "bytes": sum(safetensors.nbytes(s, d) for _, s, d in specs),
        "tensors": len(specs),
        "tokenizer": tokenizer,
    }


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, max_shard_size: int = 2 * 10**9, dtype: str = "auto"
) -> dict[str, Any]:
    """``jaxlm export``: a run or step directory -> a transformers model directory."""
    from jaxlm import checkpoint as ckpt

    cfg, params, step, _ = ckpt.load_params(checkpoint)  # split over fsdp as far as the model allows
    return export(params, cfg, out, max_shard_size, dtype) | {"step": step}


def main(args: argparse.Namespace) -> int:
    """``jaxlm export`` with the arguments ``jaxlm.cli`` parsed."""
    s = export_checkpoint(args.checkpoint, args.out, safetensors.parse_size(args.max_shard_size), args.dtype)
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
