"""``spectra scan``: many adapters, one analysis each, into Parquet tables; ``spectra census`` from them.

Public names are imported lazily: a scan worker imports :mod:`nora_spectra.scan._threads` (which sets
single-threaded BLAS) before anything here loads numpy. Modules: ``discover`` (adapters under roots,
by the registry's sniffers), ``manifest``, ``content_key``, ``task`` (the one analysis function),
``local_engine`` / ``ray_engine``, ``store`` (parts, final tables, ``load_scan``), ``runner``
(``scan``), ``census``. Documentation: ``docs/scan.md``.
"""

from nora_core._lazy import lazy_getattr

_EXPORTS = {
    "scan": "runner",
    "ScanSummary": "runner",
    "load_scan": "store",
    "read_tables": "store",
    "build_census": "census",
    "write_census": "census",
    "CensusData": "census",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
