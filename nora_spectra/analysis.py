"""``analyze(path) -> Analysis``: per-layer spectra and metrics of one adapter checkpoint.

The data path reads straight through::

    load_checkpoint(path) --iter_layers()--> LayerFactors (one pair at a time)
        --adapter_singular_values(A, B, scale)--> sigma --spectrum_metrics--> layer record (dict)
        --summarize(records)--> summary                                  --> Analysis

Nothing here computes a singular value or a metric itself: :mod:`nora_spectra.spectrum` and
:mod:`nora_spectra.metrics` do, so the CLI, the library and the CI gate agree to the last bit.
This module imports neither torch nor pandas (``Analysis.layers`` imports pandas when first used).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, Union

from nora_spectra._text import name_list, package_version, plural
from nora_spectra.errors import UsageError
from nora_spectra.plots import PlotMethods
from nora_spectra.summary import summarize

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from nora_spectra.io import Checkpoint

__all__ = [
    "LAYER_COLUMNS",
    "Analysis",
    "AnalysisWarning",
    "analyses_from_data",
    "analysis_items",
    "analyze",
    "analyze_many",
    "layer_index",
    "layer_record",
    "module_type",
    "progress_callback",
    "to_jsonable",
]

log = logging.getLogger(__name__)

#: columns of :attr:`Analysis.layers`, in order; also the keys of every layer record.
LAYER_COLUMNS: tuple[str, ...] = (
    "module",
    "module_type",
    "layer_index",
    "kind",
    "layer_type",
    "dtype",
    "rank",
    "scale",
    "shape",
    "status",
    "collapsed",
    "effective_rank",
    "utilization",
    "stable_rank",
    "energy_rank_90",
    "energy_rank_99",
    "numerical_rank",
    "spectral_entropy",
    "participation_ratio",
    "sigma_max",
    "frobenius_norm",
    "tail_energy",
    "singular_values",
)


_INTEGER = re.compile(r"^\d+$")

ProgressArg = Union[None, bool, Callable[[int, int, str], None]]


class AnalysisWarning(UserWarning):
    """A checkpoint was analysed, but some layers need the user's attention (NaN, zero, skipped, DoRA)."""


