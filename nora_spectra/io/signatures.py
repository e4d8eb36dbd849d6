"""Cheap tests of which format a set of tensor keys is in: what the sniffers of :mod:`nora_spectra.io.formats` use.

Each test reads only key names and header metadata (never a tensor). They are written side by side so that
no two of them accept the same file:

==============  ================================================================================================
format          keys (``P`` a dotted prefix, ``N`` a prefix without dots)
==============  ================================================================================================
``kohya``       ``N.lora_down.weight`` / ``N.lora_up.weight``, and not LyCORIS
``lycoris``     ``N.hada_w1_a`` / ``N.lokr_w1`` / ... (LoHa, LoKr), or kohya-style keys whose header says
                ``ss_network_module: lycoris...`` or whose prefix is ``lycoris_``
``diffusers``   ``P.lora.down.weight``, ``P.lora_linear_layer.down.weight``, ``P.to_q_lora.down.weight``; or
                PEFT keys (``P.lora_A.weight``) under a pipeline component (``unet.``, ``transformer.``,
                ``text_encoder.``, ...) or with a ``lora_adapter_metadata`` header entry
``mlx``         ``P.lora_a`` / ``P.lora_b`` without ``.weight``
``torchtune``   ``P.lora_a.weight`` / ``P.lora_b.weight``
``safetensors`` PEFT keys (``P.lora_A.weight``) not claimed by ``diffusers``
==============  ================================================================================================
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

__all__ = [
    "DIFFUSERS_COMPONENTS",
    "LYCORIS_FACTORS",
    "diffusers_keys",
    "kohya_lora_keys",
    "lycoris_keys",
    "mlx_keys",
    "torchtune_keys",
]

#: the component prefixes diffusers' pipelines give their LoRA keys.
DIFFUSERS_COMPONENTS: tuple[str, ...] = (
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "prior",
    "decoder",
)

#: LyCORIS LoHa / LoKr tensor names (after the module prefix and a dot).
LYCORIS_FACTORS: frozenset[str] = frozenset(
    {
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    }
)

_KOHYA = re.compile(r"[^.]+\.lora_(down|up)\.weight")
_DIFFUSERS_OLD = re.compile(r".+\.(lora|lora_linear_layer|to_(q|k|v|out)_lora)\.(down|up)\.weight")
_PEFT = re.compile(r".+\.lora_[AB]\.weight")
_MLX = re.compile(r".+\.lora_[ab]")
_TORCHTUNE = re.compile(r".+\.lora_[ab]\.weight")


def kohya_lora_keys(names: Iterable[str]) -> bool:
    """Some key is ``<name without dots>.lora_down.weight`` / ``.lora_up.weight`` (kohya's LoRA layout)."""
    return any(_KOHYA.fullmatch(name) for name in names)


def lycoris_keys(names: Iterable[str], metadata: Mapping[str, str]) -> bool:
    """LoHa / LoKr factors, or kohya-style LoRA keys that LyCORIS wrote (``lycoris_`` prefix, or the header's
    ``ss_network_module`` names a LyCORIS module)."""
    names = list(names)
    for name in names:
        prefix, _, tensor = name.partition(".")
        if tensor in LYCORIS_FACTORS and "." not in prefix:
            return True
    if not kohya_lora_keys(names):
        return False
    if str(metadata.get("ss_network_module", "")).startswith("lycoris"):
        return True
    return any(name.startswith("lycoris_") for name in names if _KOHYA.fullmatch(name))


def diffusers_keys(names: Iterable[str], metadata: Mapping[str, str]) -> bool:
    """diffusers' layouts: old-style ``.lora.down`` / ``.lora_linear_layer.down`` / ``.to_q_lora.down`` keys, or
    PEFT keys under a pipeline component or with diffusers' ``lora_adapter_metadata`` header entry."""
    peft = False
    for name in names:
        if _DIFFUSERS_OLD.fullmatch(name):
            return True
        if _PEFT.fullmatch(name):
            peft = True
            if name.split(".", 1)[0] in DIFFUSERS_COMPONENTS:
                return True
    return peft and "lora_adapter_metadata" in metadata


def mlx_keys(names: Iterable[str]) -> bool:
    """mlx-lm's ``<module>.lora_a`` / ``<module>.lora_b`` keys (no ``.weight``)."""
    return any(_MLX.fullmatch(name) for name in names)


def torchtune_keys(names: Iterable[str]) -> bool:
    """torchtune's native ``<module>.lora_a.weight`` / ``<module>.lora_b.weight`` keys."""
    return any(_TORCHTUNE.fullmatch(name) for name in names)
