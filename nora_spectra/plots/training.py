"""Plots of training runs, from the step records of a run's ``metrics.jsonl``: loss and spectra over steps."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

from nora_spectra.plots._common import DASHES, History, Runs, color, figure

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["effective_rank_trajectory", "training_loss"]


def _runs(runs: Runs) -> list[tuple[str, History]]:
    if isinstance(runs, Mapping):
        return [(str(k), list(v)) for k, v in runs.items()]
    return [("run", list(runs))]


def _xy(history: History, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in history:
        value = rec.get(key)
        if value is None or rec.get("step") is None or isinstance(value, bool):
            continue
        value = float(value)
        if math.isfinite(value):
            xs.append(float(rec["step"]))
            ys.append(value)
    return xs, ys


def training_loss(
    runs: Runs,
    *,
    figsize: tuple[float, float] = (6.4, 4.0),
    title: str | None = None,
) -> "Figure":
    """Training loss (solid) and validation loss (dashed, dots) against the optimizer step.

    Args:
        runs: one run's step records (``metrics.jsonl`` lines), or ``{label: records}`` for several runs.
        figsize: inches.
        title: overrides the generated title.
    """
    fig = figure(*figsize)
    ax = fig.add_subplot()
    for i, (label, history) in enumerate(_runs(runs)):
        xs, ys = _xy(history, "train_loss")
        if xs:
            ax.plot(xs, ys, color=color(i), linewidth=1.2, label=f"{label}: train")
        xs, ys = _xy(history, "val_loss")
        if xs:
            ax.plot(xs, ys, color=color(i), linestyle="--", marker="o", markersize=3, linewidth=1.2,
                    label=f"{label}: validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per token)")
    ax.set_title(title or "Training and validation loss")
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no loss recorded", transform=ax.transAxes, ha="center", va="center")
    return fig


def effective_rank_trajectory(
    runs: Runs,
    *,
    metric: str = "effective_rank",
    figsize: tuple[float, float] = (6.4, 4.0),
    title: str | None = None,
) -> "Figure":
    """Per module type, the mean of a spectral metric over that type's modules against the step.

    Reads the ``spectra`` lists of the step records (written by the trainer's spectral tracking). One
    colour per module type, one line style per run; with ``metric="effective_rank"`` dotted lines mark
    each rank budget ``r``.

    Args:
        runs: one run's step records, or ``{label: records}`` for several runs.
        metric: ``"effective_rank"``, ``"utilization"``, ``"stable_rank"`` or ``"sigma_max"``.
        figsize: inches.
        title: overrides the generated title.
    """
    fig = figure(*figsize)
    ax = fig.add_subplot()
    types: list[str] = []
    ranks: set[int] = set()
    many = len(_runs(runs)) > 1
    for j, (label, history) in enumerate(_runs(runs)):
        curves: dict[str, tuple[list[float], list[float]]] = {}
        for rec in history:
            groups: dict[str, list[float]] = {}
            for item in rec.get("spectra") or []:
                value = item.get(metric)
                if value is None or not math.isfinite(float(value)):
                    continue
                groups.setdefault(str(item.get("module_type") or item.get("module")), []).append(float(value))
                if item.get("rank"):
                    ranks.add(int(item["rank"]))
            for name, values in groups.items():
                xs, ys = curves.setdefault(name, ([], []))
                xs.append(float(rec["step"]))
                ys.append(math.fsum(values) / len(values))
        for name, (xs, ys) in curves.items():
            if name not in types:
                types.append(name)
            ax.plot(xs, ys, color=color(types.index(name)), linestyle=DASHES[j % len(DASHES)], marker=".",
                    label=f"{label}: {name}" if many else name, linewidth=1.4)
    if metric == "effective_rank":
        for r in sorted(ranks):
            ax.axhline(r, color="#888888", linestyle=":", linewidth=0.9)
            ax.annotate(f"r = {r}", (0.0, r), xycoords=("axes fraction", "data"), xytext=(2, -10),
                        textcoords="offset points", fontsize="x-small", color="#555555")
    pretty = metric.replace("_", " ")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"mean {pretty} over modules of a type")
    ax.set_title(title or f"{pretty.capitalize()} during training, by module type")
    ax.grid(True, alpha=0.3)
    if ax.get_lines() and types:
        ax.legend(fontsize="x-small", ncol=2 if many else 1)
    else:
        ax.text(0.5, 0.5, "no spectra recorded in this run", transform=ax.transAxes, ha="center", va="center")
    return fig