def module_type(module: str) -> str:
    """The last dotted component of a module name: ``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return module.rsplit(".", 1)[-1]


def layer_index(module: str) -> int | None:
    """The first all-digit dotted component of a module name (``model.layers.3.mlp.up_proj`` -> 3), else None."""
    for part in module.split("."):
        if _INTEGER.match(part):
            return int(part)
    return None


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and non-finite floats into strict-JSON values (NaN/Inf -> None)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if tolist is not None:
        return to_jsonable(tolist())
    return str(value)


@dataclasses.dataclass
class Analysis(PlotMethods):
    """The spectra of one adapter checkpoint: one record per adapter module, and their summary.

    In Jupyter it renders as an HTML table (``_repr_html_``); ``plot_spectrum``, ``plot_effective_rank``,
    ``plot_utilization`` and ``plot_energy`` return matplotlib figures (see :mod:`nora_spectra.plots`).

    Attributes:
        checkpoint: the analysed path, as given.
        format: checkpoint format detected by the reader (e.g. ``"peft"``).
        method: ``"lora"``, ``"nora"`` or ``"mixed"``, as the reader reports it.
        records: one dict per module, keys :data:`LAYER_COLUMNS` (JSON field names, see docs/metrics.md).
        summary: :func:`nora_spectra.summary.summarize` of ``records``.
        config: the adapter config as read from disk (None for a bare weights file).
        warnings: human-readable warnings (reader warnings first, then per-layer ones).
        skipped: ``(tensor or module name, reason)`` for every tensor that is not an adapter pair.
        collapse_threshold: the utilization below which a layer was flagged ``collapsed``.
        adapter: the non-default adapter analysed (``--adapter NAME``, the sub-directory), or None for
            the default one. ``checkpoint`` alone does not tell two adapters of one directory apart.
    """

    checkpoint: str
    format: str
    method: str
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    collapse_threshold: float = 0.25
    adapter: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        """One short line (the dataclass default printed every record with its singular values)."""
        summary = self.summary or {}
        mean_util = (((summary.get("metrics") or {}).get("utilization") or {}).get("mean"))
        util = "None" if mean_util is None else f"{float(mean_util):.3f}"
        adapter = "" if self.adapter is None else f", adapter={self.adapter!r}"
        return (
            f"Analysis(checkpoint={self.checkpoint!r}{adapter}, format={self.format!r}, method={self.method!r}, "
            f"layers={len(self.records)}, mean_utilization={util}, collapsed={summary.get('collapsed')})"
        )

    @property
    def display_name(self) -> str:
        """The checkpoint path, followed by `` (adapter NAME)`` when a non-default adapter was analysed."""
        return self.checkpoint if self.adapter is None else f"{self.checkpoint} (adapter {self.adapter})"

    def _repr_html_(self) -> str:
        from nora_spectra.render.html import analysis_html

        return analysis_html(self)

    @property
    def layers(self) -> "pd.DataFrame":
        """The records as a pandas DataFrame with columns :data:`LAYER_COLUMNS` (one row per module).

        ``shape`` and ``singular_values`` are list-valued columns; metrics of ``non_finite`` layers are
        missing values. pandas is imported here, on first use.
        """
        import pandas as pd

        return pd.DataFrame.from_records(self.records, columns=list(LAYER_COLUMNS))

    def to_dict(self) -> dict[str, Any]:
        """The strict-JSON form: ``checkpoint``, ``adapter``, ``format``, ``method``, ``layers``, ``summary``, extras.

        ``adapter`` is the non-default adapter's name, or None for the default adapter.

        Extras: ``collapse_threshold``, ``config``, ``warnings``, ``skipped`` (list of
        ``{"name", "reason"}``) and ``nora_spectra_version``. Non-finite floats become None.
        """
        return to_jsonable(
            {
                "checkpoint": self.checkpoint,
                "adapter": self.adapter,
                "format": self.format,
                "method": self.method,
                "layers": self.records,
                "summary": self.summary,
                "collapse_threshold": self.collapse_threshold,
                "config": self.config,
                "warnings": self.warnings,
                "skipped": [{"name": name, "reason": reason} for name, reason in self.skipped],
                "nora_spectra_version": package_version(),
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` serialised as strict JSON (``allow_nan=False``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Analysis":
        """Rebuild an Analysis from :meth:`to_dict` output (e.g. a stored baseline).

        Raises:
            UsageError: when ``data`` is not an analysis object (no ``layers`` list).
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), list):
            raise UsageError("not a spectra analysis: expected a JSON object with a 'layers' list")
        records = [dict(rec) for rec in data["layers"]]
        summary = data.get("summary")
        skipped = [(item.get("name", ""), item.get("reason", "")) for item in data.get("skipped") or []]
        adapter = data.get("adapter")  # absent from analyses written before the field existed
        return cls(
            checkpoint=str(data.get("checkpoint", "")),
            format=str(data.get("format", "")),
            method=str(data.get("method", "")),
            records=records,
            summary=dict(summary) if isinstance(summary, Mapping) else summarize(records),
            config=data.get("config"),
            warnings=list(data.get("warnings") or []),
            skipped=skipped,
            collapse_threshold=float(data.get("collapse_threshold", 0.25)),
            adapter=None if adapter is None else str(adapter),
        )

    @classmethod
    def from_json(cls, text: str) -> "Analysis":
        """Rebuild an Analysis from :meth:`to_json` text.

        Raises:
            UsageError: when ``text`` is not JSON or not an analysis object.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"not a spectra analysis: invalid JSON ({exc})") from None
        return cls.from_dict(data)


def analysis_items(data: Any) -> list[Any]:
    """The per-checkpoint objects of parsed ``spectra analyze --format json`` output (one, or ``checkpoints``).

    Raises:
        UsageError: ``{"checkpoints": ...}`` is not a non-empty list.
    """
    several = isinstance(data, Mapping) and "checkpoints" in data and "layers" not in data
    items = data["checkpoints"] if several else [data]
    if not isinstance(items, list) or not items:
        raise UsageError("not a spectra analysis: 'checkpoints' must be a non-empty list of analyses")
    return items


def analyses_from_data(data: Any) -> list[Analysis]:
    """The analyses in parsed ``spectra analyze --format json`` output: one object, or ``{"checkpoints": [...]}``.

    Raises:
        UsageError: ``data`` holds no analysis (the message starts "not a spectra analysis").
    """
    return [Analysis.from_dict(item) for item in analysis_items(data)]


def layer_record(
    identity: Mapping[str, Any],
    sigma: "Sequence[float] | None",
    *,
    collapse_threshold: float,
    columns: Sequence[str] = LAYER_COLUMNS,
) -> dict[str, Any]:
    """One layer record: identity fields plus every metric of ``sigma`` (weight, activation or probe space).

    Args:
        identity: ``module``, ``kind``, ``layer_type``, ``dtype``, ``rank``, ``scale``, ``shape`` (and any
            extra field named in ``columns``); ``module_type`` and ``layer_index`` are derived from ``module``.
        sigma: the scaled singular values, or None when the factors held NaN/Inf (status ``non_finite``,
            null metrics).
        collapse_threshold: see :func:`nora_spectra.metrics.spectrum_metrics`.
        columns: the record's keys, in order.

    Returns:
        The record, keys exactly ``columns``.
    """
    from nora_spectra.metrics import non_finite_metrics, spectrum_metrics

    record = dict(identity)
    record["shape"] = [int(n) for n in record["shape"]]
    record["module_type"] = module_type(record["module"])
    record["layer_index"] = layer_index(record["module"])
    if sigma is None:
        record.update(non_finite_metrics(), singular_values=None)
    else:
        rank, shape = int(record["rank"]), tuple(record["shape"])
        record.update(spectrum_metrics(sigma, rank=rank, shape=shape, collapse_threshold=collapse_threshold))
        record["singular_values"] = [float(s) for s in sigma]
    return {name: record[name] for name in columns}


def _layer_record(layer: Any, collapse_threshold: float) -> dict[str, Any]:
    """The weight-space record of one ``LayerFactors`` (spectrum of ``scale * B @ A``)."""
    from nora_spectra.spectrum import NonFiniteFactorsError, adapter_singular_values

    try:
        sigma = adapter_singular_values(layer.A, layer.B, layer.scale)
    except NonFiniteFactorsError:
        sigma = None
    identity = {
        "module": layer.module,
        "kind": layer.kind,
        "layer_type": layer.layer_type,
        "dtype": layer.dtype,
        "rank": int(layer.rank),
        "scale": float(layer.scale),
        "shape": layer.shape,
    }
    record = layer_record(identity, sigma, collapse_threshold=collapse_threshold)
    if record["status"] == "ok" and getattr(layer, "dora", False):
        record["status"] = "dora_direction_only"
    return record


def _layer_warnings(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One warning line per kind of problem across all layers (not one per layer).

    DoRA layers need none here: the reader already warns that their spectra are of the direction only.
    """
    messages = []
    by_status: dict[str, list[str]] = {}
    for rec in records:
        by_status.setdefault(rec["status"], []).append(rec["module"])
    if names := by_status.get("non_finite"):
        messages.append(
            f"{plural(len(names), 'layer')} with NaN/Inf factors (status non_finite, metrics null): {name_list(names)}"
        )
    if names := by_status.get("zero"):
        messages.append(
            f"{plural(len(names), 'layer')} with an all-zero update (status zero, effective rank 0): {name_list(names)}"
        )
    return messages


