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
    "spectra_metrics",
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


def effective_rank(sigma: ArrayLike) -> float:
    """Entropy effective rank (Roy & Vetterli, 2007).

    .. math:: p_i = \\sigma_i / \\sum_j \\sigma_j, \\quad
              \\mathrm{erank} = \\exp(-\\sum_i p_i \\ln p_i)

    Args:
        sigma: ``(k,)`` singular values.

    Returns:
        ``1 <= erank <= #nonzero sigma``; 0.0 for an all-zero spectrum.
    """
    return _one("effective_rank", sigma)


def stable_rank(sigma: ArrayLike) -> float:
    """Stable rank ``sum_i sigma_i^2 / sigma_1^2`` (``||M||_F^2 / ||M||_2^2``); 0.0 for a zero spectrum."""
    return _one("stable_rank", sigma)


def energy_rank(sigma: ArrayLike, q: float) -> int:
    """Smallest ``k`` with ``sum_{i<=k} sigma_i^2 >= q * sum_i sigma_i^2`` (0 for a zero spectrum).

    Args:
        sigma: ``(k,)`` singular values, descending.
        q: energy share in ``(0, 1]`` (0.90 is the NoRA paper's "manifold dimensionality").
    """
    if not 0 < q <= 1:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    s = as_spectrum(sigma)[None, :]
    return int(_energy_ranks(np.cumsum(_relative_energies(s, s.max(axis=1, initial=0.0)), axis=1), q)[0])


def numerical_rank(sigma: ArrayLike, shape: Sequence[int]) -> int:
    """Count of ``sigma_i > sigma_1 * max(d_out, d_in) * eps(float64)`` (numpy ``matrix_rank``'s tolerance).

    Args:
        sigma: ``(k,)`` singular values.
        shape: ``(d_out, d_in)`` of the update.
    """
    return int(spectra_metrics([sigma], ranks=[1], shapes=[shape])[0]["numerical_rank"])


def spectral_entropy(sigma: ArrayLike) -> float:
    """Normalised spectral entropy ``H(p) / ln(k)`` in ``[0, 1]``, ``p_i = sigma_i / sum sigma``.

    Equals ``ln(erank) / ln(k)``. With ``k == 1`` a nonzero spectrum is fully spread: 1.0. A zero
    spectrum: 0.0. (WeightWatcher uses ``p`` from ``sigma^2``; we keep ``sigma`` like the effective rank.)
    """
    return _one("spectral_entropy", sigma)


def _spectral_entropy(erank: float, k: int) -> float:
    """:func:`spectral_entropy` from the effective rank of a spectrum of ``k`` values."""
    if erank == 0:
        return 0.0
    if k == 1:
        return 1.0
    return float(min(1.0, math.log(erank) / math.log(k)))


def participation_ratio(sigma: ArrayLike) -> float:
    """Participation ratio ``(sum sigma^2)^2 / sum sigma^4`` (0.0 for a zero spectrum)."""
    return _one("participation_ratio", sigma)


def tail_energy(sigma: ArrayLike, rank: int) -> float:
    """Share of ``sum sigma^2`` in the bottom half of the rank budget.

    The tail is positions ``i > ceil(r / 2)`` (1-based) of the spectrum padded with zeros to length
    ``r``: for r = 16, sigma_9 .. sigma_16. 0.0 for a zero spectrum or r = 1.
    """
    return float(spectra_metrics([sigma], ranks=[rank], shapes=[(1, 1)])[0]["tail_energy"])


def _one(name: str, sigma: ArrayLike) -> Any:
    """Metric ``name`` of one spectrum (for the rank-free metrics: computed with ``r = 1``)."""
    return spectra_metrics([sigma], ranks=[1], shapes=[(1, 1)])[0][name]


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
    return spectra_metrics([sigma], ranks=[rank], shapes=[shape], collapse_threshold=collapse_threshold)[0]


def spectra_metrics(
    sigmas: Sequence[ArrayLike],
    *,
    ranks: Sequence[int],
    shapes: Sequence[Sequence[int]],
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
) -> list[dict[str, Any]]:
    """:func:`spectrum_metrics` of many spectra at once (one analysis' modules), in their order.

    Spectra of equal length are stacked into one ``(m, k)`` array and measured by a few numpy calls
    on the whole stack, so a 224-module adapter costs about what a handful of modules did one by one;
    each value is the one :func:`spectrum_metrics` gives for that spectrum alone (up to the last bit
    of a sum over a spectrum that holds exact zeros, which are now added as zeros).

    Args:
        sigmas: ``(k_i,)`` spectra as for :func:`spectrum_metrics`.
        ranks: each one's rank budget ``r_i``.
        shapes: each one's ``(d_out, d_in)``.
        collapse_threshold: as for :func:`spectrum_metrics`.

    Raises:
        ValueError: a spectrum that is not a valid one (:func:`as_spectrum`), a rank below 1,
            ``collapse_threshold`` outside [0, 1], or lengths that differ.
    """
    if not len(sigmas) == len(ranks) == len(shapes):
        raise ValueError(f"{len(sigmas)} spectra, {len(ranks)} ranks and {len(shapes)} shapes")
    if not 0 <= collapse_threshold <= 1:
        raise ValueError(f"collapse_threshold must lie in [0, 1], got {collapse_threshold}")
    spectra = [as_spectrum(sigma) for sigma in sigmas]  # each validated once
    for rank in ranks:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
    by_length: dict[int, list[int]] = {}
    for index, s in enumerate(spectra):
        by_length.setdefault(s.size, []).append(index)
    out: list[dict[str, Any]] = [{} for _ in spectra]
    for indices in by_length.values():
        stack = np.stack([spectra[i] for i in indices]) if len(indices) > 1 else spectra[indices[0]][None, :]
        rows = _stack_metrics(stack, [int(ranks[i]) for i in indices], [max(shapes[i]) for i in indices],
                              collapse_threshold)
        for i, row in zip(indices, rows):
            out[i] = row
    return out


