"""Typed, frozen experiment configuration.

An experiment is a Python file exposing ``get_config() -> Config``. The CLI overrides any field
with ``--set section.field=value``; every override is parsed against the field's declared type and
the whole config is validated before anything runs, so a typo fails in milliseconds, not after
compilation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message names it and says how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    module: str = ""
    """'' is jaxlm's transformer; 'FILE.py:Class' or 'package.module:Class' names a flax.nnx.Module
    built as Class(cfg, rngs=nnx.Rngs(key)) from this config (see experiments/nnx_gpt.py)."""
    vocab_size: int = 50257
    """Tokenizer vocabulary size; the embedding is padded up to ``vocab_multiple``."""
    vocab_multiple: int = 128
    """Pad the embedding/unembedding rows to a multiple of this (fast matmuls); pad logits are masked."""
    seq_len: int = 1024
    """Context window T: the model sees T tokens and predicts T targets per window."""
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head)."""
    head_dim: int | None = None
    """Per-head width; None means d_model // n_heads."""
    d_ff: int = 3072
    positions: Literal["learned", "rope", "sinusoidal"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    """gelu: GPT-2's tanh GELU; swiglu: Llama's gated SiLU (adds a ``gate`` weight); relu2: relu(x)²,
    no gate, the same weights as gelu (Primer, So et al. 2021). Hugging Face export represents gelu
    (GPT-2) and swiglu (Llama) and refuses relu2 by name."""
    qk_norm: bool = False
    """RMSNorm of each query and key head over head_dim before rope, with learned scales
    ``blocks/attn/q_norm`` and ``k_norm`` [layers, head_dim] (OLMo 2, Qwen3): bounds the attention
    logits, which lets higher learning rates train stably. Off: GPT-2 and Llama have none, and export
    refuses it by name."""
    use_bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    parametrization: Literal["standard", "mup"] = "standard"
    """standard: every matrix initialised with std ``init_std`` and trained at ``optim.lr``.
    mup: the maximal update parametrization (Tensor Programs V, Yang et al. 2022) for Adam, relative
    to a model of width ``mup_base_width`` (width is d_model; d_ff and the heads should grow with it,
    head_dim may stay fixed): hidden matrices (q, k, v, o, up, gate, down) get init std
    ``init_std * sqrt(base / d_model)`` and learning rate ``optim.lr * base / d_model``; embeddings,
    the output projection, biases and norm scales keep ``init_std`` and ``optim.lr``; the logits are
    multiplied by ``base / d_model``; attention scores are divided by head_dim instead of its square
    root. The best ``optim.lr`` found at the base width then carries over to wider models (docs/mup.md).
    Tied embeddings are allowed: the input and output roles want the same init and learning rate."""
    mup_base_width: int = 64
    """The d_model at which 'mup' uses ``init_std`` and ``optim.lr`` unchanged for every weight (and
    differs from 'standard' only by the 1/head_dim attention scale); read only under 'mup'."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on GPU/TPU; on a CPU bfloat16 only where a quick matmul measurement, cached per
    machine and jax version (jaxlm/cpu_dtype.py), finds it at least 1.5x faster, else float32. A run
    records the dtype it resolved to in config.json and its checkpoints."""
    attention: Literal["auto", "reference", "blockwise", "xla", "cudnn", "splash"] = "auto"
    """Attention backend; auto picks the fastest one that supports the request on this device."""
    attention_window: int = 0
    """Sliding-window (local) attention: 0 (off) attends over the whole causal context; W > 0 lets
    query t see key s only when s <= t and t - s < W (token distance; with data.document_masking
    also only within t's document, where it equals the position difference). Applies to the layers
    ``global_every`` leaves windowed, in training, evaluation and cached decoding alike; must be
    below seq_len (a window that long hides nothing). Every backend honours it. Hugging Face export
    refuses it by name (GPT-2 and Llama attend over the whole context)."""
    global_every: int = 0
    """With attention_window > 0: every k-th layer (layers k-1, 2k-1, ..., counting from 0, as
    Gemma 2 with k=2 and Gemma 3 with k=6) keeps full causal attention and the others are
    windowed; 0 (default) windows every layer (Mistral). Must lie in [2, n_layers] when set."""
    remat: Literal["none", "full", "save_matmuls"] = "none"
    """Rematerialisation policy of each transformer block."""
    logits_chunk: int = 0
    """Tokens per chunk of the chunked cross-entropy; 0 computes all logits at once."""
    z_loss: float = 0.0
    """Coefficient of the z-loss, the mean over targets of log²Z (Z the softmax normaliser), added to
    the training loss (PaLM used 1e-4): it keeps the logits from drifting, which matters most in
    bfloat16. Logged as train/z_loss (the term added); train/loss and val loss stay the cross-entropy.
    Training only: the weights, sampling and export do not depend on it. 0 leaves the loss and
    its gradients exactly as without it."""
    moe_experts: int = 0
    """Mixture of experts: the number of experts E of each sparse layer's MLP (each an MLP of
    ``d_ff`` and ``mlp``'s kind, no biases); 0 (default) is the dense model. See docs/scaling.md#experts."""
    moe_top_k: int = 2
    """Experts per token. Its weights are the router's softmax renormalised over the k chosen
    (Mixtral); with k=1 the chosen expert's probability itself (Switch), so the router still learns."""
    moe_shared_expert: bool = False
    """One more MLP of width d_ff in every sparse layer that every token goes through (DeepSeekMoE)."""
    moe_every: int = 1
    """Every k-th layer is sparse (layers k-1, 2k-1, ..., counting from 0), the rest dense; must
    divide n_layers. 1: every layer."""
    moe_capacity_factor: float = 0.0
    """0: dropless (every token reaches all its k experts). c > 0: each expert takes at most
    ceil(c * N * k / E) of the N tokens of a routing group (one device's tokens under a mesh, the
    whole batch without one), first choices before second ones, in token order; the rest are
    dropped (the layer passes them through the residual only), counted as train/moe/dropped_fraction."""
    moe_aux_loss: float = 0.01
    """Coefficient of the load-balancing loss E * sum_e f_e * P_e (Switch Transformer; f_e the
    fraction of top-k choices that name expert e, P_e its mean router probability), averaged over
    the sparse layers and added to the training loss; logged as train/moe/aux_loss (before the
    coefficient)."""
    moe_router_z_loss: float = 0.001
    """Coefficient of the router z-loss, the mean log²(sum_e exp(router logit e)) (ST-MoE), averaged
    over the sparse layers; logged as train/moe/router_z_loss (before the coefficient)."""

    @property
    def moe_layers(self) -> int:
        """How many layers are sparse (0 for a dense model)."""
        return self.n_layers // self.moe_every if self.moe_experts else 0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m


@dataclass(frozen=True)
class DataConfig:
    inputs: tuple[str, ...] = ("shakespeare",)
    """Text/JSONL/Parquet paths or globs prepared on first use; 'shakespeare' is the embedded corpus."""
    dir: str = "data_cache/shakespeare-gpt2"
    """Prepared token shards (``jaxlm prepare --out``); prepared from ``inputs`` if missing."""
    tokenizer: str = "gpt2"
    """gpt2 | bytes | path to a directory with vocab.bpe + encoder.json."""
    max_undecodable: float = 0.01
    """Preparing refuses an input file whose share of bytes that are not UTF-8 exceeds this (a binary
    file named .txt); below it they become U+FFFD with a warning naming the file and the share."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation when preparing; checked against ``data.dir``."""
    split_seed: int = 0
    """Seed of the train/val document split (a hash per document); checked against ``data.dir``."""
    document_masking: bool = False
    """Attention stays inside each document and positions restart at each document."""
    drop_last: bool = False
    """False: the final partial window of an epoch is padded with loss mask 0, so every train token
    but the first is a target exactly once per epoch. True drops it (up to seq_len - 1 targets)."""
    shuffle: bool = True
    shuffle_seed: int = 0
    """Seed of the window order (a new permutation each epoch); independent of the split."""
    workers: int = 0
    """Worker processes for the loader; 0 loads in the training process with a prefetch thread."""
    prefetch: int = 4
    """Batches prepared ahead of the training step."""
    mixture: dict[str, float] = field(default_factory=dict, hash=False)
    """Train on several prepared directories (``jaxlm prepare --out``) at once, {directory: weight},
    e.g. {"data_cache/web": 0.7, "data_cache/code": 0.3} (``--set data.mixture=a:0.7,b:0.3``).
    Weights are relative shares of the samples; each source keeps its own windows, shuffle, epochs
    and train/val split, and is named by its directory's last component (``val/<name>/loss``).
    Empty (default): train on ``data.dir``; with a mixture, data.dir and data.inputs are not read.
    See docs/data.md#mixtures."""
    mixture_schedule: tuple[tuple[int, dict[str, float]], ...] = field(default=(), hash=False)
    """Pieces (step, weights): from train step ``step`` on, samples are drawn with ``weights`` (the
    same directories as data.mixture, which gives the weights from step 0). Each source's sample
    counter runs on across a change, so it continues with the next window of its own epoch: none
    is repeated or skipped. JSON on the command line: ``--set 'data.mixture_schedule=[[1000, {...}]]'``."""


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW for every parameter. muon: Muon (momentum orthogonalised by 5 Newton-Schulz
    steps; Jordan et al. 2024, modded-nanogpt) for the hidden matrices of the blocks, the weights
    whose first or last logical axis is ``embed`` (q, k, v, o, up, gate, down); the embeddings, the
    output head, norms and biases keep exactly the AdamW below (lr, b1, b2, eps, weight_decay).
    See docs/recipes.md#muon."""
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """AdamW decay; applied to matrices only, never to norms, biases or other vectors. With
    name='muon' it decays AdamW's matrices (embeddings, output head); Muon's use muon_weight_decay."""
    grad_clip: float = 1.0
    """Global-norm clipping threshold; 0 disables."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (name='muon'), on lr's warmup + cosine shape. An orthogonalised
    update has unit singular values whatever the gradient's size, so it is ~30x AdamW's."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum coefficient (modded-nanogpt's 0.95)."""
    muon_weight_decay: float = 0.0
    """Decoupled weight decay of Muon's matrices, times muon_lr as AdamW's is times lr (modded-nanogpt: 0)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    """Global batch, in sequences of seq_len tokens, summed over all devices and micro-batches."""
    micro_batches: int = 1
    """Gradient accumulation: the batch is split into this many sequential micro-batches."""
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    """Batches of the validation split per evaluation; 0 uses the whole split."""
    eval_tasks: tuple[str, ...] = ()
    """Task files (JSONL of context, choices, label; docs/evals.md) scored at every evaluation, their
    accuracy logged as ``tasks/<file stem>/acc`` and ``acc_norm``, e.g.
    experiments/tasks/shakespeare_next_line.jsonl."""
    target_val_loss: float = 0.0
    """Stop at the first evaluation whose val loss is at or below this, with a checkpoint there
    (summary status "reached target_val_loss"): the run's wall time is then its time to that loss
    (benchmarks/speedrun.py). 0 trains all ``steps``. The schedule still spans ``steps``."""
    run_dir: str = "runs"
    """Runs go to ``<run_dir>/<name>/``."""
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = ("tensorboard",)
    """Where the scalars go: TensorBoard events in ``<run>/tb/``, and/or a Weights & Biases run
    (``pip install 'jaxlm[wandb]'``; project from ``WANDB_PROJECT``, grouped by sweep). docs/tools.md"""


MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
"""The mesh's axes, outermost first (each a field of MeshConfig): tensor parallelism innermost
(the fastest links), then context (ring attention passes K/V to a neighbour every layer), then
expert (an all-to-all each way per MoE layer), and the batch axes outermost (one gradient
reduction per step)."""


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    """Data-parallel replicas; -1 fills with the devices the other axes leave."""
    fsdp: int = 1
    """Parameter/optimizer sharding (ZeRO-3); also splits the batch."""
    tensor: int = 1
    """Megatron tensor parallelism over heads, MLP hidden and vocabulary."""
    expert: int = 1
    """Expert parallelism: the experts of an MoE layer split over it, tokens reach them by
    all-to-all; it splits the batch too (data parallel for the dense weights)."""
    context: int = 1
    """Context parallelism: the positions of every sequence split over it, attention by ring
    (jaxlm/ring.py, docs/scaling.md); needs model.seq_len divisible by 2 x context and
    model.attention=auto."""
    coordinator_address: str = ""
    """host:port of process 0 for multi-process runs; empty auto-detects (SLURM, TPU, env)."""
    num_processes: int = 0
    """Processes in a multi-process run; 0 auto-detects."""
    process_id: int = -1
    """This process's index; -1 auto-detects."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    """Save every N steps (and at the end of the run); 0 saves only at the end."""
    keep: int = 3
    """Keep the last K checkpoints..."""
    keep_every: int = 0
    """...plus every checkpoint whose step is a multiple of M, for the record (0: none)."""
    async_save: bool = True
    """Write in the background while training continues."""


@dataclass(frozen=True)
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.train.run_dir) / self.name


