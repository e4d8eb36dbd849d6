"""``kohya``: a kohya-ss/sd-scripts LoRA file (``lora_unet_*`` / ``lora_te*_*`` keys, ``.lora_down.weight``,
``.lora_up.weight``, ``.alpha``), as Stable Diffusion LoRAs are usually shared.

Scale ``alpha / r`` per module (``alpha`` missing or 0: ``alpha = r``); conv LoRA (3x3 down, 1x1 up) flattened
to ``(c_out, c_in*kh*kw)``. Module names become dotted paths under diffusers' component names
(``unet.down_blocks.0...``, ``text_encoder.text_model...``) where that is unambiguous
(:mod:`nora_spectra.io.kohya_names`), else stay as stored; ``key`` is always the stored name. The header's
``ss_*`` training settings reach ``Analysis.metadata``. Layout: :mod:`nora_spectra.io.kohya_modules`.
"""

from __future__ import annotations

from nora_spectra._text import name_list, plural
from nora_spectra.errors import CheckpointError
from nora_spectra.io.checkpoint import Checkpoint
from nora_spectra.io.factors import group_keys, skipped_warning
from nora_spectra.io.kohya_modules import (
    KOHYA_SUFFIXES,
    ModuleNames,
    alpha_warnings,
    kohya_lora_entry,
)
from nora_spectra.io.peft import is_adapter_weights_file
from nora_spectra.io.peft_keys import natural_key
from nora_spectra.io.registry import Format, Probe
from nora_spectra.io.signatures import kohya_lora_keys, lycoris_keys

__all__ = ["FORMAT", "open_kohya"]


def _sniff(probe: Probe) -> bool:
    if not probe.looks_like_safetensors() or is_adapter_weights_file(probe):
        return False
    header = probe.safetensors()
    names = header.keys()
    return kohya_lora_keys(names) and not lycoris_keys(names, header.metadata)


def open_kohya(probe: Probe, adapter: str | None, fmt: str = "kohya") -> Checkpoint:
    """Validate a kohya-style LoRA safetensors file from its header and describe every module.

    Raises:
        CheckpointError: no kohya LoRA keys, a module missing ``lora_down`` or ``lora_up``, shapes that do not
            compose, a non-float factor, a bad ``alpha`` or ``dora_scale``.
    """
    if adapter is not None:
        raise CheckpointError(probe.path, "--adapter NAME (adapter=NAME) applies to PEFT adapter directories only")
    source = probe.safetensors()
    path = source.path
    groups, others = group_keys(path, source.keys(), KOHYA_SUFFIXES)
    dotted = [prefix for prefix in groups if "." in prefix]
    if not groups or dotted:
        sample = ", ".join((dotted or source.keys())[:3]) or "no tensors"
        raise CheckpointError(
            path, f"no kohya LoRA modules (expected <name>.lora_down.weight / .lora_up.weight keys; found {sample})"
        )
    prefixes = sorted(groups, key=natural_key)
    names = ModuleNames(prefixes)
    entries = [kohya_lora_entry(path, source, prefix, groups[prefix], names[prefix]) for prefix in prefixes]
    warnings = alpha_warnings([prefix for prefix in prefixes if "alpha" not in groups[prefix]], source.metadata)
    if names.kept:
        warnings.append(
            f"{plural(len(names.kept), 'module name')} kept as stored (no unambiguous dotted path): "
            + name_list(names.kept, 3)
        )
    if any(entry.dora for entry in entries):
        warnings.append("DoRA layers: spectra are of the direction update only (dora_scale not included)")
    skipped = [(name, "not a LoRA factor (full tensor or unknown key)") for name in others]
    if skipped:
        warnings.append(skipped_warning(skipped, "LoRA factors"))
    return Checkpoint(
        path=probe.path,
        format=fmt,
        method="lora",
        config=None,
        warnings=warnings,
        skipped=skipped,
        weights_path=path,
        metadata=dict(source.metadata),
        entries=entries,
    )


FORMAT = Format(
    name="kohya",
    summary="kohya-ss/sd-scripts LoRA .safetensors: lora_unet_* / lora_te*_* keys, lora_down / lora_up / alpha",
    sniff=_sniff,
    open=open_kohya,
)
