"""transformers' ``config.json`` in both directions: written from a jaxlm config on export, read
into the ModelConfig fields it fixes on import (keys understood by transformers 4.45 to 5.x)."""

from __future__ import annotations

from typing import Any

from jaxlm.config import Config, ConfigError, ModelConfig
from jaxlm.hf.arch import architecture


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
    rope = {
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
        "attention_dropout": 0.0,
        **common,
    }
    if architecture(m) == "mixtral":
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **rope,
            "num_local_experts": m.moe_experts,
            "num_experts_per_tok": m.moe_top_k,
            "router_aux_loss_coef": m.moe_aux_loss,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "sliding_window": None,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **rope,
        "attention_bias": m.use_bias,
        "mlp_bias": m.use_bias,
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
    "moe_experts",
    "moe_top_k",
    "moe_every",
    "moe_shared_expert",
    "moe_capacity_factor",
)
"""ModelConfig fields an imported model fixes; the others (padding, dtypes, attention backend,
remat, init) are training choices that come from --experiment or the defaults."""


def _refuse(src: str, key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{src}: {key}={value!r} {why}; jaxlm cannot import this model")


DENSE = {
    "moe_experts": 0,
    "moe_top_k": ModelConfig.moe_top_k,
    "moe_every": 1,
    "moe_shared_expert": False,
    "moe_capacity_factor": 0.0,
}
"""The mixture-of-experts fields of a dense model (GPT-2, Llama)."""


def model_fields_from_hf(hf: dict[str, Any], src: str = "config.json") -> dict[str, Any]:
    """The ARCHITECTURE_KEYS values of a transformers GPT-2, Llama or Mixtral config.json."""
    kind = hf.get("model_type")
    if kind == "mixtral":  # Llama's attention, every layer sparse, dropless, top-k renormalised
        if hf.get("router_jitter_noise", 0.0):
            _refuse(
                src,
                "router_jitter_noise",
                hf["router_jitter_noise"],
                "is not supported (jaxlm routes without noise)",
            )
        if hf.get("sliding_window"):
            _refuse(
                src,
                "sliding_window",
                hf["sliding_window"],
                "is not supported (import attends over the whole context)",
            )
        fields = model_fields_from_hf(
            {**hf, "model_type": "llama", "attention_bias": False, "mlp_bias": False}, src
        )
        return fields | {
            "moe_experts": hf["num_local_experts"],
            "moe_top_k": hf["num_experts_per_tok"],
        }
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
        } | DENSE
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
        } | DENSE
    raise ConfigError(
        f"{src}: model_type={kind!r} is not supported; jaxlm imports 'gpt2' (GPT2LMHeadModel) and "
        "'llama' (LlamaForCausalLM) and 'mixtral' (MixtralForCausalLM)"
    )
