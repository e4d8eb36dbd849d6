"""Activation-space spectra against dense float64 references: dY formed explicitly, centred, SVD'd."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from nora_core.checkpoint import save_adapter
from nora_core.config import AdapterConfig
from nora_core.data import TokenDataset
from nora_core.inject import adapter_layers, inject_adapters
from nora_core.models.gpt import GPT, GPTConfig
from nora_spectra.analysis import LAYER_COLUMNS, Analysis, activation_spectra, analyze
from nora_spectra.schema import ACTIVATION_COLUMNS
from nora_spectra.spaces.centred import CentredFactor
from nora_spectra.spaces.selection import select_layers
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.model_loading import load_model

RTOL = 1e-9  # relative to sigma_max, the spectrum engine's bound


def assert_spectrum_close(got, want, rtol=RTOL):
    got, want = np.asarray(got), np.asarray(want)
    k = len(got)
    top = max(float(want[0]), np.finfo(float).tiny)
    np.testing.assert_allclose(got, want[:k], rtol=0, atol=rtol * top)
    assert np.all(want[k:] <= 1e-10 * top)  # what the r-dim route leaves out is zero in the dense SVD


def dense_centred_svd(Y: np.ndarray) -> np.ndarray:
    """Reference: singular values of the column-centred (tokens, d_out) matrix, float64 dense SVD."""
    Y = np.asarray(Y, dtype=np.float64)
    return np.linalg.svd(Y - Y.mean(axis=0), compute_uv=False)


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter a nonzero B (fresh adapters are a no-op) and a well-scaled A."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen, dtype=torch.float64) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen, dtype=torch.float64) * 0.1)


def tiny_gpt(dtype=torch.float64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=259, block_size=32, n_layer=2, n_head=2, n_embd=16)).to(dtype)


def padded_dataset(n: int = 6, seed: int = 0) -> TokenDataset:
    """Right-padded rows of different lengths (so padding must be excluded)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([12, 5, 9, 12, 3, 7][:n])
    ids = torch.randint(0, 256, (n, 12), generator=gen)
    for i, length in enumerate(lengths):
        ids[i, length:] = 258
    return TokenDataset(ids, ids.clone(), lengths)


def reference_dY(model: nn.Module, dataset: TokenDataset) -> dict[str, np.ndarray]:
    """Form every branch output dY = layer(x) - base_layer(x) explicitly, at real tokens only."""
    captured: dict[str, list[np.ndarray]] = {}
    mask_box = {}

    def make_hook(name):
        def hook(module, args, output):
            x = args[0]
            dY = (output - module.base_layer(x)).detach()  # (B, T, d_out)
            captured.setdefault(name, []).append(dY[mask_box["mask"]].double().numpy())

        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in adapter_layers(model)]
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), 4):
            idx = torch.arange(start, min(start + 4, len(dataset)))
            ids, _ = dataset.batch(idx)
            mask_box["mask"] = torch.arange(ids.shape[1])[None, :] < dataset.lengths[idx][:, None]
            model(ids)
    for h in handles:
        h.remove()
    return {name: np.concatenate(parts) for name, parts in captured.items()}


