"""Which transformers architecture represents a jaxlm model, and its tensor table.

The table describes every Hugging Face tensor once: its name, the jaxlm params it is made of, its
shape, and its conversion in both directions; export and import both read it, and ``tensor_table``
checks it against ``model.param_decls`` each time, so a weight added to the model without a table
entry (or an entry whose param is gone, or a shape that no longer fits) is refused by name before
anything is read or written.

Layouts: jaxlm blocks are stacked on a leading layers axis; q [L,D,H,K], k/v [L,D,G,K],
o [L,H,K,D], up/gate [L,D,F], down [L,F,D], embed [V_padded,D], unembed [D,V_padded].
transformers' Llama stores nn.Linear weights [out, in]; GPT-2 stores Conv1D weights [in, out] and
fuses q, k, v into one c_attn [D, 3D] (and their biases into one c_attn.bias [3D]): the one table
entry with several parts. Vocabulary padding rows are dropped on export and re-padded with zeros on
import (padding logits are masked, so those rows never matter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

from jaxlm.config import ConfigError, ModelConfig

# ============================================================================================
# Which transformers architecture represents a model.
# ============================================================================================


HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
"""The transformers class of each architecture ``architecture`` names."""


def architecture(m: ModelConfig) -> str:
    """``"gpt2"``, ``"llama"`` or ``"mixtral"`` (rope with experts); a ConfigError listing every
    option that none represents."""
    if m.module:
        raise ConfigError(
            f"cannot export model.module={m.module!r} to Hugging Face: only jaxlm's built-in transformer "
            "maps onto a transformers architecture (GPT-2 or Llama); save the module's params yourself "
            "from checkpoint.load_params"
        )
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
    elif not m.moe_experts:
        want = {"norm": "rmsnorm", "mlp": "swiglu"}
        why = "rope is Llama (LlamaForCausalLM), which has"
    else:
        arch = "mixtral"
        want = {"norm": "rmsnorm", "mlp": "swiglu"}
        why = "rope with experts is Mixtral (MixtralForCausalLM), which has"
        mixtral = "Mixtral's sparse MLP has none of it; train without it to export"
        if m.moe_shared_expert:
            problems.append(f"model.moe_shared_expert=True: a shared expert: {mixtral}")
        if m.moe_every != 1:
            problems.append(f"model.moe_every={m.moe_every}: dense layers between sparse ones: {mixtral}")
        if m.moe_capacity_factor:
            problems.append(
                f"model.moe_capacity_factor={m.moe_capacity_factor}: dropping tokens over capacity: "
                f"{mixtral} (Mixtral is dropless)"
            )
        if m.moe_top_k == 1:
            problems.append(
                "model.moe_top_k=1: jaxlm weights a single expert by its probability, Mixtral "
                "renormalises the top-k weights (to 1 for k=1); use moe_top_k >= 2 to export"
            )
    if m.qk_norm:
        problems.append(
            "model.qk_norm=True: neither GPT-2 nor Llama normalises queries and keys (transformers' "
            "Qwen3 does, and is not an export target yet); train with qk_norm=false to export"
        )
    if m.attention_window:
        pattern = f" (global_every={m.global_every})" if m.global_every else ""
        problems.append(
            f"model.attention_window={m.attention_window}{pattern}: GPT-2 and Llama attend over the "
            "whole context (transformers' Mistral and Gemma 2 window, and are not export targets "
            "yet); train with attention_window=0 to export"
        )
    if m.parametrization == "mup":
        # Representable only by folding the scales into the weights (q by head_dim^-1/2, the untied
        # unembedding by base/width; a tied one cannot take it without changing the input side).
        problems.append(
            "model.parametrization='mup': its 1/head_dim attention scale and its logit multiplier "
            f"mup_base_width/d_model = {m.mup_base_width}/{m.d_model} have no place in GPT-2's or Llama's "
            "config, and export does not fold them into the weights; train with parametrization=standard "
            "to export"
        )
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


def _mixtral_tensors(m: ModelConfig) -> list[Tensor]:
    """Llama's attention and norms; each layer's sparse MLP is transformers 5's fused layout: the
    router gate.weight [E, D], experts.gate_up_proj [E, 2F, D] (gate rows, then up rows) and
    experts.down_proj [E, D, F], each expert an nn.Linear [out, in]."""
    D, E, F = m.d_model, m.moe_experts, m.d_ff
    p = "model.layers.{i}.mlp."
    dense = {"blocks/mlp/gate", "blocks/mlp/up", "blocks/mlp/down"}
    out = [t for t in _llama_tensors(m) if not set(t.parts) & dense]
    swap = lambda x: np.swapaxes(x, -1, -2)
    return out + [
        _transposed(p + "gate.weight", "blocks/moe/router", (E, D)),
        Tensor(
            p + "experts.gate_up_proj",
            ("blocks/moe/gate", "blocks/moe/up"),
            (E, 2 * F, D),
            lambda gate, up: np.concatenate([swap(gate), swap(up)], axis=1),
            lambda w: tuple(swap(x) for x in np.split(w, 2, axis=1)),
        ),
        Tensor(p + "experts.down_proj", ("blocks/moe/down",), (E, D, F), swap, lambda w: (swap(w),)),
    ]


def tensor_table(m: ModelConfig) -> list[Tensor]:
    """Every Hugging Face tensor of the model, in the order they are written; checked against
    ``model.param_decls`` (``check_table``)."""
    arch = architecture(m)
    tables = {"gpt2": _gpt2_tensors, "llama": _llama_tensors, "mixtral": _mixtral_tensors}
    table = tables[arch](m)
    check_table(table, declared_shapes(m), m.n_layers, arch)
    return table


# ============================================================================================
# The table against model.param_decls, both ways.
# ============================================================================================


def declared_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{param path ("blocks/attn/q"): shape} of every weight ``model.param_decls`` declares."""
    from jaxlm import model

    leaves = jax.tree_util.tree_leaves_with_path(model.param_decls(m), is_leaf=model.is_weight)
    return {"/".join(k.key for k in path): w.shape for path, w in leaves}


