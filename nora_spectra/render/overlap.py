"""Renderings of an :class:`~nora_spectra.overlap.Overlap`: table, JSON, CSV, Markdown, HTML fragments.

Formatting only: every number comes from the overlap's module rows and summary.
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING, Any

from nora_spectra._text import name_list
from nora_spectra.errors import UsageError
from nora_spectra.render._cells import csv_cell, markdown_table
from nora_spectra.schema import OVERLAP_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.overlap import Overlap

__all__ = ["OVERLAP_FORMATS", "format_overlap", "overlap_html", "overlap_table_html", "overlap_markdown"]

OVERLAP_FORMATS = ("table", "json", "csv", "markdown")

_HEADERS = ("module", "r a", "r b", "k", "left overlap", "chance", "right overlap", "chance", "top angle (left)",
            "status")
_KEYS = ("rank_a", "rank_b", "k", "left_overlap", "chance_left", "right_overlap", "chance_right", "left_angles",
         "status")


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _rows(o: "Overlap") -> list[list[str]]:
    return [
        [row["module"], str(row["rank_a"]), str(row["rank_b"]), "-" if row["k"] is None else str(row["k"]),
         _num(row["left_overlap"]), _num(row["chance_left"]), _num(row["right_overlap"]), _num(row["chance_right"]),
         "-" if not row["left_angles"] else f"{row['left_angles'][0]:.1f}°", row["status"]]
        for row in o.modules
    ]


def _lines(o: "Overlap") -> list[str]:
    s = o.summary
    lines = [f"a: {o.labels[0]} ({o.checkpoints[0]})", f"b: {o.labels[1]} ({o.checkpoints[1]})",
             f"{s['compared']} of {s['modules']} common modules compared"
             + ("" if o.top_k is None else f" at top {o.top_k} directions")
             + f"; mean left overlap {_num(s['mean_left_overlap'])}, mean right overlap {_num(s['mean_right_overlap'])}"]
    for name, group in s["by_module_type"].items():
        lines.append(f"  {name}: {group['modules']} modules, left {_num(group['mean_left_overlap'])}, "
                     f"right {_num(group['mean_right_overlap'])}")
    if o.only_in:
        lines.append(f"{len(o.only_in)} modules in one adapter only: "
                     + name_list([f"{m} ({label})" for m, label in o.only_in.items()], 5))
    lines.append("overlap = mean cos² of the top-k principal angles = φ(k, k); chance = k / d for random subspaces")
    return lines


def _table(o: "Overlap") -> str:
    from nora_spectra.render.table import format_grid

    grid = format_grid(_HEADERS, _rows(o), [False] + [True] * (len(_HEADERS) - 2) + [False])
    return "\n\n".join(["\n".join(_lines(o)[:2]), grid, "\n".join(_lines(o)[2:])]) + "\n"


def overlap_markdown(o: "Overlap", heading: str = "##") -> str:
    """The Markdown section of an overlap (also used by the Markdown report)."""
    rows = [[f"`{r[0]}`", *r[1:]] for r in _rows(o)]
    return "\n\n".join([f"{heading} Subspace overlap: {o.labels[0]} and {o.labels[1]}",
                        "\n".join(f"- {line.strip()}" for line in _lines(o)), markdown_table(_HEADERS, rows)]) + "\n"


def _csv(o: "Overlap") -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(OVERLAP_COLUMNS)
    for row in o.modules:
        writer.writerow([csv_cell(row[key]) for key in OVERLAP_COLUMNS])
    return buffer.getvalue()


def format_overlap(o: "Overlap", fmt: str = "table") -> str:
    """Render ``o`` as ``table``, ``json``, ``csv`` or ``markdown`` (newline-terminated).

    Raises:
        UsageError: an unknown format.
    """
    if fmt == "table":
        return _table(o)
    if fmt == "json":
        return json.dumps(o.to_dict(), indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        return _csv(o)
    if fmt == "markdown":
        return overlap_markdown(o)
    raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(OVERLAP_FORMATS)}")


def overlap_table_html(o: "Overlap") -> str:
    """The summary lines and the per-module table as HTML (exact values in ``data-value``)."""
    from nora_spectra.render.html import _e, _table, _td

    body = []
    for row, cells in zip(o.modules, _rows(o)):
        tds = [_td(cells[0], numeric=False)]
        tds += [_td(text, key=key, value=row[key], numeric=key != "status") for text, key in zip(cells[1:], _KEYS)]
        body.append(f'<tr data-module="{_e(row["module"])}">{"".join(tds)}</tr>')
    table = _table([(h, 0 < i < len(_HEADERS) - 1) for i, h in enumerate(_HEADERS)], body, "overlap",
                   f"{o.labels[0]} vs {o.labels[1]}")
    return f'<p class="meta">{"<br>".join(_e(line) for line in _lines(o))}</p>{table}'


def overlap_html(o: "Overlap") -> str:
    """An HTML fragment for Jupyter."""
    from nora_spectra.render.html import CSS

    return f'<div class="ns"><style>{CSS}</style>{overlap_table_html(o)}</div>'
