"""Per-layer spectral metrics, all computed from one spectrum by :func:`spectrum_metrics`.

Notation: ``sigma_1 >= ... >= sigma_k >= 0`` are the singular values of the (scaled) update, ``k =
min(r, d_out, d_in)``, ``r`` the rank budget. Formulas and references: ``docs/metrics.md``.

Conventions (documented there too):

* ``p_i = sigma_i / sum_j sigma_j`` (singular values, not their squares) for the effective rank and
  the spectral entropy, as Roy & Vetterli (2007) and the NoRA paper.
* An all-zero update has no spectrum: status ``"zero"``, every rank-like metric 0, never a division by 0.
* Energy ranks compare cumulative energy with ``q * total`` up to a relative ``1e-12`` so that a flat
  spectrum of 10 values has ``energy_rank_90 == 9``, not 10 through rounding.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from numpy.typing import ArrayLike

from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD

__all__ = [
    "DEFAULT_COLLAPSE_THRESHOLD",
    "METRIC_FIELDS",
    "as_spectrum",
    "effective_rank",
    "stable_rank",
    "energy_rank",
    "numerical_rank",
    "spectral_entropy",
    "participation_ratio",
    "tail_energy",
    "spectrum_metrics",
    "non_finite_metrics",
]

#: Relative slack in the energy-rank comparison (absorbs rounding in the cumulative sum).
_ENERGY_RTOL = 1e-12
_EPS = float(np.finfo(np.float64).eps)

#: The metric fields of a layer record, in JSON order, as returned by :func:`spectrum_metrics`.
METRIC_FIELDS = (
    "effective_rank",
    "stable_rank",
    "energy_rank_90",
    "energy_rank_99",
    "numerical_rank",
    "spectral_entropy",
    "utilization",
    "sigma_max",
    "frobenius_norm",
    "tail_energy",
    "participation_ratio",
    "collapsed",
    "status",
)


def as_spectrum(sigma: ArrayLike) -> np.ndarray:
    """``sigma`` as a validated float64 spectrum.

    Raises:
        ValueError: not 1-D, or a value that is negative, NaN or infinite.
    """
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"a spectrum is 1-D, got shape {s.shape}")
    if s.size and (not np.all(np.isfinite(s)) or s.min() < 0):
        raise ValueError("a spectrum holds non-negative finite singular values")
    return s


def _relative_energy(s: np.ndarray) -> np.ndarray:
    """``(sigma_i / sigma_1)^2``: energies that cannot overflow (all zeros for a zero spectrum)."""
    top = s.max(initial=0.0)
    return (s / top) ** 2 if top > 0 else np.zeros_like(s)


def effective_rank(sigma: ArrayLike) -> float:
    """Entropy effective rank (Roy & Vetterli, 2007).

    .. math:: p_i = \\sigma_i / \\sum_j \\sigma_j, \\quad
              \\mathrm{erank} = \\exp(-\\sum_i p_i \\ln p_i)

    Args:
        sigma: ``(k,)`` singular values.

    Returns:
        ``1 <= erank <= #nonzero sigma``; 0.0 for an all-zero spectrum.
    """
    return _effective_rank(as_spectrum(sigma))


def _effective_rank(s: np.ndarray) -> float:
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def stable_rank(sigma: ArrayLike) -> float:
    """Stable rank ``sum_i sigma_i^2 / sigma_1^2`` (``||M||_F^2 / ||M||_2^2``); 0.0 for a zero spectrum."""
    return float(np.sum(_relative_energy(as_spectrum(sigma))))


def energy_rank(sigma: ArrayLike, q: float) -> int:
    """Smallest ``k`` with ``sum_{i<=k} sigma_i^2 >= q * sum_i sigma_i^2`` (0 for a zero spectrum).

    Args:
        sigma: ``(k,)`` singular values, descending.
        q: energy share in ``(0, 1]`` (0.90 is the NoRA paper's "manifold dimensionality").
    """
    if not 0 < q <= 1:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    return _energy_rank(np.cumsum(_relative_energy(as_spectrum(sigma))), q)


def _energy_rank(energy: np.ndarray, q: float) -> int:
    """:func:`energy_rank` from the cumulative relative energies."""
    if energy.size == 0 or energy[-1] == 0:
        return 0
    needed = q * energy[-1] * (1 - _ENERGY_RTOL)
    return int(np.searchsorted(energy, needed, side="left") + 1)


def numerical_rank(sigma: ArrayLike, shape: Sequence[int]) -> int:
    """Count of ``sigma_i > sigma_1 * max(d_out, d_in) * eps(float64)`` (numpy ``matrix_rank``'s tolerance).

    Args:
        sigma: ``(k,)`` singular values.
        shape: ``(d_out, d_in)`` of the update.
    """
    return _numerical_rank(as_spectrum(sigma), shape)


def _numerical_rank(s: np.ndarray, shape: Sequence[int]) -> int:
    top = s.max(initial=0.0)
    if top == 0:
        return 0
    tol = top * max(shape) * _EPS
    return int(np.count_nonzero(s > tol))


def spectral_entropy(sigma: ArrayLike) -> float:
    """Normalised spectral entropy ``H(p) / ln(k)`` in ``[0, 1]``, ``p_i = sigma_i / sum sigma``.

    Equals ``ln(erank) / ln(k)``. With ``k == 1`` a nonzero spectrum is fully spread: 1.0. A zero
    spectrum: 0.0. (WeightWatcher uses ``p`` from ``sigma^2``; we keep ``sigma`` like the effective rank.)
    """
    s = as_spectrum(sigma)
    return _spectral_entropy(_effective_rank(s), s.size)


def _spectral_entropy(erank: float, k: int) -> float:
    """:func:`spectral_entropy` from the effective rank of a spectrum of ``k`` values."""
    if erank == 0:
        return 0.0
    if k == 1:
        return 1.0
    return float(min(1.0, math.log(erank) / math.log(k)))


def participation_ratio(sigma: ArrayLike) -> float:
    """Participation ratio ``(sum sigma^2)^2 / sum sigma^4`` (0.0 for a zero spectrum)."""
    return _participation_ratio(_relative_energy(as_spectrum(sigma)))


def _participation_ratio(e: np.ndarray) -> float:
    if not e.any():
        return 0.0
    return float(e.sum() ** 2 / np.sum(e**2))


def tail_energy(sigma: ArrayLike, rank: int) -> float:
    """Share of ``sum sigma^2`` in the bottom half of the rank budget.

    The tail is positions ``i > ceil(r / 2)`` (1-based) of the spectrum padded with zeros to length
    ``r``: for r = 16, sigma_9 .. sigma_16. 0.0 for a zero spectrum or r = 1.
    """
    return _tail_energy(_relative_energy(as_spectrum(sigma)), rank)


def _tail_energy(energy: np.ndarray, rank: int) -> float:
    total = energy.sum()
    if total == 0:
        return 0.0
    head = math.ceil(rank / 2)
    return float(energy[head:].sum() / total)


def spectrum_metrics(
    sigma: ArrayLike,
    *,
    rank: int,
    shape: Sequence[int],
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
) -> dict[str, Any]:
    """Every per-layer metric of one spectrum (the fields of :data:`METRIC_FIELDS`).

    Args:
        sigma: ``(k,)`` singular values of the scaled update, descending (from
            :func:`nora_spectra.spectrum.adapter_singular_values`).
        rank: the rank budget ``r`` the adapter paid for.
        shape: ``(d_out, d_in)`` of the update.
        collapse_threshold: ``collapsed`` is ``utilization < collapse_threshold``.

    Returns:
        A dict with ``effective_rank``, ``stable_rank``, ``energy_rank_90``, ``energy_rank_99``,
        ``numerical_rank``, ``spectral_entropy``, ``utilization`` (``effective_rank / rank``),
        ``sigma_max``, ``frobenius_norm``, ``tail_energy``, ``participation_ratio``, ``collapsed`` and
        ``status`` (``"ok"``, or ``"zero"`` for an all-zero update: utilization 0, so ``collapsed``).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not 0 <= collapse_threshold <= 1:
        raise ValueError(f"collapse_threshold must lie in [0, 1], got {collapse_threshold}")
    s = as_spectrum(sigma)  # validated once; the private helpers below take it as it is
    sigma_max = float(s.max(initial=0.0))
    erank = _effective_rank(s)
    utilization = erank / rank
    zero = sigma_max == 0
    energy = _relative_energy(s)
    cumulative = np.cumsum(energy)
    stable = float(np.sum(energy))
    return {
        "effective_rank": erank,
        "stable_rank": stable,
        "energy_rank_90": _energy_rank(cumulative, 0.90),
        "energy_rank_99": _energy_rank(cumulative, 0.99),
        "numerical_rank": _numerical_rank(s, shape),
        "spectral_entropy": _spectral_entropy(erank, s.size),
        "utilization": utilization,
        "sigma_max": sigma_max,
        "frobenius_norm": float(sigma_max * math.sqrt(stable)),
        "tail_energy": _tail_energy(energy, rank),
        "participation_ratio": _participation_ratio(energy),
        "collapsed": utilization < collapse_threshold,
        "status": "zero" if zero else "ok",
    }


def non_finite_metrics() -> dict[str, Any]:
    """The metric fields of a layer whose factors hold NaN/Inf: every metric null, status "non_finite"."""
    metrics: dict[str, Any] = {name: None for name in METRIC_FIELDS}
    metrics["collapsed"] = False
    metrics["status"] = "non_finite"
    return metrics
