"""Singular VECTORS of a low-rank update ``s * B @ A``, from its factors: :func:`factor_bases`.

The singular VALUES of every update come from :func:`nora_spectra.spectrum.spectrum`; this module adds
the singular vectors that resizing (Eckart-Young truncation) and subspace overlap need, by the same
factored route and never forming the ``d_out x d_in`` matrix. With thin QR factorizations
``B = Q_B R_B`` and ``A^T = Q_A R_A`` and the SVD of the small core ``R_B R_A^T = U_c S V_c^T``,

.. math::  s B A = Q_B \\, (s R_B R_A^T) \\, Q_A^T = (Q_B U_c) \\, (|s| S) \\, (\\mathrm{sign}(s) V_c^T Q_A^T),

a thin SVD of the update: ``Q_B U_c`` has orthonormal columns (the left singular vectors), ``V_c^T Q_A^T``
orthonormal rows (the right ones). :class:`FactorBases` holds ``R_A`` and ``R_B`` (one Gram matrix per
factor, ``O((d_out + d_in) r^2)``) and gives

* :attr:`FactorBases.core`: the ``r x r`` update ``s R_B R_A^T``, which has exactly the singular values of
  ``s B A`` (``Q_B`` and ``Q_A`` are orthonormal), so :meth:`FactorBases.singular_values`,
  ``spectrum(bases.core)``, is the update's spectrum from the one spectrum function
  (:func:`nora_spectra.spectrum.spectrum`) at ``O(r^3)`` cost instead of a second pass over the factors;
* :meth:`FactorBases.svd`: the leading ``top_k`` singular triplets (:class:`FactoredSVD`);
* :meth:`FactorBases.truncated_factors`: the factors of the best rank-``k`` approximation.

``Q`` is never formed on the fast path: ``R`` is the Cholesky factor of the factor's Gram matrix and
``Q X = F R^{-1} X`` is one triangular solve on ``r x k`` and one ``n x r`` by ``r x k`` product
(CholeskyQR; its loss of orthogonality is about ``eps * cond(F)^2``, kept below ``1e-9`` by refusing
Cholesky factors whose reciprocal condition number is under :data:`CHOLESKY_RCOND_LIMIT`). A factor that
is ill-conditioned or rank-deficient (a collapsed adapter has columns of B that are zero) goes through
Householder QR with an explicit ``Q`` instead. All arithmetic is float64; factors are first scaled by an
exact power of two when their Gram matrix would overflow or underflow, which changes no vector and is
undone exactly. The core SVD and the ``n x r`` by ``r x k`` products run on one BLAS thread
(:func:`nora_spectra._threads.one_blas_thread`); the Gram matrices keep BLAS's threads, as in
:mod:`nora_spectra.spectrum`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike

from nora_spectra._threads import one_blas_thread
from nora_spectra.spectrum import NonFiniteFactorsError, lapack_routines, scaled_gram, spectrum
from nora_spectra.updates import LowRankUpdate

__all__ = ["CHOLESKY_RCOND_LIMIT", "FactorBases", "FactoredSVD", "NonFiniteUpdateError", "factor_bases", "factored_svd"]

#: Reciprocal condition number (LAPACK ``dtrcon``, 1-norm) of a Cholesky factor below which the factor
#: is re-factored by Householder QR: CholeskyQR's orthogonality loss ``eps * cond^2`` stays under ~1e-9.
CHOLESKY_RCOND_LIMIT = 1e-3

#: A factor or the scale holds NaN or Inf: the update has no singular vectors (the spectrum's own error).
NonFiniteUpdateError = NonFiniteFactorsError


@dataclass(frozen=True, eq=False)
class FactoredSVD:
    """The leading singular triplets of ``s * B @ A``.

    ``left @ diag(values) @ right`` is the best rank-``k`` approximation of the update (Eckart-Young);
    with ``k = min(r, d_out, d_in)`` it is the update itself, to rounding.

    Attributes:
        left: ``(d_out, k)`` float64, orthonormal columns ``Q_B U_c[:, :k]``.
        values: ``(k,)`` float64, descending, non-negative, scale applied (``|s|`` times those of ``B A``).
        right: ``(k, d_in)`` float64, orthonormal rows ``sign(s) V_c[:, :k]^T Q_A^T``.
    """

    left: np.ndarray
    values: np.ndarray
    right: np.ndarray

    @property
    def k(self) -> int:
        """The number of triplets."""
        return int(self.values.shape[0])


def _solve_upper(R: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``R^{-1} x`` for upper-triangular ``R`` (LAPACK ``dtrtrs``; ``R`` is nonsingular on the Cholesky route)."""
    solution, info = lapack_routines().dtrtrs(R, x, lower=0)
    assert info == 0, f"dtrtrs failed: info {info}"
    return solution


