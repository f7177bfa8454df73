import dataclasses
import json
import re
from pathlib import Path

import pytest

from jaxlm import config
from jaxlm.config import Config, ConfigError, apply_overrides, load_config, preset

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_parse_against_declared_types():
    cfg = apply_overrides(
        Config(),
        {
            "model.n_layers": "4",
            "optim.lr": "3e-4",
            "model.n_kv_heads": "4",
            "data.shuffle": "false",
            "model.positions": "rope",
            "data.inputs": "a.txt,b.jsonl",
            "name": "exp",
        },
    )
    assert cfg.model.n_layers == 4 and cfg.optim.lr == 3e-4 and cfg.model.n_kv_heads == 4
    assert cfg.data.shuffle is False and cfg.model.positions == "rope"
    assert cfg.data.inputs == ("a.txt", "b.jsonl") and cfg.name == "exp"
    assert apply_overrides(cfg, {"model.n_kv_heads": "none"}).model.n_kv_heads is None


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("model.n_layer", "4", "valid keys in 'model'"),  # typo: lists the valid keys
        ("modle.n_layers", "4", "valid sections"),
        ("model.n_layers", "four", "is not an integer"),
        ("model.positions", "alibi", "choose one of ['learned', 'rope', 'sinusoidal']"),
        ("model.n_heads", "5", "d_model=768 is not divisible by n_heads=5"),
        ("model.n_kv_heads", "5", "must divide n_heads=12"),
        ("train.micro_batches", "5", "must divide batch_size=32"),
        ("data.shuffle", "maybe", "not a bool"),
        ("optim.lr", "-1", "optim.lr: must be positive"),
        ("mesh.data", "0", "mesh.data"),
        ("model.z_loss", "-1e-4", "model.z_loss: must be a finite number >= 0"),
        ("model.z_loss", "nan", "model.z_loss: must be a finite number >= 0"),
        ("model.mlp", "relu", "choose one of ['gelu', 'swiglu', 'relu2']"),
        ("model.qk_norm", "maybe", "not a bool"),
        ("model.attention_window", "-1", "must be 0 (full attention) or a window of 1 to seq_len - 1 = 1023"),
        ("model.attention_window", "1024", "tokens, got 1024"),
        ("model.global_every", "2", "global_every=2 with attention_window=0"),
        ("train.target_val_loss", "-1", "train.target_val_loss: must be a finite number >= 0"),
        ("train.target_val_loss", "nan", "train.target_val_loss: must be a finite number >= 0"),
        ("data.mixture", "a/web:0.7,b/web:0.3", "'a/web' and 'b/web' have the same last component 'web'"),
        ("data.mixture", "web:-1,code:1", "data.mixture: the weight of 'web' must be a finite number >= 0"),
        ("data.mixture", "web", "data.mixture: 'web' must look like KEY:VALUE"),
        ("data.mixture", "web:0,code:0", "data.mixture: weights are all 0"),
        ("data.mixture", "web:0,code:1", "['web'] have weight 0 in every piece and would never be sampled"),
        (
            "data.mixture_schedule",
            '[[10, {"web": 1}]]',
            "changes the weights of data.mixture, which is empty",
        ),
        ("data.mixture_schedule", "[[10, {", "data.mixture_schedule='[[10, {' is not valid JSON"),
    ],
)
def test_bad_overrides_name_the_key(key, value, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), {key: value})
    assert needle in str(e.value)
    assert key.split(".")[0] in str(e.value) or "valid sections" in str(e.value)


@pytest.mark.parametrize("k", [1, 13, -2])
def test_global_every_must_leave_both_kinds_of_layer(k):
    """1 would make every layer global, more than n_layers=12 none; either is a mistake, named."""
    with pytest.raises(ConfigError, match=rf"model.global_every: global_every={k} with attention_window=64"):
        apply_overrides(Config(), {"model.attention_window": "64", "model.global_every": str(k)})
    assert apply_overrides(Config(), {"model.attention_window": "64", "model.global_every": "12"})


