"""Weight space: the exact spectrum of each module's update (``s * B @ A`` for LoRA and NoRA).

``prepare(source, adapter=None, format="auto")`` opens the checkpoint (validating everything from
headers); :meth:`WeightRun.layers` then reads one module at a time and computes its singular values
with :func:`nora_spectra.spectrum.spectrum`, whatever the kind of update.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator

from nora_spectra.schema import LAYER_COLUMNS
from nora_spectra.spaces import LayerSpectrum, Report, SourceInfo, source_info
from nora_spectra.spectrum import NonFiniteFactorsError, spectrum

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.io import Checkpoint

__all__ = ["OPTIONS", "WeightRun", "open_checkpoint", "prepare"]

#: keyword options of this space.
OPTIONS = ("adapter", "format")


def open_checkpoint(source: "str | os.PathLike[str] | Checkpoint", adapter: str | None, format: str) -> "Checkpoint":
    """``source`` itself when it is a loaded checkpoint, else :func:`nora_spectra.io.load_checkpoint` of it."""
    if hasattr(source, "iter_layers"):
        return source  # type: ignore[return-value]
    from nora_spectra.io import load_checkpoint

    return load_checkpoint(source, adapter=adapter, format=format)


class WeightRun:
    """The weight-space measurement of one checkpoint."""

    columns = LAYER_COLUMNS
    unit = "layer"
    desc = "analysing"

    def __init__(self, checkpoint: "Checkpoint") -> None:
        self.checkpoint = checkpoint
        self.info: SourceInfo = source_info(checkpoint)
        self.total = len(checkpoint)

    def layers(self, report: Report | None) -> Iterator[LayerSpectrum]:
        for done, layer in enumerate(self.checkpoint.iter_layers(), start=1):
            try:
                sigma = spectrum(layer.update).values
            except NonFiniteFactorsError:
                sigma = None
            identity = {
                "module": layer.module,
                "key": layer.key,
                "kind": layer.kind,
                "layer_type": layer.layer_type,
                "dtype": layer.dtype,
                "rank": int(layer.rank),
                "scale": float(getattr(layer.update, "scale", 1.0)),
                "shape": layer.shape,
            }
            yield LayerSpectrum(identity, sigma, dora=bool(getattr(layer, "dora", False)))
            if report is not None:
                report(done, self.total, layer.module)

    def fields(self) -> dict[str, Any]:
        return {}


def prepare(source: "str | os.PathLike[str] | Checkpoint", *, adapter: str | None = None, format: str = "auto") -> WeightRun:
    """Open ``source`` (a path or a loaded :class:`~nora_spectra.io.Checkpoint`) for weight-space spectra.

    Raises:
        CheckpointError: the path is missing, malformed or of an unknown format.
    """
    return WeightRun(open_checkpoint(source, adapter, format))
