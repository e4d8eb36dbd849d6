"""The schema of analysis JSON: what ``spectra analyze --format json`` writes, checked when read back.

Every command that reads an analysis JSON file (``spectra compare`` and ``report`` inputs, ``spectra
check`` baselines) goes through :meth:`nora_spectra.result.Analysis.from_dict`, which calls
:func:`validate_analysis` here: a value of the wrong type or range is refused with its JSON path,
``layers[3].utilization: expected a number >= 0, got a list``, before any command looks at it. What
passes has exactly the structure :meth:`Analysis.to_dict` writes, so no renderer, comparison or gate
meets a surprise.

The rules (``docs/metrics.md`` defines the fields):

* top level: ``layers`` (a list of records, required); ``checkpoint``, ``format``, ``method`` strings;
  ``adapter``, ``model``, ``data`` strings or null; ``collapse_threshold`` a number >= 0;
  ``config`` an object or null; ``warnings`` a list of strings; ``skipped`` a list of
  ``{"name", "reason"}`` strings; ``space`` one of ``weight``, ``activation``, ``probe``; ``tokens``,
  ``samples`` integers >= 0 or null; ``probe_scale`` a number > 0 or null; ``metadata`` an object of
  strings (the weights file's header metadata); base-aware analyses: ``base`` a string or null, ``top_k``
  an integer >= 1, ``"all"`` or null, ``intruder_k`` an integer >= 1 or null, ``intruder_eps`` a number in
  [0, 1] or null; ``summary`` (optional; when absent it is recomputed from the records) with exactly the
  structure of :func:`nora_spectra.summary.summarize`. Unknown top-level keys are ignored.
* a record: ``module`` (a non-empty string) and ``status`` (one of the statuses) are required; every
  other column may be missing (``module_type`` and ``layer_index`` are then derived from the name, the
  rest is null). Metrics are numbers >= 0 or null, counts integers >= 0 or null, ``rank`` an integer
  in [1, 2**40] or null, ``shape`` a list of integers >= 0, ``singular_values`` a list of numbers
  >= 0, ``collapsed`` true, false or null, ``key`` a string or null. The optional columns of base-aware and
  truncated analyses (:data:`~nora_spectra.schema.OPTIONAL_COLUMNS`) are kept when present: ``top_k`` and
  ``intruders`` integers, ``captured_energy``, ``sigma_error_bound`` and the relative sizes numbers >= 0,
  ``base_tensor`` a string, ``intruder_indices`` a list of integers >= 0, ``intruder_max_cos`` a list of
  numbers >= 0 (all may be null). Unknown record keys are dropped.

Numbers are finite: the JSON reader (:mod:`nora_core.parsing`) has already refused NaN, infinities,
out-of-range integers, nesting deeper than 64 levels and lone surrogates.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from nora_core.parsing import json_path, type_name
from nora_spectra.errors import UsageError
from nora_spectra.schema import (
    ACTIVATION_COLUMNS,
    DEFAULT_COLLAPSE_THRESHOLD,
    LAYER_COLUMNS,
    OPTIONAL_COLUMNS,
    SPACES,
    STATUSES,
    SUMMARY_METRICS,
    layer_index,
    module_type,
)

__all__ = [
    "COUNT_FIELDS",
    "METRIC_NUMBER_FIELDS",
    "STATS",
    "validate_analysis",
    "validate_record",
    "validate_summary",
]

#: record metrics that are integers >= 0 (or null).
COUNT_FIELDS: tuple[str, ...] = ("energy_rank_90", "energy_rank_99", "numerical_rank")

#: record metrics that are numbers >= 0 (or null).
METRIC_NUMBER_FIELDS: tuple[str, ...] = (
    "effective_rank",
    "utilization",
    "stable_rank",
    "spectral_entropy",
    "participation_ratio",
    "sigma_max",
    "frobenius_norm",
    "tail_energy",
)

#: the statistics of each metric in a summary group.
STATS: tuple[str, ...] = ("mean", "median", "weighted_mean", "min", "max")

_TEXT_FIELDS = ("key", "module_type", "kind", "layer_type", "dtype")
_GROUP_COUNTS = ("layers", "analysed", "total_rank", "collapsed")
_MAX_RANK = 2**40

Path = tuple[Any, ...]


def _fail(parts: Path, problem: str) -> UsageError:
    return UsageError(f"{json_path(parts)}: {problem}")


def _expected(parts: Path, what: str, value: Any) -> UsageError:
    return _fail(parts, f"expected {what}, got {type_name(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, parts: Path, *, minimum: float | None = 0.0, positive: bool = False, null: bool = True) -> Any:
    if value is None and null:
        return None
    if positive:
        what = "a number > 0"
        ok = _is_number(value) and value > 0
    else:
        what = "a number" if minimum is None else f"a number >= {minimum:g}"
        ok = _is_number(value) and (minimum is None or value >= minimum)
    if not ok:
        raise _expected(parts, what + (" or null" if null else ""), value)
    return value


def _integer(value: Any, parts: Path, *, minimum: int = 0, maximum: int | None = None, null: bool = True) -> Any:
    if value is None and null:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 3.0 from another JSON writer
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bound = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, 2**40]"
        raise _expected(parts, bound + (" or null" if null else ""), value)
    return value


def _text(value: Any, parts: Path, *, null: bool = True, nonempty: bool = False) -> Any:
    if value is None and null:
        return None
    if not isinstance(value, str) or (nonempty and not value):
        what = "a non-empty string" if nonempty else "a string"
        raise _expected(parts, what + (" or null" if null else ""), value)
    return value


def _choice(value: Any, parts: Path, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        shown = repr(value) if isinstance(value, str) and len(value) <= 40 else type_name(value)
        raise _fail(parts, f"expected one of {', '.join(choices)}, got {shown}")
    return value


def _mapping(value: Any, parts: Path) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _expected(parts, "an object", value)
    return value


def _list(value: Any, parts: Path, *, null: bool = True) -> list[Any] | None:
    if value is None and null:
        return None
    if not isinstance(value, list):
        raise _expected(parts, "a list" + (" or null" if null else ""), value)
    return value


def validate_record(record: Any, parts: Path, *, space: str = "weight") -> dict[str, Any]:
    """One layer record, checked and normalised to the columns of its space (missing ones filled).

    Args:
        record: the parsed record.
        parts: its JSON path, e.g. ``("layers", 3)``.
        space: the analysis's space (activation and probe records have ``space`` and ``tokens`` too).

    Returns:
        A new dict with exactly the keys of :data:`LAYER_COLUMNS` (or :data:`ACTIVATION_COLUMNS`).

    Raises:
        UsageError: naming the JSON path of the first bad value.
    """
    rec = _mapping(record, parts)
    columns = LAYER_COLUMNS if space == "weight" else ACTIVATION_COLUMNS
    if "module" not in rec:
        raise _fail((*parts, "module"), "missing (every layer record names its module)")
    if "status" not in rec:
        raise _fail((*parts, "status"), "missing (every layer record has a status)")
    module = _text(rec["module"], (*parts, "module"), null=False, nonempty=True)
    out: dict[str, Any] = dict.fromkeys(columns)
    out["module"] = module
    out["status"] = _choice(rec["status"], (*parts, "status"), STATUSES)
    for name in _TEXT_FIELDS:
        out[name] = _text(rec.get(name), (*parts, name))
    if "module_type" not in rec:
        out["module_type"] = module_type(module)
    out["layer_index"] = _integer(rec["layer_index"], (*parts, "layer_index")) if "layer_index" in rec else layer_index(module)
    out["rank"] = _integer(rec.get("rank"), (*parts, "rank"), minimum=1, maximum=_MAX_RANK)
    out["scale"] = _number(rec.get("scale"), (*parts, "scale"), minimum=None)
    shape = _list(rec.get("shape"), (*parts, "shape"))
    if shape is not None:
        if not 1 <= len(shape) <= 8:
            raise _fail((*parts, "shape"), f"expected a list of 1 to 8 integers, got {len(shape)} items")
        out["shape"] = [_integer(d, (*parts, "shape", i), null=False) for i, d in enumerate(shape)]
    collapsed = rec.get("collapsed")
    if collapsed is not None and not isinstance(collapsed, bool):
        raise _expected((*parts, "collapsed"), "true, false or null", collapsed)
    out["collapsed"] = collapsed
    for name in METRIC_NUMBER_FIELDS:
        out[name] = _number(rec.get(name), (*parts, name))
    for name in COUNT_FIELDS:
        out[name] = _integer(rec.get(name), (*parts, name))
    values = _list(rec.get("singular_values"), (*parts, "singular_values"))
    if values is not None:
        out["singular_values"] = [
            _number(v, (*parts, "singular_values", i), null=False) for i, v in enumerate(values)
        ]
    if space != "weight":
        out["space"] = _choice(rec.get("space", space), (*parts, "space"), SPACES)
        out["tokens"] = _integer(rec.get("tokens"), (*parts, "tokens"))
    for name in OPTIONAL_COLUMNS:
        if name in rec:
            out[name] = _optional_column(name, rec[name], (*parts, name))
    return out


def _optional_column(name: str, value: Any, parts: Path) -> Any:
    """One optional column of a base-aware or truncated record (:data:`OPTIONAL_COLUMNS`), checked."""
    if name in ("top_k", "intruders"):
        return _integer(value, parts, minimum=0 if name == "intruders" else 1)
    if name == "base_tensor":
        return _text(value, parts)
    if name in ("intruder_indices", "intruder_max_cos"):
        items = _list(value, parts)
        if items is None:
            return None
        check = _integer if name == "intruder_indices" else _number
        return [check(item, (*parts, i), null=False) for i, item in enumerate(items)]
    return _number(value, parts)


def _validate_group(group: Any, parts: Path) -> dict[str, Any]:
    data = _mapping(group, parts)
    out: dict[str, Any] = {}
    for name in _GROUP_COUNTS:
        if name not in data:
            raise _fail((*parts, name), "missing")
        out[name] = _integer(data[name], (*parts, name), null=False)
    by_status = _mapping(data.get("by_status"), (*parts, "by_status"))
    out["by_status"] = {
        key: _integer(count, (*parts, "by_status", key), null=False) for key, count in by_status.items()
    }
    metrics = _mapping(data.get("metrics"), (*parts, "metrics"))
    for name in SUMMARY_METRICS:
        if name not in metrics:
            raise _fail((*parts, "metrics", name), "missing")
    out["metrics"] = {}
    for name, stats in metrics.items():
        where = (*parts, "metrics", name)
        stats = _mapping(stats, where)
        for stat in STATS:
            if stat not in stats:
                raise _fail((*where, stat), "missing")
        out["metrics"][name] = {stat: _number(stats[stat], (*where, stat), minimum=None) for stat in STATS}
    return out


def validate_summary(summary: Any, parts: Path) -> dict[str, Any]:
    """A summary as :func:`nora_spectra.summary.summarize` writes it (every key present), checked.

    Raises:
        UsageError: naming the JSON path of the first bad or missing value.
    """
    out = _validate_group(summary, parts)
    for key in ("by_module_type", "by_layer_index"):
        groups = _mapping(summary.get(key, {}), (*parts, key))
        out[key] = {name: _validate_group(group, (*parts, key, name)) for name, group in groups.items()}
    return out


def validate_analysis(data: Any, parts: Path = ()) -> dict[str, Any]:
    """One analysis object, checked and normalised (see the module docstring for the rules).

    Args:
        data: the parsed object.
        parts: its JSON path (``("checkpoints", 1)`` inside a ``{"checkpoints": [...]}`` file).

    Returns:
        A dict with the keys ``Analysis.from_dict`` reads; ``summary`` is None when it was absent.

    Raises:
        UsageError: not an analysis (``not a spectra analysis: ...``) or a bad value (its JSON path).
    """
    if not isinstance(data, Mapping) or "layers" not in data:
        where = f"{json_path(parts)}: " if parts else ""
        raise UsageError(f"{where}not a spectra analysis: expected a JSON object with a 'layers' list")
    space = _choice(data.get("space", "weight"), (*parts, "space"), SPACES)
    layers = _list(data["layers"], (*parts, "layers"), null=False)
    records = [validate_record(rec, (*parts, "layers", i), space=space) for i, rec in enumerate(layers)]
    summary = data.get("summary")
    skipped = []
    for i, item in enumerate(_list(data.get("skipped"), (*parts, "skipped")) or []):
        item = _mapping(item, (*parts, "skipped", i))
        skipped.append((
            _text(item.get("name", ""), (*parts, "skipped", i, "name"), null=False),
            _text(item.get("reason", ""), (*parts, "skipped", i, "reason"), null=False),
        ))
    config = data.get("config")
    if config is not None:
        config = dict(_mapping(config, (*parts, "config")))
    warnings = _list(data.get("warnings"), (*parts, "warnings")) or []
    threshold = data.get("collapse_threshold", DEFAULT_COLLAPSE_THRESHOLD)
    return {
        "checkpoint": _text(data.get("checkpoint", ""), (*parts, "checkpoint"), null=False),
        "adapter": _text(data.get("adapter"), (*parts, "adapter")),
        "format": _text(data.get("format", ""), (*parts, "format"), null=False),
        "method": _text(data.get("method", ""), (*parts, "method"), null=False),
        "records": records,
        "summary": None if summary is None else validate_summary(summary, (*parts, "summary")),
        "config": config,
        "warnings": [_text(w, (*parts, "warnings", i), null=False) for i, w in enumerate(warnings)],
        "skipped": skipped,
        "collapse_threshold": float(_number(threshold, (*parts, "collapse_threshold"), null=False)),
        "space": space,
        "tokens": _integer(data.get("tokens"), (*parts, "tokens")),
        "samples": _integer(data.get("samples"), (*parts, "samples")),
        "model": _text(data.get("model"), (*parts, "model")),
        "data": _text(data.get("data"), (*parts, "data")),
        "probe_scale": _number(data.get("probe_scale"), (*parts, "probe_scale"), positive=True),
        "metadata": _metadata(data.get("metadata"), (*parts, "metadata")),
        "base": _text(data.get("base"), (*parts, "base")),
        "top_k": _top_k(data.get("top_k"), (*parts, "top_k")),
        "intruder_k": _integer(data.get("intruder_k"), (*parts, "intruder_k"), minimum=1),
        "intruder_eps": _fraction(data.get("intruder_eps"), (*parts, "intruder_eps")),
    }


def _metadata(value: Any, parts: Path) -> dict[str, str]:
    """The header metadata: an object of strings (absent or null: empty)."""
    if value is None:
        return {}
    data = _mapping(value, parts)
    return {str(key): _text(item, (*parts, key), null=False) for key, item in data.items()}


def _top_k(value: Any, parts: Path) -> int | str | None:
    """``--top-k`` as recorded: an integer >= 1, ``"all"`` or null."""
    if value == "all":
        return "all"
    return _integer(value, parts, minimum=1)


def _fraction(value: Any, parts: Path) -> float | None:
    """A number in [0, 1], or null."""
    number = _number(value, parts)
    if number is not None and number > 1:
        raise _expected(parts, "a number in [0, 1] or null", value)
    return number
