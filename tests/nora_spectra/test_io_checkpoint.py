"""load_checkpoint on PEFT-layout directories and bare files: keys, factors, scales, shapes, layouts."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from nora_spectra.io import Checkpoint, ModuleUpdate, load_checkpoint
from nora_spectra.io.safetensors_file import SafetensorsFile
from tests.nora_spectra.io_builders import PREFIX, lora_tensors, peft_dir, write_config, write_numpy

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"


def _layers(ckpt: Checkpoint) -> dict[str, ModuleUpdate]:
    return {layer.module: layer for layer in ckpt.iter_layers()}


def test_linear_factors_exact_and_metadata(tmp_path):
    tensors = lora_tensors({Q0: (12, 10, 8), V0: (6, 10, 8)})
    ckpt = load_checkpoint(peft_dir(tmp_path / "a", tensors, r=8, lora_alpha=16))
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.format == "peft" and ckpt.method == "lora" and len(ckpt) == 2
    assert ckpt.modules == [Q0, V0]
    assert ckpt.config["lora_alpha"] == 16 and ckpt.warnings == [] and ckpt.skipped == []
    layers = _layers(ckpt)
    q = layers[Q0]
    assert q.kind == "lora" and q.layer_type == "linear" and q.dtype == "float32" and not q.dora
    assert q.rank == 8 and q.shape == (12, 10) and q.update.scale == 2.0
    assert q.update.A.dtype == np.float64 and q.update.B.dtype == np.float64
    np.testing.assert_array_equal(q.update.A, tensors[PREFIX + Q0 + ".lora_A.weight"].astype(np.float64))
    np.testing.assert_array_equal(q.update.B, tensors[PREFIX + Q0 + ".lora_B.weight"].astype(np.float64))
    assert layers[V0].shape == (6, 10)
    assert ckpt.layer(V0).shape == (6, 10)
    with pytest.raises(KeyError):
        ckpt.layer("nope")


def test_bf16_and_fp16_factors_exact(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    a = torch.randn(4, 9).to(torch.bfloat16)
    b = torch.randn(5, 4).to(torch.float16)
    write_config(tmp_path, r=4, lora_alpha=4)
    save_file({PREFIX + Q0 + ".lora_A.weight": a, PREFIX + Q0 + ".lora_B.weight": b}, str(tmp_path / "adapter_model.safetensors"))
    layer = next(load_checkpoint(tmp_path).iter_layers())
    assert layer.dtype == "bfloat16/float16"
    np.testing.assert_array_equal(layer.update.A, a.to(torch.float64).numpy())
    np.testing.assert_array_equal(layer.update.B, b.to(torch.float64).numpy())


def test_natural_sort_of_modules(tmp_path):
    names = [f"model.layers.{i}.mlp.down_proj" for i in (10, 2, 1, 0, 11)] + ["model.layers.2.mlp.up_proj"]
    ckpt = load_checkpoint(peft_dir(tmp_path, lora_tensors({n: (3, 3, 8) for n in names})))
    assert ckpt.modules == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.2.mlp.up_proj",
        "model.layers.10.mlp.down_proj",
        "model.layers.11.mlp.down_proj",
    ]
    assert [layer.module for layer in ckpt.iter_layers()] == ckpt.modules


@pytest.mark.parametrize(
    ("config", "rank", "expected"),
    [
        (dict(r=8, lora_alpha=16), 8, 2.0),
        (dict(r=8, lora_alpha=8), 8, 1.0),
        (dict(r=4, lora_alpha=6, use_rslora=True), 4, 3.0),
        (dict(r=16, lora_alpha=16, use_rslora=True), 16, 4.0),
        (dict(r=3, lora_alpha=1.5), 3, 0.5),
        (dict(r=8, lora_alpha=16, use_rslora=False), 8, 2.0),
        (dict(r=8, lora_alpha=16, use_rslora=None), 8, 2.0),
    ],
)
def test_scale_rules(tmp_path, config, rank, expected):
    ckpt = load_checkpoint(peft_dir(tmp_path, lora_tensors({Q0: (5, 5, rank)}), **config))
    assert next(ckpt.iter_layers()).update.scale == pytest.approx(expected, rel=1e-15)


def test_rank_pattern_sets_rank_and_scale(tmp_path):
    tensors = lora_tensors({Q0: (6, 6, 4), V0: (6, 6, 8)})
    ckpt = load_checkpoint(peft_dir(tmp_path, tensors, r=8, lora_alpha=16, rank_pattern={"q_proj": 4}))
    layers = _layers(ckpt)
    assert (layers[Q0].rank, layers[Q0].update.scale) == (4, 4.0)
    assert (layers[V0].rank, layers[V0].update.scale) == (8, 2.0)


def test_rank_pattern_with_rslora(tmp_path):
    tensors = lora_tensors({Q0: (6, 6, 4), V0: (6, 6, 16)})
    ckpt = load_checkpoint(
        peft_dir(tmp_path, tensors, r=16, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 4})
    )
    layers = _layers(ckpt)
    assert layers[Q0].update.scale == pytest.approx(8 / math.sqrt(4)) and layers[V0].update.scale == pytest.approx(8 / 4)


@pytest.mark.parametrize(
    ("alpha_pattern", "alpha_q0", "alpha_q1"),
    [
        ({r"layers\.0\.self_attn\.q_proj": 32, "q_proj": 64}, 32, 64),  # specific key first: it wins for layer 0
        ({"q_proj": 64, r"layers\.0\.self_attn\.q_proj": 32}, 64, 64),  # general key first: it wins everywhere
        ({r"model\.layers\.1\..*": 4}, 16, 4),  # full-name regex
        ({"proj": 99}, 16, 16),  # must match a whole trailing name component, not a substring
    ],
)
def test_alpha_pattern_first_match_wins(tmp_path, alpha_pattern, alpha_q0, alpha_q1):
    q1 = "model.layers.1.self_attn.q_proj"
    ckpt = load_checkpoint(
        peft_dir(tmp_path, lora_tensors({Q0: (4, 4, 8), q1: (4, 4, 8)}), r=8, lora_alpha=16, alpha_pattern=alpha_pattern)
    )
    layers = _layers(ckpt)
    assert layers[Q0].update.scale == alpha_q0 / 8
    assert layers[q1].update.scale == alpha_q1 / 8


def test_pattern_matching_agrees_with_peft():
    other = pytest.importorskip("peft.utils.other")
    from nora_spectra.io.adapter_config import match_pattern

    patterns = [r"layers\.0\.self_attn\.q_proj", "q_proj", "proj", r"model\.layers\.1\..*", "v_proj|k_proj", "xq_proj"]
    names = [Q0, V0, "model.layers.1.mlp.up_proj", "model.xq_proj", "q_proj", "model.layers.10.self_attn.k_proj"]
    for start in range(len(patterns)):
        keys = patterns[start:] + patterns[:start]
        for name in names:
            ours = match_pattern(dict.fromkeys(keys, 1), name)
            theirs = other.get_pattern_key(keys, name)
            assert (ours if ours is not None else name) == theirs, (keys, name)


def test_fan_in_fan_out_reports_math_orientation(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 10)).astype(np.float32), rng.standard_normal((7, 4)).astype(np.float32)
    tensors = {PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight": a, PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight": b}
    ckpt = load_checkpoint(peft_dir(tmp_path, tensors, r=4, lora_alpha=8, fan_in_fan_out=True))
    layer = next(ckpt.iter_layers())
    assert layer.shape == (7, 10) and layer.update.scale == 2.0
    np.testing.assert_array_equal(layer.update.A, a) and np.testing.assert_array_equal(layer.update.B, b)
    assert any("fan_in_fan_out" in note for note in layer.notes)
    assert any("fan_in_fan_out" in w for w in ckpt.warnings)


def test_embedding_lora_is_transposed_update(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4, 30)).astype(np.float32)  # (r, num_embeddings)
    b = rng.standard_normal((6, 4)).astype(np.float32)  # (embedding_dim, r)
    tensors = {PREFIX + "model.embed_tokens.lora_embedding_A": a, PREFIX + "model.embed_tokens.lora_embedding_B": b}
    layer = next(load_checkpoint(peft_dir(tmp_path, tensors, r=4, lora_alpha=8)).iter_layers())
    assert layer.layer_type == "embedding" and layer.module == "model.embed_tokens"
    assert layer.shape == (30, 6) and layer.rank == 4 and layer.update.scale == 2.0
    assert layer.update.A.shape == (4, 6) and layer.update.B.shape == (30, 4)
    expected_delta = (b.astype(np.float64) @ a.astype(np.float64)).T  # PEFT's Embedding.get_delta_weight
    np.testing.assert_allclose(layer.update.B @ layer.update.A, expected_delta, rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        np.linalg.svd(layer.update.scale * layer.update.B @ layer.update.A, compute_uv=False),
        np.linalg.svd(2.0 * expected_delta, compute_uv=False),
        rtol=1e-12,
    )


def test_conv_lora_flattened(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # (r, d_in, kh, kw)
    b = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)  # (d_out, r, 1, 1)
    tensors = {PREFIX + "unet.conv_in.lora_A.weight": a, PREFIX + "unet.conv_in.lora_B.weight": b}
    layer = next(load_checkpoint(peft_dir(tmp_path, tensors, r=4, lora_alpha=4)).iter_layers())
    assert layer.layer_type == "conv" and layer.shape == (5, 27) and layer.rank == 4
    assert layer.update.A.shape == (4, 27) and layer.update.B.shape == (5, 4)
    # PEFT's Conv2d delta for a 1x1 lora_B: conv2d(A^T, B)^T, shape (d_out, d_in, kh, kw)
    ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    delta = torch.nn.functional.conv2d(ta.permute(1, 0, 2, 3), tb).permute(1, 0, 2, 3)
    np.testing.assert_allclose(layer.update.B @ layer.update.A, delta.reshape(5, -1).numpy(), rtol=1e-12, atol=1e-14)


def test_conv1d_lora(tmp_path):
    rng = np.random.default_rng(4)
    tensors = {
        PREFIX + "enc.conv.lora_A.weight": rng.standard_normal((2, 3, 5)).astype(np.float32),
        PREFIX + "enc.conv.lora_B.weight": rng.standard_normal((4, 2, 1)).astype(np.float32),
    }
    layer = next(load_checkpoint(peft_dir(tmp_path, tensors, r=2, lora_alpha=2)).iter_layers())
    assert layer.layer_type == "conv" and layer.shape == (4, 15)


def test_dora_flag_and_modules_to_save_skipped(tmp_path):
    tensors = lora_tensors({Q0: (6, 5, 8), V0: (6, 5, 8)})
    tensors[PREFIX + Q0 + ".lora_magnitude_vector"] = np.ones(6, np.float32)
    tensors[PREFIX + "score.weight"] = np.ones((2, 5), np.float32)
    tensors[PREFIX + "score.bias"] = np.ones(2, np.float32)
    tensors[PREFIX + "model.embed_tokens.weight"] = np.ones((11, 5), np.float32)
    ckpt = load_checkpoint(peft_dir(tmp_path, tensors, use_dora=True, modules_to_save=["score"]))
    layers = _layers(ckpt)
    assert layers[Q0].dora and not layers[V0].dora
    assert any("DoRA" in note for note in layers[Q0].notes)
    assert ckpt.modules == [Q0, V0]
    skipped = dict(ckpt.skipped)
    assert set(skipped) == {"score", "model.embed_tokens"}
    assert "modules_to_save" in skipped["score"] and "[2, 5]" in skipped["score"]
    assert "embedding" in skipped["model.embed_tokens"]
    assert any("DoRA" in w for w in ckpt.warnings) and [w for w in ckpt.warnings if "skipped" in w] == [
        "skipped 3 tensors of 2 modules that are not low-rank adapter factors: model.embed_tokens "
        "(saved embedding layer: full dense weights (weight [11, 5]), not a low-rank update); score "
        "(modules_to_save: full dense weights (bias [2], weight [2, 5]), not a low-rank update)"
    ]


def test_dora_magnitude_with_weight_suffix(tmp_path):
    tensors = lora_tensors({Q0: (6, 5, 8)})
    tensors[PREFIX + Q0 + ".lora_magnitude_vector.weight"] = np.ones(6, np.float32)
    assert next(load_checkpoint(peft_dir(tmp_path, tensors)).iter_layers()).dora


def test_lora_bias_noted_not_error(tmp_path):
    tensors = lora_tensors({Q0: (6, 5, 8)})
    tensors[PREFIX + Q0 + ".lora_B.bias"] = np.ones(6, np.float32)
    ckpt = load_checkpoint(peft_dir(tmp_path, tensors))
    layer = next(ckpt.iter_layers())
    assert any("bias" in note for note in layer.notes) and any("bias" in w for w in ckpt.warnings)
    assert ckpt.skipped == []


@pytest.mark.parametrize("layout", ["no_prefix", "adapter_name"])
def test_key_variants(tmp_path, layout):
    base = lora_tensors({Q0: (6, 5, 8)}, prefix="")
    if layout == "adapter_name":
        base = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in base.items()}
    ckpt = load_checkpoint(peft_dir(tmp_path, base))
    assert ckpt.modules == [Q0]
    np.testing.assert_array_equal(next(ckpt.iter_layers()).update.A, next(iter(base.values())))


def test_unknown_config_fields_ignored(tmp_path):
    ckpt = load_checkpoint(
        peft_dir(tmp_path, lora_tensors({Q0: (3, 3, 8)}), some_future_field={"x": [1]}, peft_version="9.9", lora_ga_config=None)
    )
    assert ckpt.config["some_future_field"] == {"x": [1]}
    assert next(ckpt.iter_layers()).update.scale == 2.0


def test_nora_directory(tmp_path):
    ckpt = load_checkpoint(
        peft_dir(tmp_path, lora_tensors({Q0: (3, 3, 4)}), peft_type="NORA", r=4, lora_alpha=4, activation="silu", dropout=0.3)
    )
    assert ckpt.format == "nora" and ckpt.method == "nora"
    assert ckpt.config["activation"] == "silu" and ckpt.config["dropout"] == 0.3
    layer = next(ckpt.iter_layers())
    assert layer.kind == "nora" and layer.update.scale == 1.0


def test_bare_safetensors_file(tmp_path):
    tensors = lora_tensors({Q0: (6, 5, 4)})
    ckpt = load_checkpoint(write_numpy(tmp_path / "lora.safetensors", tensors))
    assert ckpt.format == "safetensors" and ckpt.method == "lora" and ckpt.config is None
    assert ckpt.modules == [Q0]
    assert any("scale 1" in w for w in ckpt.warnings)
    layer = next(ckpt.iter_layers())
    assert layer.update.scale == 1.0 and layer.rank == 4


def test_weights_file_inside_adapter_dir_uses_config(tmp_path):
    peft_dir(tmp_path, lora_tensors({Q0: (6, 5, 8)}), lora_alpha=32)
    ckpt = load_checkpoint(tmp_path / "adapter_model.safetensors")
    assert ckpt.format == "peft" and next(ckpt.iter_layers()).update.scale == 4.0
    assert ckpt.path == str(tmp_path / "adapter_model.safetensors")


def test_adapter_subdirectories(tmp_path):
    peft_dir(tmp_path, lora_tensors({Q0: (3, 3, 8)}), lora_alpha=8)
    peft_dir(tmp_path / "math", lora_tensors({V0: (3, 3, 4)}), r=4, lora_alpha=8)
    peft_dir(tmp_path / "chat", lora_tensors({Q0: (3, 3, 2)}), r=2, lora_alpha=8)
    default = load_checkpoint(tmp_path)
    assert default.modules == [Q0] and default.adapter is None
    assert any("chat" in w and "math" in w for w in default.warnings)
    math_ckpt = load_checkpoint(tmp_path, adapter="math")
    assert math_ckpt.modules == [V0] and math_ckpt.adapter == "math" and next(math_ckpt.iter_layers()).update.scale == 2.0
    assert load_checkpoint(tmp_path, adapter="default").modules == [Q0]


def test_single_adapter_subdirectory_used_with_warning(tmp_path):
    peft_dir(tmp_path / "only", lora_tensors({Q0: (3, 3, 8)}))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.adapter == "only" and ckpt.modules == [Q0]
    assert any("'only'" in w for w in ckpt.warnings)


def test_bin_weights_loaded(tmp_path):
    torch = pytest.importorskip("torch")
    a, b = torch.randn(4, 6).to(torch.bfloat16), torch.randn(5, 4)
    write_config(tmp_path, r=4, lora_alpha=2)
    torch.save({PREFIX + Q0 + ".lora_A.weight": a, PREFIX + Q0 + ".lora_B.weight": b}, tmp_path / "adapter_model.bin")
    ckpt = load_checkpoint(tmp_path)
    layer = next(ckpt.iter_layers())
    assert ckpt.weights_path.endswith("adapter_model.bin") and layer.update.scale == 0.5 and layer.dtype == "bfloat16/float32"
    np.testing.assert_array_equal(layer.update.A, a.double().numpy())
    np.testing.assert_array_equal(layer.update.B, b.double().numpy())


def test_safetensors_preferred_over_bin(tmp_path):
    torch = pytest.importorskip("torch")
    peft_dir(tmp_path, lora_tensors({Q0: (3, 3, 8)}))
    torch.save({"garbage": torch.ones(1)}, tmp_path / "adapter_model.bin")
    assert load_checkpoint(tmp_path).weights_path.endswith(".safetensors")


def test_validation_reads_no_tensor_and_iteration_is_lazy(tmp_path, monkeypatch):
    tensors = lora_tensors({f"model.layers.{i}.q_proj": (4, 4, 8) for i in range(3)})
    path = peft_dir(tmp_path, tensors)
    calls: list[str] = []
    original = SafetensorsFile.read

    def spy(self, name):
        calls.append(name)
        return original(self, name)

    monkeypatch.setattr(SafetensorsFile, "read", spy)
    ckpt = load_checkpoint(path)
    assert calls == []
    layers = ckpt.iter_layers()
    next(layers)
    assert len(calls) == 2  # one pair only
    next(layers)
    assert len(calls) == 4


def test_nan_and_inf_are_not_errors(tmp_path):
    tensors = lora_tensors({Q0: (3, 3, 8)})
    tensors[PREFIX + Q0 + ".lora_A.weight"][0, 0] = np.nan
    tensors[PREFIX + Q0 + ".lora_B.weight"][0, 0] = np.inf
    layer = next(load_checkpoint(peft_dir(tmp_path, tensors)).iter_layers())
    assert np.isnan(layer.update.A[0, 0]) and np.isinf(layer.update.B[0, 0])


def test_safetensors_path_never_imports_torch(tmp_path):
    path = peft_dir(tmp_path, lora_tensors({Q0: (3, 3, 8)}))
    code = (
        "import sys; from nora_spectra.io import load_checkpoint; "
        f"c = load_checkpoint({json.dumps(str(path))}); [l.update.A.sum() for l in c.iter_layers()]; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
