"""``plot_*`` methods for results (Analysis, Comparison) that import the plotting code only when called.

Like pandas' ``DataFrame.plot``, a result offers its plots without importing matplotlib, or the
plotting module, at import time: the figures are drawn by :mod:`nora_spectra.plots`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["PlotMethods"]


class PlotMethods:
    """Plot methods for classes that :func:`nora_spectra.plots.series_of` accepts (Analysis, Comparison)."""

    def plot_spectrum(self, **options: Any) -> "Figure":
        """:func:`nora_spectra.plots.spectrum_decay` of this object."""
        from nora_spectra.plots import spectrum_decay

        return spectrum_decay(self, **options)

    def plot_effective_rank(self, **options: Any) -> "Figure":
        """:func:`nora_spectra.plots.effective_rank_vs_rank` of this object."""
        from nora_spectra.plots import effective_rank_vs_rank

        return effective_rank_vs_rank(self, **options)

    def plot_utilization(self, **options: Any) -> "Figure":
        """:func:`nora_spectra.plots.utilization_heatmap` of this object."""
        from nora_spectra.plots import utilization_heatmap

        return utilization_heatmap(self, **options)

    def plot_energy(self, **options: Any) -> "Figure":
        """:func:`nora_spectra.plots.cumulative_energy` of this object."""
        from nora_spectra.plots import cumulative_energy

        return cumulative_energy(self, **options)
