"""Singular values of every update kind, from its factors: :func:`spectrum` is the one entry point.

Everything in nora_spectra (``analyze``, reports, ``spectra check``, the trainer's tracking, the
activation-space measurement) gets its singular values here; nothing else computes a spectrum.
:func:`spectrum` dispatches on the kind of :mod:`nora_spectra.updates`:

* low-rank ``s * B @ A``: :func:`adapter_singular_values` (below), exact from the ``r x r`` core;
* Hadamard ``s * (B1 A1) * (B2 A2)``: the same function on the face-splitting factors (rank ``<= r1 r2``);
* Kronecker ``s * kron(W1, W2)``: every product ``sigma_i(W1) sigma_j(W2)``, sorted;
* dense ``delta``: :func:`dense_spectrum`, an exact SVD, or a randomized top-k SVD with a rigorous
  a-posteriori error bound when only the leading values are asked for.

Base-aware analyses also need singular values and vectors of dense matrices (a base weight ``W0``,
a tuned weight ``W0 + dW``): :func:`spectral_norm`, :func:`leading_left_singular_vectors` and
:func:`left_singular_vectors` compute them here too, exactly (LAPACK for small matrices, ARPACK's
Lanczos iteration to machine precision for the few leading ones of large matrices).

Low-rank method (see ``docs/metrics.md``): with thin QR factorizations ``B = Q_B R_B`` and ``A^T = Q_A R_A``,

.. math::  s B A = Q_B \\, (s R_B R_A^T) \\, Q_A^T,

so the singular values of the ``d_out x d_in`` update are those of the ``r x r`` core ``s R_B R_A^T``:
``O((d_out + d_in) r^2)`` work instead of ``O(d_out d_in min(d_out, d_in))``, and the update is never
formed. When ``r > min(d_out, d_in)`` the update has rank at most ``min(d_out, d_in)`` and the small
product ``B @ A`` itself is formed instead: ``O(d_out d_in r)`` work and ``d_out d_in <= r max(d_out, d_in)``
memory, never more than the factors (an ``r x r`` Gram matrix would cost ``r^2``).

The triangular factors come from the Gram matrix of each factor (one BLAS pass), **equilibrated**:
with ``d_i`` the norm of the i-th row of ``A`` (column of ``B``), ``G = D M D`` and ``R = R_0 D`` where
``R_0`` is the Cholesky factor of the unit-diagonal ``M``. The rounding errors of the Gram product and of
Cholesky are relative to ``d_i d_j`` entry by entry (``R^T R = D (M + Delta) D`` with
``|Delta_ij| = O(eps)``; Demmel 1989, van der Sluis 1969), so a factor whose rows decay geometrically (a
collapsed adapter) is as accurate as a well-scaled one: what matters is the condition of ``R_0``, not
of ``R``. The first accurate of three routes is taken, decided by cheap ``r x r`` tests
(:data:`GRAM_RCOND_LIMIT`):

1. both ``R_0`` well-conditioned (reciprocal condition estimate ``>= 1e-3``): the Gram route, whose
   error is about ``eps * cond(R_0)^2`` of ``sigma_1``;
2. otherwise, when first-order perturbation theory applies (``||Delta|| ||R_0^{-1}||^2`` small): the
   core's SVD with vectors gives each value's first-order error,
   ``|d sigma_i| <= sigma_i (delta_B ||R_{0B}^{-1} u_i||^2 + delta_A ||R_{0A}^{-1} v_i||^2) / 2`` with
   ``delta = sqrt(r n) eps`` (the probabilistic backward-error model of a length-``n`` dot product, with
   a margin of 10-100x over the errors measured here); when every bound is below ``1e-10 sigma_1`` the
   Gram route's values stand. A half-trained adapter (``B`` nearly rank-one) takes this route: its
   small singular values are poorly determined relative to themselves but are small;
3. otherwise, each factor whose ``R_0`` is ill-conditioned (or singular) is re-factored with
   Householder QR (LAPACK's recursive blocked ``dgeqrt``, about 3x faster than ``numpy.linalg.qr``;
   ``A^T`` of a C-ordered ``A`` is already in LAPACK's column-major layout), the other keeps its
   Cholesky factor.

Rows of ``A`` (columns of ``B``) that are exactly zero carry nothing to the update and are dropped
from both factors first. All arithmetic is float64; inputs are first scaled by an exact power of two so
that huge or tiny factors neither overflow nor underflow in the Gram matrix. Only scipy's compiled
LAPACK wrappers are loaded, not the whole of ``scipy.linalg`` (about 0.25 s of start-up); BLAS threads
are the caller's business (:func:`blas_threads`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import numpy as np

from nora_spectra._threads import blas_limit
from nora_spectra.updates import DenseUpdate, HadamardUpdate, KroneckerUpdate, LowRankUpdate, Update

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import ArrayLike

__all__ = [
    "DENSE_VECTORS_MAX_DIM",
    "GRAM_RCOND_LIMIT",
    "GramPair",
    "NonFiniteFactorsError",
    "Spectrum",
    "adapter_singular_values",
    "blas_threads",
    "core_singular_values",
    "dense_spectrum",
    "gram_pair",
    "lapack_routines",
    "leading_left_singular_vectors",
    "left_singular_vectors",
    "scaled_gram",
    "singular_values",
    "spectral_norm",
    "spectrum",
]

#: Reciprocal condition number (1-norm estimate, LAPACK ``dtrcon``) of the equilibrated Cholesky factor
#: ``R_0`` at or above which a factor's Gram route is used without further checks. The Gram route's error
#: on a singular value is about ``eps * cond(R_0)^2`` relative to ``sigma_1``; with cond(R_0) <= 1e3 that
#: stays near 1e-10.
GRAM_RCOND_LIMIT = 1e-3

#: Route 2 keeps the Gram route's values when every first-order error bound is below this share of sigma_1
#: (the contract, tested against dense float64 SVDs, is 1e-9).
_FIRST_ORDER_TOL = 1e-10
#: Route 2 needs ``delta * ||R_0^{-1}||_F^2`` (the size of the relative perturbation of the factor's
#: Gram matrix in its own metric) at most this, so that second-order terms stay negligible.
_FIRST_ORDER_VALID = 1e-2
#: A squared row norm below this (after the power-of-two scaling) lost precision to underflow: that
#: factor is not equilibrated, it is re-factored by Householder QR.
_TINY_SQUARED_NORM = 2.0**-960
#: Block size of LAPACK's ``dgeqrt`` (measured best between 16 and 32 for r in 16..256).
_QR_BLOCK = 32

_EPS = float(np.finfo(np.float64).eps)


class NonFiniteFactorsError(ValueError):
    """A factor holds NaN or Inf: the update has no spectrum."""


# --------------------------------------------------------------------------------------------------
# LAPACK, without importing scipy.linalg


_LAPACK: Any = None
_LAPACK_LOCK = threading.Lock()


def lapack_routines() -> Any:
    """scipy's compiled LAPACK wrappers (``dpotrf``, ``dtrcon``, ``dtrtri``, ``dtrtrs``, ``dgeqrt``, ...).

    ``scipy.linalg.lapack`` is a thin re-export of the extension module ``scipy.linalg._flapack``, but
    importing it runs ``scipy/linalg/__init__.py``, which imports every decomposition (about 0.25 s,
    half of ``spectra analyze``'s start-up on a small adapter). The extension itself loads in a few
    milliseconds, so it is loaded alone from scipy's installed files; when that is not possible (another
    layout, a future scipy) or ``scipy.linalg`` is already imported, the public module is used. Both
    are the same compiled functions.
    """
    global _LAPACK
    if _LAPACK is None:
        with _LAPACK_LOCK:  # spectra may be computed on several threads
            if _LAPACK is None:
                linalg = sys.modules.get("scipy.linalg")
                _LAPACK = getattr(linalg, "lapack", None) or _load_flapack()
    return _LAPACK


def _load_flapack() -> Any:
    """``scipy.linalg._flapack`` loaded from its file, without running ``scipy/__init__.py`` or
    ``scipy/linalg/__init__.py`` (the extension needs only numpy); the public module if that fails."""
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    with _idle_blas_threads_sleep():
        try:
            found = importlib.util.find_spec("scipy")  # locates the package without importing it
            locations = list(found.submodule_search_locations or []) if found is not None else []
            name = "scipy.linalg._flapack"
            for location in locations:
                for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                    path = Path(location) / "linalg" / f"_flapack{suffix}"
                    if not path.is_file():
                        continue
                    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
                    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
                    if spec is None:
                        continue
                    module = importlib.util.module_from_spec(spec)
                    loader.exec_module(module)
                    if all(hasattr(module, f) for f in ("dpotrf", "dtrcon", "dtrtri", "dtrtrs", "dgeqrt")):
                        return module
        except (ImportError, OSError):  # pragma: no cover - depends on the installed scipy
            pass
        from scipy.linalg import lapack  # pragma: no cover - the slow, public route

        return lapack  # pragma: no cover


@contextmanager
def _idle_blas_threads_sleep() -> Iterator[None]:
    """While scipy's OpenBLAS loads, ask its idle threads to sleep at once instead of spinning.

    OpenBLAS starts one thread per core when it is loaded, and each spins for about 2^28 cycles
    (``OPENBLAS_THREAD_TIMEOUT``, read once, at load) before sleeping: measured here, 0.1-0.15 s of CPU
    stolen from the spectra that start right then, on a 2-core machine a third of a small adapter's
    run. ``OPENBLAS_THREAD_TIMEOUT=4`` (2^4 cycles) changes nothing else (thread counts, results); it
    is set only if the user has not set it, and only for the load.
    """
    key = "OPENBLAS_THREAD_TIMEOUT"
    if key in os.environ:
        yield
        return
    os.environ[key] = "4"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def blas_threads(limit: int = 1) -> ContextManager[Any]:
    """Limit every BLAS/LAPACK library loaded (numpy's and scipy's) to ``limit`` threads while inside.

    The products here (``r x r`` and ``n x r`` with ``r <= 256``) gain nothing from BLAS threads, and
    OpenBLAS threads that busy-wait for a core make a loaded machine several times slower; callers that
    run several spectra at once (:mod:`nora_spectra.spaces.weight`) use one BLAS thread per worker. The
    limit is process-wide (threadpoolctl, through :func:`nora_spectra._threads.blas_limit`), so set it
    once around a whole computation, not per call.
    """
    lapack_routines()  # scipy's OpenBLAS must be loaded to be limited, and seen by a fresh controller
    return blas_limit(limit, refresh=True)


# --------------------------------------------------------------------------------------------------
# the low-rank update s * B @ A


def _gram(factor: np.ndarray, rows_are_r: bool) -> np.ndarray:
    """Gram matrix over the factor's long dimension: ``A A^T`` for ``A`` (r, n), ``B^T B`` for ``B`` (n, r).

    ``np.dot``, not ``@``: both call BLAS ``syrk`` and give the same bits, but ``np.dot`` releases the
    GIL around it, while ``@`` held it for these shapes (r = 16, numpy 2.4: measured with a Python loop
    beside it), which serialized the weight space's threads at small ranks.
    """
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return np.dot(factor, factor.T) if rows_are_r else np.dot(factor.T, factor)


def _peak_exponent(factor: np.ndarray) -> int | None:
    """``e`` with ``max |factor| = m 2**e``, ``0.5 <= m < 1``; None for an all-zero factor.

    Raises:
        NonFiniteFactorsError: the factor holds NaN or Inf.
    """
    peak = max(float(factor.max()), -float(factor.min())) if factor.size else 0.0
    if not math.isfinite(peak):
        raise NonFiniteFactorsError("factor holds NaN or Inf")
    return None if peak == 0.0 else math.frexp(peak)[1]


def scaled_gram(factor: np.ndarray, rows_are_r: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Gram matrix of ``factor``, rescaled by an exact power of two when it would over- or underflow.

    The common path costs one pass (the Gram itself): NaN/Inf propagate into its trace
    ``||F||_F^2``, which is checked; only an out-of-range or non-finite trace triggers the explicit
    scan of the factor.

    Args:
        factor: ``(r, n)`` (``rows_are_r``) or ``(n, r)`` float64.
        rows_are_r: orientation of ``factor``.

    Returns:
        ``(factor', gram', exponent)`` with ``factor == factor' * 2**exponent`` exactly and
        ``gram' = Gram(factor')``.

    Raises:
        NonFiniteFactorsError: when the factor holds NaN or Inf.
    """
    gram = _gram(factor, rows_are_r)
    if _gram_in_range(gram):
        return factor, gram, 0
    exponent = _peak_exponent(factor)
    if exponent is None:
        return factor, gram, 0
    scaled = np.ldexp(factor, -exponent)
    return scaled, _gram(scaled, rows_are_r), exponent


