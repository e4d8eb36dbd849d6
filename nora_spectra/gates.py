"""The CI gate's decisions: ``check(paths, ...) -> CheckResult``, a list of :class:`GateOutcome`.

Every number a gate compares comes from the layer records of an
:class:`~nora_spectra.analysis.Analysis` (the same records ``spectra analyze`` prints); nothing here
computes a spectrum or a metric. Gates, per checkpoint:

==========================  ==========  ==================================================================
gate                        scope       fails when
==========================  ==========  ==================================================================
``finite``                  module      the layer's status is ``non_finite`` (NaN/Inf factors); always on
``min_utilization``         module      ``utilization < limit`` (``zero`` layers have utilization 0)
``min_effective_rank``      module      ``effective_rank < limit``
``max_drop``                module      ``(baseline - current) / baseline > limit`` for ``metric``
``missing_module``          module      a baseline module is absent (only with ``fail_on_missing``)
``new_module``              module      a module is absent from the baseline (only with ``fail_on_new``)
``max_collapsed_fraction``  checkpoint  the share of gated modules ``collapsed`` or ``zero`` ``> limit``
==========================  ==========  ==================================================================

A value equal to its limit passes. A ``non_finite`` layer gets one failing ``finite`` outcome and no
other per-module outcome (its metrics are undefined). Missing or new modules that do not fail are
reported in :attr:`CheckResult.notes`. Baseline files are read and paired by :mod:`nora_spectra.baseline`;
settings come from :mod:`nora_spectra.check_config`; rendering lives in :mod:`nora_spectra.render.check_report`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping, Sequence, Union

from nora_spectra._text import name_list
from nora_spectra.analysis import analyze
from nora_spectra.baseline import load_baseline, match_baseline
from nora_spectra.check_config import CheckSettings, Override, parse_overrides
from nora_spectra.errors import UsageError
from nora_spectra.result import Analysis
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD

__all__ = [
    "CHECKPOINT_SCOPE",
    "GATES",
    "CheckResult",
    "GateOutcome",
    "analyze_paths",
    "check",
    "evaluate",
]

#: every gate name, in report order.
GATES: tuple[str, ...] = (
    "finite",
    "min_utilization",
    "min_effective_rank",
    "max_drop",
    "missing_module",
    "new_module",
    "max_collapsed_fraction",
)

#: the ``module`` of a checkpoint-wide outcome.
CHECKPOINT_SCOPE = "(all modules)"

PathOrAnalysis = Union[str, "os.PathLike[str]", Analysis]


@dataclasses.dataclass(frozen=True)
class GateOutcome:
    """One gate applied to one module (or to a whole checkpoint).

    Attributes:
        checkpoint: the checkpoint path, as analysed.
        module: the module name, or :data:`CHECKPOINT_SCOPE` for a checkpoint-wide gate.
        gate: one of :data:`GATES`.
        value: the compared number (``max_drop``: the relative drop), None when undefined.
        limit: the threshold it was compared with, None when the gate has none.
        passed: whether the gate passed.
        message: a self-contained sentence naming the module, value, limit and by how much it missed.
    """

    checkpoint: str
    module: str
    gate: str
    value: float | None
    limit: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The outcome as a JSON-ready dict (field names as attributes)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CheckResult:
    """Every gate outcome of a check, and notes that do not fail it.

    Attributes:
        checkpoints: the checked checkpoint paths, in order (one JUnit test suite each).
        outcomes: every :class:`GateOutcome`, grouped by checkpoint in ``checkpoints`` order.
        notes: ``(checkpoint, message)`` pairs worth reading that do not fail the check (new or missing
            modules that are allowed, skipped modules, analysis warnings).
        settings: the settings the gates ran with.
    """

    checkpoints: list[str]
    outcomes: list[GateOutcome]
    notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    settings: CheckSettings = dataclasses.field(default_factory=CheckSettings)

    @property
    def passed(self) -> bool:
        """True when no outcome failed."""
        return all(o.passed for o in self.outcomes)

    @property
    def failures(self) -> list[GateOutcome]:
        """The failed outcomes, in order."""
        return [o for o in self.outcomes if not o.passed]

    def for_checkpoint(self, checkpoint: str) -> list[GateOutcome]:
        """The outcomes of one checkpoint, in order."""
        return [o for o in self.outcomes if o.checkpoint == checkpoint]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``passed``, counts, ``checkpoints``, ``outcomes``, ``notes`` and ``settings``."""
        settings = dataclasses.asdict(self.settings)
        return {
            "passed": self.passed,
            "gates": len(self.outcomes),
            "failed": len(self.failures),
            "checkpoints": list(self.checkpoints),
            "outcomes": [o.to_dict() for o in self.outcomes],
            "notes": [{"checkpoint": c, "message": m} for c, m in self.notes],
            "settings": settings,
        }


