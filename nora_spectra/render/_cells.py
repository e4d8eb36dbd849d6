"""Cell formatting shared by the renderers (terminal table, CSV, Markdown, HTML): formatting only, no maths."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from nora_spectra.schema import to_jsonable

__all__ = [
    "BASE_AWARE_COLUMNS",
    "COLUMN_SETS",
    "NUMERIC_KEYS",
    "Column",
    "cell",
    "csv_cell",
    "layer_columns",
    "layer_rows",
    "markdown_table",
    "signed",
]

#: (record key, header, formatter)
Column = tuple[str, str, Callable[[Any], str]]


def _int(value: Any) -> str:
    return "-" if value is None else str(int(value))


def _fixed(digits: int) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{float(value):.{digits}f}"

    return fmt


def _sig(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4g}"


def _shape(value: Any) -> str:
    return "-" if not value else "x".join(str(int(n)) for n in value)


def _flag(value: Any) -> str:
    return "yes" if value is True else ""


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


#: column sets by view name: ``full`` (every scalar metric) and ``effective_rank`` (the focus view).
COLUMN_SETS: dict[str, tuple[Column, ...]] = {
    "full": (
        ("module", "module", _text),
        ("kind", "kind", _text),
        ("rank", "r", _int),
        ("shape", "shape", _shape),
        ("effective_rank", "erank", _fixed(2)),
        ("utilization", "util", _fixed(3)),
        ("stable_rank", "stable", _fixed(2)),
        ("energy_rank_90", "e90", _int),
        ("energy_rank_99", "e99", _int),
        ("numerical_rank", "nrank", _int),
        ("spectral_entropy", "entropy", _fixed(3)),
        ("tail_energy", "tail", _fixed(4)),
        ("sigma_max", "sigma_max", _sig),
        ("collapsed", "collapsed", _flag),
        ("status", "status", _text),
    ),
    "effective_rank": (
        ("module", "module", _text),
        ("rank", "r", _int),
        ("effective_rank", "effective_rank", _fixed(2)),
        ("utilization", "utilization", _fixed(3)),
        ("collapsed", "collapsed", _flag),
        ("status", "status", _text),
    ),
}

#: columns added to a view when the records carry them (base-aware analyses, truncated spectra).
BASE_AWARE_COLUMNS: tuple[Column, ...] = (
    ("captured_energy", "captured", _fixed(3)),
    ("relative_sigma_max", "rel_2", _sig),
    ("relative_frobenius_norm", "rel_F", _sig),
    ("intruders", "intruders", _int),
)

#: columns whose cells are right-aligned in the terminal table.
NUMERIC_KEYS = frozenset(
    {"rank", "effective_rank", "utilization", "stable_rank", "energy_rank_90", "energy_rank_99",
     "numerical_rank", "spectral_entropy", "tail_energy", "sigma_max", "captured_energy", "relative_sigma_max",
     "relative_frobenius_norm", "intruders"}
)


def layer_columns(view: str, records: Sequence[dict[str, Any]]) -> tuple[Column, ...]:
    """The columns of ``view`` (``full`` or ``effective_rank``), before ``status``: those of
    :data:`BASE_AWARE_COLUMNS` the records carry."""
    columns = COLUMN_SETS[view]
    extra = tuple(col for col in BASE_AWARE_COLUMNS if records and col[0] in records[0])
    if not extra:
        return columns
    return columns[:-1] + extra + columns[-1:]


def cell(value: Any, digits: int = 3) -> str:
    """Format a summary number: None -> ``-``, ints as is, floats with ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{digits}f}"


def layer_rows(records: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[list[str]]:
    """Format each record into one row of strings, one cell per column."""
    return [[fmt(rec.get(key)) for key, _, fmt in columns] for rec in records]


def signed(value: Any, digits: int) -> str:
    """A difference with its sign (``+0.125``), or ``""`` when it is undefined."""
    return "" if value is None else f"{float(value):+.{digits}f}"


def csv_cell(value: Any) -> str:
    """One CSV cell: empty for None, ``true``/``false``, floats by ``repr`` (they read back bit-exactly),
    lists as compact JSON arrays."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(to_jsonable(value), allow_nan=False, separators=(",", ":"))
    return str(value)


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table of already-formatted cells (``|`` escaped, newlines flattened)."""
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)