#: A Gram trace inside this range neither overflowed nor lost the factor to underflow.
_GRAM_TRACE_RANGE = (2.0**-900, 2.0**900)


def _gram_in_range(gram: np.ndarray) -> bool:
    """Whether the Gram's trace ``||F||_F^2`` lies in :data:`_GRAM_TRACE_RANGE` (False for NaN/Inf)."""
    return _GRAM_TRACE_RANGE[0] < float(gram.trace()) < _GRAM_TRACE_RANGE[1]


@dataclass
class _Side:
    """One factor arranged tall, ``F`` (n, r): ``A^T`` or ``B``, and what its Gram matrix says.

    Attributes:
        tall: ``F`` itself (a view; ``A^T`` of a C-ordered ``A`` is Fortran-ordered), or a function
            that returns it (read again from its file) when only the Gram matrix was kept.
        live: the columns of ``F`` that are kept (exactly zero rows of ``A`` / columns of ``B`` dropped), or
            None for all; only the Householder route needs ``F`` itself, so only it takes them.
        n: the long dimension (``d_in`` for ``A``, ``d_out`` for ``B``).
        scale: ``d``, the column norms of ``F`` (``sqrt(diag(F^T F))``).
        r0: the Cholesky factor of the equilibrated Gram ``M = D^{-1} F^T F D^{-1}``, or None.
        rcond: ``dtrcon``'s reciprocal 1-norm condition estimate of ``r0`` (0 when there is none).
    """

    tall: "np.ndarray | Callable[[], np.ndarray]"
    live: np.ndarray | None
    n: int
    scale: np.ndarray
    r0: np.ndarray | None
    rcond: float

    @classmethod
    def from_gram(
        cls, tall: "np.ndarray | Callable[[], np.ndarray]", n: int, gram: np.ndarray, live: np.ndarray | None
    ) -> "_Side":
        """``gram`` is ``F^T F`` restricted to ``live`` (all of it when ``live`` is None); ``n`` is ``F``'s
        row count."""
        lapack = lapack_routines()
        diag = gram.diagonal()
        scale = np.sqrt(diag)
        if diag.min() < _TINY_SQUARED_NORM:  # a row so small that its squared norm underflowed
            return cls(tall, live, n, scale, None, 0.0)
        equilibrated = gram / np.multiply.outer(scale, scale)
        r0, info = lapack.dpotrf(equilibrated, lower=0, clean=1, overwrite_a=1)
        if info != 0:
            return cls(tall, live, n, scale, None, 0.0)
        rcond, info = lapack.dtrcon(r0, norm="1", uplo="U")
        return cls(tall, live, n, scale, r0, float(rcond) if info == 0 else 0.0)

    @property
    def gram_ok(self) -> bool:
        """Route 1: the Gram route needs no further check."""
        return self.rcond >= GRAM_RCOND_LIMIT

    def cholesky_r(self) -> np.ndarray:
        """``R = R_0 D`` with ``R^T R = F^T F`` (to the equilibrated rounding errors)."""
        assert self.r0 is not None
        return self.r0 * self.scale[None, :]

    def householder_r(self) -> np.ndarray:
        """``R`` (r, r) of the Householder QR ``F = Q R`` (LAPACK ``dgeqrt``, recursive and blocked)."""
        tall = self.tall if isinstance(self.tall, np.ndarray) else self.tall()
        tall = tall if self.live is None else tall[:, self.live]
        overwrite = 0
        if not tall.flags.f_contiguous:  # B (n, r) C-ordered: one copy into LAPACK's layout
            tall = np.asfortranarray(tall)
            overwrite = 1
        r = tall.shape[1]
        qr, _, info = lapack_routines().dgeqrt(min(r, _QR_BLOCK), tall, overwrite_a=overwrite)
        assert info == 0, f"dgeqrt failed: info {info}"
        return np.triu(qr[:r])

    def delta(self) -> float:
        """The backward-error model of route 2: ``||Delta||_2 <= sqrt(r n) eps`` for the unit-diagonal Gram."""
        return math.sqrt(self.scale.size * self.n) * _EPS


