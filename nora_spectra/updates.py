"""The kinds of weight update a module can carry: a small closed set of frozen dataclasses.

Each kind holds its factors (float64 numpy arrays, as read) and knows its shape and the largest rank
it can have; :func:`nora_spectra.spectrum.spectrum` computes its exact singular values from the
factors, never forming the dense ``d_out x d_in`` matrix when a factored form exists.

- :class:`LowRankUpdate`, ``scale * B @ A``: rank at most ``min(r, d_out, d_in)``;
- :class:`DenseUpdate`, ``delta``: rank at most ``min(d_out, d_in)`` (or its ``top_k`` leading values);
- :class:`KroneckerUpdate`, ``scale * kron(W1, W2)``: rank at most ``bound(W1) * bound(W2)``;
- :class:`HadamardUpdate`, ``scale * (B1 @ A1) * (B2 @ A2)``: rank at most ``min(r1 * r2, d_out, d_in)``.

LoRA and NoRA factors are low-rank; a full fine-tune difference ``W_tuned - W_base`` is dense;
LyCORIS LoKr is a Kronecker product (its factors may themselves be low-rank) and LoHa a Hadamard
product of two low-rank products. ``Update`` is the union of the four.

:func:`dense_matrix` forms the ``d_out x d_in`` matrix of any kind: only base-aware analyses need it
(the tuned weight ``W0 + dW``, DoRA's true update), never the spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

__all__ = ["DenseUpdate", "HadamardUpdate", "KroneckerUpdate", "LowRankUpdate", "Update", "UPDATE_KINDS", "dense_matrix"]


def _shape_error(kind: str, detail: str) -> ValueError:
    return ValueError(f"{kind}: factors do not compose: {detail}")


@dataclass(frozen=True, eq=False)
class LowRankUpdate:
    """``scale * B @ A``: a LoRA/NoRA pair.

    Attributes:
        A: ``(r, d_in)`` down-projection.
        B: ``(d_out, r)`` up-projection.
        scale: the adapter's scale ``s`` (``alpha / r``, ``alpha / sqrt(r)``, ...).
    """

    A: np.ndarray
    B: np.ndarray
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise _shape_error("low-rank", f"A {self.A.shape} (r, d_in), B {self.B.shape} (d_out, r)")

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank_bound(self) -> int:
        """``min(r, d_out, d_in)``."""
        return min(self.A.shape[0], *self.shape)


@dataclass(frozen=True, eq=False)
class DenseUpdate:
    """A materialised update ``delta`` (a full fine-tune difference, or a formed product).

    Attributes:
        delta: ``(d_out, d_in)``.
        top_k: None for every singular value (exact SVD); else the number of leading singular values
            wanted, computed by a randomized SVD with a stated error bound when that is cheaper
            (:func:`nora_spectra.spectrum.dense_spectrum`).
    """

    delta: np.ndarray
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.delta.ndim != 2:
            raise ValueError(f"dense: delta must be 2-D, got shape {self.delta.shape}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"dense: top_k must be >= 1, got {self.top_k}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        return (int(self.delta.shape[0]), int(self.delta.shape[1]))

    @property
    def rank_bound(self) -> int:
        """``min(d_out, d_in)``, or ``top_k`` when smaller."""
        k = min(self.shape)
        return k if self.top_k is None else min(k, self.top_k)


@dataclass(frozen=True, eq=False)
class KroneckerUpdate:
    """``scale * kron(W1, W2)`` (LyCORIS LoKr): ``sigma = {sigma_i(W1) * sigma_j(W2)}``, exactly.

    Attributes:
        left: ``W1`` (``(m1, n1)``), itself a low-rank or dense update.
        right: ``W2`` (``(m2, n2)``), likewise.
        scale: multiplies every singular value.
    """

    left: "LowRankUpdate | DenseUpdate"
    right: "LowRankUpdate | DenseUpdate"
    scale: float = 1.0

    def __post_init__(self) -> None:
        for side in (self.left, self.right):
            if not isinstance(side, (LowRankUpdate, DenseUpdate)):
                raise TypeError(f"kronecker: a factor must be low-rank or dense, got {type(side).__name__}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(m1 * m2, n1 * n2)``."""
        (m1, n1), (m2, n2) = self.left.shape, self.right.shape
        return (m1 * m2, n1 * n2)

    @property
    def rank_bound(self) -> int:
        """``bound(W1) * bound(W2)``."""
        return self.left.rank_bound * self.right.rank_bound


@dataclass(frozen=True, eq=False)
class HadamardUpdate:
    """``scale * (B1 @ A1) * (B2 @ A2)`` (element-wise; LyCORIS LoHa).

    With the face-splitting (row-wise Kronecker) product, ``(B1 A1) * (B2 A2) = U V`` where
    ``U[p, (a, b)] = B1[p, a] B2[p, b]`` (``d_out x r1 r2``) and ``V[(a, b), q] = A1[a, q] A2[b, q]``
    (``r1 r2 x d_in``): a low-rank product of rank at most ``r1 * r2``, so the spectrum stays exact
    and factored.

    Attributes:
        first: ``B1 @ A1`` as a :class:`LowRankUpdate` (its own scale is ignored; use ``scale``).
        second: ``B2 @ A2``, same shape as ``first``.
        scale: multiplies the product.
    """

    first: LowRankUpdate
    second: LowRankUpdate
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.first.shape != self.second.shape:
            raise _shape_error("hadamard", f"B1 A1 is {self.first.shape} but B2 A2 is {self.second.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        return self.first.shape

    @property
    def rank_bound(self) -> int:
        """``min(r1 * r2, d_out, d_in)``."""
        return min(self.first.A.shape[0] * self.second.A.shape[0], *self.shape)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(U, V)`` with ``(B1 A1) * (B2 A2) = U @ V``: ``U`` (d_out, r1 r2), ``V`` (r1 r2, d_in)."""
        b1, b2 = self.first.B, self.second.B
        a1, a2 = self.first.A, self.second.A
        u = (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)
        v = (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])
        return u, v


Update = Union[LowRankUpdate, DenseUpdate, KroneckerUpdate, HadamardUpdate]

#: every update kind, for dispatch and validation.
UPDATE_KINDS: tuple[type, ...] = (LowRankUpdate, DenseUpdate, KroneckerUpdate, HadamardUpdate)


def dense_matrix(update: Update) -> np.ndarray:
    """The update as a dense float64 ``(d_out, d_in)`` matrix (scale applied).

    Forms what the spectrum never needs to: use it where the matrix itself is wanted (the tuned weight
    ``W0 + dW`` of a base-aware analysis, DoRA's true update). Always a new array, which the caller may
    change in place (a :class:`DenseUpdate`'s ``delta`` is copied).

    Raises:
        TypeError: ``update`` is not an update kind.
    """
    if isinstance(update, DenseUpdate):
        return np.array(update.delta, dtype=np.float64)
    if isinstance(update, LowRankUpdate):
        product = np.asarray(update.B, np.float64) @ np.asarray(update.A, np.float64)
        product *= float(update.scale)
        return product
    if isinstance(update, KroneckerUpdate):
        product = np.kron(dense_matrix(update.left), dense_matrix(update.right))
        product *= float(update.scale)
        return product
    if isinstance(update, HadamardUpdate):
        product = np.asarray(update.first.B, np.float64) @ np.asarray(update.first.A, np.float64)
        product *= np.asarray(update.second.B, np.float64) @ np.asarray(update.second.A, np.float64)
        product *= float(update.scale)
        return product
    raise TypeError(f"not an update kind: {type(update).__name__}")
