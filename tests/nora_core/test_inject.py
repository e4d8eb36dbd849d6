"""inject_adapters / unload: PEFT's target matching, freezing, gradients and restoring the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nora_core.config import AdapterConfig
from nora_core.inject import adapter_config, adapter_layers, inject_adapters, unload
from nora_core.layers import AdapterLinear
from tests.nora_core.conftest import Toy, randomize_b


def _adapted(config: AdapterConfig) -> list[str]:
    return [name for name, _ in adapter_layers(inject_adapters(Toy(), config))]


def test_list_targets_match_exact_names_and_dotted_suffixes() -> None:
    assert _adapted(AdapterConfig(target_modules=["q_proj"])) == [
        f"model.layers.{i}.self_attn.q_proj" for i in range(3)
    ]
    assert _adapted(AdapterConfig(target_modules=["self_attn.v_proj", "lm_head"])) == [
        *(f"model.layers.{i}.self_attn.v_proj" for i in range(3)),
        "lm_head",
    ]
    assert _adapted(AdapterConfig(target_modules=["model.layers.1.mlp.up_proj"])) == ["model.layers.1.mlp.up_proj"]


def test_regex_target_must_match_the_whole_name() -> None:
    assert _adapted(AdapterConfig(target_modules=r".*\.[qv]_proj")) == [
        f"model.layers.{i}.self_attn.{m}_proj" for i in range(3) for m in "qv"
    ]
    with pytest.raises(ValueError, match="no module"):
        _adapted(AdapterConfig(target_modules="q_proj"))  # fullmatch: a bare suffix is not enough


def test_exclude_and_layers_to_transform() -> None:
    names = _adapted(AdapterConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj"]))
    assert "model.layers.0.self_attn.q_proj" not in names and len(names) == 5
    names = _adapted(AdapterConfig(target_modules=r".*_proj", exclude_modules=r".*mlp.*|.*[ko]_proj"))
    assert len(names) == 6 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    names = _adapted(AdapterConfig(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]))
    assert names == [f"model.layers.{i}.{m}" for i in (0, 2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    names = _adapted(AdapterConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"))
    assert names == ["model.layers.1.self_attn.q_proj"]


def test_no_match_lists_targets_and_existing_names() -> None:
    with pytest.raises(ValueError) as info:
        inject_adapters(Toy(), AdapterConfig(target_modules=["c_attn", "query"]))
    message = str(info.value)
    assert "c_attn" in message and "query" in message
    assert "q_proj" in message and "model.layers.0.self_attn.q_proj" in message


def test_matching_a_non_linear_module_is_an_error() -> None:
    with pytest.raises(ValueError, match="LayerNorm"):
        inject_adapters(Toy(), AdapterConfig(target_modules=["norm"]))


def test_layers_use_per_module_rank_and_scale() -> None:
    config = AdapterConfig(r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.2.self_attn.q_proj": 1})
    layers = dict(adapter_layers(inject_adapters(Toy(), config)))
    q0, v0, q2 = (layers[f"model.layers.{i}.self_attn.{m}"] for i, m in [(0, "q_proj"), (0, "v_proj"), (2, "q_proj")])
    assert (q0.r, q0.scaling) == (4, 2.0) and (v0.r, v0.scaling) == (2, 4.0) and (q2.r, q2.scaling) == (4, 0.25)
    assert v0.lora_A.weight.shape == (2, 16) and v0.lora_B.weight.shape == (16, 2)


@pytest.mark.parametrize("method", ["lora", "nora"])
def test_fresh_adapters_leave_the_output_unchanged(toy: Toy, toy_input: torch.Tensor, method: str) -> None:
    before = toy(toy_input)
    inject_adapters(toy, AdapterConfig(method=method, r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    assert torch.equal(toy.eval()(toy_input), before)


@pytest.mark.parametrize("method", ["lora", "nora"])
def test_only_a_and_b_get_gradients(toy: Toy, toy_input: torch.Tensor, method: str) -> None:
    inject_adapters(toy, AdapterConfig(method=method, r=4, target_modules=["q_proj", "v_proj"]))
    randomize_b(toy)
    trainable = {n for n, p in toy.named_parameters() if p.requires_grad}
    expected = {f"model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight" for i in range(3) for m in "qv" for ab in "AB"}
    assert trainable == expected
    toy.train()(toy_input).square().mean().backward()
    for name, param in toy.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_unload_restores_plain_layers_and_trainability(toy: Toy, toy_input: torch.Tensor) -> None:
    toy.lm_head.requires_grad_(False)
    q0 = toy.model.layers[0].self_attn["q_proj"]
    before = toy(toy_input)
    config = AdapterConfig(r=2, target_modules=["q_proj"])
    inject_adapters(toy, config)
    assert adapter_config(toy) == config and adapter_config(toy) is not config and isinstance(toy.model.layers[0].self_attn["q_proj"], AdapterLinear)
    with pytest.raises(ValueError, match="already holds adapters"):
        inject_adapters(toy, config)
    randomize_b(toy)
    unload(toy)
    assert toy.model.layers[0].self_attn["q_proj"] is q0 and adapter_config(toy) is None
    assert not any(isinstance(m, AdapterLinear) for m in toy.modules())
    assert torch.equal(toy(toy_input), before)
    assert not toy.lm_head.weight.requires_grad and q0.weight.requires_grad
    with pytest.raises(ValueError, match="no adapters"):
        unload(toy)


def test_fan_in_fan_out_mismatch_warns() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential()
    model.add_module("c_attn", pytorch_utils.Conv1D(6, 4))
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        inject_adapters(model, AdapterConfig(r=2, target_modules=["c_attn"]))
    assert model.c_attn.fan_in_fan_out