class _Basis:
    """An orthonormal basis ``Q`` of a tall factor ``F = Q R`` (``F`` is ``(n, r)``), applied lazily.

    Attributes:
        R: ``(m, r)`` upper-trapezoidal, ``m = r`` (Cholesky) or ``min(n, r)`` (Householder).
    """

    def __init__(self, tall: np.ndarray, gram: np.ndarray) -> None:
        n, r = tall.shape
        self._tall = tall
        self._q: np.ndarray | None = None
        if n >= r:
            lapack = lapack_routines()
            chol, info = lapack.dpotrf(gram, lower=0, clean=1)
            if info == 0:
                rcond, info_con = lapack.dtrcon(chol, norm="1", uplo="U")
                if info_con == 0 and rcond >= CHOLESKY_RCOND_LIMIT:
                    self.R = chol
                    return
        self._q, self.R = np.linalg.qr(tall, mode="reduced")

    def columns(self, x: np.ndarray) -> np.ndarray:
        """``Q @ x`` (``(n, k)``) for ``x`` of shape ``(m, k)``: ``F @ (R^{-1} x)`` on the Cholesky route."""
        if self._q is not None:
            return self._q @ x
        return self._tall @ _solve_upper(self.R, x)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """``(Q @ x)^T`` (``(k, n)``, C-contiguous), computed as ``x^T R^{-T} F^T``."""
        if self._q is not None:
            return np.ascontiguousarray((self._q @ x).T)
        return _solve_upper(self.R, x).T @ self._tall.T


