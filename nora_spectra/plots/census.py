"""The census's box plots: one box per group of modules (per r, module type or base model).

Inputs are the values :func:`nora_spectra.scan.census.build_census` gathered (group -> list of
floats); this module only draws them. matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from nora_spectra.plots._common import color, figure

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["box_plot"]


def box_plot(
    groups: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    threshold: float | None = None,
    budget: bool = False,
    horizontal: bool = False,
) -> "Figure":
    """Box plots of ``groups`` in the given order, labelled with each group's count.

    Args:
        groups: group label -> values (an empty group is drawn as an empty slot).
        xlabel: what the groups are (``r``, ``module type``...).
        ylabel: what the values are.
        threshold: a dotted line at the collapse threshold (utilization plots).
        budget: groups are ranks r: mark each box's r (the full-use level of effective rank).
        horizontal: one row per group (long labels: module types, base models).

    Returns:
        The Figure (one axes; a note instead of boxes when there is nothing to draw).
    """
    labels = list(groups)
    data = [list(groups[g]) for g in labels]
    height = max(3.2, 0.32 * len(labels) + 1.2) if horizontal else 4.0
    fig = figure(7.0, height)
    ax = fig.add_subplot()
    if not any(data):
        ax.text(0.5, 0.5, "no module with a known spectrum", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    ticks = [f"{g} (n={len(v)})" if horizontal else f"{g}\nn={len(v)}" for g, v in zip(labels, data)]
    options = {"showfliers": False, "patch_artist": True, "widths": 0.6, "medianprops": {"color": "#1f2328"}}
    boxes = [v if v else [float("nan")] for v in data]
    try:
        parts = ax.boxplot(boxes, orientation="horizontal" if horizontal else "vertical", **options)
    except TypeError:  # matplotlib < 3.10
        parts = ax.boxplot(boxes, vert=not horizontal, **options)
    for box in parts["boxes"]:
        box.set_facecolor(color(0))
        box.set_alpha(0.45)
    positions = range(1, len(labels) + 1)
    if horizontal:
        ax.set_yticks(list(positions), ticks)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
        ax.set_ylabel(xlabel)
        line = ax.axvline
    else:
        ax.set_xticks(list(positions), ticks)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        line = ax.axhline
    if threshold is not None:  # utilization: the whole [0, 1] scale, so low values read as low
        (ax.set_xlim if horizontal else ax.set_ylim)(0.0, 1.02)
        line(float(threshold), color=color(1), linestyle=":", linewidth=1.2, label=f"collapse threshold {threshold:g}")
        ax.legend(loc="best", fontsize="small")
    if budget and not horizontal:
        for x, g in zip(positions, labels):
            try:
                r = float(g)
            except ValueError:
                continue
            ax.plot([x - 0.35, x + 0.35], [r, r], color=color(1), linestyle="--", linewidth=1.0)
    ax.grid(True, axis="x" if horizontal else "y", alpha=0.3)
    return fig