# ----------------------------------------------------------------------------- CentredFactor
@pytest.mark.parametrize("sizes", [[50], [7, 1, 30, 2], [3, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
def test_centred_factor_matches_dense_centring(sizes):
    rng = np.random.default_rng(1)
    width = 6
    batches = [rng.standard_normal((m, width)) * [1, 2, 3, 1e-3, 5, 1] + 100.0 for m in sizes]
    factor = CentredFactor(width)
    for batch in batches:
        factor.update(batch)
    H = np.vstack(batches)
    assert factor.n == H.shape[0]
    np.testing.assert_allclose(factor.mean, H.mean(axis=0), rtol=1e-13)
    want = dense_centred_svd(H)
    got = np.linalg.svd(factor.R, compute_uv=False)
    assert factor.R.shape == (width, width)
    assert_spectrum_close(got[: len(want)], want, rtol=1e-11)
    assert np.all(got[len(want):] <= 1e-12 * want[0])


def test_centred_factor_non_finite_and_shape_errors():
    factor = CentredFactor(3)
    with pytest.raises(ValueError, match=r"\(m, 3\)"):
        factor.update(np.zeros((2, 4)))
    factor.update(np.array([[1.0, np.nan, 0.0]]))
    assert not factor.finite


# ----------------------------------------------------------------------------- one linear layer
class EmbedLinear(nn.Module):
    """ids -> embedding -> one linear: the adapter's input X is the embedding rows, known exactly."""

    def __init__(self, vocab=40, d_in=12, d_out=9):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_in)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, ids):
        return self.proj(self.emb(ids))


@pytest.mark.parametrize("r", [3, 9, 12])
def test_lora_single_linear_equals_svd_of_centred_X_At_Bt(r):
    model = EmbedLinear().double()
    inject_adapters(model, AdapterConfig(method="lora", r=r, alpha=2.0 * r, target_modules=["proj"]))
    randomize_adapters(model, seed=r)
    ids = torch.randint(0, 40, (5, 8))
    result = activation_spectra(model, data=ids, samples=5, batch_size=2)
    layer = model.proj
    X = model.emb.weight.detach().numpy()[ids.reshape(-1).numpy()]  # (40 tokens, d_in)
    A = layer.lora_A.weight.detach().numpy()
    B = layer.lora_B.weight.detach().numpy()
    want = dense_centred_svd(layer.scaling * X @ A.T @ B.T)
    (rec,) = result.records
    assert rec["space"] == "activation" and rec["tokens"] == 40 and rec["shape"] == [9, 40]
    assert rec["scale"] == pytest.approx(2.0) and rec["rank"] == r
    assert_spectrum_close(rec["singular_values"], want)
    assert len(rec["singular_values"]) == min(r, 9)


# ----------------------------------------------------------------------------- tiny GPT, every branch
@pytest.mark.parametrize(
    "config",
    [
        AdapterConfig(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        AdapterConfig(method="lora", r=8, alpha=8, use_rslora=True, dropout=0.2, target_modules=["q_proj", "v_proj", "up_proj"]),
        AdapterConfig(method="nora", r=6, activation="silu", target_modules=["q_proj", "v_proj", "down_proj"]),
        AdapterConfig(method="nora", r=20, activation="gelu", target_modules=["q_proj"]),  # r > d_in of q_proj
    ],
    ids=["lora", "rslora-dropout", "nora-silu", "nora-gelu-r>d"],
)
def test_gpt_activation_spectra_match_dense_dY(config):
    model = inject_adapters(tiny_gpt(), config)
    randomize_adapters(model)
    model.train()  # must be switched to eval for the measurement (dropout off), and restored after
    data = padded_dataset()
    want = reference_dY(model, data)
    model.train()
    result = activation_spectra(model, data=data, samples=len(data), batch_size=4)
    assert model.training and all(m.training for m in model.modules())
    tokens = int(data.lengths.sum())
    assert result.tokens == tokens and result.samples == len(data) and result.space == "activation"
    assert [rec["module"] for rec in result.records] == list(want)
    for rec in result.records:
        assert rec["tokens"] == tokens and rec["kind"] == config.method
        assert rec["status"] == "ok"
        assert want[rec["module"]].shape == (tokens, rec["shape"][0])
        assert_spectrum_close(rec["singular_values"], dense_centred_svd(want[rec["module"]]))
        assert 1.0 <= rec["effective_rank"] <= rec["rank"]


def test_records_have_weight_space_fields_and_json_roundtrip():
    model = inject_adapters(tiny_gpt(), AdapterConfig(method="nora", r=4, target_modules=["v_proj"]))
    randomize_adapters(model)
    result = activation_spectra(model, data=padded_dataset(), samples=3)
    assert isinstance(result, Analysis) and result.space == "activation"
    assert set(LAYER_COLUMNS) <= set(result.records[0]) and tuple(result.records[0]) == ACTIVATION_COLUMNS
    data = json.loads(result.to_json())
    assert data["space"] == "activation" and data["samples"] == 3
    assert data["tokens"] == 12 + 5 + 9
    assert data["layers"][0]["space"] == "activation"
    assert list(result.layers.columns) == list(ACTIVATION_COLUMNS)


def test_fresh_adapter_is_zero_status_not_an_error():
    model = inject_adapters(tiny_gpt(), AdapterConfig(method="lora", r=4, target_modules=["q_proj"]))
    result = activation_spectra(model, data=padded_dataset(), samples=2)
    assert {rec["status"] for rec in result.records} == {"zero"}
    assert all(rec["effective_rank"] == 0.0 for rec in result.records)
    assert any("constant" in w for w in result.warnings)


def test_samples_limit_only_first_rows():
    model = inject_adapters(tiny_gpt(), AdapterConfig(method="lora", r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    result = activation_spectra(model, data=padded_dataset(), samples=2, batch_size=1)
    assert result.tokens == 12 + 5 and result.samples == 2
    more = activation_spectra(model, data=padded_dataset(), samples=100)
    assert more.samples == 6 and any("asked for 100 samples" in w for w in more.warnings)


# ----------------------------------------------------------------------------- layer selection
def test_select_layers():
    names = [f"blocks.{i}.attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]
    assert select_layers(names, None) == names
    assert select_layers(names, "last:2") == names[4:]
    assert select_layers(names, [-1]) == names[6:]
    assert select_layers(names, "0, v_proj") == names[:2] + [names[3], names[5], names[7]]
    assert select_layers(names, ["blocks.2.*"]) == names[4:6]
    with pytest.raises(UsageError, match="selects no adapter"):
        select_layers(names, "o_proj")
    with pytest.raises(UsageError, match="last:N"):
        select_layers(names, "last:x")
    with pytest.raises(UsageError, match="only 4"):
        select_layers(names, [-5])


def test_layers_option_restricts_records():
    model = inject_adapters(tiny_gpt(), AdapterConfig(method="lora", r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    result = activation_spectra(model, data=padded_dataset(), samples=2, layers="last:1")
    assert [r["module"] for r in result.records] == ["blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]


# ----------------------------------------------------------------------------- from disk
@pytest.fixture
def saved(tmp_path):
    base = tiny_gpt(torch.float32)
    base_dir = base.save_pretrained(tmp_path / "base")
    model = inject_adapters(base, AdapterConfig(method="nora", r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    adapter_dir = save_adapter(model, tmp_path / "adapter")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"what is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(10))
    )
    return base_dir, adapter_dir, data, model


def test_checkpoint_path_and_model_dir_match_in_memory(saved):
    base_dir, adapter_dir, data, model = saved
    from_disk = analyze(adapter_dir, space="activation", model=base_dir, data=data, samples=4)
    in_memory = activation_spectra(model, data=data, samples=4)
    assert from_disk.format == "nora" and from_disk.method == "nora"
    assert from_disk.checkpoint == str(adapter_dir) and from_disk.model == str(base_dir)
    assert from_disk.config is not None and from_disk.config.get("activation") == "silu"
    for a, b in zip(from_disk.records, in_memory.records):
        assert a["module"] == b["module"]
        assert a["key"] == "base_model.model." + a["module"]  # the prefix as stored in the file
        assert b["key"] == b["module"]  # an in-memory model: its module names are the keys
        np.testing.assert_allclose(a["singular_values"], b["singular_values"], rtol=1e-12)


def test_plain_module_gets_adapter_and_is_restored(saved):
    base_dir, adapter_dir, data, _ = saved
    base = GPT.from_pretrained(base_dir)
    result = activation_spectra(adapter_dir, model=base, data=data, samples=2)
    assert len(result.records) == 4
    assert not list(adapter_layers(base)), "the adapter is removed again"


def test_model_loading_errors(saved, tmp_path):
    base_dir, adapter_dir, data, _ = saved
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="adapter checkpoint, not a base model"):
        load_model(adapter_dir)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"hidden": 3}')
    with pytest.raises(CheckpointError, match="unknown model config"):
        load_model(odd)
    (odd / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(odd)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((base_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(broken)
    with pytest.raises(CheckpointError):
        analyze(tmp_path / "no-adapter", space="activation", model=base_dir, data=data)


def test_usage_errors(saved, tmp_path):
    base_dir, adapter_dir, data, model = saved
    with pytest.raises(UsageError, match="--model"):
        activation_spectra(adapter_dir, data=data)
    with pytest.raises(UsageError, match="data file not found"):
        analyze(adapter_dir, space="activation", model=base_dir, data=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    with pytest.raises(UsageError, match="bad.jsonl"):
        analyze(adapter_dir, space="activation", model=base_dir, data=bad)
    with pytest.raises(UsageError, match="no adapter layers"):
        activation_spectra(tiny_gpt(), data=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(UsageError, match="already holds adapters"):
        activation_spectra(adapter_dir, model=model, data=data)


def test_transformers_model_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    loaded = load_model(tmp_path / "gpt2", dtype=torch.float64)
    assert loaded.kind == "transformers" and loaded.max_length == 32
    model = inject_adapters(loaded.model, AdapterConfig(method="nora", r=3, target_modules=["c_attn"], fan_in_fan_out=True))
    randomize_adapters(model)
    ids = torch.randint(0, 300, (3, 10))
    # reference with the transformers forward (attention mask all ones)
    captured = []
    layer = dict(adapter_layers(model))["transformer.h.0.attn.c_attn"]
    handle = layer.register_forward_hook(lambda m, a, out: captured.append((out - m.base_layer(a[0])).reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)
    handle.remove()
    result = activation_spectra(loaded, data=ids, samples=3)
    (rec,) = result.records
    assert_spectrum_close(rec["singular_values"], dense_centred_svd(captured[0].double().numpy()))
    assert math.isclose(rec["tokens"], 30)
