"""compare(): modules matched by name, values read from the records, differences against a hand computation.

The checkpoint builders here are shared with the plot, report and CLI tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytest
from safetensors.numpy import save_file

from nora_spectra.analysis import Analysis, analyze
from nora_spectra.comparison import ROW_COLUMNS, Comparison, compare, load_analyses
from nora_spectra.labels import default_labels
from nora_spectra.errors import CheckpointError, UsageError

D = 12  # d_in = d_out of every test module


def diagonal_factors(sigma: Sequence[float], d: int = D) -> tuple[np.ndarray, np.ndarray]:
    """A (r, d) and B (d, r) with B @ A = diag(sigma) padded: singular values exactly ``sigma``."""
    r = len(sigma)
    A = np.zeros((r, d), dtype=np.float32)
    A[:, :r] = np.eye(r)
    B = np.zeros((d, r), dtype=np.float32)
    B[:r, :r] = np.diag(np.asarray(sigma, dtype=np.float32))
    return A, B


def write_peft(
    path: Path,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    kind: str = "lora",
    r: int,
    alpha: float | None = None,
) -> Path:
    """Write a PEFT-layout checkpoint (``peft_type`` "NORA" marks NoRA) with the given factors."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(A, dtype=np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(B, dtype=np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": kind.upper(), "r": r, "lora_alpha": alpha if alpha is not None else r,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors})}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def random_checkpoint(path: Path, *, kind: str, r: int, layers: int = 2, types: Sequence[str] = ("q_proj", "v_proj"),
                      decay: float = 1.0, seed: int = 0) -> Path:
    """Random factors whose spectrum falls off faster for larger ``decay`` (LoRA-like cliffs)."""
    rng = np.random.default_rng(seed)
    factors = {}
    for i in range(layers):
        for t in types:
            A = rng.standard_normal((r, D))
            B = rng.standard_normal((D, r)) * np.geomspace(1.0, 10.0 ** (-decay), r)
            factors[f"model.layers.{i}.self_attn.{t}"] = (A, B)
    return write_peft(path, factors, kind=kind, r=r, alpha=2 * r)


def hand_erank(sigma: Sequence[float]) -> float:
    p = np.asarray(sigma, dtype=float) / np.sum(sigma)
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    a = write_peft(root / "a", {q: diagonal_factors([4, 2, 1, 1]), v: diagonal_factors([1, 0.5, 0.25, 0.125])}, r=4)
    b = write_peft(
        root / "b",
        {
            q: diagonal_factors([3, 3, 3, 3, 1, 1, 1, 1]),
            v: diagonal_factors([1, 1, 1, 1, 1, 1, 1, 1]),
            "model.layers.1.mlp.up_proj": diagonal_factors([2, 1, 1, 1, 1, 1, 1, 1]),
        },
        kind="nora",
        r=8,
        alpha=16,
    )
    return a, b


def test_modules_and_differences_match_a_hand_computation(pair: tuple[Path, Path]) -> None:
    cmp = compare(pair, labels=["lora", "nora"], emit_warnings=False)
    q = "model.layers.0.self_attn.q_proj"
    ref, other = cmp.row(q, "lora"), cmp.row(q, "nora")
    # scale 1 for a (alpha = r), 2 for b (alpha = 16, r = 8): sigma_max scales, erank does not.
    assert ref["effective_rank"] == pytest.approx(hand_erank([4, 2, 1, 1]), rel=1e-12)
    assert other["effective_rank"] == pytest.approx(hand_erank([3, 3, 3, 3, 1, 1, 1, 1]), rel=1e-12)
    assert other["d_effective_rank"] == pytest.approx(
        hand_erank([3, 3, 3, 3, 1, 1, 1, 1]) - hand_erank([4, 2, 1, 1]), rel=1e-12
    )
    assert other["d_utilization"] == pytest.approx(
        hand_erank([3, 3, 3, 3, 1, 1, 1, 1]) / 8 - hand_erank([4, 2, 1, 1]) / 4, rel=1e-12
    )
    assert ref["sigma_max"] == pytest.approx(4.0) and other["sigma_max"] == pytest.approx(6.0)
    assert other["d_sigma_max"] == pytest.approx(2.0)
    assert other["rank_differs"] is True and ref["rank_differs"] is False
    assert ref["d_effective_rank"] is None  # no difference of the reference to itself
    assert (other["kind"], ref["kind"]) == ("nora", "lora")


