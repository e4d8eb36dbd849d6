"""Summaries of per-layer records: counts, means, medians and rank-weighted means, overall and grouped.

A layer record is the dict that :func:`nora_spectra.analysis.analyze` builds for one adapter module
(JSON field names fixed, see ``docs/metrics.md``). Every function here is a pure function of such
records; renderers print these numbers and never recompute them.

Averages are taken over the layers whose spectrum is known (status ``"ok"``,
``"dora_direction_only"`` or ``"zero"``, whose metrics are exact zeros, so an untrained module pulls
the means down instead of vanishing from them); ``"non_finite"`` layers are counted, not averaged.
The rank-weighted mean uses the rank budget ``r`` as weight,

.. math:: \\bar x_r = \\frac{\\sum_i r_i x_i}{\\sum_i r_i},

so the weighted utilization equals ``sum(effective_rank) / sum(rank)``: the share of the whole rank
budget (every module together) that the adapter actually uses.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

from nora_spectra.schema import AVERAGED_STATUSES, STATUSES, SUMMARY_METRICS

__all__ = [
    "AVERAGED_STATUSES",
    "STATUSES",
    "SUMMARY_METRICS",
    "count_by_status",
    "count_collapsed",
    "group_records",
    "mean",
    "median",
    "metric_stats",
    "rank_weighted_mean",
    "summarize",
    "summarize_group",
]

Record = Mapping[str, Any]

def _finite_pairs(records: Iterable[Record], name: str, *, averaged: bool = False) -> list[tuple[float, float]]:
    """(value, rank) pairs of ``name`` over averaged records whose value is a finite number
    (``averaged``: every record given is known to be averaged)."""
    pairs = []
    for rec in records:
        if not averaged and rec.get("status") not in AVERAGED_STATUSES:
            continue
        value = rec.get(name)
        if value is None or isinstance(value, bool):
            continue
        value = float(value)
        if math.isfinite(value):
            pairs.append((value, float(rec.get("rank") or 0)))
    return pairs


def mean(records: Iterable[Record], name: str) -> float | None:
    """Arithmetic mean of metric ``name`` over the averaged layers (None when there are none)."""
    return _mean([v for v, _ in _finite_pairs(records, name)])


def median(records: Iterable[Record], name: str) -> float | None:
    """Median of metric ``name`` over the averaged layers (None when there are none)."""
    return _median([v for v, _ in _finite_pairs(records, name)])


def rank_weighted_mean(records: Iterable[Record], name: str) -> float | None:
    """Mean of metric ``name`` weighted by each layer's rank ``r``: ``sum(r_i x_i) / sum(r_i)``.

    For ``utilization = effective_rank / r`` this is ``sum(effective_rank) / sum(r)``.
    Returns None when no averaged layer has a positive rank.
    """
    return _rank_weighted_mean(_finite_pairs(records, name))


def metric_stats(records: Sequence[Record], name: str, *, averaged: bool = False) -> dict[str, float | None]:
    """``{"mean", "median", "weighted_mean", "min", "max"}`` of metric ``name`` (None where undefined);
    ``averaged``: every record given has an averaged status (the caller filtered them)."""
    pairs = _finite_pairs(records, name, averaged=averaged)  # once, not once per statistic
    values = [v for v, _ in pairs]
    return {
        "mean": _mean(values),
        "median": _median(values),
        "weighted_mean": _rank_weighted_mean(pairs),
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _median(values: list[float]) -> float | None:
    """The middle value, or the mean of the two middle values (as :func:`statistics.median`)."""
    if not values:
        return None
    ordered = sorted(values)
    half = len(ordered) // 2
    return float(ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2)


def _rank_weighted_mean(pairs: list[tuple[float, float]]) -> float | None:
    total = math.fsum(r for _, r in pairs)
    if total <= 0:
        return None
    return math.fsum(v * r for v, r in pairs) / total


def count_by_status(records: Iterable[Record]) -> dict[str, int]:
    """Number of layers per status; every status in :data:`STATUSES` is present (possibly 0)."""
    counts = dict.fromkeys(STATUSES, 0)
    for rec in records:
        status = rec.get("status")
        counts[status] = counts.get(status, 0) + 1
    return counts


def count_collapsed(records: Iterable[Record]) -> int:
    """Number of layers flagged ``collapsed`` (utilization below the collapse threshold)."""
    return sum(1 for rec in records if rec.get("collapsed") is True)


def group_records(records: Iterable[Record], key: str | Callable[[Record], Hashable]) -> dict[Hashable, list[Record]]:
    """Group records by a field name or a key function, keeping first-seen order of the groups."""
    get = (lambda rec: rec.get(key)) if isinstance(key, str) else key
    groups: dict[Hashable, list[Record]] = {}
    for rec in records:
        groups.setdefault(get(rec), []).append(rec)
    return groups


def summarize_group(records: Sequence[Record]) -> dict[str, Any]:
    """Counts and :func:`metric_stats` of every metric in :data:`SUMMARY_METRICS` for one set of layers.

    Returns:
        ``{"layers": int, "analysed": int, "total_rank": int, "collapsed": int,
        "by_status": {status: int}, "metrics": {name: {"mean", "median", "weighted_mean", "min", "max"}}}``
        where ``analysed`` counts the averaged layers and ``total_rank`` is their summed rank budget.
    """
    by_status = count_by_status(records)
    averaged = [rec for rec in records if rec.get("status") in AVERAGED_STATUSES]  # once for every metric
    return {
        "layers": len(records),
        "analysed": sum(by_status.get(s, 0) for s in AVERAGED_STATUSES),
        "total_rank": int(sum(int(rec.get("rank") or 0) for rec in averaged)),
        "collapsed": count_collapsed(records),
        "by_status": by_status,
        "metrics": {name: metric_stats(averaged, name, averaged=True) for name in SUMMARY_METRICS},
    }


def _layer_key(index: Any) -> str:
    return "none" if index is None else str(index)


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """Summary of an analysis: the overall group plus the same grouped by module type and layer index.

    Args:
        records: layer records (dicts with at least ``status``, ``rank``, ``collapsed``, ``module_type``,
            ``layer_index`` and the metrics of :data:`SUMMARY_METRICS`).

    Returns:
        :func:`summarize_group` of all records, with two more keys: ``"by_module_type"`` (module type ->
        group summary, first-seen order) and ``"by_layer_index"`` (layer index as a string, ``"none"``
        for modules outside numbered layers -> group summary, ascending).
    """
    records = list(records)
    result = summarize_group(records)
    result["by_module_type"] = {
        str(name): summarize_group(group) for name, group in group_records(records, "module_type").items()
    }
    by_index = group_records(records, "layer_index")
    ordered = sorted(by_index, key=lambda i: (i is None, i if isinstance(i, int) else 0, str(i)))
    result["by_layer_index"] = {_layer_key(i): summarize_group(by_index[i]) for i in ordered}
    return result
