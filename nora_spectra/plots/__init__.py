"""Plots of analyses, comparisons and training runs: each function returns a matplotlib ``Figure``.

Only the object-oriented API is used (``matplotlib.figure.Figure``, never ``pyplot``), so nothing
touches global state and every function works headless (PNG output goes through Agg). matplotlib is
imported inside the functions: importing this module is free.

Inputs: ``data`` is one :class:`~nora_spectra.analysis.Analysis`, a
:class:`~nora_spectra.comparison.Comparison`, or a list of analyses (or of ``(label, analysis)`` pairs).
Every number comes from the analysis records (``singular_values``, ``effective_rank``,
``utilization``, ``energy_rank_90``...). The curves are only re-expressions of the stored singular
values for drawing (``sigma_i / sigma_1``, ``sigma_i / sum_j sigma_j``, cumulative ``sigma^2`` shares).
Training plots take the step records of a run's ``metrics.jsonl``. Checkpoint plots live in
:mod:`.checkpoint`, training-run plots in :mod:`.training`, subspace-overlap plots (an
:class:`~nora_spectra.overlap.Overlap`) in :mod:`.overlap`.
"""

from nora_spectra.plots._common import color, figure_png, series_of
from nora_spectra.plots.checkpoint import (
    AVERAGING,
    cumulative_energy,
    effective_rank_vs_rank,
    spectrum_decay,
    utilization_heatmap,
)
from nora_spectra.plots.overlap import overlap_bars, phi_heatmap
from nora_spectra.plots.training import effective_rank_trajectory, training_loss

__all__ = [
    "AVERAGING",
    "color",
    "cumulative_energy",
    "effective_rank_trajectory",
    "effective_rank_vs_rank",
    "figure_png",
    "overlap_bars",
    "phi_heatmap",
    "series_of",
    "spectrum_decay",
    "training_loss",
    "utilization_heatmap",
]
