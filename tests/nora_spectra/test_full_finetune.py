"""Full fine-tunes against their base (format ``full``): dW = W_tuned - W_base, exact or top-k, relative size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from nora_spectra.analysis import analyze
from nora_spectra.errors import CheckpointError
from nora_spectra.io import detect_format, load_checkpoint
from tests.nora_spectra.golden_fixtures import write_safetensors
from tests.nora_spectra.model_builders import write_model, write_sharded

Q0 = "model.layers.0.self_attn.q_proj.weight"
V0 = "model.layers.0.self_attn.v_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"


def _pair(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]], rank: int = 3, noise: float = 1e-3):
    """Base weights and tuned = base + a low-rank change + small noise (float32)."""
    base, tuned = {}, {}
    for name, shape in shapes.items():
        w0 = rng.standard_normal(shape).astype(np.float32)
        flat = (shape[0], math.prod(shape[1:]))
        change = rng.standard_normal((flat[0], rank)) @ rng.standard_normal((rank, flat[1])) * 0.05
        change += noise * rng.standard_normal(flat)
        base[name] = w0
        tuned[name] = (w0 + change.reshape(shape)).astype(np.float32)
    return base, tuned


def _reference(base: dict, tuned: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(dW, W0) in float64, conv kernels flattened."""
    w0 = base[name].astype(np.float64)
    dw = tuned[name].astype(np.float64) - w0
    return dw.reshape(dw.shape[0], -1), w0.reshape(w0.shape[0], -1)


@pytest.fixture
def models(tmp_path: Path):
    rng = np.random.default_rng(3)
    base, tuned = _pair(rng, {Q0: (24, 16), V0: (12, 16), UP: (40, 16)})
    extra = {
        "model.norm.weight": np.ones(16, np.float32),
        "model.embed_tokens.weight": rng.standard_normal((30, 16)).astype(np.float32),
    }
    base.update(extra)
    tuned.update({k: v + np.float32(0.5) for k, v in extra.items()})
    tuned["model.layers.0.new_proj.weight"] = rng.standard_normal((4, 4)).astype(np.float32)  # not in the base
    tuned["model.layers.0.qweight"] = np.ones((4, 4), np.int8)  # a quantized tensor
    return write_model(tmp_path / "base.safetensors", base), write_model(tmp_path / "tuned", tuned), base, tuned


def test_exact_spectra_relative_size_and_skips(models) -> None:
    base_path, tuned_path, base, tuned = models
    analysis = analyze(tuned_path, base=base_path, cache=False, emit_warnings=False)
    assert (analysis.format, analysis.method, analysis.base) == ("full", "full", str(base_path))
    records = {rec["module"]: rec for rec in analysis.records}
    assert list(records) == [Q0[:-7], V0[:-7], UP[:-7]]
    for name in (Q0, V0, UP):
        rec = records[name[:-7]]
        dw, w0 = _reference(base, tuned, name)
        want = np.linalg.svd(dw, compute_uv=False)
        assert rec["kind"] == "full" and rec["rank"] == min(dw.shape) and rec["shape"] == list(dw.shape)
        np.testing.assert_allclose(rec["singular_values"], want, rtol=0, atol=1e-12 * want[0])
        assert (rec["top_k"], rec["captured_energy"], rec["sigma_error_bound"]) == (None, 1.0, 0.0)
        assert rec["base_tensor"] == name
        assert rec["relative_sigma_max"] == pytest.approx(want[0] / np.linalg.norm(w0, 2), rel=1e-12)
        assert rec["relative_frobenius_norm"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(w0), rel=1e-12)
    skipped = dict(analysis.skipped)
    assert "fewer than 2 dimensions" in skipped["model.norm.weight"]
    assert "vocabulary embedding" in skipped["model.embed_tokens.weight"]
    assert skipped["model.layers.0.new_proj.weight"] == "not in the base model"
    assert "non-float dtype I8" in skipped["model.layers.0.qweight"]
    assert any(w.startswith("skipped 4 tensors not compared with the base") for w in analysis.warnings)
    assert "intruders" not in analysis.records[0]


