"""Singular VECTORS of a low-rank update ``s * B @ A``, from its factors: :func:`factored_svd`.

The singular VALUES of every update come from :func:`nora_spectra.spectrum.spectrum`; this module adds
the singular vectors that resizing (Eckart-Young truncation) and subspace overlap need, by the same
factored route and never forming the ``d_out x d_in`` matrix. With thin QR factorizations
``B = Q_B R_B`` and ``A^T = Q_A R_A`` and the SVD of the small core ``R_B R_A^T = U_c S V_c^T``,

.. math::  s B A = (Q_B U_c) \\, (|s| S) \\, (\\mathrm{sign}(s) V_c^T Q_A^T),

a thin SVD of the update: ``Q_B U_c`` has orthonormal columns (the left singular vectors), ``V_c^T Q_A^T``
orthonormal rows (the right ones). Cost ``O((d_out + d_in) r^2)``; only the ``top_k`` leading vectors
are formed (``O((d_out + d_in) r k)`` more).

``Q`` is never formed on the fast path: like the spectrum, the triangular factor ``R`` is the Cholesky
factor of the factor's Gram matrix, and ``Q X = F R^{-1} X`` is one triangular solve on ``r x k`` and one
``n x r`` by ``r x k`` product (CholeskyQR; its loss of orthogonality is about ``eps * cond(F)^2``, kept
below ``1e-9`` by refusing Cholesky factors whose reciprocal condition number is under
:data:`CHOLESKY_RCOND_LIMIT`). A factor that is ill-conditioned or rank-deficient (a collapsed adapter
has columns of B that are zero) goes through Householder QR with an explicit ``Q`` instead. All
arithmetic is float64; factors are first scaled by an exact power of two when their Gram matrix would
overflow or underflow, which changes no vector and is undone exactly on the values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.linalg import lapack, solve_triangular

__all__ = ["CHOLESKY_RCOND_LIMIT", "FactoredSVD", "NonFiniteUpdateError", "factored_svd"]

#: Reciprocal condition number (LAPACK ``dtrcon``, 1-norm) of a Cholesky factor below which the factor
#: is re-factored by Householder QR: CholeskyQR's orthogonality loss ``eps * cond^2`` stays under ~1e-9.
CHOLESKY_RCOND_LIMIT = 1e-3

#: A Gram trace inside this range neither overflowed nor lost the factor to underflow.
_GRAM_TRACE_RANGE = (2.0**-900, 2.0**900)


class NonFiniteUpdateError(ValueError):
    """A factor or the scale holds NaN or Inf: the update has no singular vectors."""


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


def _scaled(factor: np.ndarray, rows_are_r: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """``(factor', gram', exponent)`` with ``factor == factor' * 2**exponent`` and a Gram that did not overflow.

    Raises:
        NonFiniteUpdateError: the factor holds NaN or Inf.
    """
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        gram = factor @ factor.T if rows_are_r else factor.T @ factor
    trace = float(np.trace(gram))
    if math.isfinite(trace) and _GRAM_TRACE_RANGE[0] < trace < _GRAM_TRACE_RANGE[1]:
        return factor, gram, 0
    peak = max(float(factor.max()), -float(factor.min())) if factor.size else 0.0
    if not math.isfinite(peak):
        raise NonFiniteUpdateError("factor holds NaN or Inf")
    if peak == 0.0:
        return factor, gram, 0
    exponent = math.frexp(peak)[1]
    scaled = np.ldexp(factor, -exponent)
    gram = scaled @ scaled.T if rows_are_r else scaled.T @ scaled
    return scaled, gram, exponent


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
            chol, info = lapack.dpotrf(gram, lower=0, clean=1)
            if info == 0:
                rcond, info_con = lapack.dtrcon(chol, norm="1", uplo="U")
                if info_con == 0 and rcond >= CHOLESKY_RCOND_LIMIT:
                    self.R = chol
                    return
        self._q, self.R = np.linalg.qr(tall, mode="reduced")

    def times(self, x: np.ndarray) -> np.ndarray:
        """``Q @ x`` for ``x`` of shape ``(m, k)``: ``F @ (R^{-1} x)`` on the Cholesky route."""
        if self._q is not None:
            return self._q @ x
        return self._tall @ solve_triangular(self.R, x, lower=False, check_finite=False)


def factored_svd(A: ArrayLike, B: ArrayLike, scale: float = 1.0, *, top_k: int | None = None) -> FactoredSVD:
    """The leading singular triplets of ``scale * B @ A``, without forming it.

    Args:
        A: ``(r, d_in)`` down-projection (PEFT's ``lora_A.weight``); any real float dtype (upcast to float64).
        B: ``(d_out, r)`` up-projection (PEFT's ``lora_B.weight``).
        scale: the adapter's scale ``s``; ``|s|`` multiplies the values and ``sign(s)`` goes into ``right``.
        top_k: how many triplets to return; None for all ``min(r, d_out, d_in)`` (larger values are capped).

    Returns:
        The :class:`FactoredSVD`. ``values`` are those of :func:`nora_spectra.spectrum.spectrum` to rounding;
        vectors belonging to a zero singular value are an arbitrary orthonormal completion.

    Raises:
        ValueError: shapes that do not compose, or ``top_k < 0``.
        NonFiniteUpdateError: ``A``, ``B`` or ``scale`` holds NaN or Inf.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"factors do not compose: A {A.shape} (r, d_in), B {B.shape} (d_out, r)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise NonFiniteUpdateError(f"scale is {scale}")
    r, d_in = A.shape
    d_out = B.shape[0]
    k = min(r, d_out, d_in) if top_k is None else min(top_k, r, d_out, d_in)
    a_n, gram_a, exp_a = _scaled(A, rows_are_r=True)
    b_n, gram_b, exp_b = _scaled(B, rows_are_r=False)
    if k == 0:
        return FactoredSVD(np.zeros((d_out, 0)), np.zeros(0), np.zeros((0, d_in)))
    basis_a = _Basis(a_n.T, gram_a)  # A^T = Q_A R_A
    basis_b = _Basis(b_n, gram_b)  # B = Q_B R_B
    core = basis_b.R @ basis_a.R.T  # B A = Q_B core Q_A^T
    u_c, s_c, vt_c = np.linalg.svd(core, full_matrices=False)
    left = basis_b.times(u_c[:, :k])  # (d_out, k)
    right = basis_a.times(vt_c[:k].T).T  # (k, d_in): V_c^T Q_A^T
    if scale < 0:
        right = -right
    values = np.ldexp(s_c[:k], exp_a + exp_b) * abs(scale)
    return FactoredSVD(np.ascontiguousarray(left), values, np.ascontiguousarray(right))
