"""``Checkpoint`` (a validated adapter checkpoint) and ``LayerFactors`` (one module's float64 factors).

A :class:`Checkpoint` holds only header information; :meth:`Checkpoint.iter_layers` reads one factor
pair at a time, so memory stays near the largest pair, not the whole file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from nora_spectra.io.keys import LayerPlan
from nora_spectra.io.safetensors_file import TensorInfo

__all__ = ["LayerFactors", "Checkpoint", "TensorSource", "LayerScale"]


class TensorSource(Protocol):
    """What a weights reader offers (``SafetensorsFile``, ``TorchBinFile``)."""

    path: str
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> np.ndarray: ...


@dataclass(frozen=True)
class LayerScale:
    """The scale of one module and what it came from.

    Attributes:
        scale: the factor multiplying ``B @ A``.
        alpha: the alpha used (None without a config).
    """

    scale: float
    alpha: float | None = None


@dataclass(frozen=True, eq=False)
class LayerFactors:
    """One adapted module's factors, upcast exactly to float64.

    The update whose spectrum is analysed is ``scale * B @ A`` (of shape ``shape``), possibly up to a
    transpose that leaves singular values unchanged (``fan_in_fan_out``).

    Attributes:
        module: base-model module name, e.g. ``model.layers.0.self_attn.q_proj``.
        kind: ``"lora"`` or ``"nora"``.
        A: (r, n) float64. Conv: the stored (r, d_in, kh, kw) reshaped to (r, d_in*kh*kw). Embedding: the
            stored ``lora_embedding_B`` transposed, (r, embedding_dim).
        B: (m, r) float64. Conv: the stored (d_out, r, 1, 1) as (d_out, r). Embedding: the stored
            ``lora_embedding_A`` transposed, (num_embeddings, r).
        scale: PEFT's rule (alpha/r, alpha/sqrt(r) with rsLoRA, rank/alpha patterns); 1.0 without config.
        rank: r of this module.
        shape: (m, n) = (rows, cols) of the update: (d_out, d_in) for linear layers (also with
            ``fan_in_fan_out``, whose base weight is stored transposed), (d_out, d_in*kh*kw) for conv,
            (num_embeddings, embedding_dim) for embeddings.
        layer_type: ``"linear"``, ``"embedding"`` or ``"conv"``.
        dtype: stored dtype name, e.g. ``"bfloat16"``.
        dora: a DoRA magnitude vector exists: the spectrum is of the direction update ``B A`` only.
        notes: short remarks about this layer (fan_in_fan_out, lora_B bias, DoRA), for reports.
    """

    module: str
    kind: str
    A: np.ndarray
    B: np.ndarray
    scale: float
    rank: int
    shape: tuple[int, int]
    layer_type: str
    dtype: str
    dora: bool = False
    notes: tuple[str, ...] = ()


@dataclass
class Checkpoint:
    """A validated adapter checkpoint; factors are read lazily.

    Attributes:
        path: the path the user gave.
        format: ``"peft"`` (LoRA directory), ``"nora"`` (NoRA directory) or ``"safetensors"`` (bare file).
        method: ``"lora"`` or ``"nora"``.
        config: the ``adapter_config.json`` as read (unknown fields included), or None.
        warnings: remarks the user should see (no config, chosen adapter, fan_in_fan_out, ...).
        skipped: (name, reason) for tensors that are not low-rank updates.
        weights_path: the weights file actually read.
        adapter: the adapter sub-directory chosen, or None.
    """

    path: str
    format: str
    method: str
    config: dict[str, Any] | None
    warnings: list[str]
    skipped: list[tuple[str, str]]
    weights_path: str
    adapter: str | None = None
    _source: TensorSource | None = field(default=None, repr=False)
    _plans: list[LayerPlan] = field(default_factory=list, repr=False)
    _scales: dict[str, LayerScale] = field(default_factory=dict, repr=False)
    _notes: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def modules(self) -> list[str]:
        """Adapted module names in natural order (``layers.2`` before ``layers.10``)."""
        return [plan.module for plan in self._plans]

    def __len__(self) -> int:
        return len(self._plans)

    def iter_layers(self) -> Iterator[LayerFactors]:
        """Yield each module's :class:`LayerFactors` in :attr:`modules` order, reading one pair at a time."""
        for plan in self._plans:
            yield self._materialize(plan)

    def layer(self, module: str) -> LayerFactors:
        """Read one module's factors.

        Raises:
            KeyError: ``module`` is not in :attr:`modules`.
        """
        for plan in self._plans:
            if plan.module == module:
                return self._materialize(plan)
        raise KeyError(module)

    def _materialize(self, plan: LayerPlan) -> LayerFactors:
        assert self._source is not None
        a = self._source.read(plan.key_a)
        b = self._source.read(plan.key_b)
        if plan.layer_type == "embedding":
            # Stored A (r, num_embeddings), B (dim, r); the update (B A)^T = A^T B^T.
            a, b = b.T.copy(), a.T.copy()
        elif plan.layer_type == "conv":
            a = a.reshape(plan.rank, -1)
            b = b.reshape(b.shape[0], plan.rank)
        assert a.shape == (plan.rank, plan.shape[1]) and b.shape == (plan.shape[0], plan.rank)
        return LayerFactors(
            module=plan.module,
            kind=self.method,
            A=a,
            B=b,
            scale=self._scales[plan.module].scale,
            rank=plan.rank,
            shape=plan.shape,
            layer_type=plan.layer_type,
            dtype=plan.dtype,
            dora=plan.dora,
            notes=self._notes.get(plan.module, ()),
        )
