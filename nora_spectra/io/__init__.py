"""Checkpoint loading for every registered format, torch-free on the safetensors path.

``load_checkpoint(path, adapter=None, format="auto")`` detects the format (a reader registry, see
:mod:`nora_spectra.io.registry`), validates the checkpoint eagerly from its configs and headers, and
returns a :class:`Checkpoint` whose :meth:`~Checkpoint.iter_layers` yields one :class:`ModuleUpdate`
(the module, its rank and shape, and its update, one of :mod:`nora_spectra.updates`) at a time.
``open_model_weights(path)`` opens a safetensors model (a base model, one file or sharded) for
base-aware analyses. See ``docs/formats.md``.
"""

from nora_spectra.io.checkpoint import Checkpoint, ModuleEntry, ModuleUpdate
from nora_spectra.io.model_weights import ModelWeights, open_model_weights
from nora_spectra.io.registry import Format, detect_format, formats, load_checkpoint

__all__ = [
    "Checkpoint",
    "Format",
    "ModelWeights",
    "ModuleEntry",
    "ModuleUpdate",
    "detect_format",
    "formats",
    "load_checkpoint",
    "open_model_weights",
]
