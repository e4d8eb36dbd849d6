"""``peft``: a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``).

Also the weights file of such a directory, and directories holding adapters in sub-directories
(``--adapter NAME``). Key layout and scale rules: ``docs/formats.md``.
"""

from __future__ import annotations

from nora_spectra.io.peft import config_kind, open_peft_layout
from nora_spectra.io.registry import Format

FORMAT = Format(
    name="peft",
    summary="PEFT LoRA directory: adapter_config.json + adapter_model.safetensors (or .bin)",
    sniff=lambda probe: config_kind(probe) == "lora",
    open=open_peft_layout,
    resize_writer="nora_spectra.io.peft_resize:PEFT_RESIZE",
)
