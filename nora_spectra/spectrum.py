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
formed. The triangular factors come from the Cholesky factor of each Gram matrix (``R^T R = F^T F``),
an order of magnitude faster than Householder QR; since the Gram squares the condition number, a
factor whose Cholesky factor is ill-conditioned (or rank-deficient) is re-factored with Householder QR.
All arithmetic is float64; inputs are first scaled by an exact power of two so that huge or tiny
factors neither overflow nor underflow in the Gram matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.linalg import lapack

from nora_spectra.updates import DenseUpdate, HadamardUpdate, KroneckerUpdate, LowRankUpdate, Update

__all__ = [
    "DENSE_VECTORS_MAX_DIM",
    "GRAM_RCOND_LIMIT",
    "NonFiniteFactorsError",
    "Spectrum",
    "adapter_singular_values",
    "dense_spectrum",
    "leading_left_singular_vectors",
    "left_singular_vectors",
    "singular_values",
    "spectral_norm",
    "spectrum",
]

#: Reciprocal condition number (1-norm estimate of the Cholesky factor) below which a factor is
#: re-factored with Householder QR. The Gram route's error on a singular value is about
#: ``eps * cond(F)^2 * ||A|| ||B||``; with cond(F) <= 1e3 that stays below 1e-9 relative.
GRAM_RCOND_LIMIT = 1e-3


class NonFiniteFactorsError(ValueError):
    """A factor holds NaN or Inf: the update has no spectrum."""


def _gram(factor: np.ndarray, rows_are_r: bool) -> np.ndarray:
    """Gram matrix over the factor's long dimension: ``A A^T`` for ``A`` (r, n), ``B^T B`` for ``B`` (n, r)."""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return factor @ factor.T if rows_are_r else factor.T @ factor


def _safe_gram(factor: np.ndarray, rows_are_r: bool) -> tuple[np.ndarray, np.ndarray, int]:
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
    trace = float(np.trace(gram))
    if math.isfinite(trace) and _GRAM_TRACE_RANGE[0] < trace < _GRAM_TRACE_RANGE[1]:
        return factor, gram, 0
    peak = max(float(factor.max()), -float(factor.min())) if factor.size else 0.0
    if not math.isfinite(peak):
        raise NonFiniteFactorsError("factor holds NaN or Inf")
    if peak == 0.0:
        return factor, gram, 0
    exponent = math.frexp(peak)[1]  # peak = m * 2**exponent, 0.5 <= m < 1
    scaled = np.ldexp(factor, -exponent)
    return scaled, _gram(scaled, rows_are_r), exponent


#: A Gram trace inside this range neither overflowed nor lost the factor to underflow.
_GRAM_TRACE_RANGE = (2.0**-900, 2.0**900)


def _triangular_factor(tall: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Return ``R`` with ``tall = Q R`` (``Q`` orthonormal columns) for a tall-or-wide factor.

    Args:
        tall: ``(n, r)`` float64 matrix (a factor arranged so that its rows index the big dimension).
        gram: ``tall.T @ tall``, ``(r, r)``.

    Returns:
        ``(k, r)`` upper-trapezoidal ``R`` with ``k = r`` (Cholesky route) or ``k = min(n, r)``
        (Householder fallback). Only ``R^T R = tall^T tall`` matters for the spectrum.
    """
    n, r = tall.shape
    if n >= r:
        chol, info = lapack.dpotrf(gram, lower=0, clean=1)
        if info == 0:
            rcond, info_con = lapack.dtrcon(chol, norm="1", uplo="U")
            if info_con == 0 and rcond >= GRAM_RCOND_LIMIT:
                return chol
    return np.linalg.qr(tall, mode="r")


def adapter_singular_values(A: ArrayLike, B: ArrayLike, scale: float = 1.0) -> np.ndarray:
    """Singular values of the low-rank update ``scale * B @ A``, without forming it.

    Args:
        A: ``(r, d_in)`` down-projection (PEFT's ``lora_A.weight``); any real float dtype.
        B: ``(d_out, r)`` up-projection (PEFT's ``lora_B.weight``).
        scale: the adapter's scale ``s`` (``alpha / r``, ``alpha / sqrt(r)``, ...); its magnitude
            multiplies every singular value.

    Returns:
        float64 array of length ``min(r, d_out, d_in)``, descending, non-negative: the singular values
        of ``scale * B @ A`` (the remaining ``min(d_out, d_in) - min(r, d_out, d_in)`` are exactly 0).

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
    k = min(r, d_out, d_in)
    if k == 0:
        return np.zeros(0)
    A_n, gram_a, exp_a = _safe_gram(A, rows_are_r=True)
    B_n, gram_b, exp_b = _safe_gram(B, rows_are_r=False)
    if not gram_a.any() or not gram_b.any():  # an all-zero factor: the update is exactly zero
        return np.zeros(k)
    r_a = _triangular_factor(A_n.T, gram_a)  # A^T = Q_A R_A, R_A (k_A, r)
    r_b = _triangular_factor(B_n, gram_b)  # B = Q_B R_B, R_B (k_B, r)
    core = r_b @ r_a.T  # (k_B, k_A) with min(k_B, k_A) == k; sigma(B A) == sigma(core)
    sigma = np.linalg.svd(core, compute_uv=False)
    return np.ldexp(sigma, exp_a + exp_b) * abs(float(scale))


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
