"""The built-in GPT: shapes, causality, module names adapters target, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nora_core import AdapterConfig, inject_adapters
from nora_core.models import GPT, GPTConfig
from tests.nora_core.test_trainer import single_thread  # noqa: F401 (autouse fixture)

SMALL = GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=16)


def test_forward_maps_ids_to_logits() -> None:
    model = GPT(SMALL)
    logits = model(torch.randint(0, SMALL.vocab_size, (3, 10)))
    assert logits.shape == (3, 10, SMALL.vocab_size) and logits.dtype == torch.float32
    assert model.lm_head.weight is model.wte.weight  # tied
    with pytest.raises(ValueError, match="block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_attention_is_causal() -> None:
    model = GPT(SMALL).eval()
    ids = torch.randint(0, SMALL.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % SMALL.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_module_names_match_adapter_targets() -> None:
    names = {n for n, _ in GPT(SMALL).named_modules()}
    for i in range(SMALL.n_layer):
        for part in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"blocks.{i}.{part}" in names
    model = inject_adapters(GPT(SMALL), AdapterConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"blocks.{i}.attn.{m}.lora_{f}.weight" for i in range(2) for m in ("q_proj", "v_proj") for f in "AB"
    )


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = GPT(SMALL)
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == SMALL
    ids = torch.randint(0, SMALL.vocab_size, (2, 9))
    assert torch.equal(model(ids), loaded(ids))
    assert loaded.lm_head.weight is loaded.wte.weight
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("kwargs, word", [({"n_embd": 30, "n_head": 4}, "divisible"), ({"n_layer": 0}, "n_layer"),
                                          ({"dropout": 1.0}, "dropout")])
def test_config_validation(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        GPTConfig(**kwargs)


def test_config_from_dict_ignores_unknown_keys() -> None:
    assert GPTConfig.from_dict({"n_layer": 2, "rope_theta": 1e4}) == GPTConfig(n_layer=2)
