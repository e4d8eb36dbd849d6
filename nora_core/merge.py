"""Fold LoRA updates into the base weights: ``W <- W0 + s B A`` (transposed for ``Conv1D``)."""

from __future__ import annotations

import torch
from torch import nn

from nora_core.inject import adapter_layers, unload
from nora_core.layers import AdapterLinear

__all__ = ["merge_adapters"]


def _merged_weight(layer: AdapterLinear) -> torch.Tensor:
    """``W0 + s B A`` computed in float64, then cast to the base weight's dtype."""
    weight = layer.base_layer.weight
    return (weight.detach().to(torch.float64) + layer.delta_weight(torch.float64)).to(weight.dtype)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every LoRA adapter into its base layer and return the model with plain layers.

    The sum is formed in float64 and rounded once to the base dtype. Every layer is checked first
    (NoRA, non-finite results) so that on an error no base weight has been touched. Parameters frozen
    by ``inject_adapters`` get ``requires_grad`` back, as with ``unload``.

    Args:
        model: a model holding LoRA adapters; modified in place.

    Returns:
        ``model`` with each ``AdapterLinear`` replaced by its (merged) base layer.

    Raises:
        ValueError: if the model holds no adapters, holds a NoRA adapter (a non-linear branch
            ``B act(A x)`` is not a matrix and cannot be merged), or a merged weight is not finite.
    """
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("the model holds no adapters to merge")
    nora = [name for name, layer in layers if layer.method != "lora"]
    if nora:
        raise ValueError(
            f"cannot merge NoRA adapters (e.g. {nora[0]!r}): the branch s B act(A x) is non-linear in x, "
            "so no weight matrix equals it; keep the adapter layers or use unload()"
        )
    for name, layer in layers:
        if not torch.isfinite(_merged_weight(layer)).all():
            raise ValueError(f"merging {name!r} gives non-finite weights (overflow or NaN); nothing was merged")
    with torch.no_grad():
        for _, layer in layers:
            layer.base_layer.weight.copy_(_merged_weight(layer))
    return unload(model)
