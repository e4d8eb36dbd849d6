"""``Checkpoint`` (a validated checkpoint of any format) and ``ModuleUpdate`` (one module's update).

A reader (a format of :mod:`nora_spectra.io.formats`) validates everything it can from headers and
configs and describes each adapted module as a :class:`ModuleEntry`: what the module is, and a
``read`` function that reads its tensors and returns its update (:mod:`nora_spectra.updates`).
:meth:`Checkpoint.iter_layers` calls them one at a time, so memory stays near the largest module,
not the whole file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from nora_spectra.io.safetensors_file import TensorInfo
from nora_spectra.updates import Update

__all__ = ["Checkpoint", "ModuleEntry", "ModuleUpdate", "TensorSource"]


class TensorSource(Protocol):
    """What a weights container offers (``SafetensorsFile``, ``TorchBinFile``)."""

    path: str
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class ModuleEntry:
    """One adapted module as a reader found it, before any tensor is read.

    Attributes:
        module: base-model module name, e.g. ``model.layers.0.self_attn.q_proj``.
        key: the tensor-key prefix exactly as stored in the file (the part before ``.lora_A``,
            ``.lora_down``, ``.hada_w1_a``, ...), so the module can be traced back to the file.
        kind: the adapter method, ``"lora"`` or ``"nora"`` (more with other formats).
        rank: the rank budget ``r`` the module paid for.
        shape: ``(rows, cols)`` of the update as analysed: ``(d_out, d_in)`` for linear layers (also
            with ``fan_in_fan_out``, whose base weight is stored transposed), ``(d_out, d_in*kh*kw)``
            for conv, ``(num_embeddings, embedding_dim)`` for embeddings.
        layer_type: ``"linear"``, ``"embedding"`` or ``"conv"``.
        dtype: stored dtype name of the factors, e.g. ``"bfloat16"`` (``"float32/bfloat16"`` if mixed).
        read: reads the module's tensors (float64) and returns its update.
        dora: a DoRA magnitude exists: the spectrum is of the direction update only.
        notes: short remarks about this module (fan_in_fan_out, lora_B bias, DoRA), for reports.
        read_magnitude: for a DoRA module, reads its magnitude vector ``m`` (float64, ``(d_out,)``), which
            the true update ``m * (W0 + s B A) / ||W0 + s B A||_col - W0`` needs with the base weight;
            None otherwise.
        read_tuned: for an update that is a difference against the base (a full fine-tune), reads the
            tuned matrix alone (float64, ``shape``, a new array), so that a base-aware analysis subtracts
            the ``W0`` it has read anyway instead of reading the base twice; ``read`` stays the whole update.
    """

    module: str
    key: str
    kind: str
    rank: int
    shape: tuple[int, int]
    layer_type: str
    dtype: str
    read: Callable[[], Update] = field(repr=False)
    dora: bool = False
    notes: tuple[str, ...] = ()
    read_magnitude: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    read_tuned: Callable[[], np.ndarray] | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class ModuleUpdate:
    """One adapted module with its update read (float64 factors).

    Attributes are those of :class:`ModuleEntry` (without ``read``) plus ``update``, one of the kinds of
    :mod:`nora_spectra.updates`; for LoRA and NoRA a ``LowRankUpdate`` with ``A`` (r, n), ``B`` (m, r)
    and the scale of PEFT's rule (``alpha / r``, ``alpha / sqrt(r)``, rank and alpha patterns).
    ``read_magnitude`` is the entry's (DoRA modules), still unread: only a base-aware analysis needs it.
    """

    module: str
    key: str
    kind: str
    update: Update
    rank: int
    shape: tuple[int, int]
    layer_type: str
    dtype: str
    dora: bool = False
    notes: tuple[str, ...] = ()
    read_magnitude: Callable[[], np.ndarray] | None = field(default=None, repr=False)


@dataclass
class Checkpoint:
    """A validated checkpoint; updates are read lazily.

    Attributes:
        path: the path the user gave.
        format: the registered format that read it (``"peft"``, ``"nora"``, ``"safetensors"``, ...).
        method: ``"lora"`` or ``"nora"`` (the adapter method the format reports).
        config: the adapter config as read (unknown fields included), or None.
        warnings: remarks the user should see (no config, chosen adapter, fan_in_fan_out, ...).
        skipped: (name, reason) for tensors that are not adapter updates.
        weights_path: the weights file actually read.
        adapter: the adapter sub-directory chosen, or None.
        metadata: the weights file's header metadata (safetensors ``__metadata__``), as read.
        entries: one :class:`ModuleEntry` per adapted module, in natural order.
    """

    path: str
    format: str
    method: str
    config: dict[str, Any] | None
    warnings: list[str]
    skipped: list[tuple[str, str]]
    weights_path: str
    adapter: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    entries: list[ModuleEntry] = field(default_factory=list, repr=False)

    @property
    def modules(self) -> list[str]:
        """Adapted module names in natural order (``layers.2`` before ``layers.10``)."""
        return [entry.module for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def iter_layers(self) -> Iterator[ModuleUpdate]:
        """Yield each module's :class:`ModuleUpdate` in :attr:`modules` order, reading one module at a time."""
        for entry in self.entries:
            yield materialize(entry)

    def layer(self, module: str) -> ModuleUpdate:
        """Read one module's update.

        Raises:
            KeyError: ``module`` is not in :attr:`modules`.
        """
        for entry in self.entries:
            if entry.module == module:
                return materialize(entry)
        raise KeyError(module)


def materialize(entry: ModuleEntry) -> ModuleUpdate:
    """Read ``entry``'s tensors and return the :class:`ModuleUpdate`."""
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf bits are reported as a status, not warned
        update = entry.read()
    return ModuleUpdate(
        module=entry.module,
        key=entry.key,
        kind=entry.kind,
        update=update,
        rank=entry.rank,
        shape=entry.shape,
        layer_type=entry.layer_type,
        dtype=entry.dtype,
        dora=entry.dora,
        notes=entry.notes,
        read_magnitude=entry.read_magnitude,
    )