# --------------------------------------------------------------------------------------------------
# number formatting for messages


def _num(x: float) -> str:
    return f"{x:.4g}"


def _pair(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` with just enough significant digits to tell them apart."""
    for digits in range(4, 18):
        a, b = f"{value:.{digits}g}", f"{limit:.{digits}g}"
        if a != b or value == limit:
            return a, b
    return repr(value), repr(limit)  # pragma: no cover - unequal floats differ at 17 digits


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


# --------------------------------------------------------------------------------------------------
# gates


def _limit(settings: CheckSettings, override: Override | None, key: str) -> tuple[float | None, str]:
    """The threshold ``key`` for a module and, when an override set it, `` (override PATTERN)``."""
    if override is not None and getattr(override, key) is not None:
        return getattr(override, key), f" (override {override.pattern})"
    return getattr(settings, key), ""


class _Gates:
    """Appends the outcomes and notes of one checkpoint to a :class:`CheckResult` (used by :func:`evaluate`)."""

    def __init__(self, analysis: Analysis, settings: CheckSettings, result: CheckResult) -> None:
        self.analysis = analysis
        self.settings = settings
        self.result = result

    def add(self, module: str, gate: str, value: float | None, limit: float | None, passed: bool, message: str) -> None:
        outcome = GateOutcome(self.analysis.checkpoint, module, gate, value, limit, passed, message)
        self.result.outcomes.append(outcome)

    def note(self, message: str) -> None:
        self.result.notes.append((self.analysis.checkpoint, message))

    def minimum(self, rec: Mapping[str, Any], gate: str, field: str, override: Override | None) -> None:
        """A ``record[field] >= limit`` gate (skipped when no limit is set)."""
        limit, source = _limit(self.settings, override, gate)
        if limit is None:
            return
        module, value = rec["module"], float(rec[field])
        shown, bound = _pair(value, limit)
        if value >= limit:
            self.add(module, gate, value, limit, True, f"{module}: {field} {shown} >= {gate} {bound}{source}")
            return
        miss = limit - value
        share = f", {_pct(miss / limit)} short" if limit > 0 else ""
        zero = " (all-zero update)" if rec.get("status") == "zero" else ""
        message = f"{module}: {field} {shown} is below {gate} {bound}{source} by {_num(miss)}{share}{zero}"
        self.add(module, gate, value, limit, False, message)

    def drop(self, rec: Mapping[str, Any], base: Mapping[str, Any], override: Override | None) -> None:
        """The regression gate: relative drop of ``settings.metric`` from the baseline record."""
        metric, module = self.settings.metric, rec["module"]
        limit, source = _limit(self.settings, override, "max_drop")
        if base.get(metric) is None:
            self.note(f"{module}: no baseline {metric} (baseline status {base.get('status')}); drop not checked")
            return
        old, new = float(base[metric]), float(rec[metric])
        if old <= 0:
            self.add(module, "max_drop", 0.0, limit, True, f"{module}: baseline {metric} is {_num(old)}; cannot drop")
            return
        drop = (old - new) / old
        if drop <= limit:
            moved = f"dropped {_pct(drop)}" if drop > 0 else f"rose {_pct(-drop)}"
            message = f"{module}: {metric} {_num(old)} -> {_num(new)} ({moved}, max_drop {_pct(limit)}{source})"
            self.add(module, "max_drop", drop, limit, True, message)
            return
        message = (
            f"{module}: {metric} dropped {_pct(drop)} from the baseline ({_num(old)} -> {_num(new)}), "
            f"more than max_drop {_pct(limit)}{source} by {100 * (drop - limit):.3g} percentage points"
        )
        self.add(module, "max_drop", drop, limit, False, message)

    def baseline_membership(self, baseline: Analysis) -> None:
        """Modules of the baseline absent from the checkpoint (not skipped): fail or note."""
        present = {r["module"] for r in self.analysis.records}
        for rec in baseline.records:
            module = rec["module"]
            override = self.settings.override_for(module)
            if module in present or (override is not None and override.skip):
                continue
            if self.settings.fail_on_missing:
                message = f"{module}: in the baseline but missing from this checkpoint"
                self.add(module, "missing_module", None, None, False, message)
            else:
                self.note(f"{module}: in the baseline but missing from this checkpoint (allowed)")

    def collapsed(self, records: Sequence[Mapping[str, Any]], limit: float) -> None:
        """Checkpoint-wide: the share of gated modules that are ``collapsed`` (or ``zero``) must be <= limit."""
        names = [r["module"] for r in records if r.get("collapsed") or r.get("status") == "zero"]
        fraction = len(names) / len(records) if records else 0.0
        shown, bound = _pair(fraction, limit)
        head = f"{len(names)} of {len(records)} modules collapsed ({shown})"
        gate = "max_collapsed_fraction"
        if fraction <= limit:
            self.add(CHECKPOINT_SCOPE, gate, fraction, limit, True, f"{head} <= {gate} {bound}")
            return
        listed = name_list(names, 5)
        message = f"{head} is above {gate} {bound} by {_num(fraction - limit)}: {listed}"
        self.add(CHECKPOINT_SCOPE, gate, fraction, limit, False, message)

    def run(self, baseline: Analysis | None) -> None:
        """Every gate of the checkpoint: per module in :data:`GATES` order, then missing modules and
        the collapsed fraction."""
        settings = self.settings
        base_records = {r["module"]: r for r in baseline.records} if baseline is not None else {}
        gated = []
        for rec in self.analysis.records:
            module = rec["module"]
            override = settings.override_for(module)
            if override is not None and override.skip:
                self.note(f"{module}: skipped by override {override.pattern}")
                continue
            gated.append(rec)
            if rec.get("status") == "non_finite":
                message = f"{module}: adapter factors hold NaN/Inf; its metrics are undefined and it fails every gate"
                self.add(module, "finite", None, None, False, message)
                continue
            self.minimum(rec, "min_utilization", "utilization", override)
            self.minimum(rec, "min_effective_rank", "effective_rank", override)
            if baseline is None:
                continue
            if module in base_records:
                self.drop(rec, base_records[module], override)
            elif settings.fail_on_new:
                self.add(module, "new_module", None, None, False, f"{module}: not in the baseline (new module)")
            else:
                self.note(f"{module}: not in the baseline (new module, not gated)")
        if baseline is not None:
            self.baseline_membership(baseline)
        if settings.max_collapsed_fraction is not None:
            self.collapsed(gated, settings.max_collapsed_fraction)


def evaluate(
    analyses: Sequence[Analysis],
    settings: CheckSettings,
    baselines: Sequence[Analysis] | None = None,
) -> CheckResult:
    """Apply the gates of ``settings`` to analyses (a pure function of the records).

    Args:
        analyses: one Analysis per checkpoint.
        settings: thresholds and overrides.
        baselines: baseline analyses (matched by :func:`match_baseline`), or None for no regression gate.

    Returns:
        The :class:`CheckResult`; analysis warnings become notes.

    Raises:
        UsageError: a checkpoint has no baseline entry.
    """
    result = CheckResult(checkpoints=[a.checkpoint for a in analyses], outcomes=[], settings=settings)
    paired = match_baseline(analyses, baselines, result.notes) if baselines else [None] * len(analyses)
    for analysis, baseline in zip(analyses, paired):
        gates = _Gates(analysis, settings, result)
        for message in analysis.warnings:
            gates.note(message)
        gates.run(baseline)
    return result


def check(
    paths: PathOrAnalysis | Iterable[PathOrAnalysis],
    *,
    min_utilization: float | None = None,
    min_effective_rank: float | None = None,
    max_collapsed_fraction: float | None = None,
    baseline: str | os.PathLike[str] | Analysis | Sequence[Analysis] | None = None,
    max_drop: float = 0.05,
    metric: str = "effective_rank",
    overrides: Sequence[Override | Mapping[str, Any]] = (),
    fail_on_missing: bool = True,
    fail_on_new: bool = False,
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
    adapter: str | None = None,
    settings: CheckSettings | None = None,
) -> CheckResult:
    """Analyse checkpoints and apply rank-utilization gates to every module.

    Args:
        paths: one checkpoint (path or :class:`Analysis`) or several.
        min_utilization: per-module floor on ``utilization = effective_rank / r``, in [0, 1].
        min_effective_rank: per-module floor on ``effective_rank``.
        max_collapsed_fraction: per-checkpoint ceiling on the share of modules ``collapsed`` or ``zero``.
        baseline: a baseline JSON path (``spectra analyze --format json`` output), or Analysis objects.
        max_drop: largest allowed relative drop ``(baseline - current) / baseline`` of ``metric``.
        metric: the record field the regression gate compares (default ``effective_rank``).
        overrides: per-module overrides (:class:`Override` or mappings with a glob ``pattern``).
        fail_on_missing: a module of the baseline that the checkpoint lacks fails the check.
        fail_on_new: a module of the checkpoint that the baseline lacks fails the check.
        collapse_threshold: what ``collapsed`` means when analysing paths (ignored for Analysis inputs).
        adapter: adapter sub-directory name for the reader.
        settings: a ready :class:`CheckSettings`; when given, every threshold argument above is ignored.

    Returns:
        A :class:`CheckResult`; ``result.passed`` is the verdict.

    Raises:
        UsageError: bad thresholds, no gate configured, or an unreadable baseline.
        CheckpointError: a checkpoint is missing or malformed.
    """
    if settings is None:
        settings = CheckSettings(
            min_utilization=min_utilization,
            min_effective_rank=min_effective_rank,
            max_collapsed_fraction=max_collapsed_fraction,
            baseline=None if baseline is None or not isinstance(baseline, (str, os.PathLike)) else os.fspath(baseline),
            max_drop=max_drop,
            metric=metric,
            overrides=parse_overrides(overrides),
            fail_on_missing=fail_on_missing,
            fail_on_new=fail_on_new,
            collapse_threshold=collapse_threshold,
            adapter=adapter,
        )
        baseline_given = baseline
    else:
        baseline_given = settings.baseline
    if not settings.has_gates and baseline_given is None:
        raise UsageError(
            "no gate configured: set min_utilization, min_effective_rank, max_collapsed_fraction or a baseline"
        )
    analyses = analyze_paths(paths, settings)
    if baseline_given is None:
        baselines = None
    elif isinstance(baseline_given, Analysis):
        baselines = [baseline_given]
    elif isinstance(baseline_given, (str, os.PathLike)):
        baselines = load_baseline(baseline_given)
    else:
        baselines = list(baseline_given)
    return evaluate(analyses, settings, baselines)


def analyze_paths(paths: PathOrAnalysis | Iterable[PathOrAnalysis], settings: CheckSettings) -> list[Analysis]:
    """Analyse each path (Analysis objects pass through) with the settings' adapter and collapse threshold."""
    items = [paths] if isinstance(paths, (str, os.PathLike, Analysis)) else list(paths)
    if not items:
        raise UsageError("no checkpoint to check")
    options = {"adapter": settings.adapter, "collapse_threshold": settings.collapse_threshold, "emit_warnings": False}
    return [item if isinstance(item, Analysis) else analyze(item, **options) for item in items]
