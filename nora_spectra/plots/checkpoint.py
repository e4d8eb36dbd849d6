"""Plots of checkpoints: spectrum decay, effective rank against r, the utilization heat map, energy.

Inputs: ``data`` is one :class:`~nora_spectra.result.Analysis`, a
:class:`~nora_spectra.comparison.Comparison`, or a list of analyses (or of ``(label, analysis)`` pairs).
Every number comes from the analysis records (``singular_values``, ``effective_rank``,
``utilization``, ``energy_rank_90``...). The curves are only re-expressions of the stored singular
values for drawing (``sigma_i / sigma_1``, ``sigma_i / sum_j sigma_j``, cumulative ``sigma^2`` shares).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from nora_spectra.plots._common import Data, check_module, color, figure, scope_text, series_of, stored_spectra
from nora_spectra.summary import mean

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["AVERAGING", "cumulative_energy", "effective_rank_vs_rank", "spectrum_decay", "utilization_heatmap"]

#: averaging modes of :func:`spectrum_decay` -> y-axis label.
AVERAGING: dict[str, str] = {
    "l1": "mean of L1-normalised spectra σ_i / Σ_j σ_j",
    "max": "mean of max-normalised spectra σ_i / σ_1",
}


def spectrum_decay(
    data: Data,
    *,
    labels: Sequence[str] | None = None,
    module: str | None = None,
    module_type: str | None = None,
    average: str = "l1",
    figsize: tuple[float, float] = (6.4, 4.0),
    title: str | None = None,
) -> "Figure":
    """Singular-value decay, log y, one line per checkpoint.

    With ``module`` the line is that module's ``sigma_i / sigma_1``. Otherwise each checkpoint's line is
    the average over its modules (optionally of one ``module_type``) of the normalised spectra:
    ``average="l1"`` divides each spectrum by its sum first (as the NoRA paper does), ``"max"`` by its
    largest value. Shorter spectra (smaller ranks) count as zeros beyond their length. Zero and
    non-finite layers are left out. Checkpoints without a selected module draw no line.

    Args:
        data: analyses to draw (see :func:`series_of`).
        labels: legend labels.
        module: one module name, e.g. ``model.layers.3.self_attn.v_proj``.
        module_type: average only modules of this type, e.g. ``q_proj``.
        average: ``"l1"`` or ``"max"`` (ignored with ``module``).
        figsize: inches.
        title: overrides the generated title.

    Returns:
        The Figure (one axes).

    Raises:
        ValueError: ``average`` is unknown, or ``module`` is in none of the checkpoints.
    """
    if average not in AVERAGING:
        raise ValueError(f"average must be one of {', '.join(AVERAGING)}, got {average!r}")
    pairs = series_of(data, labels)
    check_module(pairs, module)
    fig = figure(*figsize)
    ax = fig.add_subplot()
    for i, (label, analysis) in enumerate(pairs):
        spectra = stored_spectra(analysis, module, module_type)
        if not spectra:
            continue
        if module is not None:
            curve = [s / spectra[0][0] for s in spectra[0]]
            name = label
        else:
            width = max(len(s) for s in spectra)
            total = [0.0] * width
            for sigma in spectra:
                norm = math.fsum(sigma) if average == "l1" else sigma[0]
                for j, s in enumerate(sigma):
                    total[j] += s / norm
            curve = [t / len(spectra) for t in total]
            name = f"{label} (mean of {len(spectra)} modules)"
        points = [(j + 1, v) for j, v in enumerate(curve) if v > 0]
        ax.plot([p[0] for p in points], [p[1] for p in points], color=color(i), label=name, linewidth=1.6)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σ_i / σ_1" if module is not None else ("σ_i / Σ_j σ_j" if average == "l1" else "σ_i / σ_1"))
    scope = scope_text(module, module_type)
    ax.set_title(title or (f"Spectrum decay, {scope}" if module is not None else f"Spectrum decay, {scope}:\n{AVERAGING[average]}"))
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no analysable module", transform=ax.transAxes, ha="center", va="center")
    return fig


def effective_rank_vs_rank(
    data: Data,
    *,
    labels: Sequence[str] | None = None,
    series: Sequence[str] | None = None,
    module_type: str | None = None,
    annotate: bool | None = None,
    figsize: tuple[float, float] = (6.4, 4.0),
    title: str | None = None,
) -> "Figure":
    """Mean effective rank against the rank budget ``r``, one line per method, with the line ``y = r``.

    Each checkpoint gives one marker per rank it uses (read from its records): the mean effective rank
    of its analysable modules of that rank (:func:`nora_spectra.summary.mean`). Every checkpoint keeps
    its own marker. Each series' line joins, in order of ``r``, the mean of its checkpoints' values at
    each ``r``: with one checkpoint per rank it goes through the markers; when several checkpoints of
    one series share a rank, the line passes through their mean (legend ``NAME: mean per r``) and the
    markers show the spread, so no checkpoint is hidden and no vertical segment joins two of them.
    Lines are labelled by series; the markers' artists carry labels starting with ``_``.

    Args:
        data: analyses to draw (see :func:`series_of`).
        labels: checkpoint labels (used for point annotations).
        series: one series name per checkpoint; default each analysis's ``method`` (``lora``, ``nora``).
        module_type: only modules of this type.
        annotate: write each point's checkpoint label next to it (default: when at most 4 points).
        figsize: inches.
        title: overrides the generated title.
    """
    pairs = series_of(data, labels)
    names = list(series) if series is not None else [a.method or "adapter" for _, a in pairs]
    if len(names) != len(pairs):
        raise ValueError(f"got {len(names)} series names for {len(pairs)} checkpoints")
    points: dict[str, list[tuple[int, float, str]]] = {}
    for name, (label, analysis) in zip(names, pairs):
        by_rank: dict[int, list[Mapping[str, Any]]] = {}
        for rec in analysis.records:
            if module_type is None or rec.get("module_type") == module_type:
                by_rank.setdefault(int(rec.get("rank") or 0), []).append(rec)
        for rank, recs in sorted(by_rank.items()):
            value = mean(recs, "effective_rank")
            if value is not None and rank > 0:
                points.setdefault(name, []).append((rank, value, label))
    fig = figure(*figsize)
    ax = fig.add_subplot()
    ranks = sorted({r for pts in points.values() for r, _, _ in pts})
    if annotate is None:
        annotate = sum(len(p) for p in points.values()) <= 4
    from matplotlib.lines import Line2D

    handles = []
    for i, (name, pts) in enumerate(points.items()):
        pts.sort()
        by_r: dict[int, list[float]] = {}
        for r, value, _ in pts:
            by_r.setdefault(r, []).append(value)
        xs = sorted(by_r)
        means = [math.fsum(by_r[r]) / len(by_r[r]) for r in xs]
        shared = any(len(values) > 1 for values in by_r.values())
        line_label = f"{name}: mean per r" if shared else name
        # a shared rank's mean is a horizontal tick, so it shows even where the line is one point
        style = {"marker": "_", "markersize": 16, "markeredgewidth": 2} if shared else {}
        ax.plot(xs, means, color=color(i), label=line_label, linewidth=1.6, **style)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", marker="o", color=color(i),
                label=f"_{name} checkpoints")
        handles.append(Line2D([], [], color=color(i), linewidth=1.6, label=line_label, **(style or {"marker": "o"})))
        if annotate:
            for r, value, label in pts:
                if label == name:
                    continue
                ax.annotate(label, (r, value), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    if any(handle.get_marker() == "_" for handle in handles):
        handles.append(Line2D([], [], color="#555555", marker="o", linestyle="none", label="one checkpoint"))
    if ranks:
        low, high = ranks[0], ranks[-1]
        if high / low >= 4:
            from matplotlib.ticker import ScalarFormatter

            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(ScalarFormatter())
        span = [low / 1.3, high * 1.3] if high / low >= 4 else [max(low - 0.25 * high, 0.5), high * 1.25]
        (diagonal,) = ax.plot(span, span, linestyle="--", color="#888888", linewidth=1,
                              label="y = r (every direction used)")
        handles.append(diagonal)
        ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank budget r")
    ax.set_ylabel("mean effective rank (Roy & Vetterli)")
    scope = f"{module_type} modules" if module_type else "all modules"
    ax.set_title(title or f"Effective rank against rank budget, {scope}")
    ax.grid(True, alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize="small")
    else:
        ax.text(0.5, 0.5, "no analysable module", transform=ax.transAxes, ha="center", va="center")
    return fig


def _cell_keys(records: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[str], dict[str, str]]:
    """Row keys (layer indices), column keys (module path inside the layer) and column display names."""

    def column(rec: Mapping[str, Any]) -> str:
        parts = rec["module"].split(".")
        index = rec.get("layer_index")
        if index is not None and str(index) in parts:
            return ".".join(parts[parts.index(str(index)) + 1 :]) or rec["module"]
        return rec["module"]

    rows: list[Any] = []
    cols: list[str] = []
    types: dict[str, str] = {}
    for rec in records:
        if rec.get("layer_index") not in rows:
            rows.append(rec.get("layer_index"))
        key = column(rec)
        if key not in cols:
            cols.append(key)
            types[key] = rec.get("module_type") or key
    short = list(types.values())
    names = {key: (types[key] if short.count(types[key]) == 1 else key) for key in cols}
    rows.sort(key=lambda i: (i is None, i if isinstance(i, int) else 0))
    return rows, cols, names


def utilization_heatmap(
    data: Data,
    *,
    labels: Sequence[str] | None = None,
    annotate: bool | None = None,
    title: str | None = None,
) -> "Figure":
    """Utilization (effective rank / r) of every module as a grid: layers by module type.

    One panel per checkpoint, sharing the colour scale [0, 1]. Cells of missing modules are blank,
    cells of zero or non-finite layers grey.

    Args:
        data: analyses to draw (see :func:`series_of`).
        labels: panel titles.
        annotate: print each cell's value (default: when a panel has at most 200 cells).
        title: overrides the generated figure title.
    """
    import numpy as np
    from matplotlib import colormaps

    pairs = series_of(data, labels)
    panels = []
    for label, analysis in pairs:
        rows, cols, names = _cell_keys(analysis.records)
        grid = np.full((len(rows), len(cols)), np.nan)
        bad = np.zeros(grid.shape, dtype=bool)
        for rec in analysis.records:
            r = rows.index(rec.get("layer_index"))
            c = cols.index(_cell_keys([rec])[1][0])
            value = rec.get("utilization")
            if value is None:
                bad[r, c] = True
            else:
                grid[r, c] = float(value)
        panels.append((label, rows, [names[c] for c in cols], grid, bad))
    n_rows = max((len(p[1]) for p in panels), default=1)
    n_cols = max((len(p[2]) for p in panels), default=1)
    width = min(3.2 + 0.75 * n_cols * len(panels) + 1.0, 16.0)
    height = min(max(1.6 + 0.32 * n_rows, 2.6), 14.0)
    fig = figure(width, height)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = None
    for ax, (label, rows, cols, grid, bad) in zip(axes, panels):
        masked = np.ma.masked_invalid(grid)
        image = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        if bad.any():
            ax.imshow(np.ma.masked_where(~bad, np.ones_like(grid)), cmap=colormaps["Greys"], vmin=0, vmax=2,
                      aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(cols)), cols, rotation=45 if max(map(len, cols), default=0) > 6 else 0,
                      ha="right" if max(map(len, cols), default=0) > 6 else "center", fontsize="small")
        ax.set_yticks(range(len(rows)), ["-" if i is None else str(i) for i in rows], fontsize="small")
        ax.set_xlabel("module type")
        ax.set_ylabel("layer index")
        ax.set_title(label, fontsize="medium")
        show = annotate if annotate is not None else grid.size <= 200
        if show:
            for (r, c), value in np.ndenumerate(grid):
                if not math.isnan(value):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                            color="black" if value > 0.6 else "white")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.9)
        # two short lines: one long vertical line ran past the figure edge on short (few-layer) figures
        bar.set_label("utilization\n= effective rank / r", fontsize="small")
    fig.suptitle(title or "Rank utilization by layer and module type")
    return fig


def cumulative_energy(
    data: Data,
    *,
    labels: Sequence[str] | None = None,
    module: str | None = None,
    module_type: str | None = None,
    marks: Sequence[float] = (0.9, 0.99),
    figsize: tuple[float, float] = (6.4, 4.0),
    title: str | None = None,
) -> "Figure":
    """Cumulative energy ``sum_{i<=k} sigma_i^2 / sum sigma^2`` against ``k``, one line per checkpoint.

    Without ``module`` the curve is the mean of the modules' curves (a curve is 1 beyond its rank).
    Horizontal lines mark ``marks`` (90% and 99%); for a single module the points at the records'
    ``energy_rank_90`` / ``energy_rank_99`` are marked on each line.

    Args:
        data: analyses to draw (see :func:`series_of`).
        labels: legend labels.
        module: one module name.
        module_type: average only modules of this type.
        marks: energy levels to draw as horizontal reference lines.
        figsize: inches.
        title: overrides the generated title.

    Raises:
        ValueError: ``module`` is in none of the checkpoints.
    """
    pairs = series_of(data, labels)
    check_module(pairs, module)
    fig = figure(*figsize)
    ax = fig.add_subplot()
    width = 1
    for i, (label, analysis) in enumerate(pairs):
        spectra = stored_spectra(analysis, module, module_type)
        if not spectra:
            continue
        length = max(len(s) for s in spectra)
        width = max(width, length)
        total = [0.0] * length
        for sigma in spectra:
            energy = [s * s for s in sigma]
            norm = math.fsum(energy)
            running = 0.0
            for j in range(length):
                running += energy[j] if j < len(energy) else 0.0
                total[j] += running / norm
        curve = [t / len(spectra) for t in total]
        ks = list(range(1, length + 1))
        name = label if module is not None else f"{label} (mean of {len(spectra)} modules)"
        ax.plot(ks, curve, color=color(i), label=name, linewidth=1.6, drawstyle="steps-post")
        if module is not None:
            rec = next(r for r in analysis.records if r["module"] == module)
            for key in ("energy_rank_90", "energy_rank_99"):
                k = rec.get(key)
                if k:
                    ax.plot([k], [curve[int(k) - 1]], marker="o", color=color(i), linestyle="none")
    for level in marks:
        ax.axhline(level, color="#888888", linestyle="--", linewidth=0.9)
        ax.annotate(f"{level:.0%}", (0.0, level), xycoords=("axes fraction", "data"), xytext=(3, -2),
                    textcoords="offset points", ha="left", va="top", fontsize="x-small", color="#555555")
    ax.set_xlim(0.5, width + 0.5)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("number of singular directions k")
    ax.set_ylabel("cumulative energy Σ_{i≤k} σ_i² / Σ σ²")
    ax.set_title(title or f"Cumulative spectral energy, {scope_text(module, module_type)}")
    ax.grid(True, alpha=0.3)
    if any(line.get_label() and not line.get_label().startswith("_") for line in ax.get_lines()):
        ax.legend(fontsize="small", loc="lower right")
    return fig
