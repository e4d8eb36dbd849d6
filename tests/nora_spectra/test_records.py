"""Layer records: built for many layers at once, each equal to the record of that layer alone."""

from __future__ import annotations

import numpy as np
import pytest

from nora_spectra.metrics import METRIC_FIELDS, spectrum_metrics
from nora_spectra.records import layer_record, layer_records, status_warnings
from nora_spectra.schema import LAYER_COLUMNS


def _identity(module: str, rank: int, shape: tuple[int, int]) -> dict:
    return {"module": module, "key": f"base_model.model.{module}", "kind": "lora", "layer_type": "linear",
            "dtype": "BF16", "rank": rank, "scale": 2.0, "shape": shape}


def test_records_of_many_layers_equal_each_layer_alone() -> None:
    rng = np.random.default_rng(3)
    layers = []
    for i, (rank, k) in enumerate([(16, 16), (16, 16), (8, 8), (64, 40), (16, 16)]):
        sigma = np.sort(rng.exponential(size=k))[::-1]
        layers.append((_identity(f"model.layers.{i}.self_attn.q_proj", rank, (k * 4, 40)), sigma, i == 4))
    layers.append((_identity("model.layers.5.mlp.down_proj", 16, (64, 64)), None, False))  # NaN factors
    layers.append((_identity("lm_head", 4, (10, 10)), np.zeros(4), False))
    records = layer_records(layers, collapse_threshold=0.3)
    assert [list(rec) for rec in records] == [list(LAYER_COLUMNS)] * len(layers)
    for (identity, sigma, dora), record in zip(layers, records):
        assert record == layer_record(identity, sigma, collapse_threshold=0.3, dora=dora)
    first = records[0]
    expected = spectrum_metrics(layers[0][1], rank=16, shape=(64, 40), collapse_threshold=0.3)
    assert {name: first[name] for name in METRIC_FIELDS} == expected
    assert first["singular_values"] == layers[0][1].tolist() and first["layer_index"] == 0
    assert first["module_type"] == "q_proj" and first["shape"] == [64, 40]
    assert records[4]["status"] == "dora_direction_only"
    assert records[5]["status"] == "non_finite" and records[5]["effective_rank"] is None
    assert records[6]["status"] == "zero" and records[6]["layer_index"] is None
    assert status_warnings(records) == [
        "1 layer with NaN/Inf factors (status non_finite, metrics null): model.layers.5.mlp.down_proj",
        "1 layer with an all-zero update (status zero, effective rank 0): lm_head",
    ]


def test_no_layers_no_records() -> None:
    assert layer_records([], collapse_threshold=0.5) == []


def test_bad_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="rank must be >= 1"):
        layer_records([(_identity("a.q_proj", 0, (4, 4)), np.ones(2), False)], collapse_threshold=0.5)
