"""``scan(roots, output=...)``: analyse every adapter under some roots (or in a manifest) into Parquet tables.

The steps, all in the calling process except the analyses::

    roots --discover--> adapter paths (+ manifest entries, with metadata)
          --content_key--> items --ScanStore.completed (--resume)--> the items still to analyse
          --engine (local process pool | Ray Data)--> ItemResult per adapter
          --ScanStore.add (parts committed atomically)--> ScanStore.finish --> adapters.parquet, layers.parquet

The engines run :func:`~nora_spectra.scan.task.analyse_item` and move paths and rows; nothing here
computes a metric. A bad adapter is a row with status ``error``; only bad input to the scan itself (a
root that does not exist or holds no adapter, a bad manifest, an output directory holding another
scan, a missing Ray) raises a :class:`~nora_spectra.errors.UsageError`, before any analysis.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Union

from nora_spectra.analysis import check_collapse_threshold
from nora_spectra.errors import UsageError
from nora_spectra.io.registry import get_format
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD
from nora_spectra.scan.content_key import content_key
from nora_spectra.scan.discover import discover
from nora_spectra.scan.manifest import read_manifest
from nora_spectra.scan.store import ScanStore
from nora_spectra.scan.task import AnalysisSettings, ItemResult, ScanItem

__all__ = ["ENGINES", "ScanSummary", "scan"]

#: the engines ``--engine`` takes.
ENGINES: tuple[str, ...] = ("local", "ray")

#: ``progress(done, total, failed)`` after every adapter.
ScanProgress = Union[None, bool, Callable[[int, int, int], None]]


@dataclasses.dataclass
class ScanSummary:
    """What a scan did.

    Attributes:
        output: the output directory.
        adapters: adapters in the tables (found under the roots and in the manifest).
        analysed: adapters analysed by this run.
        resumed: adapters taken from an earlier run (same content key).
        ok: adapters with status ``ok`` in the tables.
        errors: adapters with status ``error`` in the tables.
        layers: layer rows in the tables.
        seconds: wall-clock time of the analyses (engine start to last result).
        engine: the engine used.
        workers: its worker count (None: the Ray cluster's CPUs).
    """

    output: str
    adapters: int
    analysed: int
    resumed: int
    ok: int
    errors: int
    layers: int
    seconds: float
    engine: str
    workers: int | None

    @property
    def rate(self) -> float | None:
        """Adapters analysed per second by this run (None when it analysed none)."""
        return self.analysed / self.seconds if self.analysed and self.seconds > 0 else None

    def line(self) -> str:
        """One line for the end of ``spectra scan``."""
        rate = f", {self.rate:.1f} adapters/s" if self.rate is not None else ""
        resumed = f"; {self.resumed} already done" if self.resumed else ""
        return (
            f"scanned {self.adapters} adapter{'s' if self.adapters != 1 else ''} into {self.output}: "
            f"{self.ok} ok, {self.errors} error{'s' if self.errors != 1 else ''} "
            f"({self.analysed} analysed in {self.seconds:.1f} s{rate}{resumed})"
        )


class _Progress:
    """One tqdm bar of adapters (done, failed, rate, ETA), or a callback."""

    def __init__(self, progress: ScanProgress, total: int) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.callback: Callable[[int, int, int], None] | None = None
        self.bar: Any = None
        if progress is True:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="adapter", desc="scanning", dynamic_ncols=True, leave=True)
        elif callable(progress):
            self.callback = progress
        elif progress not in (None, False):
            raise UsageError(f"progress must be None, a bool or a callable, got {type(progress).__name__}")

    def update(self, result: ItemResult) -> None:
        self.done += 1
        self.failed += 0 if result.ok else 1
        if self.bar is not None:
            if not result.ok:
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)
        if self.callback is not None:
            self.callback(self.done, self.total, self.failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _items(roots: Iterable[str], manifest: str | None, output: str) -> list[ScanItem]:
    """Discovered adapters and manifest entries, one item per path (manifest metadata attached)."""
    found = {f.path: f for f in discover(roots, skip=[output])} if roots else {}
    entries = read_manifest(manifest) if manifest is not None else []
    metadata = {entry.path: entry.metadata for entry in entries}
    paths = sorted(set(found) | set(metadata))
    items = []
    for path in paths:
        item = found.get(path)
        is_dir = item.is_dir if item is not None else os.path.isdir(path)
        items.append(ScanItem(
            path=path,
            key=content_key(path, is_dir=is_dir),
            metadata=dict(metadata.get(path, {})),
            problem=item.problem if item is not None else None,
        ))
    return items


def scan(
    roots: Iterable["str | os.PathLike[str]"] = (),
    *,
    output: "str | os.PathLike[str]",
    manifest: "str | os.PathLike[str] | None" = None,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    csv: bool = False,
    format: str | None = None,
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
    part_size: int = 100,
    part_seconds: float = 30.0,
    progress: ScanProgress = None,
) -> ScanSummary:
    """Analyse every adapter under ``roots`` and in ``manifest`` into ``output/adapters.parquet`` and ``layers.parquet``.

    Args:
        roots: directories to walk (every adapter a registered format claims is analysed), or adapters.
        output: the output directory (created when missing).
        manifest: a CSV or JSONL file of adapter paths with optional metadata columns
            (:mod:`~nora_spectra.scan.manifest`).
        engine: ``"local"`` (a process pool) or ``"ray"`` (Ray Data; ``pip install 'nora-spectra[ray]'``).
        workers: worker processes (local; default: the cores), or CPUs of the local Ray cluster.
        ray_address: the Ray cluster to join (engine ``"ray"``); default ``RAY_ADDRESS`` or a new local one.
        resume: continue the scan in ``output``: adapters already stored with the same content key are
            not analysed again.
        overwrite: replace a scan stored in ``output``.
        retry_errors: with ``resume``, analyse again the adapters stored with status ``error``.
        csv: also write ``adapters.csv`` and ``layers.csv``.
        format: a registered checkpoint format forced on every adapter (default: detected per adapter).
        collapse_threshold: see :func:`nora_spectra.analysis.analyze`.
        part_size, part_seconds: commit results to disk after this many adapters or seconds.
        progress: None/False, True (a tqdm bar on stderr), or ``callback(done, total, failed)``.

    Returns:
        A :class:`ScanSummary`; the tables: :func:`nora_spectra.load_scan`.

    Raises:
        UsageError: bad options, a root that does not exist or holds no adapter, a bad manifest, an
            output directory holding a scan (without ``resume``/``overwrite``) or one of other
            settings, Ray missing or unreachable.
    """
    collapse_threshold = check_collapse_threshold(collapse_threshold)
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UsageError(f"workers must be a positive integer, got {workers!r}")
    if ray_address is not None and engine != "ray":
        raise UsageError("--ray-address needs --engine ray")
    if not isinstance(part_size, int) or part_size < 1:
        raise UsageError(f"part size must be a positive integer, got {part_size!r}")
    if retry_errors and not resume:
        raise UsageError("--retry-errors needs --resume")
    if format is not None:
        get_format(format)
    if engine == "ray":
        from nora_spectra.scan.ray_engine import import_ray

        import_ray()  # a missing Ray is one line, before any work
    roots = [os.path.abspath(os.fspath(r)) for r in roots]
    manifest = None if manifest is None else os.path.abspath(os.fspath(manifest))
    out = os.path.abspath(os.fspath(output))
    if not roots and manifest is None:
        raise UsageError("nothing to scan: give a ROOT directory or --manifest FILE")

    items = _items(roots, manifest, out)
    settings = AnalysisSettings(collapse_threshold=collapse_threshold, format_in=format)
    stored_settings = {
        "roots": sorted(set(roots)),
        "manifest": manifest,
        "space": "weight",
        "collapse_threshold": collapse_threshold,
        "format_in": format,
    }
    store = ScanStore.open(out, stored_settings, resume=resume, overwrite=overwrite,
                           part_size=part_size, part_seconds=part_seconds)
    done = store.completed()
    todo = [
        item for item in items
        if item.path not in done
        or done[item.path][0] != item.key.digest
        or (retry_errors and done[item.path][1] == "error")
    ]
    bar = _Progress(progress, len(todo))

    def emit(result: ItemResult) -> None:
        store.add(result)
        bar.update(result)

    started = time.perf_counter()
    try:
        if todo and engine == "local":
            from nora_spectra.scan.local_engine import default_workers, run_local

            workers = workers or default_workers()
            run_local(todo, settings, emit, workers=workers)
        elif todo:
            from nora_spectra.scan.ray_engine import run_ray

            run_ray(todo, settings, emit, workers=workers, address=ray_address)
    except BaseException:
        store.commit()  # an interrupted scan keeps every result it had (--resume continues from there)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    adapters, layers = store.finish([item.path for item in items], csv_too=csv)
    statuses = adapters.column("status").to_pylist()
    return ScanSummary(
        output=out,
        adapters=adapters.num_rows,
        analysed=len(todo),
        resumed=len(items) - len(todo),
        ok=statuses.count("ok"),
        errors=statuses.count("error"),
        layers=layers.num_rows,
        seconds=seconds,
        engine=engine,
        workers=workers,
    )
