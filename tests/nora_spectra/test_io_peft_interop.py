"""Checkpoints written by PEFT itself load with PEFT's modules, factors, shapes and scales."""

from __future__ import annotations

import numpy as np
import pytest

from nora_spectra.io import load_checkpoint

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
nn = torch.nn


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, 2 * d)
        self.fc = nn.Linear(2 * d, d)


class _Tiny(nn.Module):
    def __init__(self, layers: int = 12, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, d)
        self.conv = nn.Conv2d(3, 5, 3)
        self.layers = nn.ModuleList(_Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 2)

    def forward(self, x):  # pragma: no cover - never run
        return x


def _peft_deltas(model, adapter: str = "default") -> dict[str, tuple]:
    """module name -> (scaling, r, delta weight as PEFT computes it) for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:
            out[name] = (module.scaling[adapter], module.r[adapter], module.get_delta_weight(adapter).detach().double().numpy())
    return out


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_peft_saved_checkpoint_with_patterns_and_rslora(tmp_path, safe_serialization):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "embed", "conv"],
        rank_pattern={r"layers\.1\.q_proj": 4, "v_proj": 2},
        alpha_pattern={r"layers\.10\.v_proj": 7, "q_proj": 3},
        modules_to_save=["head"],
        init_lora_weights=False,  # non-zero B so the deltas are meaningful
    )
    model = get_peft_model(_Tiny(), config)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    reference = _peft_deltas(model)

    ckpt = load_checkpoint(tmp_path)
    assert ckpt.format == "peft" and ckpt.method == "lora"
    assert sorted(ckpt.modules) == sorted(reference)
    assert ckpt.modules.index("layers.2.q_proj") < ckpt.modules.index("layers.10.q_proj")  # natural order
    assert [name for name, _ in ckpt.skipped] == ["head"]
    seen_types = set()
    for layer in ckpt.iter_layers():
        scaling, r, delta = reference[layer.module]
        seen_types.add(layer.layer_type)
        assert layer.rank == r
        assert layer.update.scale == pytest.approx(scaling, rel=1e-12)
        ours = layer.update.scale * (layer.update.B @ layer.update.A)
        assert layer.shape == ours.shape
        np.testing.assert_allclose(ours, delta.reshape(ours.shape), rtol=1e-5, atol=1e-6)
    assert seen_types == {"linear", "embedding", "conv"}
    layers = {layer.module: layer for layer in ckpt.iter_layers()}
    assert layers["layers.1.q_proj"].rank == 4 and layers["layers.1.q_proj"].update.scale == pytest.approx(3 / 2)
    assert layers["layers.10.v_proj"].rank == 2 and layers["layers.10.v_proj"].update.scale == pytest.approx(7 / np.sqrt(2))
    assert layers["layers.0.v_proj"].update.scale == pytest.approx(16 / np.sqrt(2))
    assert layers["embed"].shape == (20, 8) and layers["conv"].shape == (5, 27)


def test_peft_fan_in_fan_out_conv1d(tmp_path):
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class _Gpt2Like(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(12, 4)  # weight (d_in=4, d_out=12)

    model = get_peft_model(
        _Gpt2Like(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    )
    model.save_pretrained(tmp_path)
    (name, (scaling, _, delta)), = _peft_deltas(model).items()
    layer = next(load_checkpoint(tmp_path).iter_layers())
    assert layer.module == name == "c_attn"
    assert delta.shape == (4, 12) and layer.shape == (12, 4)  # PEFT's delta is in the stored (d_in, d_out) layout
    np.testing.assert_allclose(layer.update.scale * layer.update.B @ layer.update.A, delta.T, rtol=1e-5, atol=1e-6)


def test_peft_dora_and_named_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_Tiny(layers=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True), adapter_name="chat")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "chat" / "adapter_config.json").is_file()
    ckpt = load_checkpoint(tmp_path, adapter="chat")
    assert ckpt.adapter == "chat" and ckpt.modules == ["layers.0.q_proj", "layers.1.q_proj"]
    assert all(layer.dora and layer.update.scale == 2.0 for layer in ckpt.iter_layers())


def test_peft_dora_magnitude_is_read_for_linear_conv_and_embedding(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "conv", "embed"], use_dora=True)
    model = get_peft_model(_Tiny(layers=1), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param))  # lora_B starts at zero; the magnitude at ||W0||
    model.save_pretrained(tmp_path)
    stored = {
        name.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]: param.detach().double().numpy()
        for name, param in model.named_parameters()
        if "lora_magnitude_vector" in name
    }
    entries = {entry.module: entry for entry in load_checkpoint(tmp_path).entries}
    assert set(stored) == set(entries) == {"embed", "conv", "layers.0.q_proj"}
    for module, entry in entries.items():
        assert entry.dora and entry.read_magnitude is not None
        magnitude = entry.read_magnitude()
        np.testing.assert_array_equal(magnitude, stored[module].reshape(-1))  # conv: (1, c_out, 1, 1) -> (c_out,)
        size = entry.shape[1] if entry.layer_type == "embedding" else entry.shape[0]
        assert magnitude.shape == (size,)
