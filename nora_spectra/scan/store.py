"""A scan's output directory: settings, parts committed atomically, the final tables, ``load_scan``.

Layout of ``OUT_DIR``::

    scan.json                  the scan's settings (what --resume must match) and when it started
    parts/000001.layers.parquet    rows committed while the scan runs, one pair per part:
    parts/000001.adapters.parquet  the layers file first, then the adapters file (the commit marker)
    adapters.parquet, layers.parquet   the final tables, written when a run ends (parts then removed)
    adapters.csv, layers.csv   with --csv

**Atomicity.** Every file is written to a temporary name in its directory, fsynced and renamed into
place (:func:`nora_core.atomic.atomic_write`); the parts directory is fsynced between the layers file
and the adapters file, so an adapters part never exists without its layers part, even after a power
loss. A part whose adapters file is missing is not committed: it is deleted when the directory is
opened again, and its adapters are analysed again.

**Merging.** The scan's state is a sequence of segments: the final tables, then the committed parts
in order. An adapter's rows (its adapter row and its layer rows) come from the last segment that
holds its adapter row; so a killed scan, a resumed one, and a run killed between the two renames of
the final tables all read back with no duplicate and no lost row. :func:`read_tables` and
:func:`load_scan` apply this rule; the final tables are its result, restricted to the adapters of the
last run and sorted by path (layer rows keep the module order of the analysis).

Tables are built with pyarrow; column types come from the values (Python ints, floats, strings,
booleans and lists), and segments are concatenated with pyarrow's permissive type promotion, so a
column that is null in one part (every adapter failed) takes its type from the others. The column
lists come from :mod:`nora_spectra.schema`, never retyped here.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from nora_core.atomic import atomic_write, atomic_write_text, fsync_directory
from nora_core.parsing import ParseError, read_json
from nora_spectra._text import package_version
from nora_spectra.errors import UsageError
from nora_spectra.schema import SCAN_ADAPTER_COLUMNS, SCAN_LAYER_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pyarrow as pa

    from nora_spectra.scan.task import ItemResult

__all__ = [
    "ADAPTERS_FILE",
    "LAYERS_FILE",
    "PARTS_DIR",
    "SCAN_FILE",
    "ScanStore",
    "load_scan",
    "read_settings",
    "read_tables",
    "rows_table",
]

SCAN_FILE = "scan.json"
ADAPTERS_FILE = "adapters.parquet"
LAYERS_FILE = "layers.parquet"
PARTS_DIR = "parts"
CSV_FILES = ("adapters.csv", "layers.csv")

#: what ``scan.json`` says it is.
SCAN_KIND = "nora-spectra scan"
SCAN_VERSION = 1

_PART = re.compile(r"^(\d{6,})\.(adapters|layers)\.parquet$")


def _pa() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule is used as pyarrow.parquet)
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise UsageError("spectra scan needs pyarrow: pip install pyarrow") from None
    return pyarrow


def rows_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> "pa.Table":
    """A pyarrow table of ``rows`` with ``columns`` in order (a missing field is null).

    Raises:
        UsageError: a column holds values of incompatible types (a manifest column of mixed types).
    """
    pa = _pa()
    arrays = {}
    for name in columns:
        try:
            arrays[name] = pa.array([row.get(name) for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise UsageError(f"column {name!r} holds values of incompatible types ({exc})") from None
    return pa.table(arrays)


def _write_parquet(path: Path, table: "pa.Table") -> None:
    _pa()
    import pyarrow.parquet as pq

    with atomic_write(path, "wb") as handle:
        pq.write_table(table, handle)


def _read_parquet(path: Path, columns: Sequence[str] | None = None) -> "pa.Table":
    _pa()
    import pyarrow.parquet as pq

    if columns is not None:
        present = set(pq.read_schema(path).names)
        columns = [c for c in columns if c in present]
    return pq.read_table(path, columns=columns)


def _ordered(table: "pa.Table", first: Sequence[str]) -> "pa.Table":
    names = [c for c in first if c in table.column_names]
    names += [c for c in table.column_names if c not in names]
    return table.select(names)


def _concat(tables: list["pa.Table"], first: Sequence[str]) -> "pa.Table":
    pa = _pa()
    if not tables:
        return rows_table([], first)
    return _ordered(pa.concat_tables(tables, promote_options="permissive"), first)


# ------------------------------------------------------------------------------------------- segments


def _parts(directory: Path) -> list[tuple[int, Path, Path]]:
    """Committed parts ``(number, adapters file, layers file)`` in order."""
    parts_dir = directory / PARTS_DIR
    if not parts_dir.is_dir():
        return []
    found: dict[int, dict[str, Path]] = {}
    for entry in parts_dir.iterdir():
        match = _PART.match(entry.name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = entry
    return [(n, files["adapters"], files["layers"]) for n, files in sorted(found.items())
            if "adapters" in files and "layers" in files]


def _segments(directory: Path) -> list[tuple[Path, Path]]:
    """(adapters file, layers file) of the final tables (when present) then of every committed part."""
    out = []
    final = (directory / ADAPTERS_FILE, directory / LAYERS_FILE)
    if final[0].is_file() and final[1].is_file():
        out.append(final)
    out.extend((adapters, layers) for _, adapters, layers in _parts(directory))
    return out


def _merge(
    directory: Path, keep: Iterable[str] | None = None, written: Mapping[str, "pa.Table"] | None = None
) -> tuple["pa.Table", "pa.Table"]:
    """The merged state: each adapter's rows from the last segment holding its adapter row.

    ``written``: file name -> the table this process wrote there (read from memory, not from disk).
    """
    pa = _pa()
    written = written or {}

    def read(path: Path) -> "pa.Table":
        return written[path.name] if path.name in written else _read_parquet(path)

    adapters, layers = [], []
    for index, (adapters_file, layers_file) in enumerate(_segments(directory)):
        a = read(adapters_file)
        adapters.append(a.append_column("_segment", pa.array([index] * a.num_rows, pa.int64())))
        lay = read(layers_file)
        layers.append(lay.append_column("_segment", pa.array([index] * lay.num_rows, pa.int64())))
    adapter_table = _concat(adapters, SCAN_ADAPTER_COLUMNS)
    layer_table = _concat(layers, SCAN_LAYER_COLUMNS)
    if adapter_table.num_rows == 0:
        return (adapter_table.drop_columns([c for c in ("_segment",) if c in adapter_table.column_names]),
                layer_table.drop_columns([c for c in ("_segment",) if c in layer_table.column_names]))
    paths = adapter_table.column("path").to_pylist()
    segments = adapter_table.column("_segment").to_pylist()
    winner: dict[str, tuple[int, int]] = {}
    for row, (path, segment) in enumerate(zip(paths, segments)):
        winner[path] = (segment, row)  # later segments (and later rows) win
    if keep is not None:
        wanted = set(keep)
        winner = {p: w for p, w in winner.items() if p in wanted}
    rows = sorted(winner.items())  # by path
    adapter_table = adapter_table.take(pa.array([row for _, (_, row) in rows], pa.int64()))
    chosen = {path: segment for path, (segment, _) in winner.items()}
    layer_paths = layer_table.column("path").to_pylist() if layer_table.num_rows else []
    layer_segments = layer_table.column("_segment").to_pylist() if layer_table.num_rows else []
    picked = [i for i, (p, s) in enumerate(zip(layer_paths, layer_segments)) if chosen.get(p) == s]
    # stable: layer rows keep their order within an adapter; adapters in path order
    order = sorted(range(len(picked)), key=lambda j: layer_paths[picked[j]])
    layer_table = layer_table.take(pa.array([picked[j] for j in order], pa.int64()))
    return adapter_table.drop_columns(["_segment"]), layer_table.drop_columns(["_segment"])


def read_tables(directory: "str | os.PathLike[str]") -> tuple["pa.Table", "pa.Table"]:
    """The adapters and layers tables of a scan directory, as pyarrow tables (merged, see the module).

    Raises:
        UsageError: ``directory`` holds no scan (no ``scan.json``).
    """
    root = Path(directory)
    if not (root / SCAN_FILE).is_file():
        raise UsageError(f"{os.fspath(directory)}: not a spectra scan directory (no {SCAN_FILE})")
    return _merge(root)


def _to_pandas(table: "pa.Table") -> "pd.DataFrame":
    """A DataFrame whose list columns hold Python lists (as ``Analysis.layers`` does) and whose integer
    columns are pandas' nullable ``Int64`` (an error row's missing ``r`` stays missing, not a float NaN)."""
    import pandas as pd

    pa = _pa()
    data = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_null(column.type):
            data[name] = pd.Series(column.to_pylist(), dtype=object)
        elif pa.types.is_integer(column.type):
            data[name] = column.to_pandas(types_mapper={column.type: pd.Int64Dtype()}.get)
        else:
            data[name] = column.to_pandas()
    return pd.DataFrame(data, columns=table.column_names)


def load_scan(directory: "str | os.PathLike[str]") -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """The two tables of a ``spectra scan`` output directory, as pandas DataFrames.

    Works on a finished scan and on one still running or killed (its committed parts are included).

    Args:
        directory: the scan's ``OUT_DIR``.

    Returns:
        ``(adapters, layers)``: one row per adapter (columns :data:`~nora_spectra.schema.SCAN_ADAPTER_COLUMNS`
        then the manifest's metadata columns), and one row per module (columns
        :data:`~nora_spectra.schema.SCAN_LAYER_COLUMNS`: ``path`` then the columns of ``Analysis.layers``).
        Both sorted by path; ``shape``, ``singular_values`` and ``warnings`` hold Python lists.

    Raises:
        UsageError: ``directory`` holds no scan.
    """
    adapters, layers = read_tables(directory)
    return _to_pandas(adapters), _to_pandas(layers)


# ------------------------------------------------------------------------------------------- the store


def _settings_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    names = sorted(set(old) | set(new))
    diffs = [f"{n}: {json.dumps(old.get(n))} there, {json.dumps(new.get(n))} now" for n in names if old.get(n) != new.get(n)]
    return "; ".join(diffs)


class ScanStore:
    """The output directory of a running scan: checks its settings, commits parts, writes the final tables.

    Use :meth:`open`; then :meth:`completed` (what a resume skips), :meth:`add` for every result,
    :meth:`finish` at the end.

    Args:
        directory: the scan's ``OUT_DIR`` (exists).
        part_size: commit a part after this many adapters...
        part_seconds: ... or when this many seconds have passed since the last commit, if sooner.
    """

    def __init__(self, directory: Path, *, part_size: int = 100, part_seconds: float = 30.0) -> None:
        self.directory = directory
        self.part_size = part_size
        self.part_seconds = part_seconds
        self._buffer: list["ItemResult"] = []
        self._written: dict[str, "pa.Table"] = {}  # the parts this run wrote, by file name
        self._last_commit = time.monotonic()
        parts = _parts(directory)
        self._next_part = (parts[-1][0] + 1) if parts else 1

    @classmethod
    def open(
        cls,
        directory: "str | os.PathLike[str]",
        settings: Mapping[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
        part_size: int = 100,
        part_seconds: float = 30.0,
    ) -> "ScanStore":
        """Open (or create) ``directory`` for a scan with ``settings``.

        Args:
            directory: the output directory; created when missing.
            settings: what makes two scans the same (JSON-able); stored in ``scan.json``.
            resume: continue the scan stored there (same settings); a directory without a scan starts one.
            overwrite: delete a scan stored there (only the scan's own files) and start over.

        Raises:
            UsageError: ``directory`` is a file, holds a scan and neither flag is given, holds a scan of
                other settings with ``resume``, or cannot be written.
        """
        root = Path(directory)
        name = os.fspath(directory)
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if root.exists() and not root.is_dir():
            raise UsageError(f"{name}: the scan's output must be a directory, and this is a file")
        scan_file = root / SCAN_FILE
        ours = [SCAN_FILE, ADAPTERS_FILE, LAYERS_FILE, PARTS_DIR, *CSV_FILES]
        present = [n for n in ours if (root / n).exists()]
        if present and overwrite:
            for n in present:
                target = root / n
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
            present = []
        if scan_file.exists():
            stored = read_settings(scan_file, hint="; use --overwrite to start over")
            if stored != dict(settings):
                raise UsageError(
                    f"{name}: holds a scan of different settings ({_settings_difference(stored, settings)}); "
                    "use another directory, or --overwrite to replace it"
                )
            if not resume:
                raise UsageError(f"{name}: holds a scan already; use --resume to continue it or --overwrite to start over")
        elif present:
            raise UsageError(
                f"{name}: holds scan outputs ({', '.join(present)}) but no {SCAN_FILE}; use --overwrite to replace them"
            )
        try:
            (root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
            if not scan_file.exists():
                document = {
                    "kind": SCAN_KIND,
                    "version": SCAN_VERSION,
                    "settings": dict(settings),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "nora_spectra_version": package_version(),
                }
                atomic_write_text(scan_file, json.dumps(document, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            raise UsageError(f"{name}: cannot write the scan: {exc.strerror or exc}") from None
        _clean(root)
        # pyarrow's imports (its first array loads pandas: about a second on a busy machine) are paid
        # now, not while the workers wait for the driver at the first commit
        import pyarrow.parquet  # noqa: F401

        _pa().array([0])
        return cls(root, part_size=part_size, part_seconds=part_seconds)

    def completed(self) -> dict[str, tuple[str, str]]:
        """``path -> (content_key, status)`` of every adapter stored (final tables and committed parts)."""
        out: dict[str, tuple[str, str]] = {}
        for adapters_file, _ in _segments(self.directory):
            table = _read_parquet(adapters_file, ["path", "content_key", "status"])
            for path, key, status in zip(*(table.column(c).to_pylist() for c in ("path", "content_key", "status"))):
                out[path] = (key, status)
        return out

    def add(self, result: "ItemResult") -> None:
        """Buffer one adapter's rows; commit a part when :attr:`part_size` or :attr:`part_seconds` is reached."""
        self._buffer.append(result)
        if len(self._buffer) >= self.part_size or time.monotonic() - self._last_commit >= self.part_seconds:
            self.commit()

    def commit(self) -> None:
        """Write the buffered rows as one part: the layers file, fsync, then the adapters file."""
        self._last_commit = time.monotonic()
        if not self._buffer:
            return
        adapter_rows = [r.adapter for r in self._buffer]
        layer_rows = [row for r in self._buffer for row in r.layers]
        adapter_columns = _columns(adapter_rows, SCAN_ADAPTER_COLUMNS)
        parts_dir = self.directory / PARTS_DIR
        number = f"{self._next_part:06d}"
        tables = {f"{number}.layers.parquet": rows_table(layer_rows, _columns(layer_rows, SCAN_LAYER_COLUMNS)),
                  f"{number}.adapters.parquet": rows_table(adapter_rows, adapter_columns)}
        try:
            for name, table in tables.items():  # layers first: the adapters file commits the part
                _write_parquet(parts_dir / name, table)
                fsync_directory(parts_dir)
        except OSError as exc:
            raise UsageError(f"{parts_dir}: cannot write a part of the scan: {exc.strerror or exc}") from None
        self._written.update(tables)
        self._next_part += 1
        self._buffer = []

    def finish(self, paths: Iterable[str], *, csv_too: bool = False) -> tuple["pa.Table", "pa.Table"]:
        """Commit what is buffered, then write the final tables (the adapters of ``paths`` only) and drop the parts.

        The CSV files are written with ``csv_too``, and removed otherwise (they would be stale).

        The adapters table is renamed into place before the layers table; a kill between the two is
        harmless (see the module docstring). Returns the final ``(adapters, layers)`` tables.
        """
        self.commit()
        adapters, layers = _merge(self.directory, keep=paths, written=self._written)
        try:
            _write_parquet(self.directory / ADAPTERS_FILE, adapters)
            _write_parquet(self.directory / LAYERS_FILE, layers)
            fsync_directory(self.directory)
            for file, table in zip(CSV_FILES, (adapters, layers)):
                if csv_too:
                    atomic_write_text(self.directory / file, csv_text(table))
                elif (self.directory / file).exists():
                    (self.directory / file).unlink()  # a CSV of an earlier run would no longer match
        except OSError as exc:
            raise UsageError(f"{self.directory}: cannot write the scan's tables: {exc.strerror or exc}") from None
        for _, adapters_file, layers_file in _parts(self.directory):
            adapters_file.unlink()  # the commit marker first: a part is never half-removed and committed
            layers_file.unlink()
        return adapters, layers


def _columns(rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> list[str]:
    """``first``, then every other key of ``rows`` in order of appearance (manifest or optional columns)."""
    known = set(first)
    extra = dict.fromkeys(name for row in rows for name in row if name not in known)
    return list(first) + list(extra)


def read_settings(path: "str | os.PathLike[str]", *, hint: str = "") -> dict[str, Any]:
    """The ``settings`` of a scan's ``scan.json``, read within :mod:`nora_core.parsing`'s limits.

    Args:
        path: the ``scan.json`` file.
        hint: appended to error messages (``"; use --overwrite to start over"`` when scanning).

    Raises:
        UsageError: the file is unreadable, not JSON, or not a spectra scan's settings.
    """
    try:
        document = read_json(path)
    except OSError as exc:
        raise UsageError(f"{os.fspath(path)}: unreadable scan settings ({exc.strerror or exc}){hint}") from None
    except ParseError as exc:
        raise UsageError(f"{os.fspath(path)}: unreadable scan settings ({exc.problem}){hint}") from None
    if not isinstance(document, dict) or document.get("kind") != SCAN_KIND or not isinstance(document.get("settings"), dict):
        raise UsageError(f"{os.fspath(path)}: not the settings of a spectra scan{hint}")
    return document["settings"]


def _clean(root: Path) -> None:
    """Remove what a killed run left: temporary files, and layers parts whose adapters part never came."""
    parts_dir = root / PARTS_DIR
    for directory in (root, parts_dir):
        for entry in directory.iterdir() if directory.is_dir() else ():
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink()
    committed = {n for n, _, _ in _parts(root)}
    for entry in parts_dir.iterdir():
        match = _PART.match(entry.name)
        if match and int(match.group(1)) not in committed:
            entry.unlink()


def csv_text(table: "pa.Table") -> str:
    """CSV of a table: floats by ``repr``, lists as JSON arrays, booleans ``true``/``false``, nulls empty."""
    from nora_spectra.render._cells import csv_cell

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.column_names)
    columns = [table.column(name).to_pylist() for name in table.column_names]
    for row in zip(*columns):
        writer.writerow([csv_cell(value) for value in row])
    return buffer.getvalue()
