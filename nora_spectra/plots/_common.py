"""What every plot shares: colours, figures without pyplot state, input normalisation, PNG output."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from nora_spectra._text import name_list
from nora_spectra.labels import analysis_labels
from nora_spectra.schema import AVERAGED_STATUSES

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from nora_spectra.result import Analysis

__all__ = ["Data", "History", "Runs", "check_module", "color", "figure", "figure_png", "scope_text", "series_of", "stored_spectra", "DASHES"]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")
DASHES = ("-", "--", ":", "-.")

Data = Union["Analysis", Any, Sequence[Any]]
History = Sequence[Mapping[str, Any]]
Runs = Union[History, Mapping[str, History]]


def color(i: int) -> str:
    """The colour of the ``i``-th checkpoint or series (same order in every plot)."""
    return _PALETTE[i % len(_PALETTE)]


def series_of(data: Data, labels: Sequence[str] | None = None) -> list[tuple[str, "Analysis"]]:
    """Normalise plot input into ``(label, analysis)`` pairs.

    Args:
        data: an Analysis, a Comparison (its labels are used), or a sequence of analyses or
            ``(label, analysis)`` pairs.
        labels: labels overriding the defaults (the checkpoint paths' last components, with
            ``/ADAPTER`` for a non-default adapter).

    Raises:
        ValueError: when ``labels`` and ``data`` differ in length.
    """
    if hasattr(data, "analyses") and hasattr(data, "labels"):
        pairs = list(zip(data.labels, data.analyses))
    elif hasattr(data, "records"):
        pairs = [(None, data)]
    else:
        pairs = [item if isinstance(item, tuple) else (None, item) for item in data]
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(pairs):
            raise ValueError(f"got {len(labels)} labels for {len(pairs)} checkpoints")
        pairs = [(label, a) for label, (_, a) in zip(labels, pairs)]
    if any(label is None for label, _ in pairs):
        names = analysis_labels([a for _, a in pairs])
        pairs = [(label if label is not None else name, a) for name, (label, a) in zip(names, pairs)]
    return [(str(label), a) for label, a in pairs]


def figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def stored_spectra(analysis: "Analysis", module: str | None, module_type: str | None) -> list[list[float]]:
    """Stored singular values of the selected, analysable, non-zero modules."""
    out = []
    for rec in analysis.records:
        if module is not None and rec["module"] != module:
            continue
        if module_type is not None and rec.get("module_type") != module_type:
            continue
        sigma = rec.get("singular_values")
        if rec.get("status") not in AVERAGED_STATUSES or not sigma or not sigma[0]:
            continue
        out.append([float(s) for s in sigma])
    return out


def check_module(pairs: Sequence[tuple[str, "Analysis"]], module: str | None) -> None:
    """Raise ValueError when ``module`` is given but no checkpoint has a module of that name.

    A misspelled name would otherwise give an empty plot; the message lists a few available modules.
    """
    if module is None:
        return
    available: list[str] = []
    for _, analysis in pairs:
        for rec in analysis.records:
            if rec["module"] == module:
                return
            if rec["module"] not in available:
                available.append(rec["module"])
    raise ValueError(f"no module named {module!r} in the data; available modules: {name_list(available, 5) or 'none'}")


def scope_text(module: str | None, module_type: str | None) -> str:
    if module is not None:
        return f"module {module}"
    return f"{module_type} modules" if module_type else "all modules"


def figure_png(fig: "Figure", *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (Agg, no timestamp or software metadata)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()
