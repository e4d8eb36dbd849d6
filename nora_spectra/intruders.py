"""Intruder dimensions (Shuttleworth et al., 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

With a base weight ``W0`` and the tuned weight ``W = W0 + dW``: among the ``k`` leading left singular
vectors ``u_1 .. u_k`` of ``W``, an *intruder* is one whose largest absolute cosine similarity with every
left singular vector ``v_j`` of ``W0`` is below ``epsilon``:

.. math:: \\mathrm{intruder}(i) \\iff \\max_j |u_i^T v_j| < \\epsilon .

The paper and PEFT (``peft.tuners.lora.intruders.reduce_intruder_dimension``) use ``k = 10`` and
``epsilon = 0.5`` and compare against every left singular vector of ``W0`` (a thin SVD). Singular vectors
are unit vectors, so the cosine is the dot product. The base's vectors are the expensive part and do not
depend on the adapter: :mod:`nora_spectra.svd_cache` keeps them on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nora_spectra.spectrum import leading_left_singular_vectors

__all__ = ["Intruders", "intruder_dimensions"]


@dataclass(frozen=True)
class Intruders:
    """The intruder dimensions of one module.

    Attributes:
        count: how many of the ``k`` leading directions are intruders.
        indices: their positions among the tuned matrix's leading left singular vectors (0-based,
            ``0`` is the direction of the largest singular value).
        max_cos: for each of the ``k`` leading directions, ``max_j |u_i^T v_j|`` against the base's
            left singular vectors ``v_j``.
    """

    count: int
    indices: list[int]
    max_cos: list[float]


def intruder_dimensions(tuned: np.ndarray, base_vectors: np.ndarray, *, k: int, eps: float) -> Intruders:
    """The intruder dimensions of the tuned weight ``tuned`` against the base's left singular vectors.

    Args:
        tuned: ``W0 + dW``, ``(d_out, d_in)``, in the same orientation as the base.
        base_vectors: ``(d_out, n)`` orthonormal left singular vectors of ``W0`` (all of them; float32
            is enough for the comparison, float64 is used when given).
        k: how many leading directions of ``tuned`` to test (fewer when the matrix is smaller).
        eps: the cosine threshold, in ``(0, 1]``.

    Returns:
        The :class:`Intruders`.

    Raises:
        NonFiniteFactorsError: ``tuned`` holds NaN or Inf.
        ValueError: shapes that do not fit.
    """
    if base_vectors.ndim != 2 or base_vectors.shape[0] != tuned.shape[0]:
        raise ValueError(f"base vectors {base_vectors.shape} do not fit a tuned matrix of shape {tuned.shape}")
    vectors, _ = leading_left_singular_vectors(tuned, k)
    cosines = np.abs(vectors.T.astype(base_vectors.dtype, copy=False) @ base_vectors)  # (k, n)
    max_cos = cosines.max(axis=1, initial=0.0).astype(np.float64)
    indices = [int(i) for i in np.flatnonzero(max_cos < eps)]
    return Intruders(count=len(indices), indices=indices, max_cos=[float(c) for c in max_cos])
