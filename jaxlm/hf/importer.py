"""``jaxlm import``: a transformers GPT-2 or Llama directory (config.json + safetensors) -> a
jaxlm run directory with a step-0 checkpoint that ``jaxlm train --resume`` continues.

The architecture comes from the directory's config.json; everything else (data, optim, train,
mesh, the non-architecture model settings) from an experiment file or the defaults, then --set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxlm.config import Config, ConfigError, ModelConfig
from jaxlm.files import write_json
from jaxlm.hf.arch import architecture, declared_shapes, tensor_table
from jaxlm.hf.config_json import ARCHITECTURE_KEYS, model_fields_from_hf
from jaxlm.hf.safetensors import SafetensorsDir


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
    names = list(tensors)
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
    declared = declared_shapes(m)  # tensor_table checked the names and to_hf; this is from_hf
    wrong = [f"{p}: {x.shape}, declared {declared[p]}" for p, x in flat.items() if x.shape != declared[p]]
    if wrong:  # a table bug in jaxlm/hf/arch.py, not in the user's files
        raise AssertionError(
            f"from_hf of the {architecture(m)} table gives params unlike model.param_decls: {wrong}"
        )
    return traverse_util.unflatten_dict(flat, sep="/")


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

    from jaxlm import checkpoint, lm, sharding, state
    from jaxlm.config import to_dict

    src, out = Path(src), Path(out)
    cfg = import_config(src, out, tokenizer, experiment, overrides)
    params_np = params_from_hf(SafetensorsDir(src), cfg.model, str(src))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new run directory")

    # Place params sharded (as training would) and build the fresh optimizer state next to them.
    mesh = sharding.loading_mesh(cfg.model, lm.get(cfg.model).decls)
    sh = state.state_shardings(cfg, mesh)
    params = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]), params_np, sh.params
    )
    train_state = state.from_params(cfg, params, sh)
    created = not out.exists()
    errors: list[str] = []
    saver = checkpoint.Checkpointer(
        out / "checkpoints", dataclasses.replace(cfg.checkpoint, async_save=False), say=errors.append
    )
    try:
        ok = saver.save(0, train_state.as_tree(), to_dict(cfg)) and saver.wait()
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


def main(args: argparse.Namespace) -> int:
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
