"""Interop with the real PEFT on tiny random transformers models (built from configs, no download)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from nora_core.checkpoint import load_adapter, save_adapter  # noqa: E402
from nora_core.config import AdapterConfig  # noqa: E402
from nora_core.inject import adapter_layers, inject_adapters  # noqa: E402
from tests.nora_core.conftest import randomize_b  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 2, 33, 17, 4], [8, 8, 3, 60, 12, 0, 7]])


def _llama() -> torch.nn.Module:
    torch.manual_seed(123)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(123)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _randomize_peft_b(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)


OURS = {
    "llama-plain": (_llama, AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "llama-rslora-patterns": (_llama, AdapterConfig(
        r=8, use_rslora=True, target_modules=r".*\.(q_proj|v_proj|down_proj)",
        rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 4}, alpha_pattern={"v_proj": 3},
    )),
    "llama-exclude-layers": (_llama, AdapterConfig(
        r=4, alpha=2, target_modules=["q_proj", "k_proj", "up_proj"], exclude_modules=["model.layers.0.mlp.up_proj"],
        layers_to_transform=[0],
    )),
    "gpt2-fan-in-fan-out": (
        _gpt2, AdapterConfig(r=4, alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    ),
}


@pytest.mark.parametrize("case", sorted(OURS))
def test_our_lora_loads_in_peft_with_identical_logits(tmp_path: Path, case: str) -> None:
    build, config = OURS[case]
    base_logits = _logits(build())
    ours = inject_adapters(build(), config)
    randomize_b(ours)
    expected = _logits(ours)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapters really change the output
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "Unexpected keyword arguments" for unknown fields
        peft_config = peft.PeftConfig.from_pretrained(str(tmp_path))
    peft_model = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert peft_config.peft_type == "LORA"
    lora_layer = peft.tuners.lora.LoraLayer
    peft_names = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, lora_layer)}
    assert peft_names == {name for name, _ in adapter_layers(ours)}
    torch.testing.assert_close(_logits(peft_model), expected, rtol=0, atol=1e-5)


PEFTS = {
    "llama-plain": (_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-rslora-patterns": (_llama, dict(
        r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
        rank_pattern={"o_proj": 2, "model.layers.1.self_attn.q_proj": 3}, alpha_pattern={"v_proj": 16, "gate_proj": 1},
    )),
    "gpt2-fan-in-fan-out": (_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", sorted(PEFTS))
def test_peft_saved_lora_loads_into_ours_with_identical_logits(tmp_path: Path, case: str) -> None:
    build, kwargs = PEFTS[case]
    peft_model = peft.get_peft_model(build(), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs)).eval()
    _randomize_peft_b(peft_model)
    expected = _logits(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    ours = load_adapter(build(), tmp_path)
    layers = dict(adapter_layers(ours))
    assert len(layers) == sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    if case == "llama-rslora-patterns":
        assert layers["model.layers.0.self_attn.o_proj"].r == 2
        assert layers["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(4 / 3**0.5)
        assert layers["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(16 / 8**0.5)
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-5)


def test_peft_refuses_nora(tmp_path: Path) -> None:
    ours = inject_adapters(_llama(), AdapterConfig(method="nora", r=4, target_modules=["q_proj"]))
    save_adapter(ours, tmp_path)
    with pytest.raises((KeyError, ValueError, TypeError)):
        peft.PeftModel.from_pretrained(_llama(), str(tmp_path))
