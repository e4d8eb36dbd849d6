"""``report(paths, output)``: a self-contained HTML or Markdown report of checkpoints and training runs.

The report's numbers are those of :func:`~nora_spectra.analysis.analyze` (the same records that
``spectra analyze --format json`` writes): this module gathers analyses, a
:class:`~nora_spectra.comparison.Comparison`, training histories and PNG figures into a
:class:`ReportData`; the renderers (:mod:`nora_spectra.render.html`,
:mod:`nora_spectra.render.markdown_report`) only format it.

A path may be

* an adapter checkpoint (anything ``analyze`` reads);
* an analysis JSON file written by ``spectra analyze --format json`` (one or several checkpoints);
* a training run directory (it holds ``metrics.jsonl``): its loss curves and effective-rank
  trajectories are plotted, and its final adapter (``adapter/``, else the latest
  ``checkpoints/step-*``) is analysed like any checkpoint.

With ``overlap=True`` the report adds the subspace overlap (:func:`~nora_spectra.overlap.overlap`) of the
first checkpoint with each of the others: a table, the per-module bar chart and the phi heat map of one
module (``overlap_module``, default the first one compared).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

from nora_core.parsing import ParseError, read_json, read_json_lines, type_name
from nora_spectra._text import package_version
from nora_spectra.comparison import Comparison, compare, load_analyses
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.labels import analysis_labels
from nora_spectra.outputs import check_writable, write_output
from nora_spectra.overlap import Overlap, overlap as subspace_overlap
from nora_spectra.result import Analysis

__all__ = [
    "METRICS_NAME",
    "REPORT_FORMATS",
    "ReportData",
    "ReportFigure",
    "RunData",
    "build_report",
    "collapse_warnings",
    "read_run",
    "report",
    "summary_rows",
    "write_report",
]

#: the trainer's per-step log inside a run directory.
METRICS_NAME = "metrics.jsonl"

#: output suffix -> format name.
REPORT_FORMATS: dict[str, str] = {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown"}

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclasses.dataclass
class ReportFigure:
    """One plot of a report.

    Attributes:
        name: file-name stem (``spectrum_decay``), unique within the report.
        title: heading shown above the image.
        caption: how to read it, one or two sentences.
        png: the image, PNG bytes.
    """

    name: str
    title: str
    caption: str
    png: bytes


@dataclasses.dataclass
class RunData:
    """A training run directory.

    Attributes:
        label: its label in the report.
        path: the directory.
        history: the records of ``metrics.jsonl``, in file order.
        config: ``train_config.json`` when present.
        adapter: the adapter directory analysed for this run (None when it has none).
    """

    label: str
    path: str
    history: list[dict[str, Any]]
    config: dict[str, Any] | None = None
    adapter: str | None = None

    @property
    def last(self) -> dict[str, Any]:
        """The last record with a training loss ({} when there is none)."""
        return next((rec for rec in reversed(self.history) if rec.get("train_loss") is not None), {})


@dataclasses.dataclass
class ReportData:
    """Everything a report shows; renderers format it and compute nothing.

    Attributes:
        title: the report title.
        generated: creation time, ISO 8601 UTC (seconds).
        version: the nora-spectra version.
        labels: one label per analysis.
        analyses: the analysed checkpoints.
        comparison: :func:`~nora_spectra.comparison.compare` of the analyses (the first is the reference);
            None with fewer than two analyses.
        runs: training runs.
        warnings: collapse warnings first, then the analyses' own warnings, then comparison notes:
            dicts ``{"label", "kind", "message", "modules"}`` (``kind`` in collapse, warning, note).
        figures: the plots, in display order.
        summary: one row per checkpoint for the summary table (:func:`summary_rows`).
        overlaps: the subspace overlaps of the first checkpoint with each other one (``overlap=True``).
    """

    title: str
    generated: str
    version: str
    labels: list[str]
    analyses: list[Analysis]
    comparison: Comparison | None
    runs: list[RunData]
    warnings: list[dict[str, Any]]
    figures: list[ReportFigure]
    summary: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    overlaps: list[Overlap] = dataclasses.field(default_factory=list)

    @property
    def checkpoints(self) -> list[tuple[str, Analysis]]:
        """``(label, analysis)`` pairs."""
        return list(zip(self.labels, self.analyses))


def read_run(path: "str | os.PathLike[str]", label: str | None = None) -> RunData:
    """Read a training run directory: ``metrics.jsonl``, ``train_config.json`` and where its adapter is.

    Raises:
        CheckpointError: ``metrics.jsonl`` is unreadable or a line is not a JSON object with a ``step``.
    """
    root = Path(path)
    file = root / METRICS_NAME
    history: list[dict[str, Any]] = []
    try:
        for number, record in read_json_lines(file):
            history.append(_step_record(file, number, record))
    except OSError as exc:
        raise CheckpointError(file, f"cannot read the training log ({exc.strerror or exc})") from None
    except ParseError as exc:
        raise CheckpointError(file, exc.problem) from None
    config = None
    config_file = root / "train_config.json"
    if config_file.is_file():
        try:
            config = read_json(config_file)
        except (OSError, ParseError):
            config = None
    return RunData(
        label=label or root.resolve().name,
        path=os.fspath(path),
        history=history,
        config=config if isinstance(config, dict) else None,
        adapter=_run_adapter(root),
    )


#: fields of a metrics.jsonl record that the plots read, and what each must be.
_NUMBER_FIELDS = ("train_loss", "lr", "tokens_per_s", "val_loss", "val_ppl")
_SPECTRA_FIELDS = ("module", "module_type", "rank", "effective_rank", "utilization", "stable_rank", "sigma_max", "status")


def _step_record(file: Path, number: int, record: Any) -> dict[str, Any]:
    """One ``metrics.jsonl`` record, checked: the fields the report plots have the trainer's types.

    Raises:
        CheckpointError: naming the file, the line and the bad field.
    """

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(file, f"line {number}: {problem}")

    if not isinstance(record, dict) or "step" not in record:
        raise bad("not a step record (a JSON object with 'step')")
    step = record["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= 2**53:
        raise bad(f"step: expected an integer in [0, 2**53], got {type_name(step)}")
    for name in _NUMBER_FIELDS:
        value = record.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad(f"{name}: expected a number or null, got {type_name(value)}")
    spectra = record.get("spectra")
    if spectra is not None:
        if not isinstance(spectra, list):
            raise bad(f"spectra: expected a list, got {type_name(spectra)}")
        for i, entry in enumerate(spectra):
            if not isinstance(entry, dict):
                raise bad(f"spectra[{i}]: expected an object, got {type_name(entry)}")
            rank = entry.get("rank")
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= 2**40):
                raise bad(f"spectra[{i}].rank: expected an integer in [0, 2**40] or null, got {type_name(rank)}")
            for name in _SPECTRA_FIELDS:
                value = entry.get(name)
                text = name in ("module", "module_type", "status")
                ok = value is None or (isinstance(value, str) if text else
                                       isinstance(value, (int, float)) and not isinstance(value, bool))
                if not ok:
                    want = "a string" if text else "a number"
                    raise bad(f"spectra[{i}].{name}: expected {want} or null, got {type_name(value)}")
    return record


def _run_adapter(root: Path) -> str | None:
    """The run's final adapter directory, else its latest step checkpoint holding an adapter."""
    final = root / "adapter"
    if (final / "adapter_config.json").is_file():
        return os.fspath(final)
    steps = []
    checkpoints = root / "checkpoints"
    if checkpoints.is_dir():
        for child in checkpoints.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "adapter_config.json").is_file():
                steps.append((int(match.group(1)), child))
    return os.fspath(max(steps)[1]) if steps else None


