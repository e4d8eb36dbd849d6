"""merge_adapters: exact LoRA merge, NoRA refused, non-finite results refused before any write."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nora_core.config import AdapterConfig
from nora_core.inject import inject_adapters
from nora_core.layers import AdapterLinear
from nora_core.merge import merge_adapters
from tests.nora_core.conftest import Toy, randomize_b

CONFIG = AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2})


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_merged_model_equals_adapter_model(toy_input: torch.Tensor, dtype: torch.dtype, atol: float) -> None:
    model = inject_adapters(Toy().to(dtype).eval(), CONFIG)
    randomize_b(model)
    x = toy_input.to(dtype)
    expected = model(x)
    q0 = model.model.layers[0].self_attn["q_proj"]
    w0, delta = q0.base_layer.weight.detach().double().clone(), q0.delta_weight()
    assert merge_adapters(model) is model
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    merged = model.model.layers[0].self_attn["q_proj"]
    assert type(merged) is nn.Linear and merged.weight.requires_grad
    assert torch.equal(merged.weight, (w0 + delta).to(dtype))  # one rounding from float64
    torch.testing.assert_close(model(x), expected, rtol=0, atol=atol)


def test_merge_conv1d() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential()
    model.add_module("c_attn", pytorch_utils.Conv1D(6, 4))
    inject_adapters(model, AdapterConfig(r=2, alpha=3, target_modules=["c_attn"], fan_in_fan_out=True))
    randomize_b(model)
    x = torch.randn(3, 4)
    expected = model(x)
    merge_adapters(model)
    assert isinstance(model.c_attn, pytorch_utils.Conv1D)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def test_nora_cannot_be_merged(toy: Toy) -> None:
    inject_adapters(toy, AdapterConfig(method="nora", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="non-linear"):
        merge_adapters(toy)
    assert isinstance(toy.model.layers[0].self_attn["q_proj"], AdapterLinear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_merge_touches_nothing(dtype: torch.dtype) -> None:
    model = inject_adapters(Toy().to(dtype), CONFIG)
    layers = [model.model.layers[i].self_attn["q_proj"] for i in range(3)]
    before = [layer.base_layer.weight.detach().clone() for layer in layers]
    with torch.no_grad():
        layers[2].lora_A.weight.fill_(1.0)
        layers[2].lora_B.weight.fill_(torch.finfo(dtype).max / 4)  # s * B A overflows the dtype
        layers[0].lora_B.weight.fill_(0.5)
    with pytest.raises(ValueError, match="non-finite"):
        merge_adapters(model)
    assert all(torch.equal(layer.base_layer.weight, w) for layer, w in zip(layers, before))
    with pytest.raises(ValueError, match="no adapters"):
        merge_adapters(Toy())
