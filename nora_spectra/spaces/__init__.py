"""The spaces a spectrum is measured in, each a module that yields one spectrum per adapter layer.

=============  ====================================================================  ================
space          spectrum of                                                           module
=============  ====================================================================  ================
``weight``     the update ``s * B @ A`` (or any kind of :mod:`nora_spectra.updates`)  :mod:`.weight`
``activation`` each branch's centred output over real inputs through a base model   :mod:`.activation`
``probe``      each branch's centred response to isotropic Gaussian inputs          :mod:`.probe`
=============  ====================================================================  ================

A space module defines ``OPTIONS`` (the keyword options it takes) and ``prepare(source, **options)``
returning a :class:`SpaceRun`. :func:`nora_spectra.analysis.analyze` is the one loop over a run:
it builds the records, drives the progress bar, gathers warnings and writes the summary, so those
are written once for every space.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from nora_spectra.errors import UsageError
from nora_spectra.schema import SPACES

__all__ = ["LayerSpectrum", "SourceInfo", "SpaceRun", "open_space", "source_info"]

#: space -> module implementing it.
_MODULES = {space: f"nora_spectra.spaces.{space}" for space in SPACES}

Report = Callable[[int, int, str], None]


@dataclass
class SourceInfo:
    """What an analysis says about its input (the fields of ``Analysis`` that are not records).

    Attributes:
        checkpoint: the path as given (``"<in-memory model>"`` for a model holding adapters).
        format, method, config, adapter: as the reader reported them.
        warnings: the reader's warnings, in order (a space appends its own).
        skipped: ``(name, reason)`` of tensors that are not adapter updates.
        metadata: the weights file's header metadata (safetensors ``__metadata__``: kohya's ``ss_*``
            training settings, diffusers' ``lora_adapter_metadata``, ...), without the writer's
            ``format`` marker (``"pt"``, ``"np"``, ``"mlx"``).
    """

    checkpoint: str
    format: str
    method: str
    config: dict[str, Any] | None = None
    adapter: str | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def source_info(checkpoint: Any) -> SourceInfo:
    """The :class:`SourceInfo` of a loaded :class:`~nora_spectra.io.Checkpoint` (or a look-alike)."""
    return SourceInfo(
        checkpoint=os.fspath(checkpoint.path),
        format=str(checkpoint.format),
        method=str(checkpoint.method),
        config=getattr(checkpoint, "config", None),
        adapter=getattr(checkpoint, "adapter", None),
        warnings=list(getattr(checkpoint, "warnings", None) or []),
        skipped=[(str(n), str(r)) for n, r in (getattr(checkpoint, "skipped", None) or [])],
        metadata={
            str(k): str(v) for k, v in (getattr(checkpoint, "metadata", None) or {}).items() if k not in _WRITER_MARKERS
        },
    )


#: header metadata keys that describe the file's writer, not the adapter (safetensors' torch, numpy and mlx
#: writers, PEFT and diffusers add ``{"format": "pt"}``): kept on the Checkpoint, left out of the Analysis.
_WRITER_MARKERS = frozenset({"format"})


@dataclass
class LayerSpectrum:
    """One layer's measured spectrum, before it becomes a record.

    Attributes:
        identity: the record's identity fields (``module``, ``kind``, ``layer_type``, ``dtype``, ``rank``,
            ``scale``, ``shape``; activation and probe add ``space`` and ``tokens``).
        sigma: the scaled singular values, or None when the inputs held NaN/Inf.
        dora: a DoRA layer measured by its direction only (status ``dora_direction_only``).
    """

    identity: dict[str, Any]
    sigma: np.ndarray | None
    dora: bool = False


class SpaceRun(Protocol):
    """A prepared measurement: everything validated, nothing heavy run yet.

    Attributes:
        info: the input's description; ``info.warnings`` may grow while iterating.
        columns: the record keys of this space.
        total, unit, desc: the progress bar's size, unit and label.
    """

    info: SourceInfo
    columns: Sequence[str]
    total: int
    unit: str
    desc: str

    def layers(self, report: Report | None) -> Iterator[LayerSpectrum]:
        """Measure and yield each layer's spectrum, calling ``report(done, total, item)`` as work is done."""
        ...

    def fields(self) -> dict[str, Any]:
        """The space's own ``Analysis`` fields (``tokens``, ``samples``, ``model``, ``data``, ``probe_scale``),
        known once :meth:`layers` is exhausted."""
        ...


def _flags(names: Sequence[str]) -> str:
    flags = [f"--{name.replace('_', '-')}" for name in names]
    return flags[0] if len(flags) == 1 else ", ".join(flags[:-1]) + " and " + flags[-1]


def _spaces_taking(name: str) -> list[str]:
    return [space for space in SPACES if name in importlib.import_module(_MODULES[space]).OPTIONS]


def open_space(space: str, source: Any, options: Mapping[str, Any]) -> SpaceRun:
    """Validate ``options`` for ``space`` and prepare the run over ``source``.

    Args:
        space: ``"weight"``, ``"activation"`` or ``"probe"``.
        source: what the space measures (a checkpoint path or ``Checkpoint``; for activation also a model
            holding adapters).
        options: the space's keyword options; None values count as not given.

    Raises:
        UsageError: an unknown space, or options that belong to another space (the message names the
            ``spectra analyze`` flags and the space they belong to).
    """
    if space not in _MODULES:
        raise UsageError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
    module = importlib.import_module(_MODULES[space])
    given = {name: value for name, value in options.items() if value is not None}
    misfits = [name for name in given if name not in module.OPTIONS]
    if misfits:
        homes = {name: _spaces_taking(name) for name in misfits}
        if not all(homes.values()):
            unknown = [name for name, where in homes.items() if not where]
            raise UsageError(f"unknown option(s) for analyze: {', '.join(unknown)}")
        where = sorted({space for spaces in homes.values() for space in spaces}, key=SPACES.index)
        verb = "applies only" if len(misfits) == 1 else "only apply"
        raise UsageError(f"{_flags(misfits)} {verb} to --space {' and '.join(where)}")
    return module.prepare(source, **given)
