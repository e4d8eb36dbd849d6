"""analyze(): numbers against an independent dense float64 reference, statuses, warnings, Analysis API.

The reference (``reference_record``) forms ``scale * B @ A`` in float64, takes ``np.linalg.svd`` and
evaluates every metric from its textbook formula, sharing no code with nora_spectra.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from nora_spectra.analysis import LAYER_COLUMNS, Analysis, AnalysisWarning, analyze, layer_index, module_type
from nora_spectra.errors import CheckpointError, UsageError

PREFIX = "base_model.model."


# --------------------------------------------------------------------------- fixtures (shared)


def write_peft_dir(
    directory: Path,
    factors: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    r: int,
    alpha: float,
    extra_config: dict | None = None,
    dtype=np.float32,
) -> Path:
    """A PEFT LoRA directory: ``factors`` maps module -> (A (r, d_in), B (d_out, r))."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype=dtype)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b, dtype=dtype)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({m.rsplit(".", 1)[-1] for m in factors})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets}
    config.update(extra_config or {})
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def random_factors(rng: np.random.Generator, r: int, shapes: dict[str, tuple[int, int]], decay: float = 0.0):
    """module -> (A, B) with a decaying spectrum (``decay`` > 0) so metrics are not trivially flat."""
    out = {}
    for module, (d_out, d_in) in shapes.items():
        a = rng.standard_normal((r, d_in)) / math.sqrt(d_in)
        b = rng.standard_normal((d_out, r)) * np.exp(-decay * np.arange(r))
        out[module] = (a, b)
    return out


SHAPES = {
    "model.layers.0.self_attn.q_proj": (48, 32),
    "model.layers.0.mlp.down_proj": (32, 80),
    "model.layers.1.self_attn.q_proj": (48, 32),
    "model.layers.1.mlp.down_proj": (32, 80),
}


# --------------------------------------------------------------------------- independent reference


