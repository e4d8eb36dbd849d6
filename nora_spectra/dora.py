"""DoRA's true weight update, from the base weight, the direction update and the magnitude vector.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) replaces the
base weight ``W0`` by ``W' = m * V / ||V||``, with ``V = W0 + s B A`` and the norm taken per output
feature. PEFT (``peft/tuners/lora/dora.py`` and ``variants.py``, read at version 0.21) computes, in the
maths orientation ``(d_out, d_in)`` used here:

* linear layers (also GPT-2 ``Conv1D`` with ``fan_in_fan_out``, whose stored weight PEFT transposes
  first): ``||V||`` is the norm of each row, ``torch.linalg.norm(V, dim=1)``, and ``m`` (``(d_out,)``)
  scales rows;
* convolutions: the norm over ``(c_in, kh, kw)`` of each output channel, i.e. each row of the
  flattened ``(c_out, c_in*kh*kw)`` matrix; ``m`` is stored ``(1, c_out, 1, 1)``;
* embeddings (``(num_embeddings, dim)``): the norm of each column (one per embedding dimension), and
  ``m`` (``(dim,)``) scales columns.

The norm is detached from the gradient in training (DoRA, Sec. 4.3), which changes no value. The true
update is ``dW = W' - W0``; the product ``s B A`` alone is only a proxy (``dora_direction_only``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DORA_NORM_AXIS", "dora_update"]

#: layer type -> the axis the DoRA norm runs over in the ``(d_out, d_in)`` orientation (1: each row's
#: norm, one per output feature; 0: each column's norm, one per embedding dimension).
DORA_NORM_AXIS: dict[str, int] = {"linear": 1, "conv": 1, "embedding": 0}


def dora_update(base: np.ndarray, direction: np.ndarray, magnitude: np.ndarray, *, layer_type: str) -> np.ndarray:
    """DoRA's true update ``m * (W0 + s B A) / ||W0 + s B A|| - W0``.

    Args:
        base: ``W0``, ``(d_out, d_in)`` float64 in the update's orientation.
        direction: ``s B A`` as a dense ``(d_out, d_in)`` float64 matrix; overwritten (it becomes the
            result, so no third matrix is allocated).
        magnitude: ``m``, one value per norm: ``(d_out,)`` for linear and conv layers, ``(d_in,)`` (the
            embedding dimension) for embeddings; any shape with that many elements.
        layer_type: ``"linear"``, ``"conv"`` or ``"embedding"`` (:data:`DORA_NORM_AXIS`).

    Returns:
        ``dW``, ``(d_out, d_in)`` (the ``direction`` array). A zero norm gives Inf or NaN entries, as in
        PEFT; the spectrum then reports the layer as non-finite.

    Raises:
        ValueError: shapes that do not fit, or an unknown layer type.
    """
    if layer_type not in DORA_NORM_AXIS:
        raise ValueError(f"DoRA: unknown layer type {layer_type!r}")
    if base.shape != direction.shape or base.ndim != 2:
        raise ValueError(f"DoRA: base {base.shape} and update {direction.shape} differ")
    axis = DORA_NORM_AXIS[layer_type]
    m = np.asarray(magnitude, dtype=np.float64).reshape(-1)
    count = base.shape[0] if axis == 1 else base.shape[1]
    if m.size != count:
        raise ValueError(f"DoRA: magnitude has {m.size} values, the {layer_type} layer needs {count}")
    direction += base  # V = W0 + s B A
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        factor = m / np.linalg.norm(direction, axis=axis)
        direction *= factor[:, None] if axis == 1 else factor[None, :]
        direction -= base
    return direction
