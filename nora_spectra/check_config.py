"""Settings of ``spectra check``: thresholds, per-module overrides, and where they come from.

Settings are read from up to three places and merged key by key, later ones winning::

    defaults  <  [tool.spectra.check] in pyproject.toml  <  --config FILE  <  command-line flags

``pyproject.toml`` is found by walking up from the current directory to the first one that has the
file (the first ``pyproject.toml`` found is used even if it has no ``[tool.spectra.check]`` table). A
``--config`` file is either a standalone TOML whose top-level keys are the settings, or any TOML with
a ``[tool.spectra.check]`` table (another project's ``pyproject.toml``). Per-module overrides are a
list of tables, ``[[tool.spectra.check.overrides]]`` (``[[overrides]]`` in a standalone file), each
with a ``pattern`` and its own thresholds::

    [tool.spectra.check]
    min_utilization = 0.5
    baseline = "ci/spectra-baseline.json"      # relative to the file that names it

    [[tool.spectra.check.overrides]]
    pattern = "*.v_proj"                       # a glob (fnmatch), matched against the whole name
    min_utilization = 0.3

Patterns are shell-style globs matched case-sensitively against the full module name (``*`` also
crosses dots: ``*.v_proj`` matches ``model.layers.0.self_attn.v_proj``). The first override whose
pattern matches a module wins; the thresholds it does not set fall back to the global ones. An
``--config`` file's overrides list replaces pyproject's (lists are not merged). Command-line flags set
the global thresholds only, so an override still applies to the modules it matches.

Unknown keys and bad values raise :class:`~nora_spectra.errors.UsageError` naming the file and key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from nora_core.parsing import ParseError, read_toml, type_name
from nora_spectra.errors import UsageError
from nora_spectra.metrics import METRIC_FIELDS
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD

__all__ = [
    "GATED_METRICS",
    "OVERRIDE_KEYS",
    "SETTING_KEYS",
    "CheckSettings",
    "Override",
    "find_pyproject",
    "load_config_file",
    "load_pyproject",
    "parse_overrides",
    "resolve_settings",
]

#: metrics a baseline regression gate may compare: the numeric fields of a layer record.
GATED_METRICS: tuple[str, ...] = tuple(name for name in METRIC_FIELDS if name not in ("collapsed", "status"))

#: keys an override table may hold besides ``pattern``.
OVERRIDE_KEYS: tuple[str, ...] = ("min_utilization", "min_effective_rank", "max_drop", "skip")

#: keys of the ``[tool.spectra.check]`` table (and of a standalone config file).
SETTING_KEYS: tuple[str, ...] = (
    "min_utilization",
    "min_effective_rank",
    "max_collapsed_fraction",
    "baseline",
    "max_drop",
    "metric",
    "fail_on_missing",
    "fail_on_new",
    "collapse_threshold",
    "adapter",
    "overrides",
)


def _is_number(value: Any) -> bool:
    """A finite int or float (TOML booleans are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(name: str, value: Any, where: str, *, optional: bool = True) -> float | None:
    """``value`` as a float in [0, 1] (or None when optional), else a UsageError naming ``where``."""
    if value is None and optional:
        return None
    if not _is_number(value) or not 0 <= value <= 1:
        raise UsageError(f"{where}: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_nonneg(name: str, value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or value < 0:
        raise UsageError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_bool(name: str, value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{where}: {name} must be true or false, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Override:
    """Thresholds for the modules whose name matches a glob ``pattern``.

    Attributes:
        pattern: shell-style glob (:func:`fnmatch.fnmatchcase`) matched against the full module name.
        min_utilization: replaces the global ``min_utilization`` for matching modules (None: keep it).
        min_effective_rank: replaces the global ``min_effective_rank`` (None: keep it).
        max_drop: replaces the global ``max_drop`` (None: keep it).
        skip: exclude matching modules from every gate, the collapsed fraction included.
    """

    pattern: str
    min_utilization: float | None = None
    min_effective_rank: float | None = None
    max_drop: float | None = None
    skip: bool = False

    @classmethod
    def from_mapping(cls, data: Any, where: str = "override") -> "Override":
        """Validate one override table.

        Args:
            data: the table (a dict with ``pattern`` and any of :data:`OVERRIDE_KEYS`).
            where: prefix of error messages (file and position of the table).

        Raises:
            UsageError: not a table, no ``pattern``, an unknown key or a bad value.
        """
        if isinstance(data, Override):
            return data
        if not isinstance(data, Mapping):
            raise UsageError(f"{where}: an override must be a table with a 'pattern', got {data!r}")
        unknown = sorted(set(data) - set(OVERRIDE_KEYS) - {"pattern"})
        if unknown:
            hint = " (max_collapsed_fraction is checkpoint-wide)" if "max_collapsed_fraction" in unknown else ""
            raise UsageError(
                f"{where}: unknown key {unknown[0]!r}{hint}; an override takes pattern, {', '.join(OVERRIDE_KEYS)}"
            )
        pattern = data.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise UsageError(f"{where}: pattern must be a non-empty glob string, got {pattern!r}")
        return cls(
            pattern=pattern,
            min_utilization=_check_fraction("min_utilization", data.get("min_utilization"), where),
            min_effective_rank=_check_nonneg("min_effective_rank", data.get("min_effective_rank"), where),
            max_drop=_check_fraction("max_drop", data.get("max_drop"), where),
            skip=_check_bool("skip", data.get("skip", False), where),
        )


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """Every setting of the gates, validated.

    Attributes:
        min_utilization: per module, ``utilization >= min_utilization`` (None: gate off).
        min_effective_rank: per module, ``effective_rank >= min_effective_rank`` (None: gate off).
        max_collapsed_fraction: per checkpoint, the share of gated modules that are ``collapsed`` or
            ``zero`` must be ``<=`` this (None: gate off).
        baseline: path of a baseline analysis JSON (None: no regression gate).
        max_drop: per module, the relative drop ``(baseline - current) / baseline`` of ``metric`` must
            be ``<=`` this.
        metric: the layer-record metric the regression gate compares (one of :data:`GATED_METRICS`).
        fail_on_missing: a baseline module absent from the checkpoint fails (else it is a note).
        fail_on_new: a checkpoint module absent from the baseline fails (else it is a note).
        collapse_threshold: passed to :func:`~nora_spectra.analysis.analyze` (what ``collapsed`` means).
        adapter: adapter sub-directory name passed to the reader.
        overrides: per-module overrides, first match wins.
    """

    min_utilization: float | None = None
    min_effective_rank: float | None = None
    max_collapsed_fraction: float | None = None
    baseline: str | None = None
    max_drop: float = 0.05
    metric: str = "effective_rank"
    fail_on_missing: bool = True
    fail_on_new: bool = False
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD
    adapter: str | None = None
    overrides: tuple[Override, ...] = ()

    def __post_init__(self) -> None:
        self.validate("settings")

    def validate(self, where: str) -> None:
        """Check every value; ``where`` (a file name, "settings") starts any error message.

        Raises:
            UsageError: naming ``where`` and the offending key.
        """
        _check_fraction("min_utilization", self.min_utilization, where)
        _check_nonneg("min_effective_rank", self.min_effective_rank, where)
        _check_fraction("max_collapsed_fraction", self.max_collapsed_fraction, where)
        _check_fraction("max_drop", self.max_drop, where, optional=False)
        _check_fraction("collapse_threshold", self.collapse_threshold, where, optional=False)
        _check_bool("fail_on_missing", self.fail_on_missing, where)
        _check_bool("fail_on_new", self.fail_on_new, where)
        if self.metric not in GATED_METRICS:
            raise UsageError(f"{where}: metric must be one of {', '.join(GATED_METRICS)}, got {self.metric!r}")
        for name in ("baseline", "adapter"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or "\0" in value):
                raise UsageError(f"{where}: {name} must be a non-empty string (without NUL), got {value!r}")
        for item in self.overrides:
            if not isinstance(item, Override):
                raise UsageError(f"{where}: overrides must be Override objects or tables, got {item!r}")

    def override_for(self, module: str) -> Override | None:
        """The first override whose glob matches ``module``, or None."""
        from fnmatch import fnmatchcase

        return next((o for o in self.overrides if fnmatchcase(module, o.pattern)), None)

    @property
    def has_gates(self) -> bool:
        """Whether any gate is configured (an absolute threshold or a baseline)."""
        return (
            any(
                value is not None
                for value in (self.min_utilization, self.min_effective_rank, self.max_collapsed_fraction, self.baseline)
            )
            or any(o.min_utilization is not None or o.min_effective_rank is not None for o in self.overrides)
        )


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed file (:func:`nora_core.parsing.read_toml`: UTF-8, depth and number limits)."""
    try:
        return read_toml(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except ParseError as exc:
        raise UsageError(str(exc)) from None


def _parse_table(table: Any, path: Path, prefix: str) -> dict[str, Any]:
    """Validate a settings table; return only the keys it sets (baseline made relative to ``path``)."""
    where = f"{path}: {prefix}" if prefix else f"{path}:"
    if not isinstance(table, Mapping):
        raise UsageError(f"{where.rstrip(':')} must be a table")
    unknown = sorted(set(table) - set(SETTING_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown key {prefix}{unknown[0]!r}; known keys: {', '.join(SETTING_KEYS)}")
    values = dict(table)
    if "overrides" in values:
        raw = values["overrides"]
        if not isinstance(raw, list):
            raise UsageError(f"{path}: {prefix}overrides must be an array of tables ([[...overrides]])")
        values["overrides"] = tuple(
            Override.from_mapping(item, f"{path}: {prefix}overrides[{i}]") for i, item in enumerate(raw)
        )
    if isinstance(values.get("baseline"), str) and values["baseline"]:
        values["baseline"] = os.fspath(path.parent / values["baseline"])
    # Validate the keys set here on top of the defaults, so the message names this file and key.
    for key, value in values.items():
        if key == "overrides":
            continue
        try:
            CheckSettings(**{key: value})
        except UsageError as exc:
            raise UsageError(f"{path}: {prefix}{str(exc).removeprefix('settings: ')}") from None
        except TypeError:  # pragma: no cover - keys are checked above
            raise UsageError(f"{path}: bad key {prefix}{key!r}") from None
    return values


def find_pyproject(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The first ``pyproject.toml`` in ``start`` (default: the cwd) or one of its parents, or None."""
    here = Path(start if start is not None else os.getcwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_pyproject(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The keys set in ``[tool.spectra.check]`` of a ``pyproject.toml`` ({} when there is no such table).

    Raises:
        UsageError: invalid TOML, an unknown key or a bad value (naming the file and key).
    """
    path = Path(path)
    data = _read_toml(path)
    table: Any = data
    for part, name in (("tool", "tool"), ("spectra", "tool.spectra"), ("check", "tool.spectra.check")):
        if not isinstance(table, Mapping) or part not in table:
            return {}
        table = table[part]
        if not isinstance(table, Mapping):
            raise UsageError(f"{path}: {name} must be a table, got {type_name(table)}")
    return _parse_table(table, path, "tool.spectra.check.")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The keys set in a ``--config`` file: a ``[tool.spectra.check]`` table if present, else top level.

    Raises:
        UsageError: missing file, invalid TOML, an unknown key or a bad value (naming the file and key).
    """
    path = Path(path)
    data = _read_toml(path)
    tool = data.get("tool")
    if isinstance(tool, dict) and "spectra" in tool:
        spectra = tool["spectra"]
        if not isinstance(spectra, dict) or "check" not in spectra:
            raise UsageError(f"{path}: has [tool.spectra] but no [tool.spectra.check] table")
        return _parse_table(spectra["check"], path, "tool.spectra.check.")
    if "tool" in data and not isinstance(tool, dict):
        raise UsageError(f"{path}: tool must be a table, got {type_name(tool)}")
    return _parse_table(data, path, "")


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    use_pyproject: bool = True,
) -> CheckSettings:
    """Merge defaults < pyproject.toml < ``config`` < ``flags`` into one :class:`CheckSettings`.

    Args:
        flags: command-line values; keys whose value is None are treated as not given.
        config: a ``--config`` file, or None.
        cwd: where the search for ``pyproject.toml`` starts (default: the current directory).
        use_pyproject: set False to ignore ``pyproject.toml``.

    Returns:
        The validated settings.

    Raises:
        UsageError: a bad config file or a bad flag value.
    """
    merged: dict[str, Any] = {}
    if use_pyproject:
        pyproject = find_pyproject(cwd)
        if pyproject is not None:
            merged.update(load_pyproject(pyproject))
    if config is not None:
        merged.update(load_config_file(config))
    for key, value in (flags or {}).items():
        if key not in SETTING_KEYS or key == "overrides":
            raise UsageError(f"unknown setting {key!r}")
        if value is not None:
            try:
                CheckSettings(**{key: value})
            except UsageError as exc:
                option = "--" + key.replace("_", "-")
                raise UsageError(f"{option}: {str(exc).removeprefix('settings: ')}") from None
            merged[key] = value
    return CheckSettings(**merged)


def parse_overrides(items: Sequence[Any]) -> tuple[Override, ...]:
    """Validate a list of :class:`Override` objects or override mappings (library use).

    Raises:
        UsageError: an item is not a valid override (its position is named).
    """
    return tuple(Override.from_mapping(item, f"overrides[{i}]") for i, item in enumerate(items))
