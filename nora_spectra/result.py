"""``Analysis``: the result of :func:`nora_spectra.analysis.analyze`, as plain data.

An Analysis holds one record per module (dicts with the keys of :data:`nora_spectra.schema.LAYER_COLUMNS`),
their summary, what the reader said (format, config, warnings, skipped tensors) and, for activation and
probe spectra, how they were measured. It pickles compactly (plain data only, no reader or model) so
it can come back from a worker process, and turns into strict JSON, a pandas DataFrame, an HTML table
(in Jupyter) and plots; pandas, the renderers and matplotlib are imported only when those are used.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from nora_core.jsonable import dumps_indented
from nora_core.parsing import ParseError, parse_json, read_json
from nora_spectra._text import package_version
from nora_spectra.analysis_schema import validate_analysis
from nora_spectra.errors import UsageError
from nora_spectra.plot_methods import PlotMethods
from nora_spectra.schema import (
    ACTIVATION_COLUMNS,
    BASE_FIELDS,
    DEFAULT_COLLAPSE_THRESHOLD,
    LAYER_COLUMNS,
    OPTIONAL_COLUMNS,
    json_text,
    to_jsonable,
)
from nora_spectra.summary import summarize

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "SPACE_FIELDS",
    "Analysis",
    "analyses_from_data",
    "analyses_to_json",
    "analysis_items",
    "read_analyses",
]

#: the fields that activation- and probe-space analyses add to their JSON, in order.
SPACE_FIELDS: tuple[str, ...] = ("space", "tokens", "samples", "model", "data", "probe_scale")


@dataclasses.dataclass
class Analysis(PlotMethods):
    """The spectra of one adapter checkpoint: one record per adapter module, and their summary.

    In Jupyter it renders as an HTML table (``_repr_html_``); ``plot_spectrum``, ``plot_effective_rank``,
    ``plot_utilization`` and ``plot_energy`` return matplotlib figures (see :mod:`nora_spectra.plots`).

    Attributes:
        checkpoint: the analysed path, as given.
        format: checkpoint format detected by the reader (e.g. ``"peft"``).
        method: ``"lora"``, ``"nora"`` or ``"mixed"``, as the reader reports it.
        records: one dict per module, keys :data:`LAYER_COLUMNS` (activation and probe: plus ``space``
            and ``tokens``; JSON field names, see docs/metrics.md).
        summary: :func:`nora_spectra.summary.summarize` of ``records``.
        config: the adapter config as read from disk (None for a bare weights file).
        warnings: human-readable warnings (reader warnings first, then per-layer ones).
        skipped: ``(tensor or module name, reason)`` for every tensor that is not an adapter pair.
        collapse_threshold: the utilization below which a layer was flagged ``collapsed``.
        adapter: the non-default adapter analysed (``--adapter NAME``, the sub-directory), or None for
            the default one. ``checkpoint`` alone does not tell two adapters of one directory apart.
        space: ``"weight"`` (the update's spectrum), ``"activation"`` or ``"probe"``.
        tokens: rows the spectra were measured over (activation: real tokens; probe: Gaussian inputs).
        samples: sequences run through the model (activation), 0 for the probe.
        model: the base model's path or class name (activation).
        data: the data file, or a description of in-memory data (activation).
        probe_scale: the standard deviation of the Gaussian probe inputs (probe).
        metadata: the weights file's header metadata as read (safetensors ``__metadata__``: kohya's
            ``ss_network_dim``, ``ss_network_alpha`` and other ``ss_*`` training settings, diffusers'
            ``lora_adapter_metadata``, ...), without the ``format`` marker safetensors writers add
            (``{"format": "pt"}``); empty when the file has nothing else.
        base: the base model of a base-aware analysis (``--base``), or None.
        top_k: ``--top-k`` as asked (an integer or ``"all"``; None: the default policy), in analyses whose
            dense spectra may be truncated (a base, ``top_k`` or a full fine-tune).
        intruder_k, intruder_eps: the intruder-dimension options, when they were counted.
    """

    checkpoint: str
    format: str
    method: str
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD
    adapter: str | None = None
    space: str = "weight"
    tokens: int | None = None
    samples: int | None = None
    model: str | None = None
    data: str | None = None
    probe_scale: float | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    base: str | None = None
    top_k: int | str | None = None
    intruder_k: int | None = None
    intruder_eps: float | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        """One short line (the dataclass default printed every record with its singular values)."""
        summary = self.summary or {}
        mean_util = (((summary.get("metrics") or {}).get("utilization") or {}).get("mean"))
        util = "None" if mean_util is None else f"{float(mean_util):.3f}"
        adapter = "" if self.adapter is None else f", adapter={self.adapter!r}"
        space = "" if self.space == "weight" else f", space={self.space!r}"
        return (
            f"Analysis(checkpoint={self.checkpoint!r}{adapter}, format={self.format!r}, method={self.method!r}"
            f"{space}, layers={len(self.records)}, mean_utilization={util}, collapsed={summary.get('collapsed')})"
        )

    @property
    def display_name(self) -> str:
        """The checkpoint path, followed by `` (adapter NAME)`` when a non-default adapter was analysed."""
        return self.checkpoint if self.adapter is None else f"{self.checkpoint} (adapter {self.adapter})"

    @property
    def columns(self) -> tuple[str, ...]:
        """The keys of this analysis's records: :data:`LAYER_COLUMNS`, plus ``space``/``tokens`` off weight space,
        plus the :data:`~nora_spectra.schema.OPTIONAL_COLUMNS` its records carry (base-aware, truncated spectra)."""
        columns = LAYER_COLUMNS if self.space == "weight" else ACTIVATION_COLUMNS
        present = self.records[0] if self.records else {}
        return columns + tuple(name for name in OPTIONAL_COLUMNS if name in present)

    def _has_base_fields(self) -> bool:
        """True for an analysis whose JSON carries :data:`~nora_spectra.schema.BASE_FIELDS`."""
        return self.base is not None or self.top_k is not None or any(
            name in (self.records[0] if self.records else {}) for name in OPTIONAL_COLUMNS
        )

    def _repr_html_(self) -> str:
        from nora_spectra.render.html import analysis_html

        return analysis_html(self)

    @property
    def layers(self) -> "pd.DataFrame":
        """The records as a pandas DataFrame with columns :attr:`columns` (one row per module).

        ``shape`` and ``singular_values`` are list-valued columns; metrics of ``non_finite`` layers are
        missing values. pandas is imported here, on first use.
        """
        import pandas as pd

        return pd.DataFrame.from_records(self.records, columns=list(self.columns))

    def to_dict(self) -> dict[str, Any]:
        """The strict-JSON form: ``checkpoint``, ``adapter``, ``format``, ``method``, ``layers``, ``summary``, extras.

        ``adapter`` is the non-default adapter's name, or None for the default adapter.

        Extras: ``collapse_threshold``, ``config``, ``warnings``, ``skipped`` (list of
        ``{"name", "reason"}``), ``metadata`` (the header metadata, only when the file has any) and
        ``nora_spectra_version``; off weight space also :data:`SPACE_FIELDS`; base-aware and truncated
        analyses also :data:`~nora_spectra.schema.BASE_FIELDS`. Non-finite floats become None.
        """
        out = {
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
        }
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        out["nora_spectra_version"] = package_version()
        if self.space != "weight":
            out.update({name: getattr(self, name) for name in SPACE_FIELDS})
        if self._has_base_fields():
            out.update({name: getattr(self, name) for name in BASE_FIELDS})
        return to_jsonable(out)

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` serialised as strict JSON (``allow_nan=False``)."""
        return dumps_indented(self.to_dict(), indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: tuple[Any, ...] = ()) -> "Analysis":
        """Rebuild an Analysis from :meth:`to_dict` output (e.g. a stored baseline), validating every value.

        The rules are those of :mod:`nora_spectra.analysis_schema`; a missing ``summary`` is recomputed
        from the records, a missing ``adapter`` (analyses written before the field existed) is None.

        Args:
            data: the parsed analysis object.
            where: its JSON path inside a larger document (for messages), e.g. ``("checkpoints", 1)``.

        Raises:
            UsageError: ``data`` is not an analysis object (``not a spectra analysis: ...``), or a value
                has the wrong type or range (the message starts with its JSON path,
                ``layers[3].utilization: expected a number >= 0, got a list``).
        """
        clean = validate_analysis(data, where)
        records = clean.pop("records")
        summary = clean.pop("summary")
        return cls(records=records, summary=summary if summary is not None else summarize(records), **clean)

    @classmethod
    def from_json(cls, text: str) -> "Analysis":
        """Rebuild an Analysis from :meth:`to_json` text.

        Raises:
            UsageError: when ``text`` is not JSON or not an analysis object.
        """
        try:
            data = parse_json(text, "analysis")
        except ParseError as exc:
            raise UsageError(f"not a spectra analysis: {exc.problem}") from None
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
        UsageError: ``data`` holds no analysis (the message starts "not a spectra analysis"), or a value
            is invalid (the message starts with its JSON path, ``checkpoints[1].layers[0].module: ...``).
    """
    items = analysis_items(data)
    several = isinstance(data, Mapping) and "checkpoints" in data and "layers" not in data
    return [Analysis.from_dict(item, where=("checkpoints", i) if several else ()) for i, item in enumerate(items)]


def read_analyses(path: "str | os.PathLike[str]") -> list[Analysis]:
    """The analyses in a JSON file written by ``spectra analyze --format json`` (one, or ``checkpoints``).

    The file is parsed by :func:`nora_core.parsing.read_json` (UTF-8, depth, number and size limits)
    and every analysis validated by :meth:`Analysis.from_dict`.

    Raises:
        OSError: the file cannot be read (callers word "not found" themselves).
        UsageError: the file is not a valid analysis JSON; the message starts with the file and, for a
            bad value, its JSON path (``base.json: layers[3].utilization: expected ...``).
    """
    try:
        data = read_json(path)
    except ParseError as exc:
        raise UsageError(str(exc)) from None
    try:
        return analyses_from_data(data)
    except UsageError as exc:
        raise UsageError(f"{os.fspath(path)}: {exc}") from None


def analyses_to_json(analyses: Union[Analysis, Sequence[Analysis]], *, indent: int | None = 2) -> str:
    """The JSON ``spectra analyze --format json`` writes: one analysis's object, or ``{"checkpoints": [...]}``
    for a list (newline-terminated, strict)."""
    several = isinstance(analyses, (list, tuple))
    items = list(analyses) if several else [analyses]
    return json_text([a.to_dict() for a in items], several=several, indent=indent)
