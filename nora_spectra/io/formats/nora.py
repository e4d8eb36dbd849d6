"""``nora``: a NoRA adapter directory in PEFT's layout, with ``peft_type: "NORA"`` in its config.

Written by :func:`nora_core.save_adapter`; read exactly as a PEFT LoRA directory. The spectrum is that
of the branch's linear factors ``s * B @ A`` (the SiLU sits between them: ``docs/activation.md``).
"""

from __future__ import annotations

from nora_spectra.io.peft import config_kind, open_peft_layout
from nora_spectra.io.registry import Format

FORMAT = Format(
    name="nora",
    summary="NoRA directory (nora_core.save_adapter): PEFT's layout with peft_type NORA",
    sniff=lambda probe: config_kind(probe) == "nora",
    open=open_peft_layout,
    resize_writer="nora_spectra.io.peft_resize:NORA_RESIZE",
)
