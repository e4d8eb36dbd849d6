"""Layer records: one dict per module with its identity and every metric of its spectrum.

:func:`layer_record` is the one builder of a record, for weight, activation and probe spectra and for
the trainer's spectral tracking; the metrics come from :func:`nora_spectra.metrics.spectrum_metrics`.
:func:`status_warnings` words the one warning per problem kind (NaN/Inf, all-zero) of a set of records.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from nora_spectra._text import name_list, plural
from nora_spectra.metrics import non_finite_metrics, spectrum_metrics
from nora_spectra.schema import LAYER_COLUMNS, layer_index, module_type

__all__ = ["STATUS_WORDING", "layer_record", "status_warnings"]


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
            null metrics).
        collapse_threshold: see :func:`nora_spectra.metrics.spectrum_metrics`.
        columns: the record's keys, in order.
        dora: the module is a DoRA layer whose spectrum is of the direction only: status
            ``dora_direction_only`` instead of ``ok``.

    Returns:
        The record, keys exactly ``columns``.
    """
    record = dict(identity)
    record["shape"] = [int(n) for n in record["shape"]]
    record["module_type"] = module_type(record["module"])
    record["layer_index"] = layer_index(record["module"])
    if sigma is None:
        record.update(non_finite_metrics(), singular_values=None)
    else:
        rank, shape = int(record["rank"]), tuple(record["shape"])
        record.update(spectrum_metrics(sigma, rank=rank, shape=shape, collapse_threshold=collapse_threshold))
        record["singular_values"] = [float(s) for s in sigma]
        if dora and record["status"] == "ok":
            record["status"] = "dora_direction_only"
    return {name: record[name] for name in columns}


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