def collapse_warnings(labels: Sequence[str], analyses: Sequence[Analysis], comparison: Comparison | None) -> list[dict[str, Any]]:
    """Report warnings, most important first: collapsed layers, analysis warnings, comparison notes."""
    out: list[dict[str, Any]] = []
    for label, analysis in zip(labels, analyses):
        names = [rec["module"] for rec in analysis.records if rec.get("collapsed") is True]
        if names:
            out.append(
                {
                    "label": label,
                    "kind": "collapse",
                    "message": f"{len(names)} of {len(analysis.records)} layers collapsed "
                    f"(utilization below {analysis.collapse_threshold:g})",
                    "modules": names,
                }
            )
    for label, analysis in zip(labels, analyses):
        for message in analysis.warnings:
            out.append({"label": label, "kind": "warning", "message": message, "modules": []})
    if comparison is not None and comparison.partial_modules:
        out.append(
            {
                "label": "",
                "kind": "note",
                "message": f"{len(comparison.partial_modules)} modules are not in every checkpoint",
                "modules": [
                    f"{item['module']} (only in {', '.join(item['present_in'])})" for item in comparison.partial_modules
                ],
            }
        )
    return out


def summary_rows(labels: Sequence[str], analyses: Sequence[Analysis]) -> list[dict[str, Any]]:
    """One row per checkpoint for the summary table, values read from each analysis's summary."""
    rows = []
    for label, analysis in zip(labels, analyses):
        s = analysis.summary
        erank, util = s["metrics"]["effective_rank"], s["metrics"]["utilization"]
        rows.append(
            {
                "label": label,
                "checkpoint": analysis.display_name,
                "method": analysis.method,
                "format": analysis.format,
                "layers": s["layers"],
                "ranks": sorted({int(rec["rank"]) for rec in analysis.records if rec.get("rank") is not None}),
                "mean_effective_rank": erank["mean"],
                "median_effective_rank": erank["median"],
                "mean_utilization": util["mean"],
                "weighted_utilization": util["weighted_mean"],
                "min_utilization": util["min"],
                "collapsed": s["collapsed"],
                "by_status": {k: v for k, v in s["by_status"].items() if v},
            }
        )
    return rows


