"""``build_census(OUT_DIR)``: the field's picture from a scan, and ``write_census`` (``spectra census``).

A census gathers, from a scan's two tables (:func:`~nora_spectra.scan.store.load_scan`): counts of
adapters and modules, the share of collapsed modules, group tables (by r, by module type, by base
model), the values the box plots draw (utilization and effective rank of every analysed module,
grouped), the slowest adapters and the failed ones. Figures are drawn by
:mod:`nora_spectra.plots.census` and the page by :mod:`nora_spectra.render.census`, which only format
what is gathered here. Every number is read from the tables: nothing is analysed again.

Modules counted are those whose spectrum is known (statuses of
:data:`~nora_spectra.schema.AVERAGED_STATUSES`); the collapsed share is collapsed / counted.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from nora_spectra._text import package_version
from nora_spectra.errors import UsageError
from nora_spectra.outputs import check_writable, write_output
from nora_spectra.schema import AVERAGED_STATUSES
from nora_spectra.scan.store import SCAN_FILE, load_scan, read_settings

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["CensusData", "CensusFigure", "GROUPINGS", "MAX_GROUPS", "build_census", "write_census"]

#: at most this many groups per box plot and group table (the largest ones; the rest are counted).
MAX_GROUPS = 30

#: at most this many rows in the failed and slowest tables.
MAX_LISTED = 200
SLOWEST = 10

#: group tables and box plots: key -> (layer column, title).
GROUPINGS: dict[str, tuple[str, str]] = {
    "rank": ("rank", "r"),
    "module_type": ("module_type", "module type"),
    "base_model": ("base_model", "base model"),
}

#: the group name of adapters whose base model is not known.
UNKNOWN = "unknown"


@dataclasses.dataclass
class CensusFigure:
    """One plot: file-name stem, title, caption, PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


@dataclasses.dataclass
class CensusData:
    """Everything the census page shows; the renderer formats it and computes nothing.

    Attributes:
        title, generated, version: page title, creation time (UTC, ISO 8601), nora-spectra version.
        scan: the scan directory; settings: its ``scan.json`` settings.
        counts: ``adapters``, ``ok``, ``errors``, ``modules`` (layer rows), ``counted`` (modules with a
            known spectrum), ``collapsed``, ``collapsed_share`` (None without counted modules),
            ``formats`` (format -> adapters).
        group_titles: grouping key -> its title (``r``, ``module type``, ``base model``).
        groups: grouping key -> rows ``{"group", "adapters", "modules", "collapsed", "collapsed_share",
            "median_utilization", "median_effective_rank"}``, largest groups first (r: ascending r).
        hidden_groups: grouping key -> how many smaller groups were left out (:data:`MAX_GROUPS`).
        values: grouping key -> metric (``utilization``, ``effective_rank``) -> group -> values.
        slowest: the slowest adapters (``path``, ``format``, ``modules``, ``r``, ``seconds``).
        failed: the failed adapters (``path``, ``error``), at most :data:`MAX_LISTED`; failed_total: all.
        figures: the box plots.
    """

    title: str
    generated: str
    version: str
    scan: str
    settings: dict[str, Any]
    counts: dict[str, Any]
    group_titles: dict[str, str]
    groups: dict[str, list[dict[str, Any]]]
    hidden_groups: dict[str, int]
    values: dict[str, dict[str, dict[str, list[float]]]]
    slowest: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    failed_total: int
    figures: list[CensusFigure] = dataclasses.field(default_factory=list)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _median(values: Sequence[float]) -> float | None:
    import statistics

    return float(statistics.median(values)) if values else None