def test_a_target_val_loss_needs_evaluations():
    with pytest.raises(ConfigError, match="train.target_val_loss: .*set train.eval_every"):
        apply_overrides(Config(), {"train.target_val_loss": "1.95", "train.eval_every": "0"})


def test_python_values_are_type_checked():
    with pytest.raises(ConfigError, match="model.n_layers"):
        apply_overrides(Config(), {"model.n_layers": 2.5})
    with pytest.raises(ConfigError, match="set args|section.field=value"):
        config.parse_set_args(["model.n_layers"])


def test_roundtrip_through_dict():
    cfg = apply_overrides(Config(), {"model.n_kv_heads": "4", "data.inputs": "x,y"})
    assert config.from_dict(config.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        config.from_dict({"model": {"bogus": 1}})


def test_a_mixture_parses_from_set_and_survives_config_json():
    cfg = apply_overrides(
        Config(),
        {
            "data.mixture": "data_cache/web:0.7,data_cache/code:0.3",
            "data.mixture_schedule": '[[1000, {"data_cache/web": 0.5, "data_cache/code": 0.5}]]',
        },
    )
    assert cfg.data.mixture == {"data_cache/web": 0.7, "data_cache/code": 0.3}
    assert cfg.data.mixture_schedule == ((1000, {"data_cache/web": 0.5, "data_cache/code": 0.5}),)
    assert config.from_dict(json.loads(json.dumps(config.to_dict(cfg)))) == cfg
    assert hash(cfg.data) == hash(Config().data)  # still a key (sweeps prepare each data config once)


@pytest.mark.parametrize(
    "schedule, needle",
    [
        (
            '[[10, {"web": 1}]]',
            "data.mixture_schedule[0]: weighs other directories than data.mixture (lacks ['code'])",
        ),
        ('[[10, {"web": 1, "code": 1, "x": 1}]]', "(adds ['x'])"),
        (
            '[[0, {"web": 1, "code": 1}]]',
            "data.mixture_schedule[0]: starts at step 0, not after the previous piece's 0",
        ),
        (
            '[[10, {"web": 1, "code": 0}], [5, {"web": 0, "code": 1}]]',
            "[1]: starts at step 5, not after the previous piece's 10",
        ),
        ('[[10, {"web": 0, "code": 0}]]', "data.mixture_schedule[0]: weights are all 0"),
        ('[[10.5, {"web": 1, "code": 1}]]', "has type float; expected int"),
    ],
)
def test_a_mixture_schedule_weighs_the_same_sources_in_step_order(schedule, needle):
    base = apply_overrides(Config(), {"data.mixture": "web:0.5,code:0.5"})
    with pytest.raises(ConfigError) as e:
        apply_overrides(base, {"data.mixture_schedule": schedule})
    assert needle in str(e.value)


def test_every_shipped_experiment_loads():
    files = sorted((ROOT / "experiments").glob("*.py"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert isinstance(cfg, Config)
        doc = f.read_text().split('"""')[1]
        assert "Run:" in doc and "Expect:" in doc, f"{f.name}: docstring must give the command and the result"


def test_missing_experiment_file_is_named():
    with pytest.raises(ConfigError, match="nope.py"):
        load_config("nope.py")


def test_every_config_field_is_read_somewhere():
    """A field nothing reads is a lie in the config; each must appear as an attribute access in
    jaxlm/, not counting validate(), which reads everything to check it."""
    text = (ROOT / "jaxlm" / "config.py").read_text()
    start = text.index("def validate(")
    without_validate = text[:start] + text[text.index("\n# ----", start) :]
    sources = without_validate + "\n".join(
        p.read_text() for p in (ROOT / "jaxlm").rglob("*.py") if p.name != "config.py"
    )
    unread = []
    for section in dataclasses.fields(Config):
        if section.name == "name":
            continue
        for f in dataclasses.fields(section.default_factory):
            if not re.search(rf"\.{f.name}\b", sources):
                unread.append(f"{section.name}.{f.name}")
    assert not unread, f"config fields never read: {unread}"


def test_presets_unknown_name():
    with pytest.raises(ConfigError, match="valid presets"):
        preset("gpt5")