def _first_order_values(side_a: _Side, side_b: _Side, r_a: np.ndarray, r_b: np.ndarray) -> np.ndarray | None:
    """Route 2: the Gram route's singular values when their first-order error bounds are small, else None."""
    lapack = lapack_routines()
    inverses = []
    for side in (side_a, side_b):
        assert side.r0 is not None
        inverse, info = lapack.dtrtri(side.r0, lower=0)
        if info != 0 or side.delta() * float(np.sum(inverse * inverse)) > _FIRST_ORDER_VALID:
            return None
        inverses.append(inverse)
    u, sigma, vt = np.linalg.svd(r_b @ r_a.T)
    if sigma[0] == 0.0:
        return None
    weight_b = np.sum((inverses[1] @ u) ** 2, axis=0)  # ||R_0B^{-1} u_i||^2
    weight_a = np.sum((inverses[0] @ vt.T) ** 2, axis=0)  # ||R_0A^{-1} v_i||^2
    bound = 0.5 * sigma * (side_b.delta() * weight_b + side_a.delta() * weight_a)
    return sigma if float(bound.max()) <= _FIRST_ORDER_TOL * sigma[0] else None


def _core_singular_values(side_a: _Side, side_b: _Side) -> np.ndarray:
    """Singular values of ``R_B R_A^T`` by the first route that is accurate (module docstring)."""
    if side_a.gram_ok and side_b.gram_ok:
        return np.linalg.svd(side_b.cholesky_r() @ side_a.cholesky_r().T, compute_uv=False)
    if side_a.r0 is not None and side_b.r0 is not None:
        values = _first_order_values(side_a, side_b, side_a.cholesky_r(), side_b.cholesky_r())
        if values is not None:
            return values
    r_a = side_a.cholesky_r() if side_a.gram_ok else side_a.householder_r()
    r_b = side_b.cholesky_r() if side_b.gram_ok else side_b.householder_r()
    return np.linalg.svd(r_b @ r_a.T, compute_uv=False)