def _group_label(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNKNOWN
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _groups(layers: "pd.DataFrame", column: str, *, by_rank: bool) -> tuple[list[dict[str, Any]], int, dict[str, dict[str, list[float]]]]:
    rows, values = [], {"utilization": {}, "effective_rank": {}}
    counted_mask = layers["status"].isin(AVERAGED_STATUSES)
    keys = layers[column].map(_group_label)
    for name, frame in layers.groupby(keys, sort=False):
        counted = frame[counted_mask.loc[frame.index]]
        util = [v for v in (_float(x) for x in counted["utilization"]) if v is not None]
        erank = [v for v in (_float(x) for x in counted["effective_rank"]) if v is not None]
        collapsed = int((counted["collapsed"] == True).sum())  # noqa: E712 (a nullable column)
        rows.append({
            "group": str(name),
            "adapters": int(frame["path"].nunique()),
            "modules": int(len(frame)),
            "counted": int(len(counted)),
            "collapsed": collapsed,
            "collapsed_share": collapsed / len(counted) if len(counted) else None,
            "median_utilization": _median(util),
            "median_effective_rank": _median(erank),
        })
        values["utilization"][str(name)] = util
        values["effective_rank"][str(name)] = erank
    rows.sort(key=lambda r: (-r["modules"], r["group"]))
    hidden = max(0, len(rows) - MAX_GROUPS)
    rows = rows[:MAX_GROUPS]
    if by_rank:
        rows.sort(key=lambda r: (r["group"] == UNKNOWN, float(r["group"]) if r["group"] != UNKNOWN else 0.0))
    values = {metric: {r["group"]: by[r["group"]] for r in rows} for metric, by in values.items()}
    return rows, hidden, values


def build_census(
    directory: "str | os.PathLike[str]", *, title: str | None = None, dpi: int = 100, figures: bool = True
) -> CensusData:
    """Gather a census of the scan in ``directory`` (figures drawn unless ``figures=False``).

    Raises:
        UsageError: ``directory`` holds no scan.
    """
    adapters, layers = load_scan(directory)
    root = Path(directory)
    settings = read_settings(root / SCAN_FILE)
    base = dict(zip(adapters["path"], adapters["base_model"]))
    layers = layers.assign(base_model=layers["path"].map(base))
    counted = layers[layers["status"].isin(AVERAGED_STATUSES)] if len(layers) else layers
    collapsed = int((counted["collapsed"] == True).sum()) if len(counted) else 0  # noqa: E712
    ok = adapters[adapters["status"] == "ok"]
    errors = adapters[adapters["status"] == "error"]
    counts = {
        "adapters": int(len(adapters)),
        "ok": int(len(ok)),
        "errors": int(len(errors)),
        "modules": int(len(layers)),
        "counted": int(len(counted)),
        "collapsed": collapsed,
        "collapsed_share": collapsed / len(counted) if len(counted) else None,
        "formats": {str(k): int(v) for k, v in ok["format"].value_counts().sort_index().items()},
    }
    groups, hidden, values = {}, {}, {}
    if len(layers):
        for key, (column, _) in GROUPINGS.items():
            groups[key], hidden[key], values[key] = _groups(layers, column, by_rank=key == "rank")
    slow = ok.sort_values(["seconds", "path"], ascending=[False, True]).head(SLOWEST)
    data = CensusData(
        title=title or f"Adapter census: {os.path.basename(os.path.abspath(directory))}",
        generated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        version=package_version(),
        scan=os.fspath(directory),
        settings=settings,
        counts=counts,
        group_titles={key: title for key, (_, title) in GROUPINGS.items()},
        groups=groups,
        hidden_groups=hidden,
        values=values,
        slowest=[
            {"path": r.path, "format": r.format, "modules": _int(r.modules), "r": _int(r.r), "seconds": _float(r.seconds)}
            for r in slow.itertuples()
        ],
        failed=[{"path": r.path, "error": r.error} for r in errors.head(MAX_LISTED).itertuples()],
        failed_total=int(len(errors)),
    )
    if figures and len(layers):
        data.figures = _figures(data, dpi)
    return data


def _int(value: Any) -> int | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def _figures(data: CensusData, dpi: int) -> list[CensusFigure]:
    from nora_spectra.plots import census as plots
    from nora_spectra.plots import figure_png

    out = []
    threshold = data.settings.get("collapse_threshold")

    def add(name: str, title: str, caption: str, fig: Any) -> None:
        out.append(CensusFigure(name, title, caption, figure_png(fig, dpi=dpi)))

    shared = " Boxes: quartiles, whiskers: 1.5 IQR, outliers not drawn; n: modules per box."
    add("utilization_by_rank", "Utilization against r",
        "Utilization (effective rank / r) of every module, grouped by its rank r." + shared,
        plots.box_plot(data.values["rank"]["utilization"], xlabel="r", ylabel="utilization = effective rank / r",
                       threshold=threshold))
    add("effective_rank_by_rank", "Effective rank against r",
        "Effective rank of every module, grouped by its rank r; the dashes mark r itself (full use)." + shared,
        plots.box_plot(data.values["rank"]["effective_rank"], xlabel="r", ylabel="effective rank", budget=True))
    add("utilization_by_module_type", "Utilization by module type",
        "Utilization of every module, grouped by module type (largest groups)." + shared,
        plots.box_plot(data.values["module_type"]["utilization"], xlabel="module type",
                       ylabel="utilization", threshold=threshold, horizontal=True))
    add("utilization_by_base_model", "Utilization by base model",
        "Utilization of every module, grouped by the adapter's base model (from its config or the manifest)." + shared,
        plots.box_plot(data.values["base_model"]["utilization"], xlabel="base model",
                       ylabel="utilization", threshold=threshold, horizontal=True))
    return out


def write_census(
    directory: "str | os.PathLike[str]", output: "str | os.PathLike[str]", *, title: str | None = None, dpi: int = 100
) -> CensusData:
    """Write the self-contained HTML census of the scan in ``directory`` to ``output`` (atomically).

    Raises:
        UsageError: ``directory`` holds no scan, or ``output`` is not an ``.html`` file or cannot be written.
    """
    if os.path.splitext(os.fspath(output))[1].lower() not in (".html", ".htm"):
        raise UsageError(f"{os.fspath(output)}: the census is an HTML file: name it .html")
    check_writable(output, "census")
    data = build_census(directory, title=title, dpi=dpi)
    from nora_spectra.render.census import render_census_html

    write_output(output, render_census_html(data), "census")
    return data
