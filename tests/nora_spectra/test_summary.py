"""summarize(): counts, means, medians and rank-weighted means, overall and grouped, by hand."""

from __future__ import annotations

import json
import statistics

import pytest

from nora_spectra.summary import (
    SUMMARY_METRICS,
    count_by_status,
    count_collapsed,
    mean,
    median,
    metric_stats,
    rank_weighted_mean,
    summarize,
)


def rec(module: str, rank: int, erank: float | None, status: str = "ok", collapsed: bool = False) -> dict:
    index = next((int(p) for p in module.split(".") if p.isdigit()), None)
    values = None if erank is None else erank
    return {
        "module": module,
        "module_type": module.rsplit(".", 1)[-1],
        "layer_index": index,
        "rank": rank,
        "status": status,
        "collapsed": collapsed,
        "effective_rank": values,
        "utilization": None if erank is None else erank / rank,
        "stable_rank": None if erank is None else erank / 2,
        "energy_rank_90": None if erank is None else int(erank),
        "tail_energy": None if erank is None else 0.1,
        "spectral_entropy": None if erank is None else 0.5,
    }


RECORDS = [
    rec("model.layers.0.q_proj", 8, 4.0),
    rec("model.layers.0.v_proj", 16, 2.0, collapsed=True),
    rec("model.layers.2.q_proj", 8, 6.0, status="dora_direction_only"),
    rec("model.layers.10.v_proj", 16, 0.0, status="zero", collapsed=True),
    rec("model.layers.10.q_proj", 8, None, status="non_finite"),
    rec("lm_head", 32, 16.0),
]


def test_counts():
    counts = count_by_status(RECORDS)
    assert counts == {"ok": 3, "dora_direction_only": 1, "zero": 1, "non_finite": 1}
    assert count_collapsed(RECORDS) == 2


def test_means_count_zero_layers_as_zeros_and_skip_non_finite_ones():
    eranks = [4.0, 2.0, 6.0, 0.0, 16.0]
    ranks = [8, 16, 8, 16, 32]
    assert mean(RECORDS, "effective_rank") == pytest.approx(statistics.mean(eranks))
    assert median(RECORDS, "effective_rank") == pytest.approx(statistics.median(eranks))
    weighted = sum(r * e for r, e in zip(ranks, eranks)) / sum(ranks)
    assert rank_weighted_mean(RECORDS, "effective_rank") == pytest.approx(weighted)


def test_weighted_utilization_is_total_erank_over_total_rank():
    assert rank_weighted_mean(RECORDS, "utilization") == pytest.approx((4 + 2 + 6 + 0 + 16) / (8 + 16 + 8 + 16 + 32))


def test_empty_and_all_bad_give_none():
    for records in ([], [rec("a.0.q", 4, None, status="non_finite"), rec("a.1.q", 4, None, status="non_finite")]):
        stats = metric_stats(records, "utilization")
        assert stats == {"mean": None, "median": None, "weighted_mean": None, "min": None, "max": None}
    only_zero = metric_stats([rec("a.1.q", 4, 0.0, status="zero")], "utilization")
    assert only_zero == {"mean": 0.0, "median": 0.0, "weighted_mean": 0.0, "min": 0.0, "max": 0.0}
    empty = summarize([])
    assert empty["layers"] == 0 and empty["by_module_type"] == {} and empty["by_layer_index"] == {}
    json.dumps(empty, allow_nan=False)


def test_summary_groups():
    s = summarize(RECORDS)
    assert s["layers"] == 6 and s["analysed"] == 5 and s["collapsed"] == 2
    assert s["total_rank"] == 8 + 16 + 8 + 16 + 32
    assert set(s["metrics"]) == set(SUMMARY_METRICS)
    assert list(s["by_module_type"]) == ["q_proj", "v_proj", "lm_head"]
    q = s["by_module_type"]["q_proj"]
    assert q["layers"] == 3 and q["analysed"] == 2
    assert q["metrics"]["effective_rank"]["mean"] == pytest.approx(5.0)
    assert q["by_status"]["non_finite"] == 1
    # numeric order of layer indices, modules outside numbered layers last
    assert list(s["by_layer_index"]) == ["0", "2", "10", "none"]
    assert s["by_layer_index"]["10"]["analysed"] == 1
    assert s["by_layer_index"]["10"]["metrics"]["utilization"]["mean"] == 0.0
    assert s["by_layer_index"]["none"]["metrics"]["effective_rank"]["max"] == 16.0
    json.dumps(s, allow_nan=False)