def reference_record(a: np.ndarray, b: np.ndarray, scale: float, r: int) -> dict:
    """Every metric from a dense float64 SVD of ``scale * B @ A`` and hand-written formulas."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    delta = scale * (b @ a)
    k = min(r, *delta.shape)
    s = np.linalg.svd(delta, compute_uv=False)[:k]
    p = s / s.sum()
    p = p[p > 0]
    erank = math.exp(-sum(pi * math.log(pi) for pi in p))
    energy = s**2
    total = energy.sum()

    def energy_rank(q: float) -> int:
        acc = 0.0
        for i, e in enumerate(energy, start=1):
            acc += e
            if acc >= q * total * (1 - 1e-12):
                return i
        return len(energy)

    return {
        "singular_values": s,
        "effective_rank": erank,
        "utilization": erank / r,
        "stable_rank": total / s[0] ** 2,
        "energy_rank_90": energy_rank(0.90),
        "energy_rank_99": energy_rank(0.99),
        "numerical_rank": int(np.linalg.matrix_rank(delta)),
        "spectral_entropy": math.log(erank) / math.log(k),
        "participation_ratio": total**2 / np.sum(energy**2),
        "sigma_max": s[0],
        "frobenius_norm": float(np.linalg.norm(delta)),
        "tail_energy": energy[math.ceil(r / 2) :].sum() / total,
    }


def assert_matches_reference(record: dict, ref: dict, rtol: float = 1e-9) -> None:
    sv = np.asarray(record["singular_values"])
    np.testing.assert_allclose(sv, ref["singular_values"], rtol=0, atol=rtol * ref["sigma_max"])
    for name in ("effective_rank", "utilization", "stable_rank", "spectral_entropy", "participation_ratio",
                 "sigma_max", "frobenius_norm", "tail_energy"):
        assert record[name] == pytest.approx(ref[name], rel=1e-8, abs=1e-12), name
    for name in ("energy_rank_90", "energy_rank_99", "numerical_rank"):
        assert record[name] == ref[name], name


# --------------------------------------------------------------------------- numbers


def test_every_metric_matches_dense_float64_reference(tmp_path):
    rng = np.random.default_rng(1)
    r, alpha = 8, 16
    factors = random_factors(rng, r, SHAPES, decay=0.3)
    # store as float32 and compare with the float32 values (the upcast to float64 is exact)
    factors = {m: (a.astype(np.float32), b.astype(np.float32)) for m, (a, b) in factors.items()}
    ck = write_peft_dir(tmp_path / "ck", factors, r=r, alpha=alpha)
    result = analyze(ck)
    assert len(result) == len(SHAPES)
    by_module = {rec["module"]: rec for rec in result.records}
    assert set(by_module) == set(SHAPES)
    for module, (a, b) in factors.items():
        rec = by_module[module]
        assert rec["scale"] == alpha / r
        assert rec["rank"] == r
        assert rec["shape"] == list(SHAPES[module])
        assert rec["status"] == "ok"
        assert rec["kind"] == "lora"
        assert rec["dtype"] == "float32"
        assert rec["layer_type"] == "linear"
        assert_matches_reference(rec, reference_record(a, b, alpha / r, r))


def test_rslora_scale_enters_the_norms_not_the_ranks(tmp_path):
    rng = np.random.default_rng(2)
    r, alpha = 16, 8
    factors = random_factors(rng, r, {"model.layers.0.q_proj": (40, 40)}, decay=0.2)
    plain = analyze(write_peft_dir(tmp_path / "plain", factors, r=r, alpha=alpha)).records[0]
    rs = analyze(write_peft_dir(tmp_path / "rs", factors, r=r, alpha=alpha, extra_config={"use_rslora": True})).records[0]
    assert rs["scale"] == pytest.approx(alpha / math.sqrt(r))
    assert rs["sigma_max"] == pytest.approx(plain["sigma_max"] * math.sqrt(r), rel=1e-12)
    assert rs["effective_rank"] == pytest.approx(plain["effective_rank"], rel=1e-12)
    a, b = factors["model.layers.0.q_proj"]
    assert_matches_reference(rs, reference_record(a.astype(np.float32), b.astype(np.float32), alpha / math.sqrt(r), r))


def test_bfloat16_factors_are_upcast_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 24, generator=gen).to(torch.bfloat16)
    b = torch.randn(30, 4, generator=gen).to(torch.bfloat16)
    directory = tmp_path / "bf16"
    directory.mkdir()
    save_torch({f"{PREFIX}m.layers.3.v_proj.lora_A.weight": a, f"{PREFIX}m.layers.3.v_proj.lora_B.weight": b},
               str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    rec = analyze(directory).records[0]
    assert rec["dtype"] == "bfloat16"
    assert rec["module_type"] == "v_proj" and rec["layer_index"] == 3
    assert_matches_reference(rec, reference_record(a.double().numpy(), b.double().numpy(), 2.0, 4))


def test_rank_above_min_dimension_reports_min_dimension_values(tmp_path):
    rng = np.random.default_rng(3)
    r = 12
    factors = random_factors(rng, r, {"model.layers.0.k_proj": (6, 40)})
    rec = analyze(write_peft_dir(tmp_path / "ck", factors, r=r, alpha=r)).records[0]
    assert len(rec["singular_values"]) == 6
    a, b = factors["model.layers.0.k_proj"]
    assert_matches_reference(rec, reference_record(a.astype(np.float32), b.astype(np.float32), 1.0, r))
    assert rec["utilization"] <= 6 / r + 1e-12


def test_rank_deficient_update_has_lower_numerical_rank(tmp_path):
    rng = np.random.default_rng(4)
    r = 8
    a = rng.standard_normal((r, 50))
    b = rng.standard_normal((60, 3)) @ rng.standard_normal((3, r))  # rank(B) = 3
    rec = analyze(write_peft_dir(tmp_path / "ck", {"model.layers.0.o_proj": (a, b)}, r=r, alpha=r,
                                 dtype=np.float64)).records[0]
    assert rec["numerical_rank"] == 3
    assert rec["effective_rank"] <= 3 + 1e-9
    assert_matches_reference(rec, reference_record(a, b, 1.0, r))


def test_collapsed_flag_follows_threshold(tmp_path):
    rng = np.random.default_rng(5)
    r = 8
    a = rng.standard_normal((r, 30))
    b = np.zeros((30, r))
    b[:, 0] = rng.standard_normal(30)  # one direction only: erank 1, utilization 1/8
    ck = write_peft_dir(tmp_path / "ck", {"model.layers.0.q_proj": (a, b)}, r=r, alpha=r, dtype=np.float64)
    rec = analyze(ck).records[0]
    assert rec["effective_rank"] == pytest.approx(1.0)
    assert rec["collapsed"] is True  # 0.125 < 0.25
    assert analyze(ck, collapse_threshold=0.1).records[0]["collapsed"] is False
    assert analyze(ck, collapse_threshold=0.1).collapse_threshold == 0.1


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.3", True])
def test_bad_collapse_threshold_is_a_usage_error(tmp_path, bad):
    ck = write_peft_dir(tmp_path / "ck", random_factors(np.random.default_rng(0), 4, {"model.l.0.q": (8, 8)}), r=4, alpha=4)
    with pytest.raises(UsageError):
        analyze(ck, collapse_threshold=bad)


# --------------------------------------------------------------------------- statuses and warnings


def _mixed_checkpoint(tmp_path: Path) -> Path:
    rng = np.random.default_rng(6)
    factors = random_factors(rng, 4, SHAPES)
    a, b = factors["model.layers.1.self_attn.q_proj"]
    factors["model.layers.1.self_attn.q_proj"] = (a, np.zeros_like(b))
    a, b = factors["model.layers.1.mlp.down_proj"]
    a = a.copy()
    a[0, 0] = np.nan
    factors["model.layers.1.mlp.down_proj"] = (a, b)
    return write_peft_dir(tmp_path / "mixed", factors, r=4, alpha=8)


def test_zero_and_non_finite_layers_get_status_and_one_warning_each(tmp_path):
    ck = _mixed_checkpoint(tmp_path)
    with pytest.warns(AnalysisWarning) as caught:
        result = analyze(ck)
    by_module = {rec["module"]: rec for rec in result.records}
    zero = by_module["model.layers.1.self_attn.q_proj"]
    assert zero["status"] == "zero"
    assert zero["effective_rank"] == 0 and zero["utilization"] == 0 and zero["collapsed"] is True
    assert zero["singular_values"] == [0.0] * 4
    bad = by_module["model.layers.1.mlp.down_proj"]
    assert bad["status"] == "non_finite"
    assert bad["singular_values"] is None
    for name in ("effective_rank", "utilization", "stable_rank", "sigma_max", "frobenius_norm", "tail_energy"):
        assert bad[name] is None
    messages = [str(w.message) for w in caught]
    assert sum("NaN/Inf" in m for m in messages) == 1
    assert sum("all-zero" in m for m in messages) == 1
    assert any("model.layers.1.mlp.down_proj" in m for m in result.warnings)
    # summary counts both, averages the zero layer as the zeros it is, skips the non-finite one
    assert result.summary["by_status"]["zero"] == 1
    assert result.summary["by_status"]["non_finite"] == 1
    assert result.summary["analysed"] == 3


def test_emit_warnings_false_is_silent_but_keeps_messages(tmp_path):
    ck = _mixed_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = analyze(ck, emit_warnings=False)
    assert len(result.warnings) == 2


def test_json_is_strict_with_nulls_for_non_finite(tmp_path):
    result = analyze(_mixed_checkpoint(tmp_path), emit_warnings=False)
    text = result.to_json()

    def reject(constant: str):
        raise AssertionError(f"non-strict JSON constant {constant}")

    data = json.loads(text, parse_constant=reject)
    assert list(data)[:6] == ["checkpoint", "adapter", "format", "method", "layers", "summary"]
    assert set(data) == {"checkpoint", "adapter", "format", "method", "layers", "summary", "collapse_threshold",
                         "config", "warnings", "skipped", "nora_spectra_version"}
    assert data["adapter"] is None  # the default adapter
    bad = next(layer for layer in data["layers"] if layer["status"] == "non_finite")
    assert bad["effective_rank"] is None and bad["singular_values"] is None
    for layer in data["layers"]:
        assert list(layer) == list(LAYER_COLUMNS)


def test_dora_layers_are_marked_direction_only(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(16, 16)}) for _ in range(2))

        def forward(self, x):  # pragma: no cover - not called
            return x

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(Tiny(), config)
    model.save_pretrained(tmp_path / "dora")
    with pytest.warns(AnalysisWarning, match="DoRA"):
        result = analyze(tmp_path / "dora")
    assert [rec["status"] for rec in result.records] == ["dora_direction_only"] * 2
    assert result.summary["analysed"] == 2
    state = model.state_dict()
    for rec in result.records:
        name = rec["module"]  # e.g. layers.0.q_proj
        a = state[f"base_model.model.{name}.lora_A.default.weight"].double().numpy()
        b = state[f"base_model.model.{name}.lora_B.default.weight"].double().numpy()
        assert_matches_reference(rec, reference_record(a, b, 2.0, 4))


def test_checkpoint_errors_propagate(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        analyze(tmp_path / "missing")


# --------------------------------------------------------------------------- the Analysis object


def test_layers_dataframe_has_documented_columns(tmp_path):
    ck = write_peft_dir(tmp_path / "ck", random_factors(np.random.default_rng(7), 4, SHAPES), r=4, alpha=8)
    result = analyze(ck)
    frame = result.layers
    assert list(frame.columns) == list(LAYER_COLUMNS)
    assert len(frame) == len(result) == 4
    assert isinstance(frame["singular_values"].iloc[0], list)
    assert frame["effective_rank"].tolist() == [rec["effective_rank"] for rec in result.records]
    assert set(frame["module_type"]) == {"q_proj", "down_proj"}


def test_records_carry_the_stored_key_and_the_json_the_header_metadata(tmp_path):
    ck = write_peft_dir(tmp_path / "ck", random_factors(np.random.default_rng(7), 4, SHAPES), r=4, alpha=8)
    result = analyze(ck)
    assert [rec["key"] for rec in result.records] == [PREFIX + rec["module"] for rec in result.records]
    assert list(result.records[0])[:2] == ["module", "key"]
    assert result.metadata == {} and "metadata" not in result.to_dict()  # PEFT's {"format": "pt"} only
    bare = tmp_path / "bare.safetensors"
    a, b = random_factors(np.random.default_rng(8), 2, {"m.q_proj": (6, 5)})["m.q_proj"]
    save_file({"m.q_proj.lora_A.weight": a, "m.q_proj.lora_B.weight": b}, str(bare),
              metadata={"format": "pt", "ss_network_dim": "2", "note": "x"})
    result = analyze(bare, emit_warnings=False)
    assert result.records[0]["key"] == "m.q_proj"
    assert result.metadata == {"ss_network_dim": "2", "note": "x"}
    data = result.to_dict()
    assert data["metadata"] == {"ss_network_dim": "2", "note": "x"}
    assert list(data)[-2:] == ["metadata", "nora_spectra_version"]
    assert Analysis.from_dict(data).metadata == result.metadata


def test_round_trip_through_json(tmp_path):
    result = analyze(_mixed_checkpoint(tmp_path), emit_warnings=False)
    again = Analysis.from_json(result.to_json())
    assert again.to_dict() == result.to_dict()
    assert again.records[0]["singular_values"] == result.records[0]["singular_values"]
    assert len(again) == len(result)


def test_from_dict_rejects_non_analysis():
    with pytest.raises(UsageError):
        Analysis.from_dict({"checkpoints": []})
    with pytest.raises(UsageError):
        Analysis.from_json("{not json")


def test_accepts_loaded_checkpoint_and_reports_progress(tmp_path):
    from nora_spectra.io import load_checkpoint

    ck = write_peft_dir(tmp_path / "ck", random_factors(np.random.default_rng(8), 4, SHAPES), r=4, alpha=8)
    calls = []
    result = analyze(load_checkpoint(ck), progress=lambda done, total, module: calls.append((done, total, module)))
    assert [c[0] for c in calls] == [1, 2, 3, 4]
    assert all(c[1] == 4 for c in calls)
    assert [c[2] for c in calls] == [rec["module"] for rec in result.records]
    assert result.format == "peft" and result.method == "lora"
    assert result.config["r"] == 4


def test_bad_progress_argument(tmp_path):
    ck = write_peft_dir(tmp_path / "ck", random_factors(np.random.default_rng(8), 4, SHAPES), r=4, alpha=8)
    with pytest.raises(UsageError):
        analyze(ck, progress="yes")


@pytest.mark.parametrize(
    ("name", "kind", "index"),
    [
        ("model.layers.12.self_attn.q_proj", "q_proj", 12),
        ("transformer.h.0.attn.c_attn", "c_attn", 0),
        ("lm_head", "lm_head", None),
        ("unet.down_blocks.1.attentions.0.to_q", "to_q", 1),
    ],
)
def test_module_type_and_layer_index(name, kind, index):
    assert module_type(name) == kind
    assert layer_index(name) == index
