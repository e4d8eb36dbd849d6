"""Plots of an :class:`~nora_spectra.overlap.Overlap`: the phi heat map of one module and per-module bars.

Every number comes from the Overlap (its ``phi`` matrices and module rows); nothing is recomputed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nora_spectra._text import name_list
from nora_spectra.plots._common import color, figure

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from nora_spectra.overlap import Overlap

__all__ = ["overlap_bars", "phi_heatmap"]

_SIDES = {"left": ("left (column) space, U", "chance_left"), "right": ("right (row) space, V", "chance_right")}


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def phi_heatmap(
    data: "Overlap",
    module: str | None = None,
    *,
    side: str = "left",
    max_i: int | None = None,
    max_j: int | None = None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
) -> "Figure":
    """The LoRA paper's Fig. 3 for one module: ``phi(i, j)`` for ``i`` directions of A and ``j`` of B.

    Rows are ``i = 1..n_a`` (the first adapter's top directions), columns ``j = 1..n_b``; colour runs
    from 0 (orthogonal subspaces) to 1 (one contains the other).

    Args:
        data: the overlap.
        module: a compared module; default the first module whose status is ``ok``.
        side: ``"left"`` (column space, where the update writes) or ``"right"`` (row space, what it reads).
        max_i, max_j: show only the first rows / columns (the paper zooms into the top directions).
        figsize: inches (default from the matrix's aspect).
        title: overrides the generated title.

    Raises:
        ValueError: ``module`` was not compared (the message lists some that were), or a bad side.
    """
    _check_side(side)
    if module is None:
        module = next((m for m in data.phi), None)
        if module is None:
            raise ValueError("no module was compared (every module is zero, non-finite or mismatched)")
    if module not in data.phi:
        raise ValueError(f"module {module!r} was not compared; compared modules: {name_list(list(data.phi), 5) or 'none'}")
    matrix = data.phi[module][side]
    matrix = matrix[: max_i or matrix.shape[0], : max_j or matrix.shape[1]]
    n_i, n_j = matrix.shape
    if figsize is None:
        figsize = (min(11.0, 2.4 + 0.16 * n_j), min(7.0, 1.6 + 0.16 * n_i) if n_i > 1 else 2.2)
    fig = figure(*figsize)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
                      extent=(0.5, n_j + 0.5, n_i + 0.5, 0.5))
    fig.colorbar(image, ax=ax, label="φ(i, j)")
    a, b = data.labels
    ax.set_xlabel(f"j (top directions of {b})")
    ax.set_ylabel(f"i (top directions of {a})")
    ax.set_title(title or f"Subspace similarity φ(i, j), {module}\n{_SIDES[side][0]}", fontsize="medium")
    return fig


def overlap_bars(
    data: "Overlap",
    *,
    sides: tuple[str, ...] = ("left", "right"),
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
) -> "Figure":
    """One bar per module and side: the mean squared cosine of the top-k principal angles (``phi(k, k)``).

    A short black tick on each bar marks ``k / d``, what two random subspaces would give. Modules that
    were not compared (zero, non-finite, mismatched) have no bar.

    Args:
        data: the overlap.
        sides: ``"left"`` and/or ``"right"``.
        figsize: inches (default: wider with more modules).
        title: overrides the generated title.
    """
    for side in sides:
        _check_side(side)
    rows = data.modules
    n = len(rows)
    if figsize is None:  # room below the axes for the rotated module names
        longest = max((len(row["module"]) for row in rows), default=0)
        figsize = (min(24.0, max(6.4, 0.16 * n * len(sides) + 1.5)), min(10.0, 3.4 + 0.075 * longest))
    fig = figure(*figsize)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(sides))
    for s, side in enumerate(sides):
        xs, heights, chances = [], [], []
        for i, row in enumerate(rows):
            value = row[f"{side}_overlap"]
            if value is None:
                continue
            xs.append(i + (s - (len(sides) - 1) / 2) * width)
            heights.append(value)
            chances.append(row[_SIDES[side][1]])
        ax.bar(xs, heights, width=width, color=color(s), label=f"{side} singular vectors")
        ax.hlines(chances, [x - width / 2 for x in xs], [x + width / 2 for x in xs], colors="black", linewidth=1.0,
                  label="chance (k / d)" if s == len(sides) - 1 else None)
    step = max(1, n // 40)
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels([rows[i]["module"] for i in range(0, n, step)], fontsize="x-small")
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("mean cos² of the top-k principal angles")
    a, b = data.labels
    ax.set_title(title or f"Subspace overlap of {a} and {b}, per module", fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return fig
