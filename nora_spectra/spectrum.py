"""The one function that computes the singular values of a low-rank update ``s * B @ A``.

Everything in nora_spectra (``analyze``, reports, ``spectra check``, the trainer's tracking, the
activation-space measurement) calls :func:`adapter_singular_values`; nothing else computes a spectrum.

Method (see ``docs/metrics.md``): with thin QR factorizations ``B = Q_B R_B`` and ``A^T = Q_A R_A``,

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

import numpy as np
from numpy.typing import ArrayLike
from scipy.linalg import lapack

__all__ = ["NonFiniteFactorsError", "adapter_singular_values", "GRAM_RCOND_LIMIT"]

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