def _figures(
    labels: Sequence[str],
    analyses: Sequence[Analysis],
    runs: Sequence[RunData],
    dpi: int,
    overlaps: Sequence[Overlap] = (),
    overlap_module: str | None = None,
) -> list[ReportFigure]:
    # matplotlib warns on stderr about what it cannot draw well (a glyph missing from the font for a
    # control character in a module name, a flat axis): the figures are drawn anyway, and a command's
    # stderr carries only its own lines.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _draw_figures(labels, analyses, runs, dpi, overlaps, overlap_module)


def _draw_figures(
    labels: Sequence[str],
    analyses: Sequence[Analysis],
    runs: Sequence[RunData],
    dpi: int,
    overlaps: Sequence[Overlap] = (),
    overlap_module: str | None = None,
) -> list[ReportFigure]:
    from nora_spectra import plots

    pairs = list(zip(labels, analyses))
    figures: list[ReportFigure] = []

    def add(name: str, title: str, caption: str, fig: Any) -> None:
        figures.append(ReportFigure(name, title, caption, plots.figure_png(fig, dpi=dpi)))

    if pairs:
        add(
            "spectrum_decay",
            "Spectrum decay",
            "Each module's singular values are divided by their sum (L1-normalised, as in the NoRA paper), "
            "then averaged over the checkpoint's modules. A steep drop means few directions carry the update; "
            "a heavy tail means the rank budget is used.",
            plots.spectrum_decay(pairs),
        )
        add(
            "effective_rank_vs_rank",
            "Effective rank against rank budget",
            "Mean effective rank of each checkpoint's modules at its rank r (one marker per checkpoint; one "
            "line per method through its mean at each r). Points on the dashed line y = r use every "
            "direction they paid for; a flat line means extra rank buys nothing.",
            plots.effective_rank_vs_rank(pairs),
        )
        add(
            "cumulative_energy",
            "Cumulative energy",
            "Share of the squared Frobenius norm in the top k singular directions, averaged over modules; "
            "dashed lines mark 90% and 99%.",
            plots.cumulative_energy(pairs),
        )
        count = -(-len(pairs) // 4)  # panels per heatmap figure: at most 4, balanced
        size = -(-len(pairs) // count)
        chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        for n, chunk in enumerate(chunks):
            suffix = "" if len(chunks) == 1 else f"_{n + 1}"
            add(
                f"utilization_heatmap{suffix}",
                "Utilization by layer and module type" + ("" if len(chunks) == 1 else f" ({n + 1}/{len(chunks)})"),
                "Effective rank divided by r for every module; dark cells use little of their rank budget, "
                "grey cells are zero or non-finite updates.",
                plots.utilization_heatmap(chunk),
            )
    if runs:
        histories = {run.label: run.history for run in runs}
        add(
            "training_loss",
            "Training loss",
            "Mean training loss per logged window (solid) and validation loss (dashed) against the optimizer step.",
            plots.training_loss(histories),
        )
        if any(rec.get("spectra") for run in runs for rec in run.history):
            add(
                "effective_rank_trajectory",
                "Effective rank during training",
                "Mean effective rank of each module type's adapters at the steps where the trainer recorded "
                "spectra; dotted lines mark the rank budget r.",
                plots.effective_rank_trajectory(histories),
            )
    for n, item in enumerate(overlaps, start=1):
        suffix = "" if len(overlaps) == 1 else f"_{n}"
        pair = f"{item.labels[0]} and {item.labels[1]}"
        add(
            f"overlap_bars{suffix}",
            f"Subspace overlap per module, {pair}",
            "Mean squared cosine of the principal angles between the two updates' top-k singular subspaces "
            "(= φ(k, k)); left: the directions the updates write to, right: those they read. 1 means the same "
            "subspace, 0 orthogonal ones; black ticks mark k / d, what two random subspaces give.",
            plots.overlap_bars(item),
        )
        module = overlap_module if overlap_module is not None else next(iter(item.phi), None)
        if module in item.phi:
            add(
                f"overlap_phi{suffix}",
                f"Subspace similarity φ(i, j) of {module}, {pair}",
                "The LoRA paper's Fig. 3: φ(i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F² / min(i, j) between the top i "
                "left singular vectors of the first update and the top j of the second.",
                plots.phi_heatmap(item, module),
            )
    return figures


def _overlaps(analyses: Sequence[Analysis], labels: Sequence[str], module: str | None) -> list[Overlap]:
    """The overlap of the first checkpoint with each other one, read from the checkpoints themselves.

    Raises:
        UsageError: fewer than two checkpoints, a checkpoint that cannot be read (an analysis JSON whose
            checkpoint is gone), or ``module`` compared in none of the pairs.
    """
    if len(analyses) < 2:
        raise UsageError("--overlap needs at least two checkpoints")
    found = []
    first = analyses[0]
    for label, other in zip(labels[1:], analyses[1:]):
        try:
            found.append(subspace_overlap(_reopen(first), _reopen(other), labels=[labels[0], label]))
        except CheckpointError as exc:
            raise UsageError(f"--overlap reads the checkpoints themselves: {exc}") from None
    if module is not None and not any(module in item.phi for item in found):
        raise UsageError(f"--overlap-module {module!r} was not compared in any pair of checkpoints")
    return found


def _reopen(analysis: Analysis) -> Any:
    """The checkpoint an analysis was made from, read again (in its format) for its factors."""
    from nora_spectra.io import load_checkpoint

    return load_checkpoint(analysis.checkpoint, analysis.adapter, format=analysis.format or "auto")


def build_report(
    paths: Sequence["str | os.PathLike[str] | Analysis"],
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
    overlap: bool = False,
    overlap_module: str | None = None,
    **analyze_options: Any,
) -> ReportData:
    """Analyse, compare and plot everything a report shows.

    Args:
        paths: checkpoints, analysis JSON files, training run directories or Analysis objects.
        labels: one label per path (a JSON file of several analyses gets ``label[1]``, ``label[2]``...).
        title: report title (default ``"Adapter spectra report"``).
        dpi: resolution of the PNG figures.
        overlap: add the subspace overlap of the first checkpoint with each other one (reads the
            checkpoints themselves, also for analysis JSON files and Analysis objects).
        overlap_module: the module of the phi heat map (default: the first module compared).
        **analyze_options: passed to :func:`~nora_spectra.analysis.analyze` (``adapter``,
            ``collapse_threshold``...).

    Raises:
        UsageError: no paths, the number of labels differs from the paths, or ``overlap`` without two
            readable checkpoints.
        CheckpointError: a path is missing or unreadable.
    """
    paths = list(paths)
    if not paths:
        raise UsageError("nothing to report: give at least one checkpoint, analysis JSON or run directory")
    if labels is not None and len(labels) != len(paths):
        raise UsageError(f"got {len(labels)} labels for {len(paths)} paths")
    analyze_options.setdefault("emit_warnings", False)
    analyses: list[Analysis] = []
    given: list[str | None] = []
    runs: list[RunData] = []
    for i, item in enumerate(paths):
        label = None if labels is None else str(labels[i])
        if isinstance(item, Analysis):
            analyses.append(item)
            given.append(label)
            continue
        path = Path(item)
        if not path.exists():
            raise CheckpointError(path, "no such file or directory")
        if path.is_dir() and (path / METRICS_NAME).is_file():
            run = read_run(path, label)
            runs.append(run)
            if run.adapter is not None:
                analyses.append(load_analyses(run.adapter, **analyze_options)[0])
                given.append(run.label)
            continue
        found = load_analyses(path, **analyze_options)
        analyses.extend(found)
        if label is None or len(found) == 1:
            given.extend([label] * len(found))
        else:
            given.extend(f"{label}[{j}]" for j in range(1, len(found) + 1))
    defaults = analysis_labels(analyses)
    final = [g if g is not None else d for g, d in zip(given, defaults)]
    if len(set(final)) != len(final):
        final = [f"{name}#{i + 1}" if final.count(name) > 1 else name for i, name in enumerate(final)]
    comparison = compare(analyses, labels=final) if len(analyses) > 1 else None
    overlaps = _overlaps(analyses, final, overlap_module) if overlap else []
    return ReportData(
        title=title or "Adapter spectra report",
        generated=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        version=package_version(),
        labels=final,
        analyses=analyses,
        comparison=comparison,
        runs=runs,
        warnings=collapse_warnings(final, analyses, comparison),
        figures=_figures(final, analyses, runs, dpi, overlaps, overlap_module),
        summary=summary_rows(final, analyses),
        overlaps=overlaps,
    )


def _format_of(output: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("html", "markdown"):
            raise UsageError(f"unknown report format {fmt!r}; choose html or markdown")
        return fmt
    try:
        return REPORT_FORMATS[output.suffix.lower()]
    except KeyError:
        raise UsageError(f"{output}: cannot tell the report format from the suffix; use .html or .md") from None


def write_report(data: ReportData, output: "str | os.PathLike[str]", *, fmt: str | None = None) -> Path:
    """Render ``data`` and write it atomically (missing parent directories are created).

    HTML: one self-contained file. Markdown: ``output`` plus a folder ``<stem>_files/`` of PNGs next to it
    (images are written before the Markdown that links them).

    Raises:
        UsageError: unknown format, or the report cannot be written.
    """
    out = check_writable(output, "report")
    fmt = _format_of(out, fmt)
    if fmt == "html":
        from nora_spectra.render.html import render_report_html

        write_output(out, render_report_html(data), "report")
        return out
    from nora_spectra.render.markdown_report import render_report_markdown

    folder = out.with_name(f"{out.stem}_files")
    text, images = render_report_markdown(data, folder.name)
    for name, png in images.items():
        write_output(folder / name, png, "report image")
    write_output(out, text, "report")
    return out


def report(
    paths: Sequence["str | os.PathLike[str] | Analysis"],
    output: "str | os.PathLike[str]",
    labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    fmt: str | None = None,
    **options: Any,
) -> ReportData:
    """Build a report of ``paths`` and write it to ``output`` (``.html`` or ``.md``).

    Args:
        paths: checkpoints, analysis JSON files, training run directories or Analysis objects.
        output: the report file; its suffix picks the format unless ``fmt`` is given.
        labels: one label per path.
        title: report title.
        fmt: ``"html"`` or ``"markdown"``.
        **options: passed to :func:`build_report` (``dpi``, ``overlap``, ``overlap_module``, ``adapter``,
            ``collapse_threshold``).

    Returns:
        The :class:`ReportData` that was written.
    """
    out = check_writable(output, "report")
    _format_of(out, fmt)  # fail before the analysis work
    data = build_report(paths, labels=labels, title=title, **options)
    write_report(data, out, fmt=fmt)
    return data