def progress_callback(
    progress: ProgressArg, total: int, *, unit: str = "layer", desc: str = "analysing"
) -> tuple[Callable[[int, int, str], None] | None, Any]:
    """Turn a ``progress`` argument into a callback ``(done, total, item)`` and the tqdm bar to close, if any.

    Args:
        progress: None/False (nothing), True (a tqdm bar on stderr) or a callable ``(done, total, item)``.
        total: the number of units of work.
        unit, desc: the bar's unit and description.

    Raises:
        UsageError: ``progress`` is of another type.
    """
    if progress is None or progress is False:
        return None, None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit=unit, desc=desc, leave=False, dynamic_ncols=True)
        return (lambda done, _total, _item: bar.update(done - bar.n)), bar
    if callable(progress):
        return progress, None
    raise UsageError(f"progress must be None, a bool or a callable, got {type(progress).__name__}")


def analyze(
    path: "str | os.PathLike[str] | Checkpoint",
    *,
    adapter: str | None = None,
    collapse_threshold: float = 0.25,
    progress: ProgressArg = None,
    emit_warnings: bool = True,
) -> Analysis:
    """Per-layer singular-value spectra and rank-utilization metrics of one adapter checkpoint.

    For every adapter module with factors ``A`` (r, d_in) and ``B`` (d_out, r) and scale ``s``, the
    spectrum is the singular values of the update ``s * B @ A`` (computed from the r x r core, never
    forming the d_out x d_in product), and the metrics are those of ``docs/metrics.md``.

    Args:
        path: a checkpoint directory or file, or an already-loaded :class:`nora_spectra.io.Checkpoint`.
        adapter: name of a non-default adapter (its sub-directory); ignored for a loaded Checkpoint.
        collapse_threshold: a layer is ``collapsed`` when ``utilization = effective_rank / r`` is below
            this, in [0, 1]; default 0.25.
        progress: None/False for nothing, True for a tqdm bar on stderr, or a callable
            ``progress(done, total, module)`` called after each layer.
        emit_warnings: also issue the collected warnings once each through :func:`warnings.warn`
            (category :class:`AnalysisWarning`). The CLI turns this off and prints them itself.

    Returns:
        The :class:`Analysis`. NaN/Inf factors and all-zero updates are not errors: such layers get the
        status ``"non_finite"`` (null metrics) or ``"zero"`` and a warning.

    Raises:
        CheckpointError: the path is missing, malformed or of an unknown format.
        UsageError: ``collapse_threshold`` is outside [0, 1] or ``progress`` is of the wrong type.
    """
    if isinstance(collapse_threshold, bool) or not (
        isinstance(collapse_threshold, (int, float)) and 0.0 <= float(collapse_threshold) <= 1.0
    ):
        raise UsageError(f"collapse threshold must be a number in [0, 1], got {collapse_threshold!r}")
    collapse_threshold = float(collapse_threshold)

    if hasattr(path, "iter_layers"):
        checkpoint = path
    else:
        from nora_spectra.io import load_checkpoint

        checkpoint = load_checkpoint(path, adapter=adapter)

    total = len(checkpoint)
    log.debug("%s: format %s, method %s, %d adapter modules", checkpoint.path, checkpoint.format, checkpoint.method, total)
    started = time.perf_counter()
    callback, bar = progress_callback(progress, total)
    records = []
    try:
        for done, layer in enumerate(checkpoint.iter_layers(), start=1):
            records.append(_layer_record(layer, collapse_threshold))
            if callback is not None:
                callback(done, total, layer.module)
    finally:
        if bar is not None:
            bar.close()

    log.debug("%s: %d spectra in %.3f s", checkpoint.path, len(records), time.perf_counter() - started)
    messages = list(getattr(checkpoint, "warnings", None) or [])
    skipped = [(str(name), str(reason)) for name, reason in (getattr(checkpoint, "skipped", None) or [])]
    if skipped and not any(message.startswith("skipped ") for message in messages):
        # the io reader already words this warning (with the tensor count); other readers may not
        messages.append(
            f"skipped {plural(len(skipped), 'module')} that are not low-rank adapter factors: "
            + name_list([f"{name} ({reason})" for name, reason in skipped])
        )
    messages.extend(_layer_warnings(records))

    analysis = Analysis(
        checkpoint=os.fspath(checkpoint.path),
        format=str(checkpoint.format),
        method=str(checkpoint.method),
        records=records,
        summary=summarize(records),
        config=getattr(checkpoint, "config", None),
        warnings=messages,
        skipped=skipped,
        collapse_threshold=collapse_threshold,
        adapter=getattr(checkpoint, "adapter", None),
    )
    for message in messages:
        log.debug("%s: %s", analysis.checkpoint, message)
        if emit_warnings:
            warnings.warn(f"{analysis.checkpoint}: {message}", AnalysisWarning, stacklevel=2)
    return analysis


def analyze_many(paths: Iterable["str | os.PathLike[str]"], **options: Any) -> list[Analysis]:
    """:func:`analyze` each path in turn with the same options (stops at the first user error)."""
    return [analyze(path, **options) for path in paths]
