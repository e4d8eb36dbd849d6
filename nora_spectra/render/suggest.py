"""Renderings of a :class:`~nora_spectra.suggest.Suggestion`: terminal table, JSON, Markdown, notebook fragment.

Formatting only: every number comes from the suggestion's rows, config fragment and thresholds.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from nora_spectra._text import name_list
from nora_spectra.errors import UsageError
from nora_spectra.render._cells import markdown_table

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.suggest import Suggestion

__all__ = ["SUGGEST_FORMATS", "format_suggestion", "suggestion_html"]

SUGGEST_FORMATS = ("table", "json", "markdown")


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _headers(s: "Suggestion") -> list[str]:
    return ["module", "r", f"k@{s.energy:g}", "saturated", "collapsed", "suggested r", "predicted util"]


def _rows(s: "Suggestion") -> list[list[str]]:
    return [
        [row["module"], str(row["rank"]), "-" if row["energy_rank"] is None else str(row["energy_rank"]),
         "yes" if row["saturated"] else "", "yes" if row["collapsed"] else "",
         "-" if row["suggested_rank"] is None else str(row["suggested_rank"]), _num(row["predicted_utilization"], 3)]
        for row in s.modules
    ]


def _evidence(s: "Suggestion") -> list[str]:
    lines = []
    if s.uniform_r is None:
        lines.append("no module has a spectrum to suggest from")
    else:
        patterns = len(s.lora_config.get("rank_pattern", {}))
        lines.append(f"recommended: r = {s.uniform_r} (covers {s.coverage:.0%} of the modules); "
                     f"rank_pattern: {patterns} key{'' if patterns == 1 else 's'}")
    threshold = s.analysis.collapse_threshold
    lines.append(f"saturated (k@{s.energy:g} >= 90% of ceil({s.energy:g} r)): {len(s.saturated)}"
                 + (f": {name_list(s.saturated, 5)}" if s.saturated else ""))
    lines.append(f"collapsed (utilization < {threshold:g}, or zero): {len(s.collapsed)}"
                 + (f": {name_list(s.collapsed, 5)}" if s.collapsed else ""))
    lines += [f"note: {note}" for note in s.notes]
    return lines


def _table(s: "Suggestion") -> str:
    from nora_spectra.render.table import format_grid

    headers = _headers(s)
    grid = format_grid(headers, _rows(s), [False] + [True] * (len(headers) - 1))
    parts = [f"{s.checkpoint}  (energy {s.energy:g}, coverage {s.coverage:g})", grid, "\n".join(_evidence(s))]
    if s.lora_config:
        parts.append("PEFT LoraConfig fragment (JSON):\n" + s.lora_config_json())
    if s.check:
        parts.append("spectra check thresholds (pyproject.toml):\n" + s.check_toml().rstrip())
    return "\n\n".join(parts) + "\n"


def _markdown(s: "Suggestion") -> str:
    rows = [[f"`{r[0]}`", *r[1:]] for r in _rows(s)]
    parts = [f"## Suggested ranks: `{s.checkpoint}`", "\n".join(f"- {line}" for line in _evidence(s)),
             markdown_table(_headers(s), rows)]
    if s.lora_config:
        parts.append("PEFT `LoraConfig` fragment:\n\n```json\n" + s.lora_config_json() + "\n```")
    if s.check:
        parts.append("`spectra check` thresholds:\n\n```toml\n" + s.check_toml() + "```")
    return "\n\n".join(parts) + "\n"


def format_suggestion(s: "Suggestion", fmt: str = "table") -> str:
    """Render ``s`` as ``table``, ``json`` or ``markdown`` (newline-terminated).

    Raises:
        UsageError: an unknown format.
    """
    if fmt == "table":
        return _table(s)
    if fmt == "json":
        return json.dumps(s.to_dict(), indent=2, allow_nan=False) + "\n"
    if fmt == "markdown":
        return _markdown(s)
    raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(SUGGEST_FORMATS)}")


def suggestion_html(s: "Suggestion") -> str:
    """An HTML fragment for Jupyter: the evidence, the module table, the config fragment and thresholds."""
    from nora_spectra.render.html import CSS, _e, _table as html_table, _td

    keys = ("rank", "energy_rank", "saturated", "collapsed", "suggested_rank", "predicted_utilization")
    body = []
    for row, cells in zip(s.modules, _rows(s)):
        tds = [_td(cells[0], numeric=False)] + [_td(text, key=key, value=row[key]) for text, key in zip(cells[1:], keys)]
        body.append(f'<tr data-module="{_e(row["module"])}">{"".join(tds)}</tr>')
    table = html_table([(h, i > 0) for i, h in enumerate(_headers(s))], body, "suggest")
    evidence = "<br>".join(_e(line) for line in _evidence(s))
    config = f"<pre>{_e(s.lora_config_json())}</pre>" if s.lora_config else ""
    check = f"<pre>{_e(s.check_toml())}</pre>" if s.check else ""
    return f'<div class="ns"><style>{CSS}</style><p><b><code>{_e(s.checkpoint)}</code></b><br>{evidence}</p>{config}{check}{table}</div>'