def _live_indices(a: np.ndarray, gram_a: np.ndarray, b: np.ndarray, gram_b: np.ndarray) -> np.ndarray | None:
    """Indices ``i`` of the rank dimension whose row ``A[i]`` and column ``B[:, i]`` are both nonzero.

    Returns None when every index is live (the common case, decided from the Gram diagonals alone). An
    index whose Gram diagonal is 0 is dropped only when its row or column is exactly zero (not merely so
    small that its square underflowed).
    """
    if gram_a.diagonal().all() and gram_b.diagonal().all():
        return None
    zero_a = np.flatnonzero(gram_a.diagonal() == 0.0)
    zero_b = np.flatnonzero(gram_b.diagonal() == 0.0)
    dead = np.zeros(a.shape[0], dtype=bool)
    dead[zero_a[~a[zero_a].any(axis=1)]] = True
    dead[zero_b[~b[:, zero_b].any(axis=0)]] = True
    return None if not dead.any() else np.flatnonzero(~dead)


@dataclass(frozen=True, eq=False)
class GramPair:
    """What the core of one low-rank update ``s B A`` needs when its factors are plain: their Gram matrices.

    Made by :func:`gram_pair`; :func:`core_singular_values` takes many at once. A reader can drop the
    factors once it holds this: the Householder route, the only one that needs them again, calls
    ``factors`` (which may read them from the file anew).

    Attributes:
        gram_a: ``A A^T`` restricted to ``live`` (all of it when ``live`` is None).
        gram_b: ``B^T B``, restricted likewise.
        scale: ``|s|``.
        d_in: ``A``'s columns.
        d_out: ``B``'s rows.
        rank: ``r``, the number of values (the dropped indices give exact zeros).
        live: the indices ``i`` whose row ``A[i]`` and column ``B[:, i]`` are both nonzero, or None for all.
        factors: returns ``(A, B)`` as float64 arrays, equal to those the Gram matrices came from.
    """

    gram_a: np.ndarray
    gram_b: np.ndarray
    scale: float
    d_in: int
    d_out: int
    rank: int
    live: np.ndarray | None
    factors: "Callable[[], tuple[np.ndarray, np.ndarray]]"


