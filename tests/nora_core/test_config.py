"""AdapterConfig: validation, PEFT's pattern semantics, scales, and the JSON round trip."""

from __future__ import annotations

import math

import pytest

from nora_core.config import AdapterConfig

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


def test_defaults_depend_on_method() -> None:
    lora, nora = AdapterConfig(), AdapterConfig(method="nora")
    assert (lora.dropout, nora.dropout) == (0.0, 0.1)
    assert lora.target_modules == ["q_proj", "v_proj"] and nora.activation == "silu"
    assert lora.scale_for(Q0) == 1.0  # alpha=None means alpha = r


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "dora"}, "method"),
        ({"r": 0}, "r"),
        ({"r": True}, "r"),
        ({"r": 2.0}, "r"),
        ({"alpha": -1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"use_rslora": 1}, "use_rslora"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "("}, "target_modules"),
        ({"target_modules": [""]}, "target_modules"),
        ({"exclude_modules": 3}, "exclude_modules"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": {"[": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"activation": "tanh"}, "activation"),
        ({"init": "zeros"}, "init"),
        ({"fan_in_fan_out": "yes"}, "fan_in_fan_out"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**kwargs)


def test_activation_is_nora_only_and_lora_keeps_the_default() -> None:
    for activation in ("relu", "gelu", "identity"):
        with pytest.raises(ValueError, match=r"activation='\w+' is NoRA-only"):
            AdapterConfig(method="lora", activation=activation)
    lora = AdapterConfig(method="lora", alpha=8, activation="silu")  # the default: what every LoRA config holds
    assert AdapterConfig.from_dict(lora.to_dict()) == lora
    assert AdapterConfig(method="nora", activation="relu").activation == "relu"


def test_normalisation() -> None:
    config = AdapterConfig(target_modules=("q_proj",), layers_to_transform=2)
    assert config.target_modules == ["q_proj"] and config.layers_to_transform == [2]
    assert AdapterConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]


def test_patterns_follow_peft_semantics_first_match_wins() -> None:
    config = AdapterConfig(
        r=8,
        alpha=16,
        rank_pattern={r"layers\.0\.self_attn\.q_proj": 4, "q_proj": 2, "proj": 32},
        alpha_pattern={"v_proj": 3},
    )
    assert config.rank_for(Q0) == 4  # first key wins although "q_proj" also matches
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert config.rank_for(V1) == 8  # "proj" must match a whole dotted suffix, not "v_proj"
    assert config.rank_for("xq_proj") == 8 and config.rank_for("q_proj") == 2
    assert config.alpha_for(V1) == 3 and config.alpha_for(Q0) == 16
    assert config.scale_for(Q0) == 16 / 4 and config.scale_for(V1) == 3 / 8


def test_rslora_scale() -> None:
    config = AdapterConfig(r=16, alpha=8, use_rslora=True, rank_pattern={"v_proj": 4})
    assert config.scale_for(Q0) == pytest.approx(8 / math.sqrt(16))
    assert config.scale_for(V1) == pytest.approx(8 / 2)
    assert AdapterConfig(r=16, use_rslora=True).scale_for(Q0) == pytest.approx(4.0)  # alpha=None: r/sqrt(r)


def test_alpha_none_keeps_scale_one_per_module() -> None:
    config = AdapterConfig(r=8, rank_pattern={"v_proj": 2})
    assert config.scale_for(Q0) == 1.0 and config.scale_for(V1) == 1.0


@pytest.mark.parametrize(
    "config",
    [
        AdapterConfig(r=4, alpha=8, dropout=0.05, exclude_modules=["lm_head"], layers_to_transform=[0, 2]),
        AdapterConfig(r=8, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 5}),
        AdapterConfig(
            method="nora", r=6, alpha=3, use_rslora=True, activation="gelu", dropout=0.3, init="kaiming_uniform"
        ),
        AdapterConfig(target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.2\..*", task_type="CAUSAL_LM"),
    ],
)
def test_json_round_trip_keeps_every_scale(config: AdapterConfig) -> None:
    data = config.to_dict()
    back = AdapterConfig.from_dict(data)
    assert back.to_dict() == AdapterConfig.from_dict(back.to_dict()).to_dict()
    for key in ("method", "r", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
                "rank_pattern", "dropout", "activation", "fan_in_fan_out", "task_type"):
        assert getattr(back, key) == getattr(config, key), key
    for name in (Q0, V1, "model.layers.1.self_attn.q_proj", "model.layers.2.mlp.up_proj"):
        assert back.scale_for(name) == pytest.approx(config.scale_for(name)), name
        assert back.rank_for(name) == config.rank_for(name)


def test_json_uses_peft_names() -> None:
    lora = AdapterConfig(r=4, dropout=0.1).to_dict()
    assert lora["peft_type"] == "LORA" and lora["lora_alpha"] == 4 and lora["lora_dropout"] == 0.1
    assert lora["bias"] == "none" and lora["use_dora"] is False and "activation" not in lora
    nora = AdapterConfig(method="nora", dropout=0.3, activation="relu").to_dict()
    assert nora["peft_type"] == "NORA" and nora["dropout"] == 0.3 and nora["activation"] == "relu"
    assert nora["lora_dropout"] == 0.0  # NoRA has no input dropout


def test_from_dict_ignores_unknown_fields_and_refuses_unsupported() -> None:
    data = AdapterConfig(r=4).to_dict() | {"some_future_field": 1, "peft_version": "9.9"}
    assert AdapterConfig.from_dict(data).r == 4
    for bad, field in [({"peft_type": "IA3"}, "peft_type"), ({"use_dora": True}, "use_dora"),
                       ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"bias": "all"}, "bias"),
                       ({"target_modules": None}, "target_modules"), ({"r": -2}, "r")]:
        with pytest.raises(ValueError, match=field):
            AdapterConfig.from_dict(data | bad)
