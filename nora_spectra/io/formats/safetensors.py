"""``safetensors``: a bare ``.safetensors`` file with PEFT-style keys and no config (scale 1, with a warning).

Claims a safetensors file that is not the weights file of an adapter directory and whose header holds
at least one ``<module>.lora_A.weight`` / ``lora_B`` / ``lora_embedding_A`` key, unless diffusers' layout
claims it (PEFT keys under a pipeline component such as ``unet.``, or a ``lora_adapter_metadata`` header
entry: :func:`nora_spectra.io.signatures.diffusers_keys`).
"""

from __future__ import annotations

from nora_spectra.errors import CheckpointError
from nora_spectra.io.assemble import assemble_checkpoint
from nora_spectra.io.checkpoint import Checkpoint
from nora_spectra.io.peft import is_adapter_weights_file
from nora_spectra.io.peft_keys import has_factor_keys
from nora_spectra.io.registry import Format, Probe
from nora_spectra.io.signatures import diffusers_keys


def _sniff(probe: Probe) -> bool:
    if not probe.looks_like_safetensors() or is_adapter_weights_file(probe):
        return False
    header = probe.safetensors()
    return has_factor_keys(header.keys()) and not diffusers_keys(header.keys(), header.metadata)


def _open(probe: Probe, adapter: str | None) -> Checkpoint:
    if adapter is not None:
        raise CheckpointError(probe.path, "--adapter NAME (adapter=NAME) needs an adapter directory, not a file")
    return assemble_checkpoint(probe.path, "safetensors", probe.safetensors(), None)


FORMAT = Format(
    name="safetensors",
    summary="a bare .safetensors file with PEFT keys (lora_A / lora_B) and no config: scale 1",
    sniff=_sniff,
    open=_open,
    resize_writer="nora_spectra.io.peft_resize:SAFETENSORS_RESIZE",
)
