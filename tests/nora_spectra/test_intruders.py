"""Intruder dimensions: against a dense float64 reference and PEFT's own detector; the base-SVD disk cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import nora_spectra.svd_cache as svd_cache
from nora_spectra.analysis import analyze
from nora_spectra.errors import UsageError
from nora_spectra.intruders import intruder_dimensions
from nora_spectra.spectrum import DENSE_VECTORS_MAX_DIM, leading_left_singular_vectors, spectral_norm
from tests.nora_spectra.io_builders import lora_tensors, peft_dir
from tests.nora_spectra.model_builders import write_model

MODULES = {"model.layers.0.q_proj": (20, 14, 3), "model.layers.0.v_proj": (14, 20, 3), "model.layers.1.q_proj": (20, 14, 3)}


def _reference(tuned: np.ndarray, base: np.ndarray, k: int, eps: float) -> tuple[list[int], np.ndarray]:
    """PEFT's computation, densely in float64: full SVDs of both, max |cos| of the top-k tuned vectors."""
    u_base = np.linalg.svd(base, full_matrices=False)[0]
    u_tuned = np.linalg.svd(tuned, full_matrices=False)[0][:, :k]
    max_cos = np.abs(u_tuned.T @ u_base).max(axis=1)
    return [int(i) for i in np.flatnonzero(max_cos < eps)], max_cos


def test_an_intruder_built_by_hand_is_found() -> None:
    rng = np.random.default_rng(0)
    n = 16
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    base = (u * np.linspace(10, 1, n)) @ v.T
    intruder = u.sum(axis=1) / 4.0  # unit vector with |cos| 1/4 against every base direction
    tuned = base + 100.0 * np.outer(intruder, v[:, 0])
    found = intruder_dimensions(tuned, u, k=3, eps=0.5)
    indices, max_cos = _reference(tuned, base, 3, 0.5)
    assert found.count == 1 and found.indices == indices == [0]
    np.testing.assert_allclose(found.max_cos, max_cos, rtol=0, atol=1e-12)
    assert intruder_dimensions(base, u, k=3, eps=0.5).count == 0


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (DENSE_VECTORS_MAX_DIM + 90, DENSE_VECTORS_MAX_DIM + 20)])
def test_leading_vectors_and_norm_match_a_dense_svd(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    k = min(shape)
    m = (rng.standard_normal((shape[0], k)) * 0.9 ** np.arange(k)) @ rng.standard_normal((k, shape[1]))
    u_ref, s_ref, _ = np.linalg.svd(m, full_matrices=False)
    u, s = leading_left_singular_vectors(m, 6)  # the large case goes through ARPACK
    np.testing.assert_allclose(s, s_ref[:6], rtol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(u * u_ref[:, :6], axis=0)), 1.0, rtol=0, atol=1e-9)
    assert spectral_norm(m) == pytest.approx(s_ref[0], rel=1e-13)
    assert spectral_norm(np.zeros(shape)) == 0.0