class FactorBases:
    """``R_A``, ``R_B`` and the core SVD of ``s * B @ A``: the update in orthonormal coordinates.

    Build with :func:`factor_bases`. Attributes ``shape`` ``(d_out, d_in)`` and ``scale``.
    """

    def __init__(self, A: np.ndarray, B: np.ndarray, scale: float) -> None:
        self.scale = scale
        self.shape = (B.shape[0], A.shape[1])
        lapack_routines()  # scipy's OpenBLAS loaded before one_blas_thread's controller is first built
        a_n, gram_a, self._exp_a = scaled_gram(A, rows_are_r=True)
        b_n, gram_b, self._exp_b = scaled_gram(B, rows_are_r=False)
        self._a = _Basis(a_n.T, gram_a)  # A^T = Q_A R_A
        self._b = _Basis(b_n, gram_b)  # B = Q_B R_B

    @cached_property
    def core(self) -> LowRankUpdate:
        """The ``(m_B, m_A)`` update ``s' R_B R_A^T`` with exactly the singular values of ``s B A``.

        ``s' = s * 2**(e_A + e_B)`` restores the power-of-two scaling of the factors. Pass it to
        :func:`nora_spectra.spectrum.spectrum` for the values.
        """
        scale = math.ldexp(self.scale, self._exp_a + self._exp_b) if self.scale else 0.0
        return LowRankUpdate(np.ascontiguousarray(self._a.R.T), self._b.R, scale)

    def singular_values(self) -> np.ndarray:
        """The update's singular values: :func:`~nora_spectra.spectrum.spectrum` of :attr:`core` (one BLAS thread).

        Equal to ``spectrum(LowRankUpdate(A, B, s)).values`` to rounding (tested to 1e-13 relative).

        Raises:
            nora_spectra.spectrum.NonFiniteFactorsError: the scale overflowed (an update beyond float64).
        """
        with one_blas_thread():
            return spectrum(self.core).values

    @cached_property
    def _core_svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SVD of ``R_B R_A^T`` (the scaled factors' core, no scale)."""
        with one_blas_thread():  # LAPACK's gesdd calls threaded BLAS even on a 64 x 64 core
            return np.linalg.svd(self._b.R @ self._a.R.T, full_matrices=False)

    def svd(self, top_k: int | None = None) -> FactoredSVD:
        """The leading ``top_k`` singular triplets (all ``min(r, d_out, d_in)`` when None)."""
        u_c, s_c, vt_c = self._core_svd
        k = s_c.size if top_k is None else min(top_k, s_c.size)
        with one_blas_thread():
            left = self._b.columns(u_c[:, :k])  # (d_out, k)
            right = self._a.rows(vt_c[:k].T)  # (k, d_in): V_c^T Q_A^T
        if self.scale < 0:
            right = -right
        values = np.ldexp(s_c[:k], self._exp_a + self._exp_b) * abs(self.scale)
        return FactoredSVD(np.ascontiguousarray(left), values, right)

    def truncated_factors(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(A', B')``, ``(k, d_in)`` and ``(d_out, k)``, with ``s B' A'`` the best rank-``k`` approximation of ``s B A``.

        ``B' = Q_B U_c[:, :k] S_k^{1/2}`` and ``A' = S_k^{1/2} V_c[:, :k]^T Q_A^T`` with ``S_k`` the kept
        singular values of ``B A`` (without the scale): the scale ``s`` is kept, the values are split
        evenly between the factors, and each factor costs one ``n x r`` by ``r x k`` product.
        """
        u_c, s_c, vt_c = self._core_svd
        k = min(k, s_c.size)
        root = np.sqrt(s_c[:k])
        with one_blas_thread():
            b_new = self._b.columns(u_c[:, :k] * root)
            a_new = self._a.rows(vt_c[:k].T * root)
        if self._exp_a:
            a_new = np.ldexp(a_new, self._exp_a)
        if self._exp_b:
            b_new = np.ldexp(b_new, self._exp_b)
        return a_new, b_new


def factor_bases(A: ArrayLike, B: ArrayLike, scale: float = 1.0) -> FactorBases:
    """Orthonormal bases of the factors of ``scale * B @ A`` (one Gram matrix per factor).

    Args:
        A: ``(r, d_in)`` down-projection (PEFT's ``lora_A.weight``); any real float dtype (upcast to float64).
        B: ``(d_out, r)`` up-projection (PEFT's ``lora_B.weight``).
        scale: the adapter's scale ``s``.

    Raises:
        ValueError: shapes that do not compose.
        NonFiniteUpdateError: ``A``, ``B`` or ``scale`` holds NaN or Inf.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"factors do not compose: A {A.shape} (r, d_in), B {B.shape} (d_out, r)")
    scale = float(scale)
    if not math.isfinite(scale):
        raise NonFiniteUpdateError(f"scale is {scale}")
    return FactorBases(A, B, scale)


def factored_svd(A: ArrayLike, B: ArrayLike, scale: float = 1.0, *, top_k: int | None = None) -> FactoredSVD:
    """The leading singular triplets of ``scale * B @ A``, without forming it (``factor_bases(...).svd(top_k)``).

    Args:
        A: ``(r, d_in)``; B: ``(d_out, r)``; scale: ``s`` (``|s|`` multiplies the values, ``sign(s)`` goes
            into ``right``).
        top_k: how many triplets to return; None for all ``min(r, d_out, d_in)`` (larger values are capped).

    Returns:
        The :class:`FactoredSVD`. ``values`` are those of :func:`nora_spectra.spectrum.spectrum` to rounding;
        vectors belonging to a zero singular value are an arbitrary orthonormal completion.

    Raises:
        ValueError: shapes that do not compose, or ``top_k < 0``.
        NonFiniteUpdateError: ``A``, ``B`` or ``scale`` holds NaN or Inf.
    """
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    if A.ndim == 2 and B.ndim == 2 and (0 in A.shape or 0 in B.shape or top_k == 0) and B.shape[1] == A.shape[0]:
        return FactoredSVD(np.zeros((B.shape[0], 0)), np.zeros(0), np.zeros((0, A.shape[1])))
    return factor_bases(A, B, scale).svd(top_k)
