"""The census page (``spectra census``): one self-contained HTML file, like ``spectra report``'s.

Inline CSS (the report's), figures as base64 ``data:`` URIs, no scripts and nothing fetched. Sections:
overview (counts, collapsed share, formats, scan settings), the box plots, group tables (by r, module
type, base model), the slowest adapters, the failed adapters. Formatting only: every number comes
from :class:`~nora_spectra.scan.census.CensusData`; table cells carry the stored value in
``data-value`` (JSON) so the page can be checked against the scan's tables. All text is escaped.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

from nora_spectra.render._cells import cell
from nora_spectra.render.html import _e, _table, figures_section, html_page
from nora_spectra.schema import to_jsonable

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.scan.census import CensusData

__all__ = ["render_census_html"]


def _td(text: str, key: str | None = None, value: Any = None, numeric: bool = True) -> str:
    attrs = "" if numeric else ' class="t"'
    if key is not None:
        attrs += f' data-key="{_e(key)}" data-value="{_e(json.dumps(to_jsonable(value), allow_nan=False))}"'
    return f"<td{attrs}>{_e(text)}</td>"


def _share(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f} %"


def _overview(data: "CensusData") -> str:
    c = data.counts
    settings = data.settings
    items = [
        ("adapters", f"{c['adapters']} ({c['ok']} ok, {c['errors']} failed)"),
        ("modules", f"{c['modules']} ({c['counted']} with a known spectrum)"),
        ("collapsed modules", f"{c['collapsed']} ({_share(c['collapsed_share'])} of those with a known spectrum)"),
        ("formats", ", ".join(f"{name} {n}" for name, n in c["formats"].items()) or "-"),
        ("collapse threshold", str(settings.get("collapse_threshold", "-"))),
        ("roots", ", ".join(settings.get("roots") or []) or "-"),
        ("manifest", settings.get("manifest") or "-"),
        ("scan directory", data.scan),
    ]
    body = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    kind = "box" if c["collapsed"] else "box ok"
    box = (f'<div class="{kind}" data-key="collapsed_share" data-value="{_e(json.dumps(to_jsonable(c["collapsed_share"])))}">'
           f"{_e(_share(c['collapsed_share']))} of the modules collapsed (utilization below the threshold).</div>")
    return f'<section id="overview"><h2>Overview</h2>{box}<dl>{body}</dl></section>'


def _groups(data: "CensusData") -> str:
    if not data.groups:
        return ""
    parts = ['<section id="groups"><h2>Groups</h2>']
    headers = [("", False), ("adapters", True), ("modules", True), ("collapsed", True), ("collapsed share", True),
               ("median utilization", True), ("median effective rank", True)]
    for key, rows in data.groups.items():
        title = data.group_titles.get(key, key)
        body = [
            "<tr>" + _td(row["group"], numeric=False)
            + _td(str(row["adapters"]), "adapters", row["adapters"])
            + _td(str(row["modules"]), "modules", row["modules"])
            + _td(str(row["collapsed"]), "collapsed", row["collapsed"])
            + _td(_share(row["collapsed_share"]), "collapsed_share", row["collapsed_share"])
            + _td(cell(row["median_utilization"], 3), "median_utilization", row["median_utilization"])
            + _td(cell(row["median_effective_rank"], 2), "median_effective_rank", row["median_effective_rank"])
            + "</tr>"
            for row in rows
        ]
        parts.append(f"<h3>By {_e(title)}</h3>")
        parts.append(_table([(title, False)] + headers[1:], body, f"groups by-{key}"))
        if data.hidden_groups.get(key):
            parts.append(f'<p class="meta">{data.hidden_groups[key]} smaller groups not shown.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _slowest(data: "CensusData") -> str:
    if not data.slowest:
        return ""
    rows = [
        "<tr>" + _td(row["path"], numeric=False) + _td(row["format"] or "-", numeric=False)
        + _td(cell(row["modules"], 0), "modules", row["modules"]) + _td(cell(row["r"], 0), "r", row["r"])
        + _td(cell(row["seconds"], 3), "seconds", row["seconds"]) + "</tr>"
        for row in data.slowest
    ]
    table = _table([("adapter", False), ("format", False), ("modules", True), ("r", True), ("seconds", True)], rows, "slowest")
    return f'<section id="slowest"><h2>Slowest adapters</h2>{table}</section>'


def _failed(data: "CensusData") -> str:
    parts = ['<section id="failed"><h2>Failed adapters</h2>']
    if not data.failed_total:
        parts.append('<div class="box ok">Every adapter was analysed.</div>')
    else:
        rows = ["<tr>" + _td(row["path"], numeric=False) + _td(row["error"] or "", numeric=False) + "</tr>"
                for row in data.failed]
        parts.append(_table([("adapter", False), ("error", False)], rows, "failed"))
        if data.failed_total > len(data.failed):
            parts.append(f'<p class="meta">{data.failed_total - len(data.failed)} more failed adapters: '
                         "see adapters.parquet (status error).</p>")
    parts.append("</section>")
    return "\n".join(parts)


def render_census_html(data: "CensusData") -> str:
    """The whole census as one self-contained HTML document."""
    sections = [_overview(data), figures_section(data.figures), _groups(data), _slowest(data), _failed(data)]
    toc = [("overview", "Overview"), ("plots", "Plots"), ("groups", "Groups"), ("slowest", "Slowest"), ("failed", "Failed")]
    present = {anchor for anchor, _ in toc if f'id="{anchor}"' in "".join(sections)}
    meta = f"{data.counts['adapters']} adapters · generated {_e(data.generated)} by nora-spectra {_e(data.version)}"
    return html_page(data.title, meta, [(a, t) for a, t in toc if a in present], sections)
