"""Spectral tracking: the weight-space spectra of a model's adapters, as the trainer logs them.

Nothing is computed here: the singular values come from :mod:`nora_spectra.spectrum` and every
metric from :mod:`nora_spectra.metrics`, the same functions the CLI, reports and CI gate use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["adapter_spectra", "list_adapter_layers", "TRACKED_FIELDS"]


def list_adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, AdapterLinear)`` for every adapter layer of ``model``, in module order."""
    from nora_core.inject import adapter_layers

    return list(adapter_layers(model))


#: the fields of each tracked record in ``metrics.jsonl`` (a subset of the analysis record).
TRACKED_FIELDS = ("module", "module_type", "rank", "effective_rank", "utilization", "stable_rank", "sigma_max", "status")


def adapter_spectra(model: nn.Module) -> list[dict[str, Any]]:
    """Weight-space spectra of every adapter of ``model``, one record per module.

    The singular values of ``scaling * B @ A`` come from
    :func:`nora_spectra.spectrum.adapter_singular_values` and every metric from
    :func:`nora_spectra.metrics.spectrum_metrics` (nothing is computed here). For NoRA the branch is
    non-linear; these are the spectra of its linear factors (``docs/training.md``).

    Returns:
        ``[{"module", "module_type", "rank", "effective_rank", "utilization", "stable_rank",
        "sigma_max", "status"}, ...]`` in module order; metrics of a NaN/Inf factor are None.
    """
    from nora_spectra.analysis import layer_record
    from nora_spectra.metrics import DEFAULT_COLLAPSE_THRESHOLD
    from nora_spectra.spectrum import NonFiniteFactorsError, adapter_singular_values

    records = []
    for name, layer in list_adapter_layers(model):
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
