"""Streaming centred factors: the numpy core of activation- and probe-space spectra.

A branch output ``dY = s H B^T`` (``H``: tokens x r hidden, ``B``: d_out x r) centred over tokens is
``s H_c B^T``. :class:`CentredFactor` reduces ``H_c`` on the fly to its ``r x r`` triangular factor
``R`` (``H_c = Q R``), and :func:`centred_spectrum` gets ``sigma(s B R^T)`` from THE spectrum function
:func:`nora_spectra.spectrum.adapter_singular_values`. Memory is ``O(r^2)`` per layer whatever the
number of tokens, and the condition number is never squared. Plain numpy, no torch.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from nora_spectra.spectrum import NonFiniteFactorsError, adapter_singular_values, dense_spectrum

__all__ = ["CentredFactor", "centred_response_spectrum", "centred_spectrum"]


class CentredFactor:
    """Streaming triangular factor of column-centred rows: after all updates ``H_c = Q R``.

    Rows arrive in batches; each batch is centred on its own mean and reduced by Householder QR, and
    two partial results ``(n_a, mean_a, R_a)``, ``(n_b, mean_b, R_b)`` merge exactly through the
    pooled scatter identity

    .. math:: H_c^T H_c = R_a^T R_a + R_b^T R_b + \\frac{n_a n_b}{n_a + n_b} (m_b - m_a)(m_b - m_a)^T,

    realised as the QR of ``[R_a; R_b; sqrt(n_a n_b / n) (m_b - m_a)^T]`` (never forming a Gram
    matrix). Memory is ``O(width^2)`` whatever the number of rows.

    Args:
        width: number of columns ``r``.

    Attributes:
        n: rows seen so far.
        mean: ``(width,)`` column means of the rows seen.
        finite: False once a batch held NaN or Inf (later batches are then ignored).
    """

    def __init__(self, width: int) -> None:
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = int(width)
        self.n = 0
        self.mean = np.zeros(self.width)
        self.finite = True
        self._r = np.zeros((0, self.width))

    def update(self, rows: np.ndarray) -> None:
        """Add a batch of rows.

        Args:
            rows: ``(m, width)`` array (upcast to float64); ``m == 0`` is a no-op.

        Raises:
            ValueError: when ``rows`` is not ``(m, width)``.
        """
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows must be (m, {self.width}), got {rows.shape}")
        m = rows.shape[0]
        if m == 0 or not self.finite:
            return
        if not np.all(np.isfinite(rows)):
            self.finite = False
            return
        batch_mean = rows.mean(axis=0)
        batch_r = np.linalg.qr(rows - batch_mean, mode="r")
        if self.n == 0:
            self.n, self.mean, self._r = m, batch_mean, batch_r
            return
        total = self.n + m
        shift = batch_mean - self.mean
        stacked = np.vstack([self._r, batch_r, math.sqrt(self.n * m / total) * shift[None, :]])
        self._r = np.linalg.qr(stacked, mode="r")
        self.mean = self.mean + shift * (m / total)
        self.n = total

    @property
    def triangle(self) -> np.ndarray:
        """The unpadded factor: ``(k, width)`` upper-trapezoidal with ``k <= min(rows seen, width)``
        and the same ``R^T R = H_c^T H_c``."""
        return self._r

    @property
    def R(self) -> np.ndarray:
        """``(width, width)`` upper-triangular ``R`` with ``R^T R = H_c^T H_c`` (zero rows padded)."""
        out = np.zeros((self.width, self.width))
        k = min(self._r.shape[0], self.width)
        out[:k] = self._r[:k]
        return out


def centred_spectrum(factor: CentredFactor, B: np.ndarray, scale: float) -> np.ndarray:
    """Singular values of the centred branch output ``s H_c B^T`` from the streamed factor of ``H_c``.

    Args:
        factor: the :class:`CentredFactor` of the hidden ``H`` (tokens x r).
        B: ``(d_out, r)`` up-projection.
        scale: the adapter's scale ``s``.

    Returns:
        ``(min(r, d_out),)`` float64, descending: ``sigma(s B H_c^T) = sigma(s B R^T)``.

    Raises:
        NonFiniteFactorsError: when the hidden or ``B`` held NaN/Inf.
    """
    if not factor.finite:
        raise NonFiniteFactorsError("the adapter hidden held NaN or Inf")
    return adapter_singular_values(factor.R.T, B, scale)


def centred_response_spectrum(hidden: Iterable[np.ndarray], B: np.ndarray, scale: float, samples: int) -> np.ndarray:
    """Singular values of the centred branch output ``s H_c B^T`` at a cost set by ``min(r, d_out, samples)``.

    The output ``s H B^T`` (samples x d_out) has rank at most ``k = min(r, d_out, samples)``; the work
    follows the smallest side:

    * ``r <= min(d_out, samples)``: the hidden rows are reduced to their ``r x r`` factor
      (:class:`CentredFactor`) and :func:`centred_spectrum` gives ``sigma(s B R^T)``: ``O(samples r^2 +
      d_out r^2)`` time, ``O(r^2)`` memory;
    * otherwise the output rows ``s H B^T`` themselves are reduced (width ``d_out``), keeping only the
      unpadded ``min(samples, d_out) x d_out`` factor, whose singular values are those of the centred
      output: ``O(samples r d_out + samples min(samples, d_out) d_out)`` time, ``O(min(samples, d_out)
      d_out)`` memory, which is at most the size of ``B`` since ``r`` exceeds ``min(samples, d_out)``.

    Args:
        hidden: batches of hidden rows ``H`` (each ``(m, r)``), ``samples`` rows in all.
        B: ``(d_out, r)`` up-projection.
        scale: the adapter's scale ``s``.
        samples: the total number of rows the batches hold.

    Returns:
        ``(min(r, d_out),)`` float64, descending (zeros beyond the output's rank bound).

    Raises:
        NonFiniteFactorsError: the hidden rows or ``B`` held NaN/Inf.
    """
    B = np.asarray(B, dtype=np.float64)
    d_out, r = B.shape
    if r <= min(d_out, samples):
        factor = CentredFactor(r)
        for rows in hidden:
            factor.update(rows)
        return centred_spectrum(factor, B, scale)
    if not (math.isfinite(scale) and np.all(np.isfinite(B))):
        raise NonFiniteFactorsError("B or the scale holds NaN or Inf")
    up = B.T * float(scale)  # (r, d_out)
    factor = CentredFactor(d_out)
    with np.errstate(over="ignore", invalid="ignore"):
        for rows in hidden:
            factor.update(rows @ up)  # (m, d_out): the branch output rows
    if not factor.finite:
        raise NonFiniteFactorsError("the adapter output held NaN or Inf")
    values = dense_spectrum(factor.triangle).values
    out = np.zeros(min(r, d_out))
    out[: values.size] = values[: out.size]
    return out