def check_table(table: list[Tensor], declared: dict[str, tuple[int, ...]], n_layers: int, arch: str) -> None:
    """Raise a ConfigError naming every disagreement between ``table`` and the declared params:
    a param in no entry or in two, an entry part that is not declared, and an entry whose
    ``to_hf`` does not turn the declared shapes into its Hugging Face shape.

    Only shapes are computed: ``to_hf`` runs on zero-stride views (no memory), so this costs
    nothing even for a model larger than the host. ``from_hf`` is checked by import on the
    tensors it converts (``importer.params_from_hf``)."""
    owner: dict[str, str] = {}
    problems = []
    for t in table:
        for part in t.parts:
            if part not in declared:
                problems.append(
                    f"tensor {t.name!r} maps to {part!r}, which model.param_decls does not declare"
                )
            elif part in owner:
                problems.append(f"param {part!r} is in both tensor {owner[part]!r} and {t.name!r}")
            else:
                owner[part] = t.name
    problems += [f"param {p!r} {s} has no tensor" for p, s in declared.items() if p not in owner]
    for t in table:
        shapes = [declared[p] for p in t.parts if p in declared]
        if len(shapes) < len(t.parts):
            continue  # named above
        if t.per_layer:
            if any(s[:1] != (n_layers,) for s in shapes):
                problems.append(
                    f"tensor {t.name!r} is per layer but its params {shapes} are not [{n_layers}, ...]"
                )
                continue
            shapes = [s[1:] for s in shapes]
        try:
            got = t.to_hf(*(np.broadcast_to(np.zeros((), np.int8), s) for s in shapes)).shape
        except (ValueError, TypeError) as e:
            got = f"an error ({e})"
        if got != t.shape:
            problems.append(
                f"tensor {t.name!r} has shape {t.shape} but to_hf of the declared "
                f"{dict(zip(t.parts, shapes, strict=True))} gives {got}"
            )
    if problems:
        raise ConfigError(
            f"the Hugging Face {arch} tensor table (jaxlm/hf/arch.py) does not match model.param_decls: "
            + "; ".join(problems)
            + ". Give every declared weight a table entry (or refuse its option in architecture())"
        )
