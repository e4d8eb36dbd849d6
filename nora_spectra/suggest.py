"""``suggest(source) -> Suggestion``: ranks for the next training run, from this run's spectra.

Every number comes from the analysis records (the singular values :func:`~nora_spectra.analysis.analyze`
stored) through the project's own functions: energy ranks from :func:`nora_spectra.metrics.energy_rank`,
effective ranks from :func:`nora_spectra.metrics.effective_rank`, energy curves from
:func:`nora_spectra.rank_policy.energy_curve`. The rules (also in ``docs/resize.md``):

* a module's **need** is its energy rank ``k@q`` (the smallest ``k`` keeping the share ``q`` of
  ``||dW||_F^2``; ``q = 0.9`` by default, the NoRA paper's "manifold dimensionality");
* it is **saturated** when ``k@q >= 0.9 * ceil(q r)``: ``ceil(q r)`` is the largest energy rank any
  spectrum of ``r`` values can have (a flat one), so such a module used its whole budget and the data
  cannot say how much more it would take; it is **collapsed** as ``spectra analyze`` says
  (utilization below the collapse threshold) or has an all-zero update;
* its **suggested rank** is the next power of two at or above its need, ``2 r`` when saturated (capped
  at ``min(d_out, d_in)``); zero and non-finite modules get none (consider dropping them);
* the **uniform r** is the smallest suggested rank that covers the share ``coverage`` (0.9) of the
  modules; ``rank_pattern`` lists the others (one key per module type when a whole type agrees);
* alphas keep every module's current scale (``alpha = s k``, rsLoRA ``s sqrt(k)``), so the learning
  dynamics per direction stay comparable; without a config (scale unknown) no alpha is suggested;
* ``spectra check`` thresholds: ``min_utilization`` is 80 % of the lowest predicted utilization
  (``effective_rank(sigma[:k]) / k`` at the suggested rank ``k``; the current utilization for saturated
  modules) over modules that are neither collapsed nor zero, rounded down to 0.05;
  ``max_collapsed_fraction`` is the current collapsed share rounded up to 0.05.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Mapping

from nora_core.jsonable import integral_number
from nora_spectra.analysis import analyze
from nora_spectra.check_config import CheckSettings
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.io.adapter_config import match_pattern
from nora_spectra.metrics import effective_rank, energy_rank
from nora_spectra.rank_policy import energy_curve
from nora_spectra.result import Analysis, read_analyses
from nora_spectra.schema import SUGGEST_COLUMNS, to_jsonable

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["SATURATION", "SUGGEST_COLUMNS", "Suggestion", "suggest"]

#: a module is saturated when its energy rank reaches this share of the largest possible, ceil(q r).
SATURATION = 0.9
#: ``min_utilization`` suggested: this share of the lowest predicted utilization.
UTILIZATION_MARGIN = 0.8
#: suggested thresholds are rounded to this step (down for minimums, up for maximums).
THRESHOLD_STEP = 0.05


@dataclasses.dataclass
class Suggestion:
    """Recommended ranks for the next run, with the evidence.

    Attributes:
        checkpoint: the analysed path.
        energy: the energy share ``q`` the needs are measured at.
        coverage: the share of modules the uniform ``r`` covers.
        modules: one dict per module, keys :data:`SUGGEST_COLUMNS` (``energy_curve``: kept share at
            ranks 1..n; ``suggested_rank`` None for zero or non-finite modules).
        uniform_r: the recommended uniform rank (None when no module has a spectrum).
        lora_config: the PEFT ``LoraConfig`` fragment: ``r``, ``lora_alpha`` (when the scale is known),
            ``use_rslora`` (when set), ``target_modules`` (the module types seen), ``rank_pattern``,
            ``alpha_pattern``.
        check: ``[tool.spectra.check]`` settings (keys of :data:`nora_spectra.check_config.SETTING_KEYS`).
        notes: how to read the suggestion (what was assumed, what is missing).
        analysis: the :class:`~nora_spectra.result.Analysis` it was derived from.
    """

    checkpoint: str
    energy: float
    coverage: float
    modules: list[dict[str, Any]]
    uniform_r: int | None
    lora_config: dict[str, Any]
    check: dict[str, Any]
    notes: list[str]
    analysis: Analysis

    def __repr__(self) -> str:
        return (
            f"Suggestion(checkpoint={self.checkpoint!r}, r={self.uniform_r}, rank_pattern="
            f"{len(self.lora_config.get('rank_pattern', {}))} keys, saturated={len(self.saturated)}, "
            f"collapsed={len(self.collapsed)})"
        )

    @property
    def saturated(self) -> list[str]:
        """Modules whose energy rank reached their budget."""
        return [row["module"] for row in self.modules if row["saturated"]]

    @property
    def collapsed(self) -> list[str]:
        """Modules that use little of their rank (collapsed) or have an all-zero update."""
        return [row["module"] for row in self.modules if row["collapsed"]]

    @property
    def table(self) -> "pd.DataFrame":
        """:attr:`modules` as a DataFrame, columns :data:`SUGGEST_COLUMNS` (pandas imported on first use)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.modules, columns=list(SUGGEST_COLUMNS))

    def lora_config_json(self, indent: int | None = 2) -> str:
        """The ``LoraConfig`` fragment as JSON (``LoraConfig(**json.loads(text), ...)``)."""
        return json.dumps(to_jsonable(self.lora_config), indent=indent, allow_nan=False)

    def check_toml(self) -> str:
        """The ``spectra check`` thresholds as a ``[tool.spectra.check]`` TOML table."""
        lines = ["[tool.spectra.check]"]
        for key, value in self.check.items():
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON form: ``checkpoint``, ``energy``, ``coverage``, ``uniform_r``, ``lora_config``,
        ``check``, ``saturated``, ``collapsed``, ``modules``, ``notes``."""
        return to_jsonable({
            "checkpoint": self.checkpoint,
            "energy": self.energy,
            "coverage": self.coverage,
            "uniform_r": self.uniform_r,
            "lora_config": self.lora_config,
            "check": self.check,
            "saturated": self.saturated,
            "collapsed": self.collapsed,
            "modules": self.modules,
            "notes": self.notes,
        })

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def plot_energy(self, **options: Any) -> "Figure":
        """The energy curves behind the suggestion (:func:`nora_spectra.plots.cumulative_energy`)."""
        from nora_spectra.plots import cumulative_energy

        return cumulative_energy(self.analysis, marks=(self.energy,), **options)

    def _repr_html_(self) -> str:
        from nora_spectra.render.suggest import suggestion_html

        return suggestion_html(self)


def _power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _floor_step(x: float) -> float:
    return round(math.floor(x / THRESHOLD_STEP + 1e-9) * THRESHOLD_STEP, 10)


def _ceil_step(x: float) -> float:
    return round(math.ceil(x / THRESHOLD_STEP - 1e-9) * THRESHOLD_STEP, 10)


def _patterns(values: Mapping[str, Any], default: Any, types: Mapping[str, str]) -> dict[str, Any]:
    """PEFT pattern keys for the modules whose value differs from ``default``.

    A module type whose every module has one value gets one key (the type name); other modules get
    their exact, regex-escaped name, placed first (PEFT takes the first matching key).
    """
    by_type: dict[str, set[Any]] = {}
    for module, value in values.items():
        by_type.setdefault(types[module], set()).add(value)
    exact, typed = {}, {}
    for module, value in values.items():
        kind = types[module]
        if len(by_type[kind]) == 1:
            if value != default:
                typed[re.escape(kind)] = value
        elif value != default:
            exact[re.escape(module)] = value
    for module, value in values.items():  # a type key must not catch another module of another value
        key = match_pattern(typed, module)
        if key is not None and typed[key] != value and re.escape(module) not in exact:
            exact[re.escape(module)] = value
    ordered = dict(sorted(exact.items(), key=lambda item: -item[0].count(".")))
    ordered.update(typed)
    for module, value in values.items():
        key = match_pattern(ordered, module)
        assert (default if key is None else ordered[key]) == value, module
    return ordered


def _load(source: Any, options: dict[str, Any]) -> Analysis:
    if isinstance(source, Analysis):
        return source
    path = os.fspath(source)
    if path.endswith(".json") and os.path.isfile(path):
        try:
            analyses = read_analyses(path)  # bounded and validated, as compare, report and check read them
        except (OSError, UsageError) as exc:
            raise CheckpointError(path, f"not a readable analysis JSON file ({exc})") from None
        if len(analyses) != 1:
            raise CheckpointError(path, f"holds {len(analyses)} analyses; suggest takes the analysis of one checkpoint")
        return analyses[0]
    options.setdefault("emit_warnings", False)
    return analyze(path, **options)


def suggest(
    source: "str | os.PathLike[str] | Analysis",
    *,
    energy: float = 0.9,
    coverage: float = 0.9,
    **analyze_options: Any,
) -> Suggestion:
    """Recommend a uniform ``r`` and a per-module ``rank_pattern`` for the next run (rules: module docstring).

    Args:
        source: a checkpoint, an analysis JSON file of one checkpoint (``spectra analyze --format json``),
            or an :class:`~nora_spectra.result.Analysis` (weight space).
        energy: the energy share ``q`` in (0, 1] a module's need is measured at.
        coverage: the share of modules, in (0, 1], that the uniform ``r`` must cover.
        **analyze_options: passed to :func:`~nora_spectra.analysis.analyze` for a checkpoint (``adapter``,
            ``format``, ``collapse_threshold``).

    Returns:
        The :class:`Suggestion`.

    Raises:
        UsageError: ``energy`` or ``coverage`` outside (0, 1], or an analysis of another space.
        CheckpointError: the checkpoint or JSON file is unreadable.
    """
    for name, value in (("energy", energy), ("coverage", coverage)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise UsageError(f"--{name} must be a share in (0, 1], got {value!r}")
    analysis = _load(source, dict(analyze_options))
    if analysis.space != "weight":
        raise UsageError(f"suggest needs weight-space spectra, got a {analysis.space}-space analysis")
    config = analysis.config or {}
    rslora = bool(config.get("use_rslora"))
    rows: list[dict[str, Any]] = []
    for rec in analysis.records:
        sigma = rec.get("singular_values")
        r = int(rec["rank"])
        row = {name: rec.get(name) for name in ("module", "module_type", "layer_index", "rank", "status")}
        row.update(energy_rank=None, energy_curve=None, saturated=False, suggested_rank=None,
                   predicted_utilization=None, collapsed=bool(rec.get("collapsed")) or rec["status"] == "zero")
        if sigma is not None and rec["status"] != "zero":
            need = energy_rank(sigma, energy)
            cap = min(rec["shape"])
            saturated = need >= SATURATION * math.ceil(energy * r)
            suggested = min(2 * r if saturated else _power_of_two(need), cap)
            predicted = rec["utilization"] if saturated else effective_rank(sigma[:suggested]) / suggested
            row.update(energy_rank=need, energy_curve=energy_curve(sigma), saturated=saturated,
                       suggested_rank=suggested, predicted_utilization=predicted)
        rows.append(row)
    ranked = sorted(row["suggested_rank"] for row in rows if row["suggested_rank"] is not None)
    notes: list[str] = []
    lora_config: dict[str, Any] = {}
    check: dict[str, Any] = {}
    uniform = None
    if ranked:
        uniform = ranked[max(0, math.ceil(coverage * len(ranked)) - 1)]
        chosen = {row["module"]: row for row in rows if row["suggested_rank"] is not None}
        types = {m: row["module_type"] for m, row in chosen.items()}
        ranks = {m: row["suggested_rank"] for m, row in chosen.items()}
        lora_config["r"] = uniform
        if analysis.config is not None:
            scales = {rec["module"]: float(rec["scale"]) for rec in analysis.records if rec["module"] in chosen}
            alphas = {m: integral_number(scales[m] * (math.sqrt(k) if rslora else k)) for m, k in ranks.items()}
            at_uniform = [alphas[m] for m in ranks if ranks[m] == uniform] or list(alphas.values())
            default_alpha = Counter(at_uniform).most_common(1)[0][0]
            lora_config["lora_alpha"] = default_alpha
            if rslora:
                lora_config["use_rslora"] = True
        else:
            notes.append("no adapter config: the scale is unknown, so no lora_alpha is suggested")
        lora_config["target_modules"] = sorted(set(types.values()))
        lora_config["rank_pattern"] = _patterns(ranks, uniform, types)
        if analysis.config is not None:
            lora_config["alpha_pattern"] = _patterns(alphas, default_alpha, types)
        predicted = [row["predicted_utilization"] for row in rows
                     if row["predicted_utilization"] is not None and not row["collapsed"]]
        if predicted:
            check["min_utilization"] = _floor_step(UTILIZATION_MARGIN * min(predicted))
        collapsed_share = sum(1 for row in rows if row["collapsed"]) / len(rows)
        check["max_collapsed_fraction"] = min(1.0, _ceil_step(collapsed_share))
        check["collapse_threshold"] = analysis.collapse_threshold
        CheckSettings(**check)  # the thresholds are valid spectra check settings
    skipped = [row["module"] for row in rows if row["suggested_rank"] is None]
    if skipped:
        notes.append(f"{len(skipped)} modules with an all-zero or non-finite update get no rank (consider "
                     "dropping them from target_modules)")
    if any(row["saturated"] for row in rows):
        notes.append("saturated modules used their whole rank: 2r is a guess, the spectra cannot show how much more "
                     "they would use")
    return Suggestion(checkpoint=analysis.display_name, energy=float(energy), coverage=float(coverage), modules=rows,
                      uniform_r=uniform, lora_config=lora_config, check=check, notes=notes, analysis=analysis)
