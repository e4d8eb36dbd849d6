"""JSON, CSV and Markdown renderings of analyses. Formatting only: every number comes from the records.

* JSON: one checkpoint -> the object of :meth:`Analysis.to_dict`; several -> ``{"checkpoints": [...]}``.
  Strict JSON (NaN/Inf never appear; missing metrics are ``null``).
* CSV: one row per layer, columns ``checkpoint``, ``adapter`` (empty for the default adapter) +
  :data:`~nora_spectra.analysis.LAYER_COLUMNS`.
  Floats are written with ``repr`` (they read back bit-exactly), list cells (``shape``,
  ``singular_values``) as JSON arrays, booleans as ``true``/``false``, missing values as empty cells.
* Markdown: per checkpoint a heading, the summary (by module type, optionally by layer index) and the
  layer table (numbers rounded for reading).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence, Union

from nora_spectra.render._cells import cell, csv_cell, layer_columns, layer_rows, markdown_table
from nora_spectra.schema import LAYER_COLUMNS, OPTIONAL_COLUMNS, json_text, to_jsonable

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.result import Analysis

__all__ = ["CSV_COLUMNS", "render_csv", "render_json", "render_markdown"]

#: header of the CSV rendering.
CSV_COLUMNS: tuple[str, ...] = ("checkpoint", "adapter") + LAYER_COLUMNS

Analyses = Union["Analysis", Sequence["Analysis"]]


def _as_list(analyses: Analyses) -> list["Analysis"]:
    return list(analyses) if isinstance(analyses, (list, tuple)) else [analyses]


def render_json(analyses: Analyses, *, indent: int | None = 2) -> str:
    """One Analysis -> its JSON object; a list or tuple -> ``{"checkpoints": [object, ...]}``.

    Returns:
        Strict JSON text (``allow_nan=False``), newline-terminated.
    """
    several = isinstance(analyses, (list, tuple))
    return json_text([a.to_dict() for a in _as_list(analyses)], several=several, indent=indent)


def render_csv(analyses: Analyses) -> str:
    """One CSV table of every layer of every analysis: columns :data:`CSV_COLUMNS`, then the
    :data:`~nora_spectra.schema.OPTIONAL_COLUMNS` any record carries (base-aware analyses; empty cells
    for the records without them)."""
    items = _as_list(analyses)
    present = {key for analysis in items for rec in analysis.records[:1] for key in rec}
    keys = LAYER_COLUMNS + tuple(name for name in OPTIONAL_COLUMNS if name in present)
    import csv  # here: the JSON output, the common one, does not need it

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + keys[len(LAYER_COLUMNS):])
    for analysis in items:
        for rec in analysis.records:
            row = [analysis.checkpoint, csv_cell(analysis.adapter)] + [csv_cell(to_jsonable(rec.get(key))) for key in keys]
            writer.writerow(row)
    return buffer.getvalue()


def _md_one(analysis: "Analysis", effective_rank: bool, by_layer: bool = False) -> str:
    s = analysis.summary
    statuses = ", ".join(f"{name} {n}" for name, n in s["by_status"].items() if n) or "none"
    util = s["metrics"]["utilization"]
    erank = s["metrics"]["effective_rank"]
    parts = [
        f"## `{analysis.checkpoint}`" + (f" (adapter `{analysis.adapter}`)" if analysis.adapter else ""),
        "\n".join(
            [
                f"- format: {analysis.format}, method: {analysis.method}",
                f"- layers: {s['layers']} ({statuses})",
                f"- collapsed (utilization < {analysis.collapse_threshold:g}): {s['collapsed']}",
                f"- effective rank: mean {cell(erank['mean'], 4)}, median {cell(erank['median'], 4)}, "
                f"rank-weighted {cell(erank['weighted_mean'], 4)}",
                f"- utilization: mean {cell(util['mean'], 4)}, median {cell(util['median'], 4)}, "
                f"rank-weighted {cell(util['weighted_mean'], 4)}",
            ]
        ),
    ]
    tables = [("module type", s["by_module_type"])]
    if by_layer:
        tables.append(("layer", s.get("by_layer_index") or {}))
    for title, groups in tables:
        if not groups:
            continue
        rows = [
            [name, str(g["layers"]), cell(g["metrics"]["effective_rank"]["mean"], 4),
             cell(g["metrics"]["utilization"]["mean"], 4), cell(g["metrics"]["utilization"]["weighted_mean"], 4),
             str(g["collapsed"])]
            for name, g in groups.items()
        ]
        parts.append(markdown_table([title, "layers", "mean erank", "mean util", "weighted util", "collapsed"], rows))
    if analysis.records:
        columns = layer_columns("effective_rank" if effective_rank else "full", analysis.records)
        rows = layer_rows(analysis.records, columns)
        for row in rows:
            row[0] = f"`{row[0]}`"
        parts.append(markdown_table([title for _, title, _ in columns], rows))
    if analysis.warnings:
        parts.append("\n".join(f"> warning: {w}" for w in analysis.warnings))
    return "\n\n".join(parts)


def render_markdown(analyses: Analyses, *, effective_rank: bool = False, by_layer: bool = False) -> str:
    """A Markdown section per analysis: heading, summary bullets, module-type table, layer table, warnings.

    Args:
        analyses: one analysis or several.
        effective_rank: the focused layer columns (module, r, effective rank, utilization, collapse, status).
        by_layer: also a table of the summary grouped by layer index, after the module-type table.
    """
    return "\n\n".join(_md_one(a, effective_rank, by_layer) for a in _as_list(analyses)) + "\n"