@pytest.fixture
def lora_and_base(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    tensors = lora_tensors(MODULES, dtype=np.float64, seed=2)
    for name in tensors:
        tensors[name] *= 3.0  # a large update, so that some leading directions are new
    adapter = peft_dir(tmp_path / "lora", tensors, r=3, lora_alpha=6)
    rng = np.random.default_rng(5)
    base = {f"{m}.weight": rng.standard_normal((d_out, d_in)) for m, (d_out, d_in, _) in MODULES.items()}
    return adapter, write_model(tmp_path / "base.safetensors", base), tensors, base


def test_intruders_match_the_dense_reference(lora_and_base, tmp_path: Path) -> None:
    adapter, base_path, tensors, base = lora_and_base
    analysis = analyze(adapter, base=base_path, intruders=True, intruder_k=5, intruder_eps=0.6,
                       cache=tmp_path / "cache", emit_warnings=False)
    assert (analysis.intruder_k, analysis.intruder_eps) == (5, 0.6)
    total = 0
    for rec in analysis.records:
        a = tensors[f"base_model.model.{rec['module']}.lora_A.weight"]
        b = tensors[f"base_model.model.{rec['module']}.lora_B.weight"]
        w0 = base[f"{rec['module']}.weight"]
        indices, max_cos = _reference(w0 + 2.0 * b @ a, w0, 5, 0.6)
        assert rec["intruder_indices"] == indices and rec["intruders"] == len(indices)
        np.testing.assert_allclose(rec["intruder_max_cos"], max_cos, rtol=0, atol=1e-6)  # float32 base vectors
        total += rec["intruders"]
    assert total > 0  # the fixture does produce intruders


def test_intruders_match_peft(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft", reason="peft is a dev dependency")
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(14, 20)
            self.v_proj = torch.nn.Linear(20, 14)
            self.embed = torch.nn.Embedding(30, 12)

    torch.manual_seed(3)
    model = Tiny().double()
    base = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "embed"],
                                                             init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    lines: list[str] = []
    reduce_intruder_dimension(peft_model, top_k=10, threshold_epsilon=0.5, logging_sink=lines.append)
    peft_counts = {}
    for line in lines:
        if match := re.match(r".*\.(\w+): (?:Intruders: (\d+)|No intruders)$", line):
            peft_counts[match[1]] = int(match[2] or 0)
    analysis = analyze(tmp_path / "adapter", base=write_model(tmp_path / "base.safetensors", base), intruders=True,
                       cache=False, emit_warnings=False)
    ours = {rec["module"]: rec["intruders"] for rec in analysis.records}
    assert ours == peft_counts and len(ours) == 3 and sum(ours.values()) > 0


def test_the_base_svd_is_cached_and_invalidated(lora_and_base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter, base_path, _, base = lora_and_base
    calls: list[tuple[int, int]] = []
    real = svd_cache.left_singular_vectors

    def counting(matrix):
        calls.append(matrix.shape)
        return real(matrix)

    monkeypatch.setattr(svd_cache, "left_singular_vectors", counting)
    monkeypatch.setenv("NORA_SPECTRA_CACHE", str(tmp_path / "cache"))
    first = analyze(adapter, base=base_path, intruders=True, emit_warnings=False)
    assert len(calls) == 3 and len(list((tmp_path / "cache" / "base-svd").glob("*.npz"))) == 3
    second = analyze(adapter, base=base_path, intruders=True, emit_warnings=False)
    assert len(calls) == 3  # every base SVD came from the cache
    assert first.records == second.records
    base["model.layers.0.v_proj.weight"] = base["model.layers.0.v_proj.weight"] + 1.0  # one base tensor changes
    write_model(base_path, base)
    third = analyze(adapter, base=base_path, intruders=True, emit_warnings=False)
    assert calls[3:] == [(14, 20)]  # only the changed tensor is recomputed
    assert third.records[0] == first.records[0] and third.records[1] != first.records[1]
    analyze(adapter, base=base_path, intruders=True, cache=False, emit_warnings=False)
    assert len(calls) == 7  # no cache: everything computed


def test_a_corrupt_or_unwritable_cache_is_a_warning(lora_and_base, tmp_path: Path) -> None:
    adapter, base_path, _, _ = lora_and_base
    cache = tmp_path / "cache"
    reference = analyze(adapter, base=base_path, intruders=True, cache=cache, emit_warnings=False)
    entry = sorted((cache / "base-svd").glob("*.npz"))[0]
    entry.write_bytes(b"not a zip file")
    again = analyze(adapter, base=base_path, intruders=True, cache=cache, emit_warnings=False)
    assert again.records == reference.records
    assert any("is unreadable" in w and "recomputed" in w for w in again.warnings)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache directory should be")
    third = analyze(adapter, base=base_path, intruders=True, cache=blocked, emit_warnings=False)
    assert third.records == reference.records
    assert any(w.startswith(f"cannot write the SVD cache in {blocked / 'base-svd'}") for w in third.warnings)


def test_option_errors(lora_and_base) -> None:
    adapter, base_path, _, _ = lora_and_base
    with pytest.raises(UsageError, match="--intruders needs the base model"):
        analyze(adapter, intruders=True, emit_warnings=False)
    with pytest.raises(UsageError, match="--intruder-k applies only with --intruders"):
        analyze(adapter, base=base_path, intruder_k=3, emit_warnings=False)
    with pytest.raises(UsageError, match="--intruder-eps must be a number in"):
        analyze(adapter, base=base_path, intruders=True, intruder_eps=1.5, emit_warnings=False)
    with pytest.raises(UsageError, match="--top-k must be a positive integer or 'all'"):
        analyze(adapter, top_k=0, emit_warnings=False)
    with pytest.raises(UsageError, match="--base applies only to --space weight"):
        analyze(adapter, space="probe", base=base_path, emit_warnings=False)


def test_nora_checkpoints_are_measured_by_their_linear_skeleton(tmp_path: Path) -> None:
    from nora_spectra.spaces.weight import NORA_SKELETON_WARNING

    tensors = lora_tensors(MODULES, dtype=np.float64, seed=8)
    adapter = peft_dir(tmp_path / "nora", tensors, r=3, lora_alpha=6, peft_type="NORA")
    rng = np.random.default_rng(9)
    base = {f"{m}.weight": rng.standard_normal((d_out, d_in)) for m, (d_out, d_in, _) in MODULES.items()}
    analysis = analyze(adapter, base=write_model(tmp_path / "base.safetensors", base), cache=False, emit_warnings=False)
    assert analysis.method == "nora" and NORA_SKELETON_WARNING in analysis.warnings
    assert all(rec["relative_sigma_max"] > 0 for rec in analysis.records)
