"""``torchtune``: a torchtune adapter in torchtune's own key layout (``adapter_model.pt``, ``adapter_<N>.pt``,
or a ``.safetensors`` file with the same keys).

Keys are torchtune module paths (``layers.0.attn.q_proj``) plus ``.lora_a.weight`` ``(r, d_in)`` and
``.lora_b.weight`` ``(d_out, r)``; DoRA adds ``.magnitude`` ``(d_out,)``. The scale is ``lora_alpha / r``
(``LoRALinear``); torchtune keeps alpha out of the weights file, in the ``adapter_config.json`` it writes beside
it (``{"r", "lora_alpha", "target_modules", "peft_type"}``), which is therefore required. The PEFT-keyed
``adapter_model.safetensors`` torchtune writes next to it, and the directory itself, are read by the ``peft``
format (torchtune's export row-permutes q/k ``lora_B`` for RoPE; singular values are unchanged).

A ``.pt`` file is only ever loaded by ``torch.load(weights_only=True)`` after its pickle's opcodes were read
and found to name no code (:mod:`nora_spectra.io.torch_bin`); detecting the format reads those opcodes' string
constants (the keys), never a tensor.
"""

from __future__ import annotations

import os
import re
from functools import partial

from nora_spectra.errors import CheckpointError
from nora_spectra.io.adapter_config import CONFIG_NAME, read_adapter_config
from nora_spectra.io.checkpoint import Checkpoint, ModuleEntry, TensorSource
from nora_spectra.io.factors import (
    check_vector,
    group_keys,
    plan_pair,
    read_low_rank,
    read_vector,
    skipped_warning,
)
from nora_spectra.io.peft import is_adapter_weights_file
from nora_spectra.io.peft_keys import natural_key
from nora_spectra.io.registry import Format, Probe
from nora_spectra.io.signatures import torchtune_keys

__all__ = ["FORMAT", "open_torchtune"]

_SUFFIXES = {".lora_a.weight": "a", ".lora_b.weight": "b", ".magnitude": "m"}
_PICKLE_NAMES = re.compile(r".*\.(pt|pth)")


def _sniff(probe: Probe) -> bool:
    if not probe.is_file or is_adapter_weights_file(probe):
        return False
    if _PICKLE_NAMES.fullmatch(probe.name):
        from nora_spectra.io.pickle_scan import pickle_strings  # only for .pt/.pth (zipfile, pickletools)

        return torchtune_keys(pickle_strings(probe.path))
    return probe.looks_like_safetensors() and torchtune_keys(probe.safetensors().keys())


def _open_source(probe: Probe) -> TensorSource:
    if probe.looks_like_safetensors():
        return probe.safetensors()
    from nora_spectra.io.torch_bin import TorchBinFile

    return TorchBinFile(probe.path)


def open_torchtune(probe: Probe, adapter: str | None) -> Checkpoint:
    """Validate a torchtune-keyed adapter file and its ``adapter_config.json``; describe every module.

    Raises:
        CheckpointError: a directory or no ``adapter_config.json`` beside the file, an invalid config, an unsafe or
            corrupt pickle, no ``lora_a`` / ``lora_b`` keys, a factor without its partner, shapes that do not
            compose, a rank other than the config's ``r``, a bad magnitude.
    """
    if adapter is not None:
        raise CheckpointError(probe.path, "--adapter NAME (adapter=NAME) applies to PEFT adapter directories only")
    if not probe.is_file:
        raise CheckpointError(probe.path, "a torchtune adapter is a file (adapter_model.pt); its directory is read as PEFT")
    config_path = os.path.join(probe.directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(
            probe.path,
            f"no {CONFIG_NAME} beside it: torchtune keeps lora_alpha out of the weights, so the scale alpha/r is "
            f"unknown (torchtune writes {CONFIG_NAME} with r and lora_alpha next to adapter_model.pt; copy it there)",
        )
    settings = read_adapter_config(config_path)
    source = _open_source(probe)
    path = source.path
    groups, others = group_keys(path, source.keys(), _SUFFIXES)
    skipped = [(name, "not a LoRA factor (full tensor or unknown key)") for name in others]
    scale = settings.lora_alpha / settings.r
    entries: list[ModuleEntry] = []
    for prefix in sorted(groups, key=natural_key):
        roles = groups[prefix]
        if "a" not in roles and "b" not in roles:
            skipped.extend((key, "not a LoRA factor (no lora_a / lora_b beside it)") for key in roles.values())
            continue
        if "a" not in roles or "b" not in roles:
            have, missing = ("lora_a", "lora_b") if "a" in roles else ("lora_b", "lora_a")
            raise CheckpointError(path, f"module {prefix!r} has {have} without {missing}")
        plan = plan_pair(path, prefix, source.info(roles["a"]), source.info(roles["b"]), ("lora_a", "lora_b"))
        if plan.rank != settings.r:
            raise CheckpointError(path, f"module {prefix!r}: the config gives r {settings.r} but the tensors have rank {plan.rank}")
        read_magnitude, notes = None, ()
        if "m" in roles:
            check_vector(path, prefix, source.info(roles["m"]), plan.shape[0], "DoRA magnitude: one value per output feature")
            read_magnitude = partial(read_vector, source, roles["m"])
            notes = ("DoRA: spectrum of the direction update B A; the magnitude is not included",)
        entries.append(ModuleEntry(
            module=prefix, key=prefix, kind="lora", rank=plan.rank, shape=plan.shape, layer_type=plan.layer_type,
            dtype=plan.dtype, read=partial(read_low_rank, source, roles["a"], roles["b"], scale), dora="m" in roles,
            notes=notes, read_magnitude=read_magnitude,
        ))
    if not entries:
        sample = ", ".join(source.keys()[:3]) or "no tensors"
        raise CheckpointError(path, f"no torchtune LoRA factors found (expected <module>.lora_a.weight / .lora_b.weight; found {sample})")
    warnings = []
    if any(entry.dora for entry in entries):
        warnings.append("DoRA layers: spectra are of the direction update B A only (magnitude not included)")
    if skipped:
        warnings.append(skipped_warning(skipped, "LoRA factors"))
    return Checkpoint(
        path=probe.path, format="torchtune", method="lora", config=dict(settings.raw), warnings=warnings,
        skipped=skipped, weights_path=path, metadata=dict(source.metadata), entries=entries,
    )


FORMAT = Format(
    name="torchtune",
    summary="torchtune's own adapter keys (adapter_model.pt / adapter_<N>.pt, or .safetensors): lora_a / lora_b, "
    "scale lora_alpha/r from the adapter_config.json beside it",
    sniff=_sniff,
    open=open_torchtune,
)