def test_top_k_is_randomized_within_its_stated_bound(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base, tuned = _pair(rng, {Q0: (300, 200)}, rank=8, noise=0.02)
    base_path, tuned_path = write_model(tmp_path / "b.safetensors", base), write_model(tmp_path / "t.safetensors", tuned)
    rec = analyze(tuned_path, base=base_path, top_k=6, cache=False, emit_warnings=False).records[0]
    dw, _ = _reference(base, tuned, Q0)
    exact = np.linalg.svd(dw, compute_uv=False)
    got = np.asarray(rec["singular_values"])
    eps = rec["sigma_error_bound"]
    assert rec["top_k"] == 6 and rec["rank"] == 6 and len(got) == 6 and eps > 0
    # s_i <= sigma_i <= sqrt(s_i^2 + eps^2) for every i (Weyl), eps = ||(I - QQ^T) dW||_F
    assert np.all(got <= exact[:6] * (1 + 1e-12))
    assert np.all(exact[:6] <= np.sqrt(got**2 + eps**2) * (1 + 1e-12))
    total = float(np.sum(exact**2))
    assert rec["captured_energy"] == pytest.approx(float(np.sum(got**2)) / total, rel=1e-12)
    assert eps**2 <= total - float(np.sum(got**2)) + 1e-12 * total  # the sketch holds at least the top-k energy
    assert rec["relative_frobenius_norm"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(base[Q0].astype(np.float64)), rel=1e-12)
    exact_rec = analyze(tuned_path, base=base_path, top_k="all", cache=False, emit_warnings=False).records[0]
    assert exact_rec["top_k"] is None and exact_rec["rank"] == 200
    np.testing.assert_allclose(exact_rec["singular_values"], exact, rtol=0, atol=1e-12 * exact[0])


def test_default_top_k_for_large_matrices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nora_spectra.spaces.base_aware as base_aware

    monkeypatch.setattr(base_aware, "EXACT_SVD_MAX_DIM", 100)
    monkeypatch.setattr(base_aware, "DEFAULT_TOP_K", 7)
    base, tuned = _pair(np.random.default_rng(6), {Q0: (220, 160), V0: (90, 80)})
    base_path, tuned_path = write_model(tmp_path / "b.safetensors", base), write_model(tmp_path / "t.safetensors", tuned)
    records = analyze(tuned_path, base=base_path, cache=False, emit_warnings=False).records
    assert [(r["module"], r["top_k"]) for r in records] == [(Q0[:-7], 7), (V0[:-7], None)]
    assert analyze(tuned_path, base=base_path, cache=False, emit_warnings=False).top_k is None  # as asked


def test_sharded_bf16_models_and_conv_kernels(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    conv = "unet.conv.weight"
    base, tuned = _pair(rng, {Q0: (16, 12), V0: (16, 12), conv: (6, 3, 3, 3)})
    bf16 = {name: ("BF16", value) for name, value in base.items()}
    write_safetensors(tmp_path / "base" / "model-00001-of-00002.safetensors", {Q0: bf16[Q0]})
    write_safetensors(tmp_path / "base" / "model-00002-of-00002.safetensors", {V0: bf16[V0], conv: bf16[conv]})
    (tmp_path / "base" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"%s": "model-00001-of-00002.safetensors", "%s": "model-00002-of-00002.safetensors",'
        ' "%s": "model-00002-of-00002.safetensors"}}' % (Q0, V0, conv)
    )
    tuned_dir = write_sharded(tmp_path / "tuned", tuned, [[Q0, conv], [V0]])
    analysis = analyze(tuned_dir, base=tmp_path / "base", cache=False, emit_warnings=False)
    base_read = load_checkpoint(tuned_dir, base=tmp_path / "base")
    assert base_read.format == "full" and base_read.weights_path.endswith("model.safetensors.index.json")
    for rec in analysis.records:
        name = rec["module"] + ".weight"
        w0 = base[name].astype(np.float32)
        w0 = (w0.view(np.uint32) + 0x7FFF + ((w0.view(np.uint32) >> 16) & 1)) >> 16 << 16  # round to bf16
        w0 = w0.astype(np.uint32).view(np.float32).astype(np.float64)
        dw = (tuned[name].astype(np.float64) - w0).reshape(rec["shape"])
        want = np.linalg.svd(dw, compute_uv=False)
        np.testing.assert_allclose(rec["singular_values"], want, rtol=0, atol=1e-12 * want[0])
        assert rec["dtype"] == "float32/bfloat16"
    conv_rec = next(r for r in analysis.records if r["module"] == "unet.conv")
    assert conv_rec["layer_type"] == "conv" and conv_rec["shape"] == [6, 27]


def test_detection_needs_the_base(models) -> None:
    base_path, tuned_path, _, _ = models
    assert detect_format(tuned_path) is None  # a model is no adapter: without a base nothing claims it
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_checkpoint(tuned_path)
    with pytest.raises(CheckpointError, match="pass --base BASE"):
        load_checkpoint(tuned_path, format="full")
    assert load_checkpoint(tuned_path, base=base_path).format == "full"


def test_shape_mismatch_names_both_files_and_the_tensor(tmp_path: Path) -> None:
    base, tuned = _pair(np.random.default_rng(9), {Q0: (8, 6), V0: (8, 6)})
    base[V0] = np.ones((6, 8), np.float32)
    base_path, tuned_path = write_model(tmp_path / "b.safetensors", base), write_model(tmp_path / "t.safetensors", tuned)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tuned_path, base=base_path)
    assert str(info.value) == (
        f"{tuned_path}: tensor '{V0}' has shape [8, 6] but the base's '{V0}' in {base_path} has shape [6, 8]"
    )


def test_a_base_sharing_no_matrix_is_an_error(tmp_path: Path) -> None:
    base, tuned = _pair(np.random.default_rng(10), {Q0: (8, 6)})
    base_path = write_model(tmp_path / "b.safetensors", {"other.weight": base[Q0]})
    tuned_path = write_model(tmp_path / "t.safetensors", tuned)
    with pytest.raises(CheckpointError, match="no weight matrix shared with the base model"):
        load_checkpoint(tuned_path, base=base_path)
