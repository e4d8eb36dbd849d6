"""Text renderings of a :class:`~nora_spectra.comparison.Comparison`: table, JSON, CSV and Markdown.

The first checkpoint is the reference: differences are ``value - reference``. ``csv`` has one row per
module and checkpoint (columns :data:`~nora_spectra.comparison.ROW_COLUMNS`). Numbers come from the
analyses' records; this module only formats them.
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING, Any

from nora_spectra.errors import UsageError
from nora_spectra.render._cells import csv_cell, markdown_table, signed
from nora_spectra.schema import COMPARISON_ROW_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.comparison import Comparison

__all__ = ["COMPARISON_FORMATS", "format_comparison"]

COMPARISON_FORMATS = ("table", "json", "csv", "markdown")


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _module_grid(comparison: "Comparison") -> tuple[list[str], list[list[str]]]:
    labels, others = comparison.labels, comparison.labels[1:]
    headers = ["module"] + [f"r {lab}" for lab in labels]
    headers += [f"erank {lab}" for lab in labels] + [f"Δerank {lab}" for lab in others]
    headers += [f"util {lab}" for lab in labels] + [f"Δutil {lab}" for lab in others]
    headers += [f"σmax {lab}" for lab in labels] + [f"Δσmax {lab}" for lab in others]
    per: dict[str, dict[str, dict[str, Any]]] = {}
    for row in comparison.rows:
        per.setdefault(row["module"], {})[row["label"]] = row
    rows = []
    for module in comparison.modules:
        r = per[module]
        line = [module] + [str(r[lab]["rank"]) if r[lab]["present"] else "absent" for lab in labels]
        line += [_num(r[lab]["effective_rank"], 2) for lab in labels]
        line += [signed(r[lab]["d_effective_rank"], 2) for lab in others]
        line += [_num(r[lab]["utilization"], 3) for lab in labels]
        line += [signed(r[lab]["d_utilization"], 3) for lab in others]
        line += ["-" if r[lab]["sigma_max"] is None else f"{float(r[lab]['sigma_max']):.4g}" for lab in labels]
        line += ["" if r[lab]["d_sigma_max"] is None else f"{float(r[lab]['d_sigma_max']):+.4g}" for lab in others]
        rows.append(line)
    return headers, rows


def _group_grid(comparison: "Comparison", key: str) -> tuple[list[str], list[list[str]]]:
    headers = ["group", "checkpoint", "layers", "mean erank", "Δ", "mean util", "Δ", "weighted util", "collapsed"]
    rows = [
        [str(g["group"]), g["label"], str(g["layers"]), _num(g["mean_effective_rank"], 2),
         signed(g["d_mean_effective_rank"], 2), _num(g["mean_utilization"], 3), signed(g["d_mean_utilization"], 3),
         _num(g["weighted_utilization"], 3), str(g["collapsed"])]
        for g in getattr(comparison, key)
    ]
    return headers, rows


def _header_lines(comparison: "Comparison") -> list[str]:
    lines = []
    for i, (label, a) in enumerate(zip(comparison.labels, comparison.analyses)):
        ref = " (reference)" if i == 0 else ""
        lines.append(f"{label}{ref}: {a.display_name}  (format {a.format}, method {a.method}, {len(a.records)} layers)")
    return lines


def _partial_lines(comparison: "Comparison") -> list[str]:
    return [
        f"{p['module']}: only in {', '.join(p['present_in'])} (missing from {', '.join(p['missing_from'])})"
        for p in comparison.partial_modules
    ]


def _table(comparison: "Comparison", by_layer: bool) -> str:
    from nora_spectra.render.table import format_grid

    parts = ["\n".join(_header_lines(comparison))]
    headers, rows = _module_grid(comparison)
    parts.append(format_grid(headers, rows, [False] + [True] * (len(headers) - 1)))
    if comparison.partial_modules:
        parts.append("modules not in every checkpoint:\n" + "\n".join("  " + s for s in _partial_lines(comparison)))
    headers, rows = _group_grid(comparison, "by_module_type")
    headers[0] = "module type"
    parts.append(format_grid(headers, rows, [False, False] + [True] * 7))
    if by_layer:
        headers, rows = _group_grid(comparison, "by_layer")
        headers[0] = "layer"
        parts.append(format_grid(headers, rows, [False, False] + [True] * 7))
    return "\n\n".join(parts) + "\n"


def _markdown(comparison: "Comparison", by_layer: bool) -> str:

    parts = ["## Comparison", "\n".join(f"- {line}" for line in _header_lines(comparison))]
    headers, rows = _group_grid(comparison, "by_module_type")
    headers[0] = "module type"
    parts.append(markdown_table(headers, rows))
    if by_layer:
        headers, rows = _group_grid(comparison, "by_layer")
        headers[0] = "layer"
        parts.append(markdown_table(headers, rows))
    headers, rows = _module_grid(comparison)
    parts.append(markdown_table(headers, [[f"`{row[0]}`"] + row[1:] for row in rows]))
    if comparison.partial_modules:
        parts.append("Modules not in every checkpoint:\n\n" + "\n".join(f"- `{s}`" for s in _partial_lines(comparison)))
    return "\n\n".join(parts) + "\n"


def _csv(comparison: "Comparison") -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COMPARISON_ROW_COLUMNS)
    for row in comparison.rows:
        writer.writerow([csv_cell(row[key]) for key in COMPARISON_ROW_COLUMNS])
    return buffer.getvalue()


def format_comparison(comparison: "Comparison", fmt: str = "table", *, by_layer: bool = False) -> str:
    """Render a comparison as ``table``, ``json``, ``csv`` or ``markdown`` text (newline-terminated).

    Raises:
        UsageError: on an unknown format.
    """
    if fmt == "table":
        return _table(comparison, by_layer)
    if fmt == "json":
        return json.dumps(comparison.to_dict(), indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        return _csv(comparison)
    if fmt == "markdown":
        return _markdown(comparison, by_layer)
    raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(COMPARISON_FORMATS)}")
