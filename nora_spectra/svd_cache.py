"""An on-disk cache of what base-aware analyses need from each base weight: its SVD, computed once.

Analysing 100 adapters of one base model needs the same base facts 100 times: the spectral norm
``||W0||_2`` of every base matrix (relative size) and, for intruder dimensions, all its left singular
vectors (a thin SVD, the most expensive step). :class:`SvdCache` computes each once and keeps it under

    $NORA_SPECTRA_CACHE/base-svd/<digest>-<N|T>.npz      (default ~/.cache/nora-spectra, or
                                                         $XDG_CACHE_HOME/nora-spectra)

where ``<digest>`` is :meth:`nora_spectra.io.model_weights.ModelWeights.digest`, a BLAKE2b hash of the
tensor's dtype, shape and stored bytes, and ``N``/``T`` says whether the matrix was used as stored or
transposed (GPT-2 ``Conv1D``). A changed base tensor has another digest, so a stale entry is never
used; the same tensor in another file or model reuses the entry. Entries are written atomically
(:func:`nora_core.atomic.atomic_write`); an unreadable or inconsistent entry is recomputed and replaced,
with a warning. Left singular vectors are stored as float32 (``4 * d_out * min(d_out, d_in)`` bytes: 64 MiB
for a 4096 x 4096 matrix), enough for cosines to about ``1e-7``; singular values as float64.
Delete the directory to clear the cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
import numpy as np

from nora_core.atomic import atomic_write
from nora_spectra.spectrum import left_singular_vectors, spectral_norm

__all__ = ["CACHE_ENV", "SvdCache", "default_cache_dir", "open_cache"]

#: the environment variable naming the cache directory.
CACHE_ENV = "NORA_SPECTRA_CACHE"
#: the sub-directory of base-matrix entries (bumped with the entry format).
_SUBDIR = "base-svd"
_KEY = re.compile(r"^[0-9a-f]{40}-[NT]$")


def default_cache_dir() -> Path:
    """``$NORA_SPECTRA_CACHE``, else ``$XDG_CACHE_HOME/nora-spectra``, else ``~/.cache/nora-spectra``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "nora-spectra"
    return Path.home() / ".cache" / "nora-spectra"


def open_cache(cache: "bool | str | os.PathLike[str] | SvdCache | None") -> "SvdCache":
    """The cache an analysis uses: ``None``/``True`` the default directory, ``False`` none, a path that one."""
    if isinstance(cache, SvdCache):
        return cache
    if cache is False:
        return SvdCache(None)
    if cache is None or cache is True:
        return SvdCache(default_cache_dir())
    return SvdCache(Path(cache))


class SvdCache:
    """Base-matrix facts by content key, on disk (``directory`` None: nothing is kept, everything is computed).

    Args:
        directory: the cache root (entries go to ``<directory>/base-svd/``), or None for no disk cache.

    Attributes:
        warnings: problems met (an unreadable entry, an unwritable directory), worded for the user.
    """

    def __init__(self, directory: "str | os.PathLike[str] | None") -> None:
        self.root = None if directory is None else Path(directory) / _SUBDIR
        self.warnings: list[str] = []
        self._write_failed = False

    def base_facts(self, key: str | None, matrix: np.ndarray, *, vectors: bool) -> tuple[float, np.ndarray | None]:
        """``||W0||_2`` of ``matrix`` and, with ``vectors``, all its left singular vectors, with one read of
        the cache entry and at most one write.

        Args:
            key: the matrix's content key (``<digest>-N`` or ``<digest>-T``), or None not to cache.
            matrix: ``W0`` in the orientation the key names.
            vectors: also return every left singular vector (float32, ``(d_out, min(d_out, d_in))``).

        Returns:
            ``(sigma_max, vectors or None)``. ``sigma_max`` is always :func:`spectral_norm`'s value (also
            when the SVD is computed), so relative sizes do not depend on the cache's history.
        """
        entry = self._load(key, matrix.shape, vectors=vectors)
        if entry is not None and (not vectors or "vectors" in entry):
            return float(entry["sigma_max"]), entry["vectors"] if vectors else None
        sigma_max = entry["sigma_max"] if entry is not None else np.float64(spectral_norm(matrix))
        if not vectors:
            self._store(key, {"sigma_max": sigma_max})
            return float(sigma_max), None
        left, values = left_singular_vectors(matrix)
        left = left.astype(np.float32)
        self._store(key, {"sigma_max": sigma_max, "vectors": left, "values": values})
        return float(sigma_max), left

    # ------------------------------------------------------------------ disk

    def _path(self, key: str) -> Path:
        assert self.root is not None and _KEY.match(key), key
        return self.root / f"{key}.npz"

    def _load(self, key: str | None, shape: tuple[int, ...], *, vectors: bool) -> dict[str, np.ndarray] | None:
        """The entry of ``key`` (its vectors and values only when ``vectors``), checked; None when absent."""
        if key is None or self.root is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                wanted = data.files if vectors else [name for name in data.files if name not in ("vectors", "values")]
                entry = {name: data[name] for name in wanted}
            _check_entry(entry, shape)
        except Exception as exc:  # any unreadable entry is recomputed, never trusted
            self.warnings.append(f"SVD cache entry {path} is unreadable ({type(exc).__name__}: {exc}); recomputed")
            return None
        return entry

    def _store(self, key: str | None, entry: dict[str, np.ndarray]) -> None:
        if key is None or self.root is None or self._write_failed:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, "wb") as handle:
                np.savez(handle, **entry)
        except OSError as exc:
            self._write_failed = True
            self.warnings.append(
                f"cannot write the SVD cache in {self.root} ({exc.strerror or exc}); results are not cached"
            )


def _check_entry(entry: dict[str, np.ndarray], shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``entry`` is a consistent cache entry for a matrix of ``shape``."""
    sigma_max = entry.get("sigma_max")
    _require(sigma_max is not None and sigma_max.shape == () and sigma_max.dtype == np.float64, "sigma_max")
    _require(bool(np.isfinite(sigma_max)) and float(sigma_max) >= 0, "sigma_max")
    if "vectors" not in entry and "values" not in entry:
        return
    vectors, values = entry.get("vectors"), entry.get("values")
    k = min(shape)
    _require(vectors is not None and vectors.dtype == np.float32 and vectors.shape == (shape[0], k), "vectors")
    _require(values is not None and values.dtype == np.float64 and values.shape == (k,), "values")
    _require(bool(np.all(np.isfinite(vectors))) and bool(np.all(np.isfinite(values))), "finite values")


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"bad {what} for this matrix")
