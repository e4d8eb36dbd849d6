"""HTML renderings: notebook fragments (``_repr_html_``) and the self-contained HTML report.

The report is one file with inline CSS and its PNG figures as base64 ``data:`` URIs: no scripts, no
stylesheets or fonts from elsewhere, nothing fetched over the network. Sections, in order: collapse
warnings, summary (and the comparison when there are several checkpoints), per-module tables, plots,
subspace overlap (``--overlap``), training runs, adapter configs.

Formatting only: every number comes from the analysis records and summaries (via
:class:`~nora_spectra.report.ReportData`). Table cells carry the exact stored value in a
``data-value`` attribute (JSON), so the HTML can be checked against ``spectra analyze --format json``.
All text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from nora_spectra.render._cells import NUMERIC_KEYS, cell, layer_columns, signed
from nora_spectra.schema import to_jsonable

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.result import Analysis
    from nora_spectra.comparison import Comparison
    from nora_spectra.report import ReportData

__all__ = ["CSS", "analysis_html", "comparison_html", "figures_section", "html_page", "render_report_html"]

#: the report's stylesheet (inline; class names are prefixed by the ``ns`` root where it matters).
CSS = """
.ns{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;line-height:1.45}
body{margin:0;background:#fff}
main.ns{max-width:1180px;margin:0 auto;padding:20px 32px 64px}
.ns h1{font-size:1.7rem;margin:.2em 0 .1em}
.ns h2{font-size:1.3rem;border-bottom:1px solid #d8dee4;padding-bottom:.25em;margin:1.8em 0 .6em}
.ns h3{font-size:1.05rem;margin:1.3em 0 .4em}
.ns .meta{color:#59636e;font-size:.85rem;margin:0}
.ns nav{font-size:.9rem;margin:.8em 0 0}
.ns nav a{margin-right:1.1em;color:#0969da;text-decoration:none}
.ns .scroll{overflow-x:auto;max-width:100%;margin:.4em 0 1em}
.ns table{border-collapse:collapse;font-size:.82rem;font-variant-numeric:tabular-nums}
.ns th,.ns td{padding:3px 9px;border-bottom:1px solid #eaeef2;text-align:right;white-space:nowrap}
.ns th{background:#f6f8fa;font-weight:600;border-bottom:1px solid #d0d7de}
.ns .t{text-align:left}
.ns code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.95em}
.ns tr.collapsed td{background:#fff0ee}
.ns tr.absent td{color:#8c959f;font-style:italic}
.ns .up{color:#1a7f37}.ns .down{color:#cf222e}
.ns .box{border-left:4px solid #cf222e;background:#ffebe9;padding:7px 12px;margin:6px 0;font-size:.9rem}
.ns .box.warning{border-color:#bf8700;background:#fff8c5}
.ns .box.note{border-color:#0969da;background:#ddf4ff}
.ns .box.ok{border-color:#1a7f37;background:#dafbe1}
.ns .box ul{margin:.3em 0 .1em;padding-left:1.3em}
.ns details summary{cursor:pointer;color:#59636e}
.ns .figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:14px 22px}
.ns figure{margin:0}
.ns figure.wide{grid-column:1/-1}
.ns figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
.ns figcaption{font-size:.84rem;color:#59636e}
.ns figcaption b{color:#1f2328}
.ns pre{background:#f6f8fa;padding:10px 12px;overflow-x:auto;font-size:.8rem;border-radius:4px}
.ns dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:.88rem}
.ns dt{color:#59636e}.ns dd{margin:0}
"""

_LIST_LIMIT = 8


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_value(value: Any) -> str:
    return json.dumps(to_jsonable(value), allow_nan=False, separators=(",", ":"))


def _td(text: str, *, key: str | None = None, value: Any = None, numeric: bool = True, cls: str = "") -> str:
    """A table cell; ``key``/``value`` become ``data-key``/``data-value`` (exact JSON of the stored value)."""
    attrs = []
    classes = " ".join(c for c in (cls, "" if numeric else "t") if c)
    if classes:
        attrs.append(f'class="{classes}"')
    if key is not None:
        attrs.append(f'data-key="{_e(key)}"')
        if value is not None:
            attrs.append(f'data-value="{_e(_json_value(value))}"')
    return f"<td{' ' + ' '.join(attrs) if attrs else ''}>{_e(text)}</td>"


def _table(headers: Sequence[tuple[str, bool]], rows: Iterable[str], cls: str = "", label: str | None = None) -> str:
    """A scrollable table; ``headers`` are ``(title, numeric)``, ``rows`` already-rendered ``<tr>``."""
    head = "".join(f'<th class="{"" if numeric else "t"}">{_e(title)}</th>' for title, numeric in headers)
    body = "\n".join(rows)
    data_label = "" if label is None else f' data-label="{_e(label)}"'
    return (
        f'<div class="scroll"><table class="{_e(cls)}"{data_label}><thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def _delta(value: Any, digits: int, signed_colour: bool = True) -> tuple[str, str]:
    """The signed difference and its CSS class (``up``/``down``; none for 0 or without colour)."""
    text = signed(value, digits)
    if value is None or not signed_colour or float(value) == 0:
        return text, ""
    return text, "up" if float(value) > 0 else "down"


def module_table(analysis: "Analysis", label: str | None = None) -> str:
    """Every layer record of one analysis (the columns of ``spectra analyze``), collapsed rows tinted.

    ``label`` (the checkpoint's label in a report) becomes the table's ``data-label`` attribute.
    """
    columns = layer_columns("full", analysis.records)
    rows = []
    for rec in analysis.records:
        cells = []
        for key, _, fmt in columns:
            text = fmt(rec.get(key))
            cells.append(_td(text, key=key, value=rec.get(key), numeric=key in NUMERIC_KEYS))
        cls = ' class="collapsed"' if rec.get("collapsed") is True else ""
        rows.append(f'<tr{cls} data-module="{_e(rec["module"])}">{"".join(cells)}</tr>')
    return _table([(title, key in NUMERIC_KEYS) for key, title, _ in columns], rows, "modules", label)


def group_table(analysis: "Analysis", key: str = "by_module_type", title: str = "module type") -> str:
    """The analysis summary grouped by module type (or layer index), as stored in ``summary[key]``."""
    rows = []
    for name, group in (analysis.summary.get(key) or {}).items():
        erank, util = group["metrics"]["effective_rank"], group["metrics"]["utilization"]
        rows.append(
            "<tr>"
            + _td(name, numeric=False)
            + _td(str(group["layers"]))
            + _td(cell(erank["mean"], 2), key="mean_effective_rank", value=erank["mean"])
            + _td(cell(util["mean"]), key="mean_utilization", value=util["mean"])
            + _td(cell(util["weighted_mean"]), key="weighted_utilization", value=util["weighted_mean"])
            + _td(cell(util["min"]), key="min_utilization", value=util["min"])
            + _td(str(group["collapsed"]))
            + "</tr>"
        )
    headers = [(title, False), ("layers", True), ("mean erank", True), ("mean util", True),
               ("weighted util", True), ("min util", True), ("collapsed", True)]
    return _table(headers, rows, "groups")


def _summary_line(analysis: "Analysis") -> str:
    s = analysis.summary
    statuses = ", ".join(f"{name} {n}" for name, n in s["by_status"].items() if n) or "none"
    util = s["metrics"]["utilization"]
    return (
        f"{s['layers']} layers ({statuses}); mean utilization {cell(util['mean'])}, rank-weighted "
        f"{cell(util['weighted_mean'])}; collapsed (utilization &lt; {analysis.collapse_threshold:g}): {s['collapsed']}"
    )


def analysis_html(analysis: "Analysis") -> str:
    """An HTML fragment for Jupyter: header, summary line, module-type table and the layer table."""
    return (
        f'<div class="ns"><style>{CSS}</style>'
        f"<p><b><code>{_e(analysis.display_name)}</code></b> (format {_e(analysis.format)}, method {_e(analysis.method)})<br>"
        f"{_summary_line(analysis)}</p>"
        f"{group_table(analysis)}{module_table(analysis)}</div>"
    )


def comparison_table(comparison: "Comparison") -> str:
    """Module by module: r, effective rank, utilization and sigma_max per checkpoint, differences vs the reference."""
    labels = comparison.labels
    others = labels[1:]
    headers: list[tuple[str, bool]] = [("module", False)]
    headers += [(f"r {lab}", True) for lab in labels]
    headers += [(f"erank {lab}", True) for lab in labels] + [(f"Δ erank {lab}", True) for lab in others]
    headers += [(f"util {lab}", True) for lab in labels] + [(f"Δ util {lab}", True) for lab in others]
    headers += [(f"σmax {lab}", True) for lab in labels] + [(f"Δ σmax {lab}", True) for lab in others]
    by_module: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in comparison.rows:
        by_module.setdefault(row["module"], {})[row["label"]] = row
    partial = {item["module"] for item in comparison.partial_modules}
    rows = []
    for module in comparison.modules:
        per = by_module[module]
        cells = [_td(module, numeric=False)]
        cells += [_td(cell(per[lab]["rank"]) if per[lab]["present"] else "absent", key="rank", value=per[lab]["rank"])
                  for lab in labels]
        for metric, digits, coloured in (("effective_rank", 2, True), ("utilization", 3, True), ("sigma_max", 4, False)):
            for lab in labels:
                value = per[lab][metric]
                text = "-" if value is None else (f"{float(value):.4g}" if metric == "sigma_max" else cell(value, digits))
                cells.append(_td(text, key=metric, value=value))
            for lab in others:
                text, cls = _delta(per[lab][f"d_{metric}"], digits if metric != "sigma_max" else 3, coloured)
                cells.append(_td(text, key=f"d_{metric}", value=per[lab][f"d_{metric}"], cls=cls))
        cls = ' class="absent"' if module in partial else ""
        rows.append(f'<tr{cls} data-module="{_e(module)}">{"".join(cells)}</tr>')
    return _table(headers, rows, "comparison")


def comparison_group_table(comparison: "Comparison", key: str = "by_module_type", title: str = "module type") -> str:
    """Per group and checkpoint: layers, mean effective rank, utilization and their differences."""
    rows = []
    for item in getattr(comparison, key):
        d_erank, c1 = _delta(item["d_mean_effective_rank"], 2)
        d_util, c2 = _delta(item["d_mean_utilization"], 3)
        rows.append(
            "<tr>"
            + _td(item["group"], numeric=False)
            + _td(item["label"], numeric=False)
            + _td(str(item["layers"]))
            + _td(cell(item["mean_effective_rank"], 2), key="mean_effective_rank", value=item["mean_effective_rank"])
            + _td(d_erank, key="d_mean_effective_rank", value=item["d_mean_effective_rank"], cls=c1)
            + _td(cell(item["mean_utilization"]), key="mean_utilization", value=item["mean_utilization"])
            + _td(d_util, key="d_mean_utilization", value=item["d_mean_utilization"], cls=c2)
            + _td(cell(item["weighted_utilization"]), key="weighted_utilization", value=item["weighted_utilization"])
            + _td(str(item["collapsed"]))
            + "</tr>"
        )
    headers = [(title, False), ("checkpoint", False), ("layers", True), ("mean erank", True), ("Δ erank", True),
               ("mean util", True), ("Δ util", True), ("weighted util", True), ("collapsed", True)]
    return _table(headers, rows, "comparison-groups")


def comparison_html(comparison: "Comparison") -> str:
    """An HTML fragment for Jupyter: checkpoints, per-type summary, module table and partial modules."""
    items = "".join(
        f"<li><b>{_e(lab)}</b>{' (reference)' if i == 0 else ''}: <code>{_e(a.display_name)}</code>, {_e(a.method)}, "
        f"{len(a.records)} layers</li>"
        for i, (lab, a) in enumerate(zip(comparison.labels, comparison.analyses))
    )
    return (
        f'<div class="ns"><style>{CSS}</style><ul>{items}</ul>'
        f"{_partial_box(comparison)}{comparison_group_table(comparison)}{comparison_table(comparison)}</div>"
    )


def _partial_box(comparison: "Comparison") -> str:
    if not comparison.partial_modules:
        return ""
    names = [f"{p['module']} (only in {', '.join(p['present_in'])})" for p in comparison.partial_modules]
    return _box("note", f"{len(names)} modules are not in every checkpoint", names)


def _box(kind: str, message: str, names: Sequence[str] = (), label: str = "") -> str:
    body = (f"<b>{_e(label)}</b>: " if label else "") + _e(message)
    if names:
        items = "".join(f"<li><code>{_e(n)}</code></li>" for n in names)
        if len(names) > _LIST_LIMIT:
            body += f"<details><summary>{len(names)} modules</summary><ul>{items}</ul></details>"
        else:
            body += f"<ul>{items}</ul>"
    return f'<div class="box {_e(kind)}">{body}</div>'


def _warnings_section(data: "ReportData") -> str:
    parts = ['<section id="warnings"><h2>Warnings</h2>']
    if not any(w["kind"] == "collapse" for w in data.warnings):
        parts.append(_box("ok", "No collapsed layers: every module uses at least the collapse threshold of its rank."))
    for w in data.warnings:
        parts.append(_box(w["kind"], w["message"], w["modules"], w["label"]))
    parts.append("</section>")
    return "\n".join(parts)


def _summary_section(data: "ReportData") -> str:
    rows = []
    for row in data.summary:
        statuses = ", ".join(f"{k} {v}" for k, v in row["by_status"].items())
        rows.append(
            "<tr>"
            + _td(row["label"], numeric=False)
            + _td(row["checkpoint"], numeric=False)
            + _td(row["method"], numeric=False)
            + _td(str(row["layers"]), key="layers", value=row["layers"])
            + _td(", ".join(map(str, row["ranks"])) or "-", numeric=False)
            + _td(cell(row["mean_effective_rank"], 2), key="mean_effective_rank", value=row["mean_effective_rank"])
            + _td(cell(row["mean_utilization"]), key="mean_utilization", value=row["mean_utilization"])
            + _td(cell(row["weighted_utilization"]), key="weighted_utilization", value=row["weighted_utilization"])
            + _td(cell(row["min_utilization"]), key="min_utilization", value=row["min_utilization"])
            + _td(str(row["collapsed"]), key="collapsed", value=row["collapsed"])
            + _td(statuses, numeric=False)
            + "</tr>"
        )
    headers = [("checkpoint", False), ("path", False), ("method", False), ("layers", True), ("r", False),
               ("mean erank", True), ("mean util", True), ("weighted util", True), ("min util", True),
               ("collapsed", True), ("status", False)]
    parts = ['<section id="summary"><h2>Summary</h2>']
    if rows:
        parts.append(_table(headers, rows, "summary"))
        parts.append(
            "<p class=\"meta\">erank: effective rank exp(H(σ/Σσ)) (Roy &amp; Vetterli); util: erank / r; "
            "rank-weighted utilization: Σ erank / Σ r.</p>"
        )
    else:
        parts.append("<p>No adapter checkpoints.</p>")
    comparison = data.comparison
    if comparison is not None and len(comparison.labels) > 1:
        parts.append(f"<h3>By module type (differences against {_e(comparison.reference)})</h3>")
        parts.append(comparison_group_table(comparison))
        parts.append(f"<h3>Module by module (differences against {_e(comparison.reference)})</h3>")
        parts.append(comparison_table(comparison))
    elif data.analyses:
        parts.append("<h3>By module type</h3>")
        parts.append(group_table(data.analyses[0]))
    parts.append("</section>")
    return "\n".join(parts)


def _modules_section(data: "ReportData") -> str:
    if not data.analyses:
        return ""
    parts = ['<section id="modules"><h2>Per-module metrics</h2>']
    for label, analysis in data.checkpoints:
        parts.append(
            f'<h3 data-label="{_e(label)}">{_e(label)} <span class="meta"><code>{_e(analysis.display_name)}</code>, '
            f"format {_e(analysis.format)}, method {_e(analysis.method)}</span></h3>"
        )
        parts.append(f'<p class="meta">{_summary_line(analysis)}</p>')
        parts.append(module_table(analysis, label))
    parts.append("</section>")
    return "\n".join(parts)


def _figures_section(data: "ReportData") -> str:
    return figures_section(data.figures, wide=("utilization_heatmap", "overlap_bars"))


def figures_section(figures: Sequence[Any], wide: tuple[str, ...] = ()) -> str:
    """The ``Plots`` section: each figure (``name``, ``title``, ``caption``, ``png``) inline as a data URI;
    figures whose name starts with one of ``wide`` span the page. Empty without figures."""
    if not figures:
        return ""
    parts = ['<section id="plots"><h2>Plots</h2><div class="figs">']
    for fig in figures:
        uri = "data:image/png;base64," + base64.b64encode(fig.png).decode("ascii")
        cls = ' class="wide"' if wide and fig.name.startswith(wide) else ""
        parts.append(
            f'<figure{cls} id="fig-{_e(fig.name)}"><img src="{uri}" alt="{_e(fig.title)}">'
            f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)}</figcaption></figure>"
        )
    parts.append("</div></section>")
    return "\n".join(parts)


def _overlap_section(data: "ReportData") -> str:
    """The subspace overlap of the first checkpoint with each other one (``--overlap``): summary and table."""
    if not data.overlaps:
        return ""
    from nora_spectra.render.overlap import overlap_table_html

    parts = ['<section id="overlap"><h2>Subspace overlap</h2>',
             '<p class="meta">Per module: the mean squared cosine of the principal angles between the two updates\' '
             "top-k singular subspaces (φ(k, k) of the LoRA paper), for the left (output) and right (input) "
             "singular vectors; chance is k / d, what two random subspaces give. The plots are in the Plots "
             "section.</p>"]
    for item in data.overlaps:
        parts.append(f"<h3>{_e(item.labels[0])} and {_e(item.labels[1])}</h3>")
        parts.append(overlap_table_html(item))
    parts.append("</section>")
    return "\n".join(parts)


def _runs_section(data: "ReportData") -> str:
    if not data.runs:
        return ""
    parts = ['<section id="runs"><h2>Training runs</h2>']
    for run in data.runs:
        last = run.last
        val = next((rec for rec in reversed(run.history) if rec.get("val_loss") is not None), {})
        items = [
            ("directory", run.path),
            ("logged steps", str(len(run.history))),
            ("last step", str(last.get("step", "-"))),
            ("last training loss", cell(last.get("train_loss"), 4)),
            ("last validation loss", cell(val.get("val_loss"), 4) + (f" (step {val['step']})" if val else "")),
            ("last validation perplexity", cell(val.get("val_ppl"), 3)),
            ("analysed adapter", run.adapter or "none found"),
        ]
        body = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
        parts.append(f"<h3>{_e(run.label)}</h3><dl>{body}</dl>")
    parts.append("</section>")
    return "\n".join(parts)


def _configs_section(data: "ReportData") -> str:
    parts = ['<section id="configs"><h2>Adapter configs</h2>']
    for label, analysis in data.checkpoints:
        text = json.dumps(to_jsonable(analysis.config), indent=2, sort_keys=True) if analysis.config else "(no adapter config)"
        parts.append(f"<h3>{_e(label)}</h3><pre>{_e(text)}</pre>")
    for run in data.runs:
        if run.config:
            text = json.dumps(to_jsonable(run.config), indent=2, sort_keys=True)
            parts.append(f"<h3>{_e(run.label)}: training config</h3><pre>{_e(text)}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def render_report_html(data: "ReportData") -> str:
    """The whole report as one self-contained HTML document (UTF-8 text)."""
    sections = [
        _warnings_section(data),
        _summary_section(data),
        _modules_section(data),
        _overlap_section(data),
        _figures_section(data),
        _runs_section(data),
        _configs_section(data),
    ]
    toc = [("warnings", "Warnings"), ("summary", "Summary")]
    if data.analyses:
        toc.append(("modules", "Per-module metrics"))
    if data.overlaps:
        toc.append(("overlap", "Subspace overlap"))
    if data.figures:
        toc.append(("plots", "Plots"))
    if data.runs:
        toc.append(("runs", "Training runs"))
    toc.append(("configs", "Configs"))
    meta = (
        f"{len(data.analyses)} checkpoint{'s' if len(data.analyses) != 1 else ''}"
        + (f", {len(data.runs)} training run{'s' if len(data.runs) != 1 else ''}" if data.runs else "")
        + f" · generated {_e(data.generated)} by nora-spectra {_e(data.version)}"
    )
    return html_page(data.title, meta, toc, sections)


def html_page(title: str, meta: str, toc: Sequence[tuple[str, str]], sections: Sequence[str]) -> str:
    """A whole self-contained page: the report's CSS, a header with ``meta`` (HTML, already escaped) and a
    navigation bar of ``toc`` ``(anchor, title)`` links, then the non-empty ``sections``."""
    nav = "".join(f'<a href="#{anchor}">{_e(name)}</a>' for anchor, name in toc)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n"
        f'<body><main class="ns"><header><h1>{_e(title)}</h1><p class="meta">{meta}</p>'
        f"<nav>{nav}</nav></header>\n"
        + "\n".join(s for s in sections if s)
        + "\n</main></body></html>\n"
    )