def _stack_metrics(S: np.ndarray, ranks: list[int], long_sides: list[int], collapse_threshold: float) -> list[dict[str, Any]]:
    """The metric dicts of the rows of ``S`` (``(m, k)``, validated spectra of one length)."""
    m, k = S.shape
    tops = S.max(axis=1, initial=0.0)
    eranks = _effective_ranks(S)
    energy = _relative_energies(S, tops)
    cumulative = np.cumsum(energy, axis=1)
    stables = energy.sum(axis=1)
    rank_90 = _energy_ranks(cumulative, 0.90)
    rank_99 = _energy_ranks(cumulative, 0.99)
    numerical = _numerical_ranks(S, tops, long_sides)
    tails = _tail_energies(energy, stables, ranks)
    participation = _participation_ratios(energy, stables)
    rows = []
    for i in range(m):
        sigma_max = float(tops[i])
        erank = float(eranks[i])
        stable = float(stables[i])
        utilization = erank / ranks[i]
        rows.append({
            "effective_rank": erank,
            "stable_rank": stable,
            "energy_rank_90": int(rank_90[i]),
            "energy_rank_99": int(rank_99[i]),
            "numerical_rank": int(numerical[i]),
            "spectral_entropy": _spectral_entropy(erank, k),
            "utilization": utilization,
            "sigma_max": sigma_max,
            "frobenius_norm": float(sigma_max * math.sqrt(stable)),
            "tail_energy": float(tails[i]),
            "participation_ratio": float(participation[i]),
            "collapsed": utilization < collapse_threshold,
            "status": "zero" if sigma_max == 0 else "ok",
        })
    return rows


def _effective_ranks(S: np.ndarray) -> np.ndarray:
    """:func:`effective_rank` of each row: ``exp(-sum p ln p)``, ``p = s / sum s`` over the nonzero ``s``."""
    totals = S.sum(axis=1)
    out = np.zeros(S.shape[0])
    live = totals != 0
    if live.any():
        p = S[live] / totals[live, None]
        logs = np.log(p, out=np.zeros_like(p), where=p > 0)
        out[live] = [math.exp(-entropy) for entropy in (p * logs).sum(axis=1).tolist()]
    return out


def _relative_energies(S: np.ndarray, tops: np.ndarray) -> np.ndarray:
    """``(sigma_i / sigma_1)^2`` of each row: energies that cannot overflow (zeros for a zero row)."""
    safe = np.where(tops > 0, tops, 1.0)
    return np.where(tops[:, None] > 0, (S / safe[:, None]) ** 2, 0.0)


def _energy_ranks(cumulative: np.ndarray, q: float) -> np.ndarray:
    """:func:`energy_rank` of each row from its cumulative relative energies (0 for a zero row)."""
    if cumulative.shape[1] == 0:
        return np.zeros(cumulative.shape[0], dtype=np.int64)
    last = cumulative[:, -1]
    needed = q * last * (1 - _ENERGY_RTOL)
    ranks = (cumulative < needed[:, None]).sum(axis=1) + 1
    return np.where(last == 0, 0, ranks)


def _numerical_ranks(S: np.ndarray, tops: np.ndarray, long_sides: Sequence[int]) -> np.ndarray:
    """:func:`numerical_rank` of each row: values above ``sigma_1 max(d_out, d_in) eps``."""
    tolerances = tops * np.asarray(long_sides, dtype=np.float64) * _EPS
    return np.where(tops == 0, 0, (S > tolerances[:, None]).sum(axis=1))


def _tail_energies(energy: np.ndarray, totals: np.ndarray, ranks: Sequence[int]) -> np.ndarray:
    """:func:`tail_energy` of each row: its energy past position ``ceil(r / 2)``, over its total."""
    out = np.zeros(energy.shape[0])
    heads = np.array([math.ceil(rank / 2) for rank in ranks])
    for head in sorted(set(heads.tolist())):  # not np.unique: it imports numpy.ma (11 ms)
        rows = np.flatnonzero((heads == head) & (totals != 0))
        if rows.size:
            out[rows] = energy[rows, head:].sum(axis=1) / totals[rows]
    return out


def _participation_ratios(energy: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """:func:`participation_ratio` of each row: ``(sum e)^2 / sum e^2`` (0 for a zero row)."""
    out = np.zeros(energy.shape[0])
    live = energy.any(axis=1)
    out[live] = totals[live] ** 2 / (energy[live] ** 2).sum(axis=1)
    return out


def non_finite_metrics() -> dict[str, Any]:
    """The metric fields of a layer whose factors hold NaN/Inf: every metric null, status "non_finite"."""
    metrics: dict[str, Any] = {name: None for name in METRIC_FIELDS}
    metrics["collapsed"] = False
    metrics["status"] = "non_finite"
    return metrics
