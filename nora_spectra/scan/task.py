"""The one analysis function of a scan, run in a worker by every engine: an adapter -> its rows.

:func:`analyse_item` calls :func:`nora_spectra.analysis.analyze` (``emit_warnings=False``: warnings
are data, stored in the ``warnings`` column, never printed by a worker) and turns the
:class:`~nora_spectra.result.Analysis` into one adapter row (:data:`SCAN_ADAPTER_COLUMNS` plus the
manifest's metadata columns) and one layer row per module (the adapter's ``path``, then the columns of
``Analysis.layers``: :data:`SCAN_LAYER_COLUMNS`, plus the optional ones its records carry, such as a
full fine-tune's truncated-spectrum columns). Whatever goes wrong with one
adapter (a corrupt file, an unreadable one, an unexpected exception) becomes an adapter row with
status ``error`` and a one-line message; it never stops the scan. The engines
(:mod:`~nora_spectra.scan.local_engine`, :mod:`~nora_spectra.scan.ray_engine`) only move items and
results.

This module imports neither pandas nor pyarrow: workers load only what the analysis needs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from nora_spectra.analysis import analyze
from nora_spectra.errors import SpectraError
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD, SCAN_ADAPTER_COLUMNS, SUMMARY_METRICS
from nora_spectra.scan.content_key import ContentKey

__all__ = ["AnalysisSettings", "ItemResult", "ScanItem", "analyse_item", "analyse_items", "error_result", "warm_up"]

#: the config field that names the base model (PEFT's ``adapter_config.json``).
BASE_MODEL_FIELD = "base_model_name_or_path"


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """The options every adapter of a scan is analysed with (part of the scan's settings).

    Attributes:
        collapse_threshold: see :func:`nora_spectra.analysis.analyze`.
        format_in: a registered format forced on every adapter, or None to detect each.
    """

    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD
    format_in: str | None = None


@dataclasses.dataclass(frozen=True)
class ScanItem:
    """One adapter to analyse.

    Attributes:
        path: absolute path of the adapter file or directory.
        key: its :class:`~nora_spectra.scan.content_key.ContentKey`, computed before the analysis.
        metadata: the manifest's extra columns for this adapter (``base_model`` overrides the config's).
        problem: why the path could not even be examined during discovery, or None.
    """

    path: str
    key: ContentKey
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    problem: str | None = None


@dataclasses.dataclass
class ItemResult:
    """What a worker sends back for one adapter: plain rows, picklable.

    Attributes:
        adapter: the adapter row.
        layers: its layer rows (none for an error).
    """

    adapter: dict[str, Any]
    layers: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return self.adapter["status"] == "ok"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _base_row(item: ScanItem) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(SCAN_ADAPTER_COLUMNS)
    row.update(path=item.path, size=item.key.size, mtime=item.key.mtime, content_key=item.key.digest,
               warnings=[], skipped=0)
    return row


def _with_metadata(row: dict[str, Any], item: ScanItem) -> dict[str, Any]:
    """The manifest's columns after the scan's own; an empty ``base_model`` keeps the config's."""
    for name, value in item.metadata.items():
        if not (name == "base_model" and value in (None, "")):
            row[name] = value
    return row


def _finish(row: dict[str, Any], item: ScanItem, started: float) -> dict[str, Any]:
    row["seconds"] = time.perf_counter() - started
    return _with_metadata(row, item)


def warm_up() -> None:
    """Import what the first analysis would import lazily (the format modules, the weight space)."""
    from nora_spectra.io.registry import formats
    from nora_spectra.spaces import weight  # noqa: F401

    formats()


def error_result(item: ScanItem, problem: str) -> ItemResult:
    """The error row of an adapter whose analysis never returned (its worker died): ``seconds`` is null."""
    row = _base_row(item)
    row.update(status="error", error=_one_line(f"{item.path}: {problem}"))
    return ItemResult(_with_metadata(row, item), [])


def analyse_item(item: ScanItem, settings: AnalysisSettings) -> ItemResult:
    """Analyse one adapter; never raises for anything wrong with the adapter.

    Args:
        item: the adapter and its content key.
        settings: the analysis options.

    Returns:
        An :class:`ItemResult`: status ``ok`` with every layer, or status ``error`` with ``error`` the
        one-line message (a reader's ``CheckpointError`` reads ``PATH: problem``; anything unexpected
        ``PATH: internal error: Type: message``).
    """
    started = time.perf_counter()
    row = _base_row(item)
    if item.problem is not None:
        row.update(status="error", error=f"{item.path}: {item.problem}")
        return ItemResult(_finish(row, item, started), [])
    try:
        analysis = analyze(item.path, format=settings.format_in, collapse_threshold=settings.collapse_threshold,
                           emit_warnings=False)
    except SpectraError as exc:
        row.update(status="error", error=_one_line(str(exc)))
        return ItemResult(_finish(row, item, started), [])
    except MemoryError:
        row.update(status="error", error=f"{item.path}: out of memory while analysing it")
        return ItemResult(_finish(row, item, started), [])
    except Exception as exc:  # a bug or an unforeseen input: one adapter's failure, not the scan's
        row.update(status="error", error=_one_line(f"{item.path}: internal error: {type(exc).__name__}: {exc}"))
        return ItemResult(_finish(row, item, started), [])

    summary = analysis.summary
    metrics = summary["metrics"]
    config = analysis.config if isinstance(analysis.config, dict) else {}
    base_model = config.get(BASE_MODEL_FIELD)
    ranks = [int(rec["rank"]) for rec in analysis.records]
    row.update(
        format=analysis.format,
        method=analysis.method,
        base_model=base_model if isinstance(base_model, str) and base_model else None,
        r=max(ranks) if ranks else None,
        modules=len(analysis.records),
        analysed=summary["analysed"],
        collapsed=summary["collapsed"],
        total_rank=summary["total_rank"],
        weighted_utilization=metrics["utilization"]["weighted_mean"],
        skipped=len(analysis.skipped),
        warnings=[_one_line(w) for w in analysis.warnings],
        status="ok",
    )
    for name in SUMMARY_METRICS:
        row[f"mean_{name}"] = metrics[name]["mean"]
    layers = []
    for rec in analysis.records:  # the columns of ``spectra analyze``'s DataFrame, optional ones included
        layer = {"path": item.path}
        layer.update((name, rec.get(name)) for name in analysis.columns)
        layers.append(layer)
    return ItemResult(_finish(row, item, started), layers)


def analyse_items(items: list[ScanItem], settings: AnalysisSettings) -> list[ItemResult]:
    """:func:`analyse_item` over a batch (what a Ray ``map_batches`` call runs)."""
    return [analyse_item(item, settings) for item in items]
