"""``diffusers``: a diffusers LoRA file (``pytorch_lora_weights.safetensors``, or its directory), in any of the
layouts diffusers writes or reads:

==============================================================  =====================================================
key (A factor; B is ``lora_B`` / ``up``)                         written by
==============================================================  =====================================================
``unet.<m>.lora_A.weight`` (``transformer.``, ``text_encoder.``)  ``<Pipeline>.save_lora_weights`` (PEFT state dicts)
``<m>.lora_A.weight`` + header ``lora_adapter_metadata``          ``ModelMixin.save_lora_adapter`` (no component prefix)
``unet.<m>.lora.down.weight``, ``<m>.lora_linear_layer.down``     the SD1.5/SDXL training scripts
                                                                 (``convert_state_dict_to_diffusers``)
``<m>.processor.to_q_lora.down.weight`` (``to_k/to_v/to_out``)    diffusers < 0.21 ``save_attn_procs`` (legacy)
==============================================================  =====================================================

Modules are reported by their model paths with the component prefix as stored (``unet.down_blocks...to_q``;
legacy ``...attn1.processor.to_q_lora`` becomes ``...attn1.to_q``, ``to_out_lora`` ``to_out.0``, and in a text
encoder ``q_proj`` ... ``out_proj``, as diffusers' own converters map them). Scale, per module:

1. a ``.alpha`` tensor (``<prefix>.alpha`` or ``<A key>.alpha``): ``alpha / r``;
2. else the ``lora_adapter_metadata`` header entry (the ``LoraConfig`` as JSON; keys prefixed by component
   for pipeline saves): PEFT's rule, ``lora_alpha / r`` with ``rank_pattern`` / ``alpha_pattern`` /
   ``use_rslora`` matched on the module path inside its component;
3. else scale 1, with a warning: what diffusers' loader does (``alpha = r``), never a guess of ours.

A file with both ``.alpha`` tensors and ``lora_adapter_metadata`` is refused, as diffusers refuses it.
"""

from __future__ import annotations

import os
import re
from functools import partial
from typing import Any

from nora_core.parsing import ParseError, parse_json
from nora_spectra._text import name_list, plural
from nora_spectra.errors import CheckpointError
from nora_spectra.io.adapter_config import AdapterSettings, settings_from_dict
from nora_spectra.io.checkpoint import Checkpoint, ModuleEntry, TensorSource
from nora_spectra.io.factors import (
    check_vector,
    group_keys,
    plan_pair,
    read_low_rank,
    read_scalar,
    read_vector,
    skipped_warning,
)
from nora_spectra.io.peft import is_adapter_weights_file
from nora_spectra.io.peft_keys import natural_key
from nora_spectra.io.registry import Format, Probe
from nora_spectra.io.signatures import DIFFUSERS_COMPONENTS, diffusers_keys
from nora_spectra.updates import LowRankUpdate

#: the weights file diffusers' savers write into a directory.
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: the header entry holding the LoraConfig(s) as JSON.
METADATA_KEY = "lora_adapter_metadata"

_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",
    ".lora_linear_layer.up.weight": "B",
    ".down.weight": "A",  # legacy ...to_q_lora.down.weight; any other prefix is refused below
    ".up.weight": "B",
    ".alpha": "alpha",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
_LEGACY = re.compile(r"(?P<base>.*?)(?P<processor>\.processor)?\.to_(?P<proj>q|k|v|out)_lora")
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight", ".down.weight")

__all__ = ["FORMAT", "METADATA_KEY", "WEIGHTS_NAME", "open_diffusers"]


def _weights_path(probe: Probe) -> str | None:
    """The weights file: the probed file, or ``pytorch_lora_weights.safetensors`` in the probed directory."""
    if probe.is_dir:
        if os.path.exists(os.path.join(probe.path, "adapter_config.json")):
            return None  # a PEFT directory
        candidate = os.path.join(probe.path, WEIGHTS_NAME)
        return candidate if os.path.isfile(candidate) else None
    if probe.looks_like_safetensors() and not is_adapter_weights_file(probe):
        return probe.path
    return None


def _sniff(probe: Probe) -> bool:
    path = _weights_path(probe)
    if path is None:
        return False
    header = probe.safetensors(path)
    return diffusers_keys(header.keys(), header.metadata)


