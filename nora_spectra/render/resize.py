"""Renderings of a :class:`~nora_spectra.resize.Resize`: terminal table, JSON, Markdown and a notebook fragment.

Formatting only: every number comes from ``Resize.modules`` and ``Resize.summary``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

from nora_spectra.errors import UsageError
from nora_spectra.render._cells import markdown_table

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.resize import Resize

__all__ = ["RESIZE_FORMATS", "format_resize", "human_bytes", "resize_html"]

RESIZE_FORMATS = ("table", "json", "markdown")

_HEADERS = ("module", "r", "k", "energy kept", "σ_{k+1}", "rel. Frobenius error", "bytes before", "bytes after")


def human_bytes(n: Any) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``-``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _rows(resize: "Resize") -> list[list[str]]:
    return [
        [row["module"], str(row["rank_before"]), str(row["rank_after"]), f"{row['energy_kept']:.4f}",
         f"{row['spectral_error']:.4g}", f"{row['frobenius_error_rel']:.4f}", human_bytes(row["bytes_before"]),
         human_bytes(row["bytes_after"])]
        for row in resize.modules
    ]


def _summary_lines(resize: "Resize") -> list[str]:
    s = resize.summary
    lines = [
        f"rank {s['rank_before']} -> {s['rank_after']} ({s['modules_cut']} of {s['modules']} modules cut); "
        f"energy kept {s['energy_kept']:.4f}; relative Frobenius error {s['frobenius_error_rel']:.4f}; "
        f"max σ_(k+1) {s['max_spectral_error']:.4g}",
    ]
    if s["bytes_before"] is not None:
        lines.append(
            f"weights {human_bytes(s['bytes_before'])} -> {human_bytes(s['bytes_after'])} "
            f"({100 * s['size_reduction']:.1f}% smaller)"
        )
    else:
        lines.append("dry run: nothing written")
    lines += [f"note: {note}" for note in s["notes"]]
    return lines


def _header(resize: "Resize") -> str:
    target = resize.output or "(dry run)"
    return f"{resize.input} -> {target}  (format {resize.format}, policy {resize.policy})"


def _table(resize: "Resize") -> str:
    from nora_spectra.render.table import format_grid

    grid = format_grid(_HEADERS, _rows(resize), [False] + [True] * (len(_HEADERS) - 1))
    return "\n\n".join([_header(resize), grid, "\n".join(_summary_lines(resize))]) + "\n"


def _markdown(resize: "Resize") -> str:
    rows = [[f"`{r[0]}`", *r[1:]] for r in _rows(resize)]
    parts = [f"## Resize: `{resize.input}`", f"_{_header(resize)}_", markdown_table(_HEADERS, rows),
             "\n".join(f"- {line}" for line in _summary_lines(resize))]
    return "\n\n".join(parts) + "\n"


def format_resize(resize: "Resize", fmt: str = "table") -> str:
    """Render ``resize`` as ``table``, ``json`` or ``markdown`` (newline-terminated).

    Raises:
        UsageError: an unknown format.
    """
    if fmt == "table":
        return _table(resize)
    if fmt == "json":
        return json.dumps(resize.to_dict(), indent=2, allow_nan=False) + "\n"
    if fmt == "markdown":
        return _markdown(resize)
    raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(RESIZE_FORMATS)}")


def _html_rows(resize: "Resize", keys: Sequence[str]) -> list[str]:
    from nora_spectra.render.html import _e, _td

    out = []
    for row, cells in zip(resize.modules, _rows(resize)):
        tds = [_td(cells[0], numeric=False)]
        tds += [_td(text, key=key, value=row[key]) for text, key in zip(cells[1:], keys)]
        out.append(f'<tr data-module="{_e(row["module"])}">{"".join(tds)}</tr>')
    return out


def resize_html(resize: "Resize") -> str:
    """An HTML fragment for Jupyter: header, totals and the per-module table (exact values in ``data-value``)."""
    from nora_spectra.render.html import CSS, _e, _table

    keys = ("rank_before", "rank_after", "energy_kept", "spectral_error", "frobenius_error_rel", "bytes_before",
            "bytes_after")
    table = _table([(h, i > 0) for i, h in enumerate(_HEADERS)], _html_rows(resize, keys), "resize")
    lines = "<br>".join(_e(line) for line in _summary_lines(resize))
    return f'<div class="ns"><style>{CSS}</style><p><b>{_e(_header(resize))}</b><br>{lines}</p>{table}</div>'
