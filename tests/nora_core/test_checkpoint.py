"""save_adapter / load_adapter: PEFT's layout, bit-exact round trips, resume, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nora_core.checkpoint import adapter_state_dict, load_adapter, save_adapter
from nora_core.config import AdapterConfig
from nora_core.inject import adapter_config, adapter_layers, inject_adapters
from nora_core.layers import AdapterLinear
from tests.nora_core.conftest import Toy, randomize_b

LORA = AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.v_proj": 2})
NORA = AdapterConfig(method="nora", r=4, target_modules=["q_proj", "up_proj"], activation="gelu", dropout=0.2)


def _trained(config: AdapterConfig, dtype: torch.dtype = torch.float32) -> Toy:
    torch.manual_seed(1)
    model = inject_adapters(Toy().to(dtype).eval(), config)
    randomize_b(model)
    return model


def _same_factors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = adapter_state_dict(a), adapter_state_dict(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("config", [LORA, NORA], ids=["lora", "nora"])
def test_layout_matches_peft(tmp_path: Path, config: AdapterConfig) -> None:
    model = _trained(config)
    save_adapter(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        keys = set(handle.keys())
    assert keys == {f"base_model.model.{k}" for k in adapter_state_dict(model)}
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    data = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert data["peft_type"] == config.method.upper() and data["r"] == 4
    if config.method == "nora":
        assert data["activation"] == "gelu" and data["dropout"] == 0.2
    if config.method == "lora":  # the rank pattern gives this one r=2
        tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
        assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (2, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [LORA, NORA], ids=["lora", "nora"])
def test_save_load_is_bit_exact(
    tmp_path: Path, toy_input: torch.Tensor, config: AdapterConfig, dtype: torch.dtype
) -> None:
    model = _trained(config, dtype)
    save_adapter(model, tmp_path)
    torch.manual_seed(1)
    fresh = Toy().to(dtype).eval()  # same base weights, no adapters
    load_adapter(fresh, tmp_path)
    saved, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert loaded[key].dtype == dtype and torch.equal(saved[key], loaded[key]), key
    assert adapter_config(fresh).to_dict() == AdapterConfig.from_dict(config.to_dict()).to_dict()
    x = toy_input.to(dtype)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(loaded)


def test_load_into_injected_model_only_loads_weights(tmp_path: Path) -> None:
    save_adapter(_trained(NORA), tmp_path)
    torch.manual_seed(1)
    model = inject_adapters(Toy(), NORA)
    layers_before = dict(adapter_layers(model))
    load_adapter(model, tmp_path)
    assert dict(adapter_layers(model)) == layers_before  # same layer objects: an optimizer keeps its params
    assert _same_factors(model, _trained(NORA))
    with pytest.raises(ValueError, match="lora adapter"):
        load_adapter(inject_adapters(Toy(), AdapterConfig(r=4, target_modules=["q_proj", "up_proj"])), tmp_path)
    with pytest.raises(ValueError, match="other modules"):
        other = AdapterConfig(method="nora", r=4, target_modules=["q_proj"], activation="gelu")
        load_adapter(inject_adapters(Toy(), other), tmp_path)


def test_legacy_bin_is_read_without_unpickling(tmp_path: Path) -> None:
    model = _trained(LORA)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    torch.manual_seed(1)
    fresh = load_adapter(Toy(), tmp_path)
    assert _same_factors(model, fresh)
    torch.save({"w": torch.zeros(1), "evil": object()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        load_adapter(Toy(), tmp_path)


def _broken(tmp_path: Path, edit) -> Path:
    save_adapter(_trained(LORA), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return tmp_path


def test_errors_name_the_file_and_leave_the_model_plain(tmp_path: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = [
        (lambda t: t.pop(key), "missing key"),
        (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 16)}), "unexpected key"),
        (lambda t: t.update({key: torch.zeros(3, 16)}), r"shape \(3, 16\)"),
    ]
    for i, (edit, message) in enumerate(cases):
        directory = _broken(tmp_path / str(i), edit)
        model = Toy()
        with pytest.raises(ValueError, match=message) as info:
            load_adapter(model, directory)
        assert "adapter_model.safetensors" in str(info.value)
        assert not any(isinstance(m, AdapterLinear) for m in model.modules()) and adapter_config(model) is None


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_adapter(Toy(), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(Toy(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(Toy(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(LORA.to_dict()))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(Toy(), tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x01\x02garbage")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_adapter(Toy(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(LORA.to_dict() | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(Toy(), tmp_path)


def test_save_needs_adapters_and_leaves_no_temp_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inject_adapters"):
        save_adapter(Toy(), tmp_path)
    model = _trained(LORA)
    save_adapter(model, tmp_path)
    save_adapter(model, tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
