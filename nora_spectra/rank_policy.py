"""Choosing a rank from a spectrum, and what truncating the update to that rank costs.

Notation: ``sigma_1 >= ... >= sigma_n >= 0`` are the singular values of a (scaled) update, as
:func:`nora_spectra.spectrum.spectrum` returns them (``n = min(r, d_out, d_in)``). By Eckart-Young the
best rank-``k`` approximation keeps the top ``k`` singular triplets; its errors are

.. math:: \\|\\Delta W - \\Delta W_k\\|_2 = \\sigma_{k+1}, \\qquad
          \\|\\Delta W - \\Delta W_k\\|_F = \\sqrt{\\textstyle\\sum_{i>k} \\sigma_i^2}

(:func:`truncation`). A :class:`RankPolicy` picks ``k`` per module:

* ``rank K``: ``k = min(K, n)`` (uniform);
* ``energy q``: the smallest ``k`` keeping the share ``q`` of ``sum sigma^2``
  (:func:`nora_spectra.metrics.energy_rank`, the same function as the ``energy_rank_90`` metric);
* ``sv_ratio R``: every ``sigma_i >= sigma_1 / R``;
* ``threshold optimal``: Gavish & Donoho (2014)'s optimal hard threshold for a matrix with white noise
  of unknown level, ``tau = omega(beta) * median(sigma)`` (:func:`optimal_threshold`).

Every policy keeps at least :data:`MIN_RANK` direction (PEFT has no rank-0 module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from numpy.typing import ArrayLike

from nora_spectra.errors import UsageError
from nora_spectra.metrics import as_spectrum, energy_rank

__all__ = [
    "MIN_RANK",
    "POLICIES",
    "RankPolicy",
    "Truncation",
    "energy_curve",
    "gavish_donoho_omega",
    "make_policy",
    "optimal_threshold",
    "truncation",
]

#: every module keeps at least this many directions (a PEFT module cannot have rank 0).
MIN_RANK = 1

#: policy name -> what its value means (for messages and ``--help``).
POLICIES: dict[str, str] = {
    "rank": "a rank K >= 1 (uniform; never above a module's current rank)",
    "energy": "an energy share q in (0, 1]",
    "sv_ratio": "a ratio R >= 1 (keep sigma_i >= sigma_1 / R)",
    "threshold": "'optimal' (Gavish-Donoho hard threshold)",
}


@dataclass(frozen=True)
class Truncation:
    """What keeping the top ``k`` singular values of a spectrum keeps and loses.

    Attributes:
        k: the number of values kept.
        energy_kept: ``sum_{i<=k} sigma_i^2 / sum_i sigma_i^2`` (1.0 for a zero spectrum).
        spectral_error: ``sigma_{k+1}``, absolute (0.0 when nothing is cut).
        frobenius_error_rel: ``sqrt(sum_{i>k} sigma_i^2) / sqrt(sum_i sigma_i^2)`` (0.0 for a zero spectrum).
        energy: ``sum_i sigma_i^2``, absolute (``||dW||_F^2``).
        tail_energy: ``sum_{i>k} sigma_i^2``, absolute (``||dW - dW_k||_F^2``).
    """

    k: int
    energy_kept: float
    spectral_error: float
    frobenius_error_rel: float
    energy: float
    tail_energy: float


def truncation(sigma: ArrayLike, k: int) -> Truncation:
    """The errors of the best rank-``k`` approximation of an update with singular values ``sigma``.

    Sums run over ``(sigma_i / sigma_1)^2`` with :func:`math.fsum`, so nothing overflows and the shares
    are correctly rounded.

    Args:
        sigma: ``(n,)`` singular values, descending.
        k: values kept, ``0 <= k``; ``k >= n`` cuts nothing.

    Returns:
        The :class:`Truncation`.
    """
    s = as_spectrum(sigma)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    top = float(s[0]) if s.size else 0.0
    if top == 0.0:
        return Truncation(k, 1.0, 0.0, 0.0, 0.0, 0.0)
    rel = [(float(v) / top) ** 2 for v in s]
    total = math.fsum(rel)
    tail = math.fsum(rel[k:])
    return Truncation(
        k=k,
        energy_kept=math.fsum(rel[:k]) / total,
        spectral_error=float(s[k]) if k < s.size else 0.0,
        frobenius_error_rel=math.sqrt(tail / total),
        energy=top * top * total,
        tail_energy=top * top * tail,
    )


def energy_curve(sigma: ArrayLike) -> list[float]:
    """The kept energy share at every rank: ``[truncation(sigma, k).energy_kept for k = 1..n]``.

    Empty for an empty spectrum; all ones for a zero spectrum (nothing to lose).
    """
    s = as_spectrum(sigma)
    top = float(s[0]) if s.size else 0.0
    if top == 0.0:
        return [1.0] * int(s.size)
    rel = [(float(v) / top) ** 2 for v in s]
    total = math.fsum(rel)
    return [math.fsum(rel[:k]) / total for k in range(1, len(rel) + 1)]


def _marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law with aspect ratio ``beta`` in (0, 1] (variance 1)."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(t: float) -> float:
        return math.sqrt(max((hi - t) * (t - lo), 0.0)) / (2 * math.pi * beta * t)

    def mass(x: float) -> float:
        # substitute t = lo + u^2 so the square-root edge (and the 1/sqrt(t) pole when beta = 1) is smooth
        value, _ = quad(lambda u: 2 * u * density(lo + u * u), 0.0, math.sqrt(x - lo), limit=200)
        return value

    return brentq(lambda x: mass(x) - 0.5, lo + 1e-12, hi, xtol=1e-14)


@lru_cache(maxsize=64)
def gavish_donoho_omega(beta: float) -> float:
    """Gavish & Donoho (2014), eq. (4): ``omega(beta) = lambda*(beta) / sqrt(mu_beta)``.

    ``lambda*(beta) = sqrt(2 (beta + 1) + 8 beta / (beta + 1 + sqrt(beta^2 + 14 beta + 1)))`` and
    ``mu_beta`` is the median of the Marchenko-Pastur law of ratio ``beta``, computed here by quadrature
    (their cubic fit ``0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43`` is within 0.02 of it).

    Args:
        beta: aspect ratio ``m / n <= 1`` of the matrix, in (0, 1].
    """
    if not 0 < beta <= 1:
        raise ValueError(f"beta must lie in (0, 1], got {beta}")
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta * beta + 14 * beta + 1)))
    return lam / math.sqrt(_marchenko_pastur_median(beta))


def optimal_threshold(sigma: ArrayLike, shape: Sequence[int], rank: int) -> float:
    """Gavish-Donoho's hard threshold ``omega(beta) * median(sigma)`` for a low-rank update.

    A LoRA update ``s B A`` lives in the ``r``-dimensional column space of ``B`` and row space of ``A``:
    in those coordinates it is the ``min(r, d_out) x min(r, d_in)`` core whose singular values are
    ``sigma``, so the rule is applied to the core (``beta`` is the core's aspect ratio, 1 in the usual
    case ``r <= d_out, d_in``; ``omega(1) = 2.858``). Assumptions (Gavish & Donoho 2014): the core is a
    low-rank signal plus i.i.d. zero-mean noise of unknown level, and the signal's rank is well below
    ``r`` so that the median singular value is a noise value. A trained adapter need not satisfy either,
    so treat the result as a heuristic: with a flat spectrum (no visible signal) it keeps
    :data:`MIN_RANK` direction.

    Args:
        sigma: the update's singular values, descending.
        shape: ``(d_out, d_in)``.
        rank: the module's ``r``.
    """
    s = as_spectrum(sigma)
    if s.size == 0:
        return 0.0
    rows, cols = min(rank, shape[0]), min(rank, shape[1])
    beta = min(rows, cols) / max(rows, cols)
    return gavish_donoho_omega(beta) * float(np.median(s))


@dataclass(frozen=True)
class RankPolicy:
    """How a rank is chosen from each module's spectrum.

    Attributes:
        name: ``"rank"``, ``"energy"``, ``"sv_ratio"`` or ``"threshold"`` (:data:`POLICIES`).
        value: ``K`` (int), ``q`` (float), ``R`` (float) or ``"optimal"``.
    """

    name: str
    value: Any

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "value"}`` (the ``policy`` object of ``spectra resize --format json``)."""
        return {"name": self.name, "value": self.value}

    def __str__(self) -> str:
        flag = {"rank": "--rank", "energy": "--energy", "sv_ratio": "--sv-ratio", "threshold": "--threshold"}[self.name]
        return f"{flag} {self.value}"

    def choose(self, sigma: ArrayLike, *, shape: Sequence[int], rank: int) -> int:
        """The rank ``k`` this policy keeps for one module, ``MIN_RANK <= k <= len(sigma)``.

        Args:
            sigma: the module's singular values, descending (scale applied).
            shape: ``(d_out, d_in)`` of the update.
            rank: the module's current ``r``.
        """
        s = as_spectrum(sigma)
        if self.name == "rank":
            k = int(self.value)
        elif self.name == "energy":
            k = energy_rank(s, float(self.value))
        elif self.name == "sv_ratio":
            top = float(s[0]) if s.size else 0.0
            k = int(np.count_nonzero(s >= top / float(self.value))) if top > 0 else 0
        else:
            tau = optimal_threshold(s, shape, rank)
            k = int(np.count_nonzero(s > tau)) if s.size and s[0] > 0 else 0
        return max(MIN_RANK, min(k, s.size))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def make_policy(
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    threshold: str | None = None,
) -> RankPolicy:
    """Validate the one policy given.

    Raises:
        UsageError: none or several policies, or a value outside its range (``rank`` < 1, ``energy``
            outside (0, 1], ``sv_ratio`` < 1, ``threshold`` other than ``"optimal"``).
    """
    given = {name: value for name, value in
             (("rank", rank), ("energy", energy), ("sv_ratio", sv_ratio), ("threshold", threshold)) if value is not None}
    if len(given) != 1:
        flags = "--rank K, --energy Q, --sv-ratio R or --threshold optimal"
        raise UsageError(f"choose exactly one policy: {flags}" + (f" (got {', '.join(given)})" if given else ""))
    name, value = next(iter(given.items()))
    if name == "rank" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise UsageError(f"--rank must be an integer >= 1, got {value!r}")
    if name == "energy" and not (_number(value) and 0 < value <= 1):
        raise UsageError(f"--energy must be a share in (0, 1], got {value!r}")
    if name == "sv_ratio" and not (_number(value) and value >= 1):
        raise UsageError(f"--sv-ratio must be a number >= 1, got {value!r}")
    if name == "threshold" and value != "optimal":
        raise UsageError(f"--threshold must be 'optimal' (Gavish-Donoho), got {value!r}")
    if name in ("energy", "sv_ratio"):
        value = float(value)
    return RankPolicy(name, value)
