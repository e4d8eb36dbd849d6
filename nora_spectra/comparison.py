"""``compare(checkpoints) -> Comparison``: several analyses side by side, module by module.

Modules are matched by name. For every module and checkpoint the comparison keeps the rank ``r``,
the status, the effective rank, the utilization and ``sigma_max`` exactly as the
:class:`~nora_spectra.analysis.Analysis` records hold them, and their differences against the first
(reference) checkpoint:

.. math:: \\Delta x_{m,c} = x_{m,c} - x_{m,\\text{ref}}

A Comparison never computes a spectrum or a metric: per-module values come from the records and the
group summaries (by module type, by layer index) from each analysis's own ``summary``. Modules present
in only some checkpoints get a row with ``present=False`` where they are missing and are listed in
:attr:`Comparison.partial_modules`. Different ranks are allowed (``rank_differs`` flags them);
the utilization ``effective_rank / r`` is the number to compare across ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

from nora_spectra.analysis import analyze
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.labels import analysis_labels, default_labels
from nora_spectra.plot_methods import PlotMethods
from nora_spectra.result import Analysis, read_analyses
from nora_spectra.schema import (
    COMPARED_METRICS,
    COMPARISON_GROUP_COLUMNS,
    COMPARISON_ROW_COLUMNS,
    layer_index,
    module_type,
    to_jsonable,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "COMPARED_METRICS",
    "GROUP_COLUMNS",
    "ROW_COLUMNS",
    "Comparison",
    "analysis_labels",
    "compare",
    "default_labels",
    "load_analyses",
]

#: per-module metrics compared; columns of :attr:`Comparison.table` and of the group tables.
COMPARED_METRICS, ROW_COLUMNS, GROUP_COLUMNS = COMPARED_METRICS, COMPARISON_ROW_COLUMNS, COMPARISON_GROUP_COLUMNS

#: group column -> (metric, statistic) in an analysis summary group.
_GROUP_STATS: dict[str, tuple[str, str]] = {
    "mean_effective_rank": ("effective_rank", "mean"),
    "mean_utilization": ("utilization", "mean"),
    "weighted_utilization": ("utilization", "weighted_mean"),
}

Item = Union[str, "os.PathLike[str]", Analysis]


def _difference(value: Any, reference: Any) -> float | None:
    if value is None or reference is None or isinstance(value, bool) or isinstance(reference, bool):
        return None
    return float(value) - float(reference)


def load_analyses(path: "str | os.PathLike[str]", **analyze_options: Any) -> list[Analysis]:
    """The analyses a path stands for: a JSON file of ``spectra analyze --format json``, or a checkpoint.

    A JSON file holding ``{"checkpoints": [...]}`` (several analyses) yields each of them.

    Args:
        path: an analysis JSON file or anything :func:`~nora_spectra.analysis.analyze` reads.
        **analyze_options: passed to :func:`~nora_spectra.analysis.analyze` for checkpoints.

    Raises:
        CheckpointError: the path does not exist, or the JSON file is not an analysis.
    """
    file = Path(path)
    if not file.exists():
        raise CheckpointError(file, "no such file or directory")
    if file.is_file() and file.suffix.lower() == ".json":
        try:
            return read_analyses(file)
        except OSError as exc:
            raise CheckpointError(file, f"cannot read the analysis JSON file ({exc.strerror or exc})") from None
        except UsageError as exc:
            raise CheckpointError(file, str(exc).removeprefix(f"{file}: ")) from None
    return [analyze(file, **analyze_options)]


@dataclasses.dataclass
class Comparison(PlotMethods):
    """Several analyses matched module by module; the first one is the reference.

    Attributes:
        labels: one unique label per checkpoint (the reference first).
        analyses: the compared analyses, same order as ``labels``.
        modules: every module name seen, in the reference's order, then new ones as first seen.
        rows: one dict per (module, checkpoint), keys :data:`ROW_COLUMNS`; ``present`` is False (and
            every value None) where the checkpoint lacks the module; ``d_*`` are differences against
            the reference (None for the reference itself, or when either value is missing).
        partial_modules: ``{"module", "present_in", "missing_from"}`` for modules not in every checkpoint.
        by_module_type: one dict per (module type, checkpoint), keys :data:`GROUP_COLUMNS`, numbers
            from each analysis's ``summary["by_module_type"]``.
        by_layer: the same per layer index (``"none"`` for modules outside numbered layers).
    """

    labels: list[str]
    analyses: list[Analysis]
    modules: list[str]
    rows: list[dict[str, Any]]
    partial_modules: list[dict[str, Any]]
    by_module_type: list[dict[str, Any]]
    by_layer: list[dict[str, Any]]

    @property
    def reference(self) -> str:
        """The label of the reference (first) checkpoint."""
        return self.labels[0]

    def __len__(self) -> int:
        return len(self.analyses)

    def __repr__(self) -> str:
        """One short line (the dataclass default printed every row and every analysis's records)."""
        return (
            f"Comparison(labels={self.labels!r}, reference={self.reference!r}, modules={len(self.modules)}, "
            f"partial_modules={len(self.partial_modules)})"
        )

    @property
    def table(self) -> "pd.DataFrame":
        """:attr:`rows` as a pandas DataFrame, columns :data:`ROW_COLUMNS` (pandas imported on first use)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.rows, columns=list(ROW_COLUMNS))

    @property
    def module_type_table(self) -> "pd.DataFrame":
        """:attr:`by_module_type` as a DataFrame, columns :data:`GROUP_COLUMNS`."""
        import pandas as pd

        return pd.DataFrame.from_records(self.by_module_type, columns=list(GROUP_COLUMNS))

    @property
    def layer_table(self) -> "pd.DataFrame":
        """:attr:`by_layer` as a DataFrame, columns :data:`GROUP_COLUMNS`."""
        import pandas as pd

        return pd.DataFrame.from_records(self.by_layer, columns=list(GROUP_COLUMNS))

    def wide(self, metric: str = "effective_rank") -> "pd.DataFrame":
        """One metric as a modules x labels DataFrame (NaN where a module is missing).

        Args:
            metric: a column of :data:`ROW_COLUMNS`, e.g. ``"utilization"`` or ``"d_effective_rank"``.
        """
        if metric not in ROW_COLUMNS:
            raise UsageError(f"unknown comparison column {metric!r}; choose one of {', '.join(ROW_COLUMNS)}")
        table = self.table
        wide = table.pivot(index="module", columns="label", values=metric)
        return wide.reindex(index=self.modules, columns=self.labels)

    def row(self, module: str, label: str) -> dict[str, Any]:
        """The row of ``module`` in checkpoint ``label``.

        Raises:
            KeyError: no such module or label.
        """
        for rec in self.rows:
            if rec["module"] == module and rec["label"] == label:
                return rec
        raise KeyError((module, label))

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON form: ``reference``, ``checkpoints``, ``modules`` (rows), ``partial_modules`` and groups."""
        return to_jsonable(
            {
                "reference": self.reference,
                "checkpoints": [
                    {"label": label, "checkpoint": a.checkpoint, "adapter": a.adapter, "format": a.format,
                     "method": a.method, "layers": len(a.records)}
                    for label, a in zip(self.labels, self.analyses)
                ],
                "metrics": list(COMPARED_METRICS),
                "modules": self.rows,
                "partial_modules": self.partial_modules,
                "by_module_type": self.by_module_type,
                "by_layer": self.by_layer,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON text (``allow_nan=False``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _series(self) -> list[tuple[str, Analysis]]:
        return list(zip(self.labels, self.analyses))

    def _repr_html_(self) -> str:
        from nora_spectra.render.html import comparison_html

        return comparison_html(self)


def _module_rows(labels: Sequence[str], analyses: Sequence[Analysis]) -> tuple[list[str], list[dict[str, Any]]]:
    by_label = [{rec["module"]: rec for rec in a.records} for a in analyses]
    modules: list[str] = []
    seen: set[str] = set()
    for analysis in analyses:
        for rec in analysis.records:
            if rec["module"] not in seen:
                seen.add(rec["module"])
                modules.append(rec["module"])
    rows = []
    for module in modules:
        ref = by_label[0].get(module)
        for i, (label, records) in enumerate(zip(labels, by_label)):
            rec = records.get(module)
            row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS)
            row.update(
                module=module,
                module_type=rec["module_type"] if rec else module_type(module),
                layer_index=rec["layer_index"] if rec else layer_index(module),
                label=label,
                present=rec is not None,
                rank_differs=False,
            )
            if rec is not None:
                row.update({key: rec.get(key) for key in ("kind", "rank", "status", "collapsed", *COMPARED_METRICS)})
                if i > 0 and ref is not None:
                    row["rank_differs"] = rec.get("rank") != ref.get("rank")
                    for name in COMPARED_METRICS:
                        row[f"d_{name}"] = _difference(rec.get(name), ref.get(name))
            rows.append(row)
    return modules, rows


def _partial(modules: Sequence[str], labels: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    present: dict[str, list[str]] = {m: [] for m in modules}
    for row in rows:
        if row["present"]:
            present[row["module"]].append(row["label"])
    return [
        {"module": m, "present_in": present[m], "missing_from": [lab for lab in labels if lab not in present[m]]}
        for m in modules
        if len(present[m]) < len(labels)
    ]


def _group_rows(labels: Sequence[str], analyses: Sequence[Analysis], key: str) -> list[dict[str, Any]]:
    groups: list[str] = []
    for analysis in analyses:
        for name in analysis.summary.get(key) or {}:
            if name not in groups:
                groups.append(name)
    reference = analyses[0].summary.get(key) or {}
    rows = []
    for group in groups:
        ref = reference.get(group)
        for i, (label, analysis) in enumerate(zip(labels, analyses)):
            summary = (analysis.summary.get(key) or {}).get(group)
            row: dict[str, Any] = dict.fromkeys(GROUP_COLUMNS)
            row.update(group=group, label=label)
            if summary is None:
                row.update(layers=0, analysed=0, collapsed=0)
                rows.append(row)
                continue
            row.update(layers=summary["layers"], analysed=summary["analysed"], collapsed=summary["collapsed"])
            for column, (metric, stat) in _GROUP_STATS.items():
                row[column] = summary["metrics"][metric][stat]
                if i > 0 and ref is not None:
                    row[f"d_{column}"] = _difference(row[column], ref["metrics"][metric][stat])
            rows.append(row)
    return rows


def compare(
    paths_or_analyses: Iterable[Item],
    labels: Sequence[str] | None = None,
    **analyze_options: Any,
) -> Comparison:
    """Compare the spectra of several checkpoints module by module against the first one.

    Args:
        paths_or_analyses: checkpoints (anything :func:`~nora_spectra.analysis.analyze` reads), analysis
            JSON files, or :class:`~nora_spectra.analysis.Analysis` objects; the first is the reference.
        labels: one unique label per checkpoint; default: short names derived from the paths
            (:func:`analysis_labels`: ``multi/code`` for adapter ``code`` of ``multi``).
        **analyze_options: passed to :func:`~nora_spectra.analysis.analyze` for paths (``adapter``,
            ``collapse_threshold``, ``progress``, ``emit_warnings``).

    Returns:
        The :class:`Comparison`. Metrics are read from the analyses' records and summaries, never recomputed.

    Raises:
        UsageError: fewer than two checkpoints (a JSON file of several analyses counts as several), the
            number of labels differs from the checkpoints, or labels repeat.
        CheckpointError: a path is missing or unreadable.
    """
    analyses: list[Analysis] = []
    for item in paths_or_analyses:
        if isinstance(item, Analysis):
            analyses.append(item)
        else:
            analyses.extend(load_analyses(item, **analyze_options))
    if len(analyses) < 2:
        found = "none" if not analyses else f"only {analyses[0].checkpoint}"
        raise UsageError(f"compare needs at least two checkpoints (got {found})")
    if labels is None:
        labels = analysis_labels(analyses)
    labels = [str(label) for label in labels]
    if len(labels) != len(analyses):
        raise UsageError(f"got {len(labels)} labels for {len(analyses)} checkpoints")
    if len(set(labels)) != len(labels):
        raise UsageError(f"labels must be unique, got {', '.join(labels)}")
    modules, rows = _module_rows(labels, analyses)
    return Comparison(
        labels=labels,
        analyses=analyses,
        modules=modules,
        rows=rows,
        partial_modules=_partial(modules, labels, rows),
        by_module_type=_group_rows(labels, analyses, "by_module_type"),
        by_layer=_group_rows(labels, analyses, "by_layer_index"),
    )
