"""Plain-text terminal table of an analysis: the layers, then the summary. Formatting only.

No pandas, no colour codes (output stays pipe- and diff-friendly). Every number shown comes from the
:class:`~nora_spectra.analysis.Analysis` records and summary; nothing is recomputed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from nora_spectra.render._cells import NUMERIC_KEYS, cell, layer_columns, layer_rows

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.result import Analysis

__all__ = ["format_grid", "render_summary", "render_table"]


def format_grid(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """Align string cells into columns separated by two spaces, with a dashed rule under the headers.

    Args:
        headers: column titles.
        rows: rows of already-formatted cells (same length as ``headers``).
        right: per column, True to right-align (numbers); default left.
    """
    right = list(right) if right is not None else [False] * len(headers)
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


def _group_rows(groups: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, group in groups.items():
        erank = group["metrics"]["effective_rank"]
        util = group["metrics"]["utilization"]
        rows.append(
            [
                name,
                str(group["layers"]),
                cell(erank["mean"], 2),
                cell(util["mean"]),
                cell(util["weighted_mean"]),
                cell(util["min"]),
                str(group["collapsed"]),
            ]
        )
    return rows


def render_summary(analysis: "Analysis", *, by_layer: bool = False) -> str:
    """The summary block: counts, overall statistics, and per-module-type (optionally per-layer) groups."""
    s = analysis.summary
    statuses = ", ".join(f"{name} {n}" for name, n in s["by_status"].items() if n)
    lines = [
        f"{s['layers']} layers ({statuses or 'none'}); collapsed (utilization < "
        f"{analysis.collapse_threshold:g}): {s['collapsed']}",
    ]
    metrics = s["metrics"]
    stat_rows = [
        [name, cell(m["mean"]), cell(m["median"]), cell(m["weighted_mean"]), cell(m["min"]), cell(m["max"])]
        for name, m in metrics.items()
    ]
    lines.append(
        format_grid(["metric", "mean", "median", "rank-weighted", "min", "max"], stat_rows, [False] + [True] * 5)
    )
    group_headers = ["", "layers", "mean erank", "mean util", "weighted util", "min util", "collapsed"]
    right = [False] + [True] * 6
    if s["by_module_type"]:
        lines.append(format_grid(["module type"] + group_headers[1:], _group_rows(s["by_module_type"]), right))
    if by_layer and s["by_layer_index"]:
        lines.append(format_grid(["layer"] + group_headers[1:], _group_rows(s["by_layer_index"]), right))
    return "\n\n".join(lines)


def render_table(analysis: "Analysis", *, effective_rank: bool = False, by_layer: bool = False) -> str:
    """The terminal table of one analysis.

    Args:
        analysis: the analysed checkpoint.
        effective_rank: show only module, r, effective_rank, utilization, collapsed and status.
        by_layer: also print the summary grouped by layer index.

    Returns:
        A header line, the per-layer table and the summary block, newline-terminated.
    """
    columns = layer_columns("effective_rank" if effective_rank else "full", analysis.records)
    header = f"{analysis.display_name}  (format {analysis.format}, method {analysis.method}, {len(analysis)} layers"
    space = getattr(analysis, "space", "weight")
    if space != "weight":  # activation and probe spectra must not pass for weight-space ones
        tokens = getattr(analysis, "tokens", None)
        unit = "Gaussian inputs per layer" if space == "probe" else "tokens"
        header += f"; {space} space" + (f", {tokens} {unit}" if tokens else "")
    header += ")"
    parts = [header]
    if analysis.records:
        parts.append(
            format_grid(
                [title for _, title, _ in columns],
                layer_rows(analysis.records, columns),
                [key in NUMERIC_KEYS for key, _, _ in columns],
            )
        )
    parts.append(render_summary(analysis, by_layer=by_layer))
    return "\n\n".join(parts) + "\n"
