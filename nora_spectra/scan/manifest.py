"""A scan's manifest: the adapters to analyse, with optional metadata columns, as CSV or JSONL.

* CSV (``.csv``): a header row with a ``path`` column; every other column is metadata (text; an empty
  cell is null).
* JSONL (``.jsonl``, ``.ndjson``): one JSON object per line with a ``path`` string; every other key is
  metadata, a string, number, boolean or null (one type per column; integers and floats mix).

Relative paths are relative to the manifest's directory. Metadata columns are carried into
``adapters.parquet`` after its own columns; ``base_model`` replaces the base model read from the
adapter's config. A column named like another column of ``adapters.parquet`` is refused, and so is a
path listed twice. Entries are taken as given (not sniffed): one that does not exist or is not an
adapter becomes a row with status ``error``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any

from nora_core.parsing import ParseError, parse_json
from nora_spectra.errors import UsageError
from nora_spectra.schema import SCAN_ADAPTER_COLUMNS

__all__ = ["MANIFEST_SUFFIXES", "ManifestEntry", "read_manifest"]

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")

#: the manifest columns that may share a name with a column of ``adapters.parquet``.
_SHARED = {"path", "base_model"}

#: at most this many entries (a bound on the work one input file causes).
MAX_ENTRIES = 10_000_000


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One line of a manifest: an absolute path and its metadata (column -> value)."""

    path: str
    metadata: dict[str, Any]
    line: int


def _check_columns(manifest: str, names: list[str], line: int) -> None:
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{manifest}: line {line}: empty column name")
        if name in SCAN_ADAPTER_COLUMNS and name not in _SHARED:
            raise UsageError(
                f"{manifest}: line {line}: column {name!r} clashes with a column of adapters.parquet; rename it"
            )


def _csv_rows(manifest: str, handle: Any) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        raise UsageError(f"{manifest}: empty manifest (expected a header row with a 'path' column)") from None
    if "path" not in header:
        raise UsageError(f"{manifest}: line 1: no 'path' column in the header ({', '.join(header) or 'empty'})")
    if len(set(header)) != len(header):
        raise UsageError(f"{manifest}: line 1: a column name appears twice")
    _check_columns(manifest, header, 1)
    rows = []
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise UsageError(f"{manifest}: line {reader.line_num}: {len(cells)} cells for {len(header)} columns")
        rows.append((reader.line_num, {name: (cell if cell != "" else None) for name, cell in zip(header, cells)}))
    return rows


def _jsonl_rows(manifest: str, handle: Any) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            obj = parse_json(text, manifest)  # bounded: depth, integer digits, finite numbers
        except ParseError as exc:
            raise UsageError(f"{manifest}: line {number}: not JSON ({exc.problem})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{manifest}: line {number}: expected a JSON object with a 'path'")
        _check_columns(manifest, list(obj), number)
        for name, value in obj.items():
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise UsageError(f"{manifest}: line {number}: {name!r} must be a string, number, boolean or null")
        rows.append((number, obj))
    return rows


def _check_types(manifest: str, rows: list[tuple[int, dict[str, Any]]]) -> None:
    kinds: dict[str, tuple[str, int]] = {}
    for number, row in rows:
        for name, value in row.items():
            if value is None or name == "path":
                continue
            kind = "bool" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else "str"
            first = kinds.setdefault(name, (kind, number))
            if first[0] != kind:
                raise UsageError(
                    f"{manifest}: line {number}: {name!r} is a {kind} here but a {first[0]} on line {first[1]}"
                )


def read_manifest(path: "str | os.PathLike[str]") -> list[ManifestEntry]:
    """The entries of a manifest file, in file order.

    Raises:
        UsageError: the file is missing or unreadable, of another suffix, without a ``path`` column,
            malformed (the message names the line), with a clashing column, or lists a path twice.
    """
    manifest = os.fspath(path)
    suffix = os.path.splitext(manifest)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise UsageError(f"{manifest}: a manifest must be a .csv or .jsonl file")
    try:
        with open(manifest, encoding="utf-8-sig", newline="") as handle:
            rows = _csv_rows(manifest, handle) if suffix == ".csv" else _jsonl_rows(manifest, handle)
    except FileNotFoundError:
        raise UsageError(f"{manifest}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{manifest}: cannot read the manifest ({exc})") from None
    if len(rows) > MAX_ENTRIES:
        raise UsageError(f"{manifest}: more than {MAX_ENTRIES} entries; split the manifest")
    _check_types(manifest, rows)
    base = os.path.dirname(os.path.abspath(manifest))
    entries: list[ManifestEntry] = []
    lines: dict[str, int] = {}
    for number, row in rows:
        value = row.get("path")
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{manifest}: line {number}: 'path' must be a non-empty string")
        full = os.path.abspath(os.path.join(base, os.path.expanduser(value)))
        if full in lines:
            raise UsageError(f"{manifest}: line {number}: {value} is listed twice (also on line {lines[full]})")
        lines[full] = number
        entries.append(ManifestEntry(full, {k: v for k, v in row.items() if k != "path"}, number))
    if not entries:
        raise UsageError(f"{manifest}: lists no adapter")
    return entries
