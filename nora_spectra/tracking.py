"""Spectral tracking during training: the weight-space spectra of a model's adapters, as a callback.

``nora_core``'s trainer takes callbacks (``train(..., callbacks=[SpectralTracking()])``) and never
imports this package; the ``nora`` command wires the two together. Nothing is computed here: the
singular values come from :func:`nora_spectra.spectrum.adapter_singular_values` and every metric from
:func:`nora_spectra.records.layer_record`, the functions the CLI, reports and CI gate use.
"""

from __future__ import annotations

from typing import Any

from nora_spectra.records import layer_record
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD
from nora_spectra.spectrum import NonFiniteFactorsError, adapter_singular_values

__all__ = ["TRACKED_FIELDS", "SpectralTracking", "adapter_spectra"]

#: the fields of each tracked record in ``metrics.jsonl`` (a subset of the analysis record).
TRACKED_FIELDS = ("module", "module_type", "rank", "effective_rank", "utilization", "stable_rank", "sigma_max", "status")


def adapter_spectra(model: Any) -> list[dict[str, Any]]:
    """Weight-space spectra of every adapter of ``model``, one record per module.

    For NoRA the branch is non-linear; these are the spectra of its linear factors (``docs/training.md``).

    Args:
        model: an ``nn.Module`` holding :class:`nora_core.layers.AdapterLinear` layers.

    Returns:
        ``[{"module", "module_type", "rank", "effective_rank", "utilization", "stable_rank",
        "sigma_max", "status"}, ...]`` in module order; metrics of a NaN/Inf factor are None.
    """
    from nora_core.inject import adapter_layers
    from nora_spectra._torch import require_torch

    torch = require_torch("spectral tracking")

    records = []
    for name, layer in adapter_layers(model):
        A = layer.lora_A.weight.detach().to("cpu", torch.float64).numpy()  # (r, d_in)
        B = layer.lora_B.weight.detach().to("cpu", torch.float64).numpy()  # (d_out, r)
        shape = (layer.in_features, layer.out_features) if layer.fan_in_fan_out else (layer.out_features, layer.in_features)
        try:
            sigma = adapter_singular_values(A, B, layer.scaling)
        except NonFiniteFactorsError:
            sigma = None
        identity = {"module": name, "rank": layer.r, "shape": shape}
        records.append(
            layer_record(identity, sigma, collapse_threshold=DEFAULT_COLLAPSE_THRESHOLD, columns=TRACKED_FIELDS)
        )
    return records


class SpectralTracking:
    """A trainer callback: ``{"spectra": adapter_spectra(model)}`` at every tracking step.

    Use with ``TrainConfig(track_spectra_every=N)`` and ``train(..., callbacks=[SpectralTracking()])``.
    """

    def __call__(self, step: int, model: Any) -> dict[str, Any]:
        return {"spectra": adapter_spectra(model)}
