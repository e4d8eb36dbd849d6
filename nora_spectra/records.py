"""Layer records: one dict per module with its identity and every metric of its spectrum.

:func:`layer_record` is the one builder of a record, for weight, activation and probe spectra and for
the trainer's spectral tracking; the metrics come from :func:`nora_spectra.metrics.spectrum_metrics`.
:func:`status_warnings` words the one warning per problem kind (NaN/Inf, all-zero) of a set of records.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from nora_spectra._text import name_list, plural
from nora_spectra.metrics import non_finite_metrics, spectra_metrics
from nora_spectra.schema import LAYER_COLUMNS, layer_index, module_type

__all__ = ["STATUS_WORDING", "layer_record", "layer_records", "status_warnings"]


def layer_record(
    identity: Mapping[str, Any],
    sigma: "Sequence[float] | None",
    *,
    collapse_threshold: float,
    columns: Sequence[str] = LAYER_COLUMNS,
    dora: bool = False,
) -> dict[str, Any]:
    """One layer record: identity fields plus every metric of ``sigma`` (weight, activation or probe space).

    Args:
        identity: ``module``, ``kind``, ``layer_type``, ``dtype``, ``rank``, ``scale``, ``shape`` (and any
            extra field named in ``columns``); ``module_type`` and ``layer_index`` are derived from ``module``.
        sigma: the scaled singular values, or None when the factors held NaN/Inf (status ``non_finite``,
            null metrics; so is a spectrum that overflowed to infinity, e.g. from a scale near 1e308).
        collapse_threshold: see :func:`nora_spectra.metrics.spectrum_metrics`.
        columns: the record's keys, in order.
        dora: the module is a DoRA layer whose spectrum is of the direction only: status
            ``dora_direction_only`` instead of ``ok``.

    Returns:
        The record, keys exactly ``columns``.
    """
    return layer_records([(identity, sigma, dora)], collapse_threshold=collapse_threshold, columns=columns)[0]


def layer_records(
    layers: Iterable[tuple[Mapping[str, Any], "Sequence[float] | None", bool]],
    *,
    collapse_threshold: float,
    columns: Sequence[str] = LAYER_COLUMNS,
) -> list[dict[str, Any]]:
    """The records of many layers, their metrics computed together (:func:`~nora_spectra.metrics.spectra_metrics`).

    Args:
        layers: ``(identity, sigma, dora)`` per layer, as the arguments of :func:`layer_record`.
        collapse_threshold: see :func:`nora_spectra.metrics.spectrum_metrics`.
        columns: the records' keys, in order.

    Returns:
        One record per layer, in order, keys exactly ``columns``.
    """
    records: list[dict[str, Any]] = []
    measured: list[tuple[int, Any, bool]] = []  # (record index, sigma, dora) of the layers with a spectrum
    for identity, sigma, dora in layers:
        record = dict(identity)
        record["shape"] = [int(n) for n in record["shape"]]
        module = record["module"]
        record["module_type"] = module_type(module)
        record["layer_index"] = layer_index(module)
        if sigma is None or not np.isfinite(sigma).all():
            record.update(non_finite_metrics(), singular_values=None)
        else:
            measured.append((len(records), sigma, dora))
        records.append(record)
    if measured:
        metrics = spectra_metrics(
            [sigma for _, sigma, _ in measured],
            ranks=[int(records[index]["rank"]) for index, _, _ in measured],
            shapes=[records[index]["shape"] for index, _, _ in measured],
            collapse_threshold=collapse_threshold,
        )
        for (index, sigma, dora), fields in zip(measured, metrics):
            record = records[index]
            record.update(fields)
            record["singular_values"] = [float(s) for s in sigma]
            if dora and record["status"] == "ok":
                record["status"] = "dora_direction_only"
    return [{name: record[name] for name in columns} for record in records]


#: space -> (non_finite wording, zero wording): each takes ``{count}`` and ``{names}``.
STATUS_WORDING: dict[str, tuple[str, str]] = {
    "weight": (
        "{count} with NaN/Inf factors (status non_finite, metrics null): {names}",
        "{count} with an all-zero update (status zero, effective rank 0): {names}",
    ),
    "activation": (
        "{count} whose hidden or B held NaN/Inf (status non_finite, metrics null): {names}",
        "{count} with a constant (zero after centring) branch output (status zero): {names}",
    ),
}


def status_warnings(records: Sequence[Mapping[str, Any]], space: str = "weight") -> list[str]:
    """One warning line per kind of problem across all layers (not one per layer), NaN/Inf first.

    Args:
        records: layer records.
        space: ``"weight"``; ``"activation"`` and ``"probe"`` word the branch output instead of the update.
    """
    wording = STATUS_WORDING["weight" if space == "weight" else "activation"]
    by_status: dict[str, list[str]] = {}
    for rec in records:
        by_status.setdefault(rec["status"], []).append(rec["module"])
    messages = []
    for status, template in zip(("non_finite", "zero"), wording):
        if names := by_status.get(status):
            messages.append(template.format(count=plural(len(names), "layer"), names=name_list(names)))
    return messages