def gram_pair(
    A: np.ndarray,
    B: np.ndarray,
    scale: float = 1.0,
    factors: "Callable[[], tuple[np.ndarray, np.ndarray]] | None" = None,
) -> GramPair | None:
    """The Gram matrices of ``A`` (r, d_in) and ``B`` (d_out, r), float64, when they alone decide the core.

    The two products are the only ``O((d_out + d_in) r^2)`` work of a low-rank spectrum (they release
    the GIL, so threads can form them side by side); everything after them is ``r x r``.

    Args:
        A, B: the factors, float64, ``r <= min(d_out, d_in)``.
        scale: the update's scale ``s`` (finite).
        factors: returns ``(A, B)`` again for the Householder route; default: keeps a reference to them.

    Returns:
        The :class:`GramPair` (exactly zero rows of ``A`` / columns of ``B`` dropped from both), or None
        when the factors need the general path of :func:`adapter_singular_values`: a Gram trace outside
        ``[2^-900, 2^900]`` (factors to rescale by a power of two, or NaN/Inf).

    Raises:
        ValueError: factors that do not compose, or ``r > min(d_out, d_in)`` (the product's route).
        NonFiniteFactorsError: a NaN or infinite ``scale``.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0] or not 0 < A.shape[0] <= min(B.shape[0], A.shape[1]):
        raise ValueError(f"gram_pair needs A (r, d_in) and B (d_out, r) with 0 < r <= min(d_out, d_in), "
                         f"got A {A.shape}, B {B.shape}")
    if not math.isfinite(scale):
        raise NonFiniteFactorsError(f"scale is {scale}")
    gram_a = _gram(A, rows_are_r=True)
    gram_b = _gram(B, rows_are_r=False)
    if not (_gram_in_range(gram_a) and _gram_in_range(gram_b)):
        return None
    return _pair(A, B, gram_a, gram_b, scale, factors)


def _pair(
    A: np.ndarray,
    B: np.ndarray,
    gram_a: np.ndarray,
    gram_b: np.ndarray,
    scale: float,
    factors: "Callable[[], tuple[np.ndarray, np.ndarray]] | None",
) -> GramPair:
    """The :class:`GramPair` of factors whose Gram matrices are in range, exactly zero rows dropped."""
    live = _live_indices(A, gram_a, B, gram_b)
    if live is not None and live.size:
        gram_a, gram_b = gram_a[np.ix_(live, live)], gram_b[np.ix_(live, live)]
    return GramPair(gram_a, gram_b, abs(float(scale)), A.shape[1], B.shape[0], A.shape[0], live,
                    factors or (lambda: (A, B)))


def core_singular_values(pairs: "list[GramPair]") -> list[np.ndarray]:
    """``sigma(s B A)`` of each pair's update (``r`` values, descending, ``|s|`` applied), in order;
    the indices a pair dropped (zero rows) give exact zeros at the end.

    Every pair gets its two equilibrated Cholesky factors and their condition estimates (LAPACK, as
    in the module docstring). The pairs that take route 1 are then finished together: one stacked
    product ``R_B R_A^T`` and one stacked SVD per rank ``r`` (numpy runs the same LAPACK routine on
    each matrix, so every value is the one a pair alone gets); the others take routes 2 and 3 one at
    a time, route 3 asking the pair for its factors again.
    """
    out: list[np.ndarray] = [np.zeros(pair.rank) for pair in pairs]  # a pair with no live index stays 0
    sides: dict[int, tuple[_Side, _Side]] = {}
    stacks: dict[int, list[int]] = {}  # live rank -> the route-1 pairs of that rank
    for index, pair in enumerate(pairs):
        if pair.live is not None and not pair.live.size:
            continue
        side_a = _Side.from_gram(lambda pair=pair: pair.factors()[0].T, pair.d_in, pair.gram_a, pair.live)
        side_b = _Side.from_gram(lambda pair=pair: pair.factors()[1], pair.d_out, pair.gram_b, pair.live)
        sides[index] = (side_a, side_b)
        if side_a.gram_ok and side_b.gram_ok:
            stacks.setdefault(side_a.scale.size, []).append(index)
        else:
            out[index][: side_a.scale.size] = _core_singular_values(side_a, side_b)
    for indices in stacks.values():
        r_a = np.stack([sides[i][0].r0 for i in indices]) * np.stack([sides[i][0].scale for i in indices])[:, None, :]
        r_b = np.stack([sides[i][1].r0 for i in indices]) * np.stack([sides[i][1].scale for i in indices])[:, None, :]
        values = np.linalg.svd(np.matmul(r_b, r_a.transpose(0, 2, 1)), compute_uv=False)
        for row, index in enumerate(indices):
            out[index][: values.shape[1]] = values[row]
    return [values * pair.scale for values, pair in zip(out, pairs)]


def _factored_singular_values(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``sigma(B @ A)`` for ``r <= min(d_out, d_in)``: the ``r`` values of the core (module docstring),
    a factor whose Gram matrix would over- or underflow first rescaled by an exact power of two."""
    A, gram_a, exp_a = scaled_gram(A, rows_are_r=True)
    B, gram_b, exp_b = scaled_gram(B, rows_are_r=False)
    sigma = core_singular_values([_pair(A, B, gram_a, gram_b, 1.0, None)])[0]
    return np.ldexp(sigma, exp_a + exp_b) if exp_a + exp_b else sigma