def _component(module: str) -> str:
    first = module.split(".", 1)[0]
    return first if first in DIFFUSERS_COMPONENTS else ""


def _module_name(prefix: str, legacy: bool) -> str:
    """The model path of a module from its stored prefix (legacy processor names mapped as diffusers does)."""
    if not legacy:
        return prefix
    found = _LEGACY.fullmatch(prefix)
    assert found is not None
    proj, base = found["proj"], found["base"]
    if _component(prefix).startswith("text_encoder"):
        return f"{base}.{'out' if proj == 'out' else proj}_proj"
    return f"{base}.to_{proj}" + (".0" if proj == "out" else "")


def _metadata_configs(path: str, metadata: dict[str, str]) -> dict[str, dict[str, Any]] | None:
    """``component -> LoraConfig dict`` from the ``lora_adapter_metadata`` header entry (``""``: no prefix)."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        raw = parse_json(text, path)
    except ParseError as exc:
        raise CheckpointError(path, f"invalid {METADATA_KEY} header entry: {exc.problem}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"invalid {METADATA_KEY} header entry: expected a JSON object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        component, _, field = key.partition(".")
        if field and component in DIFFUSERS_COMPONENTS:
            configs.setdefault(component, {})[field] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


def _config_key(configs: dict[str, dict[str, Any]] | None, module: str) -> str | None:
    """Which metadata config describes ``module``: its component's, else the unprefixed one, else None."""
    if configs is None:
        return None
    component = _component(module)
    if component in configs:
        return component
    return "" if "" in configs else None


def _read(source: TensorSource, key_a: str, key_b: str, scale: float | tuple[str, int]) -> LowRankUpdate:
    if isinstance(scale, tuple):  # (alpha key, r): read the alpha now
        key, rank = scale
        scale = read_scalar(source, key) / rank
    return read_low_rank(source, key_a, key_b, scale)