# --------------------------------------------------------------------------------------------
# Presets: model shapes with published parameter counts (tests check the counts).
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, ModelConfig] = {
    # GPT-2 small: 124,439,808 parameters with tied embeddings and 1024 learned positions.
    "gpt2-124m": ModelConfig(),
    # Llama-3.2-1B shape: 1,235,814,400 parameters (tied, GQA 32/8, vocab 128256).
    "llama-1b": ModelConfig(
        vocab_size=128256,
        seq_len=2048,
        n_layers=16,
        d_model=2048,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        positions="rope",
        rope_theta=500000.0,
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=True,
    ),
    # Tiny, for tests and local debugging: compiles in seconds on a CPU. float32 stated, not "auto":
    # tests compare against float32 arithmetic, whichever dtype this CPU would measure faster.
    "tiny": ModelConfig(
        vocab_size=256,
        vocab_multiple=1,
        seq_len=32,
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_ff=64,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        compute_dtype="float32",
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# --------------------------------------------------------------------------------------------
# Overrides: "section.field=value" parsed against the declared type.
# --------------------------------------------------------------------------------------------

_SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse the CLI string ``text`` as type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(key, text, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"{key}={text!r} is not valid; choose one of {list(args)}")
        return text
    if origin in (tuple, dict) and any(typing.get_origin(a) in (tuple, dict, list) for a in args):
        # Containers of containers are written as config.json writes them.
        try:
            return from_json(json.loads(text), tp) if text else origin()  # '' is empty, as for a flat tuple
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{key}={text!r} is not valid JSON ({e}); write it as config.json does"
            ) from None
    if origin is tuple:
        items = [s for s in text.split(",") if s] if text else []
        return tuple(parse_value(key, s, args[0]) for s in items)
    if origin is dict:  # k:v,k:v; a key may hold ':' (a value never does)
        out = {}
        for item in (s for s in text.split(",") if s):
            k, colon, v = item.rpartition(":")
            if not colon or not k:
                raise ConfigError(f"{key}: {item!r} must look like KEY:VALUE, e.g. {key}=a:0.7,b:0.3")
            out[parse_value(key, k, args[0])] = parse_value(key, v, args[1])
        return out
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={text!r} is not a bool; use true or false")
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ConfigError(f"{key}={text!r} is not an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a number") from None
    if tp is str:
        return text
    raise ConfigError(f"{key}: cannot parse a value of type {tp}")


def _check_type(key: str, value: Any, tp: Any) -> None:
    """Type-check a value set in Python (an experiment file or a sweep), not parsed from text."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                _check_type(key, value, arg)
                return
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has type {type(value).__name__}; expected {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}={value!r}: expected None")
        return
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(args)}")
        return
    if origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{key}={value!r} must be a tuple")
        items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args
        if len(items) != len(value):
            raise ConfigError(f"{key}={value!r} must have {len(items)} items, {tp}")
        for v, item_tp in zip(value, items, strict=True):
            _check_type(key, v, item_tp)
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a dict")
        for k, v in value.items():
            _check_type(key, k, args[0])
            _check_type(key, v, args[1])
        return
    ok = (
        isinstance(value, bool)
        if tp is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if tp is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is float
        else isinstance(value, tp)
    )
    if not ok:
        raise ConfigError(f"{key}={value!r} has type {type(value).__name__}; expected {tp.__name__}")


def _locate(cfg: Config, key: str) -> tuple[str, str | None, Any]:
    """Split ``key`` into (section, field) and return its declared type, or raise naming choices."""
    section, _, name = key.partition(".")
    if section not in _SECTIONS:
        raise ConfigError(f"unknown config key {key!r}; valid sections: {sorted(_SECTIONS)}")
    sub = getattr(cfg, section)
    if not dataclasses.is_dataclass(sub):
        if name:
            raise ConfigError(f"unknown config key {key!r}; {section!r} has no fields")
        return section, None, _field_types(Config)[section]
    hints = _field_types(type(sub))
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r}; valid keys in {section!r}: {sorted(hints)}")
    return section, name, hints[name]


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return ``cfg`` with ``{"section.field": value}`` applied; string values are parsed.

    Values that are not strings (from sweeps written in Python) are type-checked instead.
    The result is validated.
    """
    by_section: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, raw in overrides.items():
        section, name, tp = _locate(cfg, key)
        value = parse_value(key, raw, tp) if isinstance(raw, str) else raw
        _check_type(key, value, tp)
        if name is None:
            top[section] = value
        else:
            by_section.setdefault(section, {})[name] = value
    for section, changes in by_section.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **changes)
    cfg = dataclasses.replace(cfg, **top)
    validate(cfg)
    return cfg