def test_values_are_the_analysis_records_exactly(pair: tuple[Path, Path]) -> None:
    analyses = [analyze(p, emit_warnings=False) for p in pair]
    cmp = compare(analyses)
    for label, analysis in zip(cmp.labels, analyses):
        for rec in analysis.records:
            row = cmp.row(rec["module"], label)
            for key in ("rank", "effective_rank", "utilization", "sigma_max", "status", "collapsed"):
                assert row[key] == rec[key]
    assert cmp.analyses[0] is analyses[0]  # nothing re-analysed


def test_modules_present_in_only_some_checkpoints_are_listed(pair: tuple[Path, Path]) -> None:
    cmp = compare(pair, labels=["a", "b"], emit_warnings=False)
    up = "model.layers.1.mlp.up_proj"
    assert cmp.modules[-1] == up
    assert cmp.partial_modules == [{"module": up, "present_in": ["b"], "missing_from": ["a"]}]
    missing = cmp.row(up, "a")
    assert missing["present"] is False and missing["effective_rank"] is None and missing["rank"] is None
    assert missing["module_type"] == "up_proj" and missing["layer_index"] == 1
    assert cmp.row(up, "b")["d_effective_rank"] is None  # no reference value to subtract
    assert len(cmp.rows) == len(cmp.modules) * 2


def test_group_summaries_come_from_each_analysis_summary(pair: tuple[Path, Path]) -> None:
    cmp = compare(pair, labels=["a", "b"], emit_warnings=False)
    groups = {(g["group"], g["label"]): g for g in cmp.by_module_type}
    for label, analysis in zip(cmp.labels, cmp.analyses):
        for name, summary in analysis.summary["by_module_type"].items():
            g = groups[(name, label)]
            assert g["mean_effective_rank"] == summary["metrics"]["effective_rank"]["mean"]
            assert g["weighted_utilization"] == summary["metrics"]["utilization"]["weighted_mean"]
    q_a, q_b = groups[("q_proj", "a")], groups[("q_proj", "b")]
    assert q_b["d_mean_effective_rank"] == pytest.approx(q_b["mean_effective_rank"] - q_a["mean_effective_rank"])
    assert groups[("up_proj", "a")]["layers"] == 0 and groups[("up_proj", "a")]["mean_effective_rank"] is None
    layers = {(g["group"], g["label"]) for g in cmp.by_layer}
    assert ("0", "a") in layers and ("1", "b") in layers


def test_table_json_and_wide_views(pair: tuple[Path, Path]) -> None:
    cmp = compare(pair, labels=["a", "b"], emit_warnings=False)
    table = cmp.table
    assert list(table.columns) == list(ROW_COLUMNS) and len(table) == 6
    data = json.loads(cmp.to_json())
    assert data["reference"] == "a" and [c["label"] for c in data["checkpoints"]] == ["a", "b"]
    assert len(data["modules"]) == 6 and data["partial_modules"][0]["module"] == "model.layers.1.mlp.up_proj"
    wide = cmp.wide("utilization")
    assert list(wide.columns) == ["a", "b"] and list(wide.index) == cmp.modules
    assert math.isnan(wide.loc["model.layers.1.mlp.up_proj", "a"])
    with pytest.raises(UsageError):
        cmp.wide("nonsense")
    assert "<table" in cmp._repr_html_()


