"""Checkpoint loading: PEFT LoRA and NoRA directories and bare safetensors files, torch-free.

``load_checkpoint(path, adapter=None)`` validates a checkpoint eagerly from its config and headers and
returns a :class:`Checkpoint` whose :meth:`~Checkpoint.iter_layers` yields one :class:`LayerFactors`
(float64 factors, scale, rank, shape) at a time. See ``docs/formats.md``.
"""

from nora_spectra.io.checkpoint import Checkpoint, LayerFactors
from nora_spectra.io.loader import load_checkpoint

__all__ = ["Checkpoint", "LayerFactors", "load_checkpoint"]