def parse_set_args(items: list[str]) -> dict[str, str]:
    """``["model.n_layers=4", "optim.lr=3e-4"]`` -> ``{"model.n_layers": "4", ...}``."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. optim.lr=3e-4")
        out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------------------------
# Validation: every impossible combination is refused before anything runs.
# --------------------------------------------------------------------------------------------


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, min(n, limit or n) + 1) if n % d == 0]


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def source_name(directory: str) -> str:
    """A mixture source's name in logs and metrics (``val/<name>/loss``): its directory's last component."""
    return Path(directory).name


def _check_mixture(d: DataConfig) -> None:
    if not d.mixture:
        _need(
            not d.mixture_schedule,
            "data.mixture_schedule",
            "changes the weights of data.mixture, which is empty; set data.mixture to the weights at step 0",
        )
        return
    names: dict[str, str] = {}
    for directory in d.mixture:
        name = source_name(directory)
        _need(bool(name), "data.mixture", f"{directory!r} must name a prepared directory")
        _need(
            name not in names,
            "data.mixture",
            f"{names.get(name)!r} and {directory!r} have the same last component {name!r}, which names "
            "a source in the logs (val/<name>/loss); rename one of the directories",
        )
        names[name] = directory
    pieces = [(0, d.mixture), *d.mixture_schedule]
    for i, (step, weights) in enumerate(pieces):
        key = f"data.mixture_schedule[{i - 1}]" if i else "data.mixture"
        if i:
            _need(
                step > pieces[i - 1][0],
                key,
                f"starts at step {step}, not after the previous piece's {pieces[i - 1][0]}: list the pieces "
                "in increasing step order after 0 (data.mixture holds the weights from step 0)",
            )
            missing, extra = sorted(set(d.mixture) - set(weights)), sorted(set(weights) - set(d.mixture))
            differ = ", ".join([f"lacks {missing}"] * bool(missing) + [f"adds {extra}"] * bool(extra))
            _need(
                not differ,
                key,
                f"weighs other directories than data.mixture ({differ}); every piece weighs the same "
                "ones, 0 for a source it leaves out",
            )
        for directory, w in weights.items():
            _need(
                0 <= w < float("inf"),  # NaN fails both comparisons
                key,
                f"the weight of {directory!r} must be a finite number >= 0, got {w}",
            )
        _need(sum(weights.values()) > 0, key, "weights are all 0; give at least one source a weight")
    never = [k for k in d.mixture if all(weights[k] == 0 for _, weights in pieces)]
    _need(
        not never,
        "data.mixture",
        f"{never} have weight 0 in every piece and would never be sampled; remove them or give them a weight",
    )


def validate(cfg: Config) -> Config:
    for section in _SECTIONS:
        sub = getattr(cfg, section)
        if dataclasses.is_dataclass(sub):
            for name, tp in _field_types(type(sub)).items():
                _check_type(f"{section}.{name}", getattr(sub, name), tp)
    m, d, o, t, mesh, c = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.mesh, cfg.checkpoint
    _need(bool(cfg.name) and "/" not in cfg.name, "name", f"{cfg.name!r} must be non-empty without '/'")
    for key in ("vocab_size", "vocab_multiple", "seq_len", "n_layers", "d_model", "n_heads", "d_ff"):
        _need(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    _need(
        m.head_dim is not None or m.d_model % m.n_heads == 0,
        "model.d_model",
        f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}; "
        f"pick n_heads among the divisors {_divisors(m.d_model, 128)} or set model.head_dim",
    )
    _need(m.head_dim is None or m.head_dim > 0, "model.head_dim", f"must be positive, got {m.head_dim}")
    _need(
        m.n_kv_heads is None or (m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0),
        "model.n_kv_heads",
        f"n_kv_heads={m.n_kv_heads} must divide n_heads={m.n_heads}; valid: {_divisors(m.n_heads)}",
    )
    _need(
        m.positions != "rope" or m.dim_per_head % 2 == 0,
        "model.head_dim",
        f"rope needs an even head dimension, got {m.dim_per_head}",
    )
    _need(m.norm_eps > 0, "model.norm_eps", "must be positive")
    _need(m.init_std > 0, "model.init_std", "must be positive")
    _need(
        m.mup_base_width > 0,
        "model.mup_base_width",
        f"must be a positive width (the d_model whose lr and init 'mup' keeps), got {m.mup_base_width}",
    )
    _need(
        m.parametrization == "standard" or not m.module,
        "model.parametrization",
        f"'mup' scales the weights of jaxlm's own transformer by their role; model.module={m.module!r} "
        "declares its own weights: use parametrization=standard (and scale them inside the module)",
    )
    _need(m.logits_chunk >= 0, "model.logits_chunk", "must be >= 0 (0 disables chunking)")
    _need(
        0 <= m.attention_window < m.seq_len,
        "model.attention_window",
        f"must be 0 (full attention) or a window of 1 to seq_len - 1 = {m.seq_len - 1} tokens, got "
        f"{m.attention_window}",
    )
    _need(
        m.global_every == 0 or (m.attention_window > 0 and 2 <= m.global_every <= m.n_layers),
        "model.global_every",
        f"global_every={m.global_every} with attention_window={m.attention_window} and n_layers="
        f"{m.n_layers}: set it to 0 (every layer windowed), or to k in [2, n_layers] with "
        "model.attention_window > 0 (every k-th layer global; 1 would window no layer)",
    )
    _need(
        0 <= m.z_loss < float("inf"),  # NaN fails both comparisons
        "model.z_loss",
        f"must be a finite number >= 0 (0 disables it; PaLM used 1e-4), got {m.z_loss}",
    )
    _validate_moe(m, mesh)
    _need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _need(
        0.0 <= d.max_undecodable <= 1.0, "data.max_undecodable", f"must be in [0, 1], got {d.max_undecodable}"
    )
    _need(d.workers >= 0, "data.workers", "must be >= 0")
    _need(d.prefetch >= 0, "data.prefetch", "must be >= 0")
    _need(bool(d.dir), "data.dir", "must name the prepared data directory")
    _check_mixture(d)
    _need(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _need(0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0, "optim.b1/b2", "must be in [0, 1)")
    _need(o.eps > 0, "optim.eps", "must be positive")
    _need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _need(
        o.muon_lr > 0, "optim.muon_lr", f"must be positive (modded-nanogpt uses 0.02-0.05), got {o.muon_lr}"
    )
    _need(0.0 <= o.muon_momentum < 1.0, "optim.muon_momentum", f"must be in [0, 1), got {o.muon_momentum}")
    _need(o.muon_weight_decay >= 0, "optim.muon_weight_decay", f"must be >= 0, got {o.muon_weight_decay}")
    _need(
        not (m.parametrization == "mup" and o.name == "muon"),
        "model.parametrization",
        "'mup' sets Adam's per-parameter learning rates (hidden matrices' lr x base_width / width); "
        "optim.name='muon' orthogonalises those matrices' updates and scales them by their shape "
        "instead: use parametrization=mup with optim.name=adamw, or muon with parametrization=standard",
    )
    _need(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
    _need(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    _need(
        t.micro_batches > 0 and t.batch_size % t.micro_batches == 0,
        "train.micro_batches",
        f"micro_batches={t.micro_batches} must divide batch_size={t.batch_size}",
    )
    _need(t.log_every > 0, "train.log_every", "must be positive")
    _need(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0 disables evaluation)")
    _need(t.eval_batches >= 0, "train.eval_batches", "must be >= 0")
    _need(
        0 <= t.target_val_loss < float("inf"),  # NaN fails both comparisons
        "train.target_val_loss",
        f"must be a finite number >= 0 (0 disables it), got {t.target_val_loss}",
    )
    _need(
        not t.target_val_loss or t.eval_every > 0,
        "train.target_val_loss",
        "is checked at evaluations, and train.eval_every=0 disables them; set train.eval_every",
    )
    for key in MESH_AXES:
        v = getattr(mesh, key)
        _need(v == -1 or v > 0, f"mesh.{key}", f"must be positive or -1 (fill), got {v}")
    _need(
        [getattr(mesh, key) for key in MESH_AXES].count(-1) <= 1,
        "mesh",
        "at most one of mesh." + "/".join(MESH_AXES) + " may be -1",
    )
    _need(c.every >= 0, "checkpoint.every", "must be >= 0")
    _need(c.keep > 0, "checkpoint.keep", "must keep at least one checkpoint")
    _need(c.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")
    return cfg


def _validate_moe(m: ModelConfig, mesh: MeshConfig) -> None:
    _need(
        m.moe_experts >= 0, "model.moe_experts", f"must be >= 0 (0 is the dense model), got {m.moe_experts}"
    )
    if not m.moe_experts:
        return
    _need(
        m.moe_experts >= 2,
        "model.moe_experts",
        f"{m.moe_experts} expert is a dense MLP with a router; use 0 (dense) or at least 2",
    )
    _need(
        1 <= m.moe_top_k <= m.moe_experts,
        "model.moe_top_k",
        f"must be in [1, moe_experts={m.moe_experts}], got {m.moe_top_k}",
    )
    _need(
        m.moe_every >= 1 and m.n_layers % m.moe_every == 0,
        "model.moe_every",
        f"moe_every={m.moe_every} must be a positive divisor of n_layers={m.n_layers} (every k-th layer "
        f"sparse); valid: {_divisors(m.n_layers)}",
    )
    _need(
        0 <= m.moe_capacity_factor < float("inf"),
        "model.moe_capacity_factor",
        f"must be 0 (dropless) or a finite factor > 0 (1.25 is common), got {m.moe_capacity_factor}",
    )
    for key in ("moe_aux_loss", "moe_router_z_loss"):
        v = getattr(m, key)
        _need(0 <= v < float("inf"), f"model.{key}", f"must be a finite number >= 0 (0 disables it), got {v}")
    _need(
        not m.module,
        "model.moe_experts",
        f"mixture of experts is a layer of jaxlm's own transformer; model.module={m.module!r} declares "
        "its own weights: set moe_experts=0 (or build the experts inside the module)",
    )
    _need(
        not m.use_bias,
        "model.use_bias",
        "the experts of model.moe_experts > 0 have no biases; set model.use_bias=false",
    )
    _need(
        mesh.expert == -1 or m.moe_experts % mesh.expert == 0,
        "mesh.expert",
        f"mesh.expert={mesh.expert} must divide model.moe_experts={m.moe_experts} (each device holds "
        f"moe_experts / mesh.expert experts); valid: {_divisors(m.moe_experts)}",
    )


# --------------------------------------------------------------------------------------------
# Experiment files and serialisation.
# --------------------------------------------------------------------------------------------


def _experiment_error(path: Path, e: BaseException, doing: str) -> ConfigError:
    """One line naming the experiment file, the line in it where ``e`` arose, and ``e``."""
    if isinstance(e, SyntaxError) and e.filename and Path(e.filename).resolve() == path.resolve():
        code = f": {e.text.strip()!r}" if e.text and e.text.strip() else ""
        return ConfigError(f"{path}:{e.lineno}: syntax error, {e.msg}{code}; fix the experiment file")
    frames = [
        f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()
    ]
    where = f"{path}:{frames[-1].lineno}" if frames else str(path)
    code = f" (at {frames[-1].line!r})" if frames and frames[-1].line else ""
    what = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
    return ConfigError(f"{where}: {doing} failed{code}: {what}; fix the experiment file")


def load_experiment(path: str | Path) -> types.ModuleType:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist; see experiments/ for examples")
    spec = importlib.util.spec_from_file_location(f"jaxlm_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise _experiment_error(path, e, "running it") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment file {str(path)!r} must define get_config() -> jaxlm.config.Config")
    return module


def call_experiment(path: str | Path, module: types.ModuleType, name: str) -> Any:
    """``module.name()`` (get_config, get_sweep) with whatever it raises as one ConfigError line."""
    try:
        return getattr(module, name)()
    except Exception as e:
        raise _experiment_error(Path(path), e, f"{name}()") from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> Config:
    cfg = call_experiment(path, load_experiment(path), "get_config")
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected jaxlm.config.Config")
    if isinstance(overrides, (list, tuple)):
        overrides = parse_set_args(list(overrides))
    return apply_overrides(validate(cfg), dict(overrides))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_json(value: Any, tp: Any) -> Any:
    """``value`` as JSON holds it (lists for tuples) in the declared type ``tp``; what does not fit
    is left as it is for the type check to name."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and isinstance(value, (list, tuple)):
        items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args
        if len(items) != len(value):
            return tuple(value)
        return tuple(from_json(v, item_tp) for v, item_tp in zip(value, items, strict=True))
    if origin is dict and isinstance(value, dict):
        return {k: from_json(v, args[1]) for k, v in value.items()}
    return value


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a checkpoint's config.json), validated."""
    if "seed" in d.get("data", {}):  # before split_seed/shuffle_seed, one data.seed served both
        data = dict(d["data"])
        seed = data.pop("seed")
        d = {**d, "data": {"split_seed": seed, "shuffle_seed": seed, **data}}
    unknown = set(d) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config sections {sorted(unknown)}; valid: {sorted(_SECTIONS)}")
    kwargs: dict[str, Any] = {}
    for name, f in _SECTIONS.items():
        if name not in d:
            continue
        if f.default_factory is dataclasses.MISSING:
            kwargs[name] = d[name]
            continue
        cls = f.default_factory
        hints = _field_types(cls)
        bad = set(d[name]) - set(hints)
        if bad:
            raise ConfigError(f"unknown keys {sorted(bad)} in section {name!r}; valid: {sorted(hints)}")
        values = {k: from_json(v, hints[k]) for k, v in d[name].items()}
        kwargs[name] = cls(**values)
    return validate(Config(**kwargs))
