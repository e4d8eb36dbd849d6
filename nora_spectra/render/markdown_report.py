"""The Markdown report: ``report.md`` text plus the PNG files it links from a folder next to it.

Same sections as the HTML report (warnings, summary, comparison, per-module tables, subspace overlap,
plots, training runs, configs). Formatting only; the per-checkpoint sections reuse
:func:`nora_spectra.render.text_formats.render_markdown`, the Markdown of ``spectra analyze``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from nora_spectra.render._cells import cell, markdown_table, signed
from nora_spectra.schema import to_jsonable
from nora_spectra.render.text_formats import render_markdown

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.comparison import Comparison
    from nora_spectra.report import ReportData

__all__ = ["comparison_markdown", "markdown_table", "render_report_markdown"]


def comparison_markdown(comparison: "Comparison") -> str:
    """The per-module-type and per-module comparison tables (differences against the reference)."""
    groups = [
        [item["group"], item["label"], str(item["layers"]), cell(item["mean_effective_rank"], 2),
         signed(item["d_mean_effective_rank"], 2), cell(item["mean_utilization"]),
         signed(item["d_mean_utilization"], 3), str(item["collapsed"])]
        for item in comparison.by_module_type
    ]
    parts = [
        f"### By module type (differences against {comparison.reference})",
        markdown_table(["module type", "checkpoint", "layers", "mean erank", "Δ erank", "mean util", "Δ util",
                        "collapsed"], groups),
    ]
    labels, others = comparison.labels, comparison.labels[1:]
    headers = ["module"] + [f"r {lab}" for lab in labels] + [f"erank {lab}" for lab in labels]
    headers += [f"Δ erank {lab}" for lab in others] + [f"util {lab}" for lab in labels]
    headers += [f"Δ util {lab}" for lab in others]
    per: dict[str, dict[str, Any]] = {}
    for row in comparison.rows:
        per.setdefault(row["module"], {})[row["label"]] = row
    rows = []
    for module in comparison.modules:
        r = per[module]
        line = [f"`{module}`"] + [cell(r[lab]["rank"]) if r[lab]["present"] else "absent" for lab in labels]
        line += [cell(r[lab]["effective_rank"], 2) for lab in labels]
        line += [signed(r[lab]["d_effective_rank"], 2) for lab in others]
        line += [cell(r[lab]["utilization"]) for lab in labels]
        line += [signed(r[lab]["d_utilization"], 3) for lab in others]
        rows.append(line)
    parts += [f"### Module by module (differences against {comparison.reference})", markdown_table(headers, rows)]
    return "\n\n".join(parts)


def _demote(text: str) -> str:
    """Push the headings of an embedded section one level down (``## x`` -> ``### x``)."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def render_report_markdown(data: "ReportData", image_dir: str) -> tuple[str, dict[str, bytes]]:
    """Render the report as Markdown.

    Args:
        data: the report data.
        image_dir: folder name (relative to the Markdown file) the images are linked from.

    Returns:
        ``(markdown text, {file name: PNG bytes})``; the caller writes the files into ``image_dir``.
    """
    meta = f"{len(data.analyses)} checkpoint{'' if len(data.analyses) == 1 else 's'}"
    if data.runs:
        meta += f", {len(data.runs)} training run{'' if len(data.runs) == 1 else 's'}"
    parts = [f"# {data.title}", f"_{meta}; generated {data.generated} by nora-spectra {data.version}_", "## Warnings"]
    if not any(w["kind"] == "collapse" for w in data.warnings):
        parts.append("No collapsed layers.")
    for w in data.warnings:
        prefix = f"**{w['label']}**: " if w["label"] else ""
        lines = [f"> **{w['kind']}** {prefix}{w['message']}"]
        lines += [f"> - `{name}`" for name in w["modules"]]
        parts.append("\n".join(lines))
    parts.append("## Summary")
    rows = [
        [r["label"], f"`{r['checkpoint']}`", r["method"], str(r["layers"]), ", ".join(map(str, r["ranks"])) or "-",
         cell(r["mean_effective_rank"], 2), cell(r["mean_utilization"]), cell(r["weighted_utilization"]),
         cell(r["min_utilization"]), str(r["collapsed"])]
        for r in data.summary
    ]
    if rows:
        parts.append(
            markdown_table(["checkpoint", "path", "method", "layers", "r", "mean erank", "mean util",
                            "weighted util", "min util", "collapsed"], rows)
        )
    if data.comparison is not None and len(data.comparison.labels) > 1:
        parts.append(comparison_markdown(data.comparison))
    if data.analyses:
        parts.append("## Per-module metrics")
        for label, analysis in data.checkpoints:
            parts.append(f"### {label}")
            parts.append(_demote(_demote(render_markdown(analysis).strip())))
    if data.overlaps:
        from nora_spectra.render.overlap import overlap_markdown

        parts.append("## Subspace overlap")
        parts.extend(overlap_markdown(item, "###").strip() for item in data.overlaps)
    images: dict[str, bytes] = {}
    if data.figures:
        parts.append("## Plots")
        for fig in data.figures:
            name = f"{fig.name}.png"
            images[name] = fig.png
            parts.append(f"### {fig.title}\n\n![{fig.title}]({image_dir}/{name})\n\n{fig.caption}")
    if data.runs:
        parts.append("## Training runs")
        for run in data.runs:
            last = run.last
            parts.append(
                f"- **{run.label}** (`{run.path}`): {len(run.history)} logged steps, last step "
                f"{last.get('step', '-')}, last training loss {cell(last.get('train_loss'), 4)}; "
                f"analysed adapter: {f'`{run.adapter}`' if run.adapter else 'none found'}"
            )
    parts.append("## Adapter configs")
    for label, analysis in data.checkpoints:
        text = json.dumps(to_jsonable(analysis.config), indent=2, sort_keys=True) if analysis.config else "null"
        parts.append(f"### {label}\n\n```json\n{text}\n```")
    for run in data.runs:
        if run.config:
            text = json.dumps(to_jsonable(run.config), indent=2, sort_keys=True)
            parts.append(f"### {run.label}: training config\n\n```json\n{text}\n```")
    return "\n\n".join(parts) + "\n", images