def _product_singular_values(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``sigma(B @ A)`` for ``r > min(d_out, d_in)``: the SVD of the formed ``d_out x d_in`` product.

    Each factor is first scaled by an exact power of two (its peak into ``[0.5, 1)``), so the product
    cannot overflow; cost ``O(d_out d_in r)``, memory ``d_out d_in``, both at most the factors' own.
    """
    exp_a = _peak_exponent(A)
    exp_b = _peak_exponent(B)
    k = min(B.shape[0], A.shape[1])
    if exp_a is None or exp_b is None:
        return np.zeros(k)
    with np.errstate(under="ignore"):
        product = np.ldexp(B, -exp_b) @ np.ldexp(A, -exp_a)
    return np.ldexp(np.linalg.svd(product, compute_uv=False), exp_a + exp_b)


def adapter_singular_values(A: ArrayLike, B: ArrayLike, scale: float = 1.0) -> np.ndarray:
    """Singular values of the low-rank update ``scale * B @ A``, without forming it.

    Args:
        A: ``(r, d_in)`` down-projection (PEFT's ``lora_A.weight``); any real float dtype.
        B: ``(d_out, r)`` up-projection (PEFT's ``lora_B.weight``).
        scale: the adapter's scale ``s`` (``alpha / r``, ``alpha / sqrt(r)``, ...); its magnitude
            multiplies every singular value.

    Returns:
        float64 array of length ``k = min(r, d_out, d_in)``, descending, non-negative: the singular
        values of ``scale * B @ A`` (the remaining ``min(d_out, d_in) - k`` are exactly 0). Work and
        memory follow ``k``: ``O((d_out + d_in) r^2)`` and ``r^2`` when ``r <= min(d_out, d_in)``,
        ``O(d_out d_in r)`` and ``d_out d_in`` otherwise.

    Raises:
        ValueError: on shapes that do not compose (``B.shape[1] != A.shape[0]``) or are not 2-D.
        NonFiniteFactorsError: when ``A``, ``B`` or ``scale`` holds NaN or Inf.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"factors do not compose: A {A.shape} (r, d_in), B {B.shape} (d_out, r)")
    if not math.isfinite(scale):
        raise NonFiniteFactorsError(f"scale is {scale}")
    r, d_in = A.shape
    d_out = B.shape[0]
    if min(r, d_out, d_in) == 0:
        return np.zeros(0)
    if r > min(d_out, d_in):
        sigma = _product_singular_values(A, B)
    else:
        sigma = _factored_singular_values(A, B)
    return sigma * abs(float(scale))


# --------------------------------------------------------------------------------------------------
# every update kind


@dataclass(frozen=True, eq=False)
class Spectrum:
    """The singular values of an update, and how exact they are.

    Attributes:
        values: float64, descending, non-negative, scale applied.
        exact: True when ``values`` are the exact leading singular values (to rounding); False for a
            randomized top-k spectrum.
        error_bound: ``0`` when exact; else ``epsilon`` such that every true singular value lies in
            ``[values[i], sqrt(values[i]**2 + epsilon**2)]`` (:func:`dense_spectrum`).
        total_energy: ``||update||_F^2`` when known (dense updates), so that the captured energy
            ``sum(values**2) / total_energy`` of a truncated spectrum can be reported; else None.
    """

    values: np.ndarray
    exact: bool = True
    error_bound: float = 0.0
    total_energy: float | None = None


#: a dense update is reduced by randomized SVD only when ``top_k + oversampling`` is at most this
#: share of ``min(d_out, d_in)``; otherwise the exact SVD is about as cheap.
_RANDOMIZED_MAX_SHARE = 0.5
#: extra random directions beyond ``top_k`` (Halko, Martinsson & Tropp 2011, Sec. 4.2).
_OVERSAMPLING = 10
#: subspace (power) iterations; each one sharpens the leading values on slowly decaying spectra.
_POWER_ITERATIONS = 2


def spectrum(update: Update) -> Spectrum:
    """The singular values of ``update``, whatever its kind (see the module docstring).

    Args:
        update: a :class:`~nora_spectra.updates.LowRankUpdate`, ``DenseUpdate``, ``KroneckerUpdate``
            or ``HadamardUpdate``.

    Returns:
        The :class:`Spectrum`; ``values`` has length ``update.rank_bound`` (leading values when a
        dense update asks for ``top_k``).

    Raises:
        NonFiniteFactorsError: a factor or the scale holds NaN or Inf.
        TypeError: ``update`` is not an update kind.
    """
    if isinstance(update, LowRankUpdate):
        return Spectrum(adapter_singular_values(update.A, update.B, update.scale))
    if isinstance(update, HadamardUpdate):
        return Spectrum(_hadamard_singular_values(update))
    if isinstance(update, KroneckerUpdate):
        return Spectrum(_kronecker_singular_values(update))
    if isinstance(update, DenseUpdate):
        return dense_spectrum(update.delta, top_k=update.top_k)
    raise TypeError(f"not an update kind: {type(update).__name__}")


def singular_values(update: Update) -> np.ndarray:
    """``spectrum(update).values``: the singular values alone."""
    return spectrum(update).values


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise NonFiniteFactorsError(f"scale is {scale}")


def _hadamard_singular_values(update: HadamardUpdate) -> np.ndarray:
    """``sigma(s (B1 A1) * (B2 A2))`` from the face-splitting factors, or densely when that is smaller."""
    _check_scale(update.scale)
    k = update.rank_bound
    r12 = update.first.A.shape[0] * update.second.A.shape[0]
    if r12 <= min(update.shape):
        u, v = update.factors()
        return adapter_singular_values(v, u, update.scale)[:k]
    first = np.asarray(update.first.B, np.float64) @ np.asarray(update.first.A, np.float64)
    second = np.asarray(update.second.B, np.float64) @ np.asarray(update.second.A, np.float64)
    return dense_spectrum(first * second).values[:k] * abs(float(update.scale))


def _kronecker_singular_values(update: KroneckerUpdate) -> np.ndarray:
    """``sigma(s kron(W1, W2)) = |s| * {sigma_i(W1) sigma_j(W2)}``, sorted descending."""
    _check_scale(update.scale)
    sides = []
    for side in (update.left, update.right):
        if isinstance(side, DenseUpdate) and side.top_k is not None:
            raise ValueError("kronecker: a dense factor must be exact (top_k None)")
        sides.append(spectrum(side).values)
    products = np.multiply.outer(sides[0], sides[1]).ravel()
    return np.sort(products)[::-1] * abs(float(update.scale))


def dense_spectrum(delta: ArrayLike, top_k: int | None = None, *, seed: int = 0) -> Spectrum:
    """Singular values of a dense matrix: exact, or the leading ``top_k`` by randomized SVD.

    Exact: ``numpy.linalg.svd(compute_uv=False)`` in float64 (LAPACK ``gesdd``), after an exact
    power-of-two rescaling so nothing overflows. Randomized (Halko, Martinsson & Tropp 2011, Alg. 4.4),
    used when ``top_k + 10 <= min(d_out, d_in) / 2``: a Gaussian sketch ``Y = M Omega`` with
    ``top_k + 10`` columns, two subspace iterations, ``Q = orth(Y)`` and the singular values ``s_i``
    of ``Q^T M``. They come with a rigorous bound: since ``M^T M = (Q^T M)^T (Q^T M) + E^T E`` with
    ``E = (I - Q Q^T) M``, Weyl's inequality gives, for every ``i``,

    .. math:: s_i \\le \\sigma_i(M) \\le \\sqrt{s_i^2 + \\|E\\|_2^2}, \\qquad
              \\|E\\|_2^2 \\le \\|E\\|_F^2 = \\|M\\|_F^2 - \\|Q^T M\\|_F^2,

    and ``error_bound`` is ``||E||_F`` (computed exactly from the two Frobenius norms).

    Args:
        delta: ``(d_out, d_in)`` real matrix.
        top_k: None for every singular value; else the number of leading values wanted.
        seed: seed of the Gaussian sketch (results are reproducible).

    Returns:
        The :class:`Spectrum` (``total_energy`` is ``||delta||_F^2``).

    Raises:
        NonFiniteFactorsError: ``delta`` holds NaN or Inf.
        ValueError: ``delta`` is not 2-D or ``top_k < 1``.
    """
    m = np.asarray(delta, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"a dense update is 2-D, got shape {m.shape}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k_full = min(m.shape)
    if k_full == 0:
        return Spectrum(np.zeros(0), total_energy=0.0)
    m, exponent = _power_of_two_scaled(m)
    if exponent is None:
        return Spectrum(np.zeros(k_full if top_k is None else min(top_k, k_full)), total_energy=0.0)
    flat = m.reshape(-1) if m.flags.c_contiguous else m.ravel()
    total = float(np.dot(flat, flat))  # ||m||_F^2 without a temporary the size of m
    k = k_full if top_k is None else min(top_k, k_full)
    if top_k is None or k + _OVERSAMPLING > _RANDOMIZED_MAX_SHARE * k_full:
        values = np.linalg.svd(m, compute_uv=False)[:k]
        return Spectrum(np.ldexp(values, exponent), total_energy=_ldexp(total, 2 * exponent))
    rng = np.random.default_rng(seed)
    width = k + _OVERSAMPLING
    q = np.linalg.qr(m @ rng.standard_normal((m.shape[1], width)))[0]
    for _ in range(_POWER_ITERATIONS):
        q = np.linalg.qr(m.T @ q)[0]
        q = np.linalg.qr(m @ q)[0]
    sketch = q.T @ m  # (width, d_in)
    values = np.linalg.svd(sketch, compute_uv=False)[:k]
    residual = max(total - float(np.sum(sketch * sketch)), 0.0)
    return Spectrum(
        np.ldexp(values, exponent),
        exact=False,
        error_bound=_ldexp(math.sqrt(residual), exponent),
        total_energy=_ldexp(total, 2 * exponent),
    )


def _ldexp(x: float, exponent: int) -> float:
    """``x * 2**exponent``, or ``inf`` where that is beyond float64 (a squared norm of huge entries)."""
    try:
        return math.ldexp(x, exponent)
    except OverflowError:
        return math.inf


#: finite entries whose largest magnitude lies in this range are used as they are; others are first
#: rescaled by an exact power of two so that products and squared norms neither overflow nor underflow.
_SAFE_PEAK_RANGE = (2.0**-400, 2.0**400)


def _power_of_two_scaled(m: np.ndarray) -> tuple[np.ndarray, int | None]:
    """``(m', e)`` with ``m == m' * 2**e`` exactly; ``m'`` is ``m`` itself (no copy) unless it must be rescaled.

    Returns ``(m, None)`` for an all-zero matrix.

    Raises:
        NonFiniteFactorsError: ``m`` holds NaN or Inf.
    """
    peak = max(float(m.max()), -float(m.min()))
    if not math.isfinite(peak):
        raise NonFiniteFactorsError("the matrix holds NaN or Inf")
    if peak == 0.0:
        return m, None
    if _SAFE_PEAK_RANGE[0] < peak < _SAFE_PEAK_RANGE[1]:
        return m, 0
    exponent = math.frexp(peak)[1]
    return np.ldexp(m, -exponent), exponent


# --------------------------------------------------------------------------------------------------
# singular vectors and norms of dense matrices (base-aware analyses)

#: a matrix with ``min(d_out, d_in)`` at most this gets a dense LAPACK SVD for its leading singular
#: vectors and its spectral norm; a larger one gets ARPACK's Lanczos iteration on the ones wanted.
DENSE_VECTORS_MAX_DIM = 512


def _dense_matrix(matrix: ArrayLike) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {m.shape}")
    return m


def _lanczos(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` leading left singular vectors and values of ``m`` by ARPACK (``scipy.sparse.linalg.svds``).

    ``tol=0`` asks ARPACK for machine precision; the start vector is fixed, so results are reproducible.
    """
    from scipy.sparse.linalg import svds

    start = np.random.default_rng(0).standard_normal(min(m.shape))
    u, s, _ = svds(m, k=k, tol=0, v0=start, return_singular_vectors="u", solver="arpack")
    order = np.argsort(s)[::-1]
    return u[:, order], s[order]


def spectral_norm(matrix: ArrayLike) -> float:
    """``||M||_2 = sigma_1(M)``, exact to rounding (LAPACK, or ARPACK for large matrices).

    Args:
        matrix: ``(d_out, d_in)`` real matrix.

    Raises:
        NonFiniteFactorsError: the matrix holds NaN or Inf.
        ValueError: it is not 2-D.
    """
    m = _dense_matrix(matrix)
    if m.size == 0:
        return 0.0
    m, exponent = _power_of_two_scaled(m)
    if exponent is None:
        return 0.0
    if min(m.shape) <= DENSE_VECTORS_MAX_DIM:
        top = float(np.linalg.svd(m, compute_uv=False)[0])
    else:
        top = float(_lanczos(m, 1)[1][0])
    return _ldexp(top, exponent)


def leading_left_singular_vectors(matrix: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` leading left singular vectors and singular values of a dense matrix.

    Args:
        matrix: ``(d_out, d_in)`` real matrix.
        k: how many; at most ``min(d_out, d_in)`` are returned.

    Returns:
        ``(U_k, sigma_k)``: ``(d_out, k')`` orthonormal columns and ``(k',)`` descending values,
        ``k' = min(k, d_out, d_in)``. Exact to rounding: a dense LAPACK SVD when
        ``min(d_out, d_in) <= DENSE_VECTORS_MAX_DIM`` or ``k`` is over half of it, else ARPACK to
        machine precision. Each vector's sign is arbitrary. An all-zero matrix returns the first
        ``k'`` standard basis vectors and zeros.

    Raises:
        NonFiniteFactorsError: the matrix holds NaN or Inf.
        ValueError: it is not 2-D or ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    m = _dense_matrix(matrix)
    k = min(k, *m.shape)
    if k == 0:
        return np.zeros((m.shape[0], 0)), np.zeros(0)
    m, exponent = _power_of_two_scaled(m)
    if exponent is None:
        return np.eye(m.shape[0], k), np.zeros(k)
    if min(m.shape) <= DENSE_VECTORS_MAX_DIM or 2 * k > min(m.shape):
        u, s, _ = np.linalg.svd(m, full_matrices=False)
        u, s = u[:, :k], s[:k]
    else:
        u, s = _lanczos(m, k)
    return u, np.ldexp(s, exponent)


def left_singular_vectors(matrix: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Every left singular vector and singular value of a dense matrix (thin SVD, LAPACK ``gesdd``).

    Args:
        matrix: ``(d_out, d_in)`` real matrix.

    Returns:
        ``(U, sigma)``: ``(d_out, min(d_out, d_in))`` orthonormal columns and the descending values.

    Raises:
        NonFiniteFactorsError: the matrix holds NaN or Inf.
        ValueError: it is not 2-D.
    """
    m = _dense_matrix(matrix)
    k = min(m.shape)
    if k == 0:
        return np.zeros((m.shape[0], 0)), np.zeros(0)
    m, exponent = _power_of_two_scaled(m)
    if exponent is None:
        return np.eye(m.shape[0], k), np.zeros(k)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    return u, np.ldexp(s, exponent)