def test_labels_are_checked_and_defaulted(pair: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError, match="3 labels for 2 checkpoints"):
        compare(pair, labels=["x", "y", "z"], emit_warnings=False)
    with pytest.raises(UsageError, match="unique"):
        compare(pair, labels=["x", "x"], emit_warnings=False)
    with pytest.raises(UsageError, match="at least two checkpoints"):
        compare([])
    # one checkpoint is refused as on the CLI, whether a path or an Analysis
    with pytest.raises(UsageError, match="compare needs at least two checkpoints"):
        compare([pair[0]], emit_warnings=False)
    with pytest.raises(UsageError, match="compare needs at least two checkpoints"):
        compare([analyze(pair[0], emit_warnings=False)])
    assert compare(pair, emit_warnings=False).labels == ["a", "b"]
    assert default_labels(["/r/one/adapter", "/r/two/adapter"]) == ["one/adapter", "two/adapter"]
    assert default_labels(["/x/a", "/x/a"]) == ["a", "a#2"]


def test_analysis_json_files_and_bad_paths(pair: tuple[Path, Path], tmp_path: Path) -> None:
    analysis = analyze(pair[0], emit_warnings=False)
    file = tmp_path / "a.json"
    file.write_text(analysis.to_json())
    loaded = load_analyses(file)
    assert len(loaded) == 1 and loaded[0].records == json.loads(analysis.to_json())["layers"]
    many = tmp_path / "many.json"
    many.write_text(json.dumps({"checkpoints": [analysis.to_dict(), analysis.to_dict()]}))
    assert len(load_analyses(many)) == 2
    with pytest.raises(CheckpointError, match="no such file"):
        compare([pair[0], tmp_path / "missing"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "an analysis"}')
    with pytest.raises(CheckpointError, match="bad.json"):
        load_analyses(bad)


def test_nora_core_checkpoints_compare(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from nora_core.checkpoint import save_adapter
    from nora_core.config import AdapterConfig
    from nora_core.inject import adapter_layers, inject_adapters

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attn()

    paths = []
    for method in ("lora", "nora"):
        model = nn.Module()
        model.layers = nn.ModuleList([Layer(), Layer()])
        inject_adapters(model, AdapterConfig(method=method, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                layer.lora_B.weight.normal_()
        paths.append(save_adapter(model, tmp_path / method))
    cmp = compare(paths, emit_warnings=False)
    assert [a.method for a in cmp.analyses] == ["lora", "nora"]
    assert len(cmp.modules) == 4 and not cmp.partial_modules
    assert all(row["present"] and row["rank"] == 4 for row in cmp.rows)
    assert isinstance(cmp, Comparison) and isinstance(cmp.analyses[0], Analysis)


def test_package_level_compare_is_the_function_whatever_the_import_order(pair: tuple[Path, Path]) -> None:
    import nora_spectra.comparison as module  # importing the submodule first must not shadow the export
    import nora_spectra

    assert nora_spectra.compare is module.compare
    assert nora_spectra.compare(pair, labels=["a", "b"], emit_warnings=False).labels == ["a", "b"]


def test_short_reprs(pair: tuple[Path, Path]) -> None:
    cmp = compare(pair, emit_warnings=False)
    text = repr(cmp)
    assert text == (
        f"Comparison(labels=['a', 'b'], reference='a', modules={len(cmp.modules)}, "
        f"partial_modules={len(cmp.partial_modules)})"
    )
    assert str(cmp) == text and "singular_values" not in text
    analysis = cmp.analyses[0]
    mean_util = analysis.summary["metrics"]["utilization"]["mean"]
    assert repr(analysis) == (
        f"Analysis(checkpoint={analysis.checkpoint!r}, format='peft', method='lora', layers={len(analysis)}, "
        f"mean_utilization={mean_util:.3f}, collapsed={analysis.summary['collapsed']})"
    )
    analysis.adapter = "code"
    assert f"checkpoint={analysis.checkpoint!r}, adapter='code', format=" in repr(analysis)
    assert len(repr(analysis)) < 300
