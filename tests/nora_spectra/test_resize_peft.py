"""Proof that ``spectra resize`` is right: PEFT loads the resized adapter unchanged, and every adapted
layer's output moves by at most the reported ``sigma_{k+1} ||x||`` (exactly that along the (k+1)-th right
singular vector); ``--energy 1.0`` reproduces the original outputs. Tiny float64 models built from
configs (no download); references are dense float64 SVDs of PEFT's own delta weights."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest

from nora_spectra.resize import resize

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
transformers = pytest.importorskip("transformers")
nn = torch.nn


def _llama(seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.float64).eval()


def _lora_layers(model) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer)}


def _adapter(tmp_path, **config):
    """A float64 PEFT LoRA adapter of the tiny Llama with non-zero B (as after training), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    base = _llama()
    settings = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
                    init_lora_weights=False)
    settings.update(config)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**settings)).eval()
    with torch.no_grad():  # a decaying spectrum, so that energy policies cut something
        for layer in _lora_layers(model).values():
            for factors in (layer.lora_B, layer.lora_embedding_B):
                if "default" in factors:
                    weight = factors["default"] if isinstance(factors["default"], nn.Parameter) else factors["default"].weight
                    r = weight.shape[1]
                    weight.mul_(torch.exp(-torch.arange(r, dtype=torch.float64) / 2.0))
    directory = tmp_path / "adapter"
    model.save_pretrained(directory)
    return base, model, directory


def _load(base, directory):
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    keys = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not keys, keys  # missing or unexpected adapter keys: PEFT must load it unchanged
    return model


@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 4}, "alpha_pattern": {"q_proj": 5}}])
def test_resized_adapter_loads_in_peft_and_moves_outputs_by_at_most_sigma_k1(tmp_path, options):
    base, original, directory = _adapter(tmp_path, **options)
    result = resize(directory, tmp_path / "small", energy=0.9)
    resized = _load(base, tmp_path / "small")
    rows = {row["module"]: row for row in result.modules}
    before, after = _lora_layers(original), _lora_layers(resized)
    assert sorted(rows) == sorted(before) == sorted(after)
    assert result.summary["modules_cut"] > 0
    gen = torch.Generator().manual_seed(1)
    for name, layer in before.items():
        row, new = rows[name], after[name]
        k = row["rank_after"]
        assert new.r["default"] == k and row["rank_before"] == layer.r["default"]
        assert new.scaling["default"] == pytest.approx(layer.scaling["default"], rel=1e-14)  # the scale is kept
        delta = layer.get_delta_weight("default").detach().double().numpy()
        if layer.lora_embedding_A:
            delta = delta.T  # PEFT's embedding delta is (B A)^T: (num_embeddings, dim) after this
        u, sigma, vt = np.linalg.svd(delta)  # the dense float64 reference
        kept = sigma[:k] ** 2
        assert row["energy_kept"] == pytest.approx(kept.sum() / (sigma**2).sum(), rel=1e-12)
        assert row["spectral_error"] == pytest.approx(sigma[k] if k < len(sigma) else 0.0, rel=1e-10, abs=1e-300)
        assert row["frobenius_error_rel"] == pytest.approx(np.sqrt((sigma[k:] ** 2).sum() / (sigma**2).sum()), rel=1e-10)
        new_delta = new.get_delta_weight("default").detach().double().numpy()
        new_delta = new_delta.T if layer.lora_embedding_A else new_delta
        best = (u[:, :k] * sigma[:k]) @ vt[:k]
        np.testing.assert_allclose(new_delta, best, rtol=0, atol=1e-12 * sigma[0])  # Eckart-Young's optimum
        assert np.linalg.norm(delta - new_delta, 2) == pytest.approx(row["spectral_error"], rel=1e-9)
        if layer.lora_embedding_A:
            continue
        x = torch.randn(64, delta.shape[1], generator=gen, dtype=torch.float64)
        x = torch.cat([x, torch.from_numpy(vt[k : k + 1].copy())])  # the worst input: the (k+1)-th right vector
        with torch.no_grad():
            change = (layer(x) - new(x)).numpy()
        norms = np.linalg.norm(change, axis=1)
        bound = row["spectral_error"] * np.linalg.norm(x.numpy(), axis=1)
        assert np.all(norms <= bound * (1 + 1e-9) + 1e-13), name
        assert norms[-1] == pytest.approx(row["spectral_error"], rel=1e-9)  # the bound is attained
    assert result.summary["bytes_after"] < result.summary["bytes_before"]
    files = sorted(p.name for p in (tmp_path / "small").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]


def test_energy_one_reproduces_the_original_outputs(tmp_path):
    base, original, directory = _adapter(tmp_path, modules_to_save=["lm_head"])
    result = resize(directory, tmp_path / "same", energy=1.0)
    assert all(row["rank_after"] == row["rank_before"] for row in result.modules)
    assert result.summary["energy_kept"] == 1.0 and result.summary["max_spectral_error"] == 0.0
    resized = _load(base, tmp_path / "same")
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = original(ids).logits.numpy(), resized(ids).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # unchanged modules are copied byte for byte, modules_to_save included
    from safetensors.numpy import load_file

    old = load_file(str(directory / "adapter_model.safetensors"))
    new = load_file(str(tmp_path / "same" / "adapter_model.safetensors"))
    assert sorted(old) == sorted(new) and any("lm_head" in key for key in new)
    for key in old:
        assert old[key].dtype == new[key].dtype and np.array_equal(old[key], new[key]), key
    config = json.loads((tmp_path / "same" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["modules_to_save"] == ["lm_head"]


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 10, 3)
        self.fc = nn.Linear(10, 12)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_conv_factors_keep_their_layout(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = _Conv().double()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=6, lora_alpha=3, target_modules=["conv", "fc"],
                                                          init_lora_weights=False))
    model.save_pretrained(tmp_path / "conv")
    resize(tmp_path / "conv", tmp_path / "small", rank=2)
    small = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "small")
    before, after = _lora_layers(model), _lora_layers(small)
    for name in before:
        delta = before[name].get_delta_weight("default").detach().double().numpy()
        flat = delta.reshape(delta.shape[0], -1)
        u, sigma, vt = np.linalg.svd(flat, full_matrices=False)
        best = (u[:, :2] * sigma[:2]) @ vt[:2]
        new = after[name].get_delta_weight("default").detach().double().numpy()
        assert new.shape == delta.shape
        np.testing.assert_allclose(new.reshape(flat.shape), best, rtol=0, atol=1e-12 * sigma[0])
    x = torch.randn(4, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