def open_diffusers(probe: Probe, adapter: str | None) -> Checkpoint:
    """Validate a diffusers LoRA file from its header and describe every module.

    Raises:
        CheckpointError: no diffusers LoRA factors, a factor without its partner, shapes that do not compose,
            an unknown layout, ``.alpha`` tensors beside ``lora_adapter_metadata``, an invalid metadata config or a
            rank that differs from it.
    """
    if adapter is not None:
        raise CheckpointError(probe.path, "--adapter NAME (adapter=NAME) applies to PEFT adapter directories only")
    weights = _weights_path(probe)
    if weights is None:
        raise CheckpointError(probe.path, f"not a diffusers LoRA: expected a .safetensors file or a directory with {WEIGHTS_NAME}")
    source = probe.safetensors(weights)
    path = source.path
    groups, others = group_keys(path, source.keys(), _SUFFIXES)
    # alphas stored under the A factor's full key (<A key>.alpha, as diffusers' kohya conversion names them)
    alphas_by_a_key = {}
    for prefix in [p for p, roles in groups.items() if set(roles) == {"alpha"} and p.endswith(_FACTOR_SUFFIXES)]:
        alphas_by_a_key[prefix] = groups.pop(prefix)["alpha"]
    skipped: list[tuple[str, str]] = [(name, "not a LoRA factor (full tensor or unknown key)") for name in others]
    configs = _metadata_configs(path, source.metadata)
    entries: list[ModuleEntry] = []
    settings: dict[str, AdapterSettings] = {}
    unscaled: list[str] = []
    has_alpha = False
    for prefix in sorted(groups, key=natural_key):
        roles = groups[prefix]
        # a bare ".down.weight" / ".up.weight" is a factor only after to_q_lora & co (the legacy layout)
        bare = [role for role in ("A", "B") if role in roles and roles[role] in (f"{prefix}.down.weight", f"{prefix}.up.weight")]
        legacy = bool(bare) and _LEGACY.fullmatch(prefix) is not None
        if bare and not legacy:
            skipped.extend((roles.pop(role), "not a LoRA factor (unknown layout)") for role in bare)
        if "A" not in roles and "B" not in roles:
            skipped.extend((key, "not a LoRA factor (no lora_A / lora_B beside it)") for key in roles.values())
            continue
        if "A" not in roles or "B" not in roles:
            have, missing = ("A", "B") if "A" in roles else ("B", "A")
            raise CheckpointError(
                path, f"module {prefix!r} has {roles[have]!r} without its {'up / lora_B' if missing == 'B' else 'down / lora_A'} factor"
            )
        module = _module_name(prefix, legacy)
        plan = plan_pair(path, module, source.info(roles["A"]), source.info(roles["B"]), ("down", "up"))
        alpha_key = roles.get("alpha") or alphas_by_a_key.pop(roles["A"], None)
        notes: list[str] = []
        scale: float | tuple[str, int]
        if alpha_key is not None:
            has_alpha = True
            check_vector(path, module, source.info(alpha_key), 1, "alpha is one number")
            scale = (alpha_key, plan.rank)
        elif (config_key := _config_key(configs, module)) is not None:
            if config_key not in settings:
                settings[config_key] = settings_from_dict(
                    path, configs[config_key], f"{METADATA_KEY} ({config_key or 'model'})")  # type: ignore[index]
            component = _component(module)
            inner = module[len(component) + 1 :] if component else module
            expected = settings[config_key].rank_for(inner)
            if expected != plan.rank:
                raise CheckpointError(
                    path, f"module {module!r}: {METADATA_KEY} gives rank {expected} but the tensors have rank {plan.rank}"
                )
            scale = settings[config_key].scale_for(inner)
        else:
            scale = 1.0
            unscaled.append(module)
            notes.append("no alpha: scale 1")
        read_magnitude = None
        if "magnitude" in roles:
            check_vector(path, module, source.info(roles["magnitude"]), plan.shape[0], "one value per output feature")
            read_magnitude = partial(read_vector, source, roles["magnitude"])
            notes.append("DoRA: spectrum of the direction update B A; the magnitude vector is not included")
        if "bias" in roles:
            notes.append("lora_B.bias present: not part of the spectrum")
        entries.append(ModuleEntry(
            module=module, key=prefix, kind="lora", rank=plan.rank, shape=plan.shape, layer_type=plan.layer_type,
            dtype=plan.dtype, read=partial(_read, source, roles["A"], roles["B"], scale), dora="magnitude" in roles,
            notes=tuple(notes), read_magnitude=read_magnitude,
        ))
    skipped.extend((key, "alpha of no module in the file") for key in alphas_by_a_key.values())
    if not entries:
        sample = ", ".join(source.keys()[:3]) or "no tensors"
        raise CheckpointError(path, f"no diffusers LoRA factors found (found {sample})")
    if has_alpha and configs is not None:
        raise CheckpointError(
            path, f"has both .alpha tensors and a {METADATA_KEY} header entry: the scale is ambiguous (diffusers "
            "refuses such a file too)"
        )
    names = [entry.module for entry in entries]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise CheckpointError(path, f"module {twice[0]!r} is stored twice (in two layouts)")
    warnings = []
    if unscaled:
        where = "" if len(unscaled) == len(entries) else f" for {plural(len(unscaled), 'module')} ({name_list(unscaled, 3)})"
        warnings.append(
            f"no alpha in the file (no .alpha tensors, no {METADATA_KEY} entry{'' if configs is None else ' for them'})"
            f"{where}: scale 1 assumed, as diffusers' loader does (alpha = r); the trained scale may differ"
        )
    if any(entry.dora for entry in entries):
        warnings.append("DoRA layers: spectra are of the direction update B A only (magnitude vector not included)")
    if any("bias" in groups[entry.key] for entry in entries):
        warnings.append("lora_B.bias tensors are ignored: a bias is not part of the update's spectrum")
    if skipped:
        warnings.append(skipped_warning(skipped, "LoRA factors"))
    config = None
    if configs is not None:
        config = configs.get("") if set(configs) == {""} else configs
    return Checkpoint(
        path=probe.path,
        format="diffusers",
        method="lora",
        config=config,
        warnings=warnings,
        skipped=skipped,
        weights_path=path,
        metadata=dict(source.metadata),
        entries=entries,
    )


FORMAT = Format(
    name="diffusers",
    summary="diffusers LoRA (pytorch_lora_weights.safetensors): unet./transformer./text_encoder. keys, "
    "old-style lora.down / to_q_lora layouts, scale from .alpha or lora_adapter_metadata",
    sniff=_sniff,
    open=open_diffusers,
)
