"""kohya-style module names (``lora_unet_down_blocks_0_..._to_q``) back to dotted module paths.

kohya-ss/sd-scripts names a module ``<prefix>_<dotted path with every "." replaced by "_">`` (LyCORIS does the
same with its own prefixes). ``_`` is both the separator and part of names (``to_q``, ``proj_in``,
``transformer_blocks``), so the dotted path is only recoverable with knowledge of the names: sd-scripts
itself looks names up in the base model it is given. Without the model, :func:`dotted_module` splits the name
at every ``_`` and re-joins the pieces into components, each of which must be

* a component of the Stable Diffusion 1.x/2.x and SDXL UNets and CLIP text encoders (:data:`COMPONENTS`, the
  names under every module sd-scripts adapts there),
* a number (``0``), or a single word ending in digits (``attn1``, ``fc2``, ``conv3``).

When exactly one split fits, the name maps to its dotted path under the component prefix diffusers uses
(``lora_unet_`` -> ``unet.``, ``lora_te_``/``lora_te1_`` -> ``text_encoder.``, ``lora_te2_`` ->
``text_encoder_2.``); otherwise (an unknown architecture, or two possible splits) the kohya name is kept
unchanged. Every module of real SD1.5 and SDXL shapes maps to the path sd-scripts' own lookup gives
(``tests/fixtures/formats/kohya/*_names.txt.gz``), and to diffusers' own kohya conversion.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["COMPONENTS", "PREFIXES", "dotted_module", "split_prefix"]

#: kohya / LyCORIS name prefix -> the component it names (diffusers' naming), longest first when matching.
PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_te_": "text_encoder",
    "lycoris_": "",
}

#: dotted-path components of the modules sd-scripts adapts in SD1.x/2.x (diffusers UNet), SDXL (sgm UNet)
#: and their CLIP text encoders; components with an underscore are the ones a split must recognise.
COMPONENTS: frozenset[str] = frozenset(
    {
        # UNet (diffusers layout: SD1.x / SD2.x)
        "down_blocks", "mid_block", "up_blocks", "attentions", "resnets", "transformer_blocks", "attn1", "attn2",
        "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "ff", "net", "proj", "conv", "conv1", "conv2",
        "conv_shortcut", "time_emb_proj", "downsamplers", "upsamplers",
        # UNet (sgm layout: SDXL)
        "input_blocks", "middle_block", "output_blocks", "in_layers", "emb_layers", "out_layers",
        "skip_connection", "op",
        # CLIP text encoders
        "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp", "fc1", "fc2",
    }
)

_WORD_WITH_DIGITS = re.compile(r"[a-z]+[0-9]+")


def split_prefix(name: str) -> tuple[str, str, str] | None:
    """``"lora_te1_text_model_..."`` -> ``("lora_te1_", "text_encoder", "text_model_...")``; None without a known prefix."""
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if name.startswith(prefix) and len(name) > len(prefix):
            return prefix, PREFIXES[prefix], name[len(prefix) :]
    return None


def _single(token: str) -> bool:
    return token in COMPONENTS or token.isdigit() or _WORD_WITH_DIGITS.fullmatch(token) is not None


@lru_cache(maxsize=4096)
def _splits(rest: str) -> tuple[int, tuple[str, ...]]:
    """(number of ways, one way) to cut ``rest`` at underscores into recognised components."""
    tokens = rest.split("_")
    n = len(tokens)
    # ways[i]: number of splits of tokens[i:]; choice[i]: the first component of one of them
    ways = [0] * (n + 1)
    choice: list[str | None] = [None] * (n + 1)
    ways[n] = 1
    for i in range(n - 1, -1, -1):
        for j in range(i + 1, n + 1):
            word = "_".join(tokens[i:j])
            if ways[j] and (word in COMPONENTS if j - i > 1 else _single(word)):
                ways[i] += ways[j]
                choice[i] = choice[i] or word
    if ways[0] != 1:
        return ways[0], ()
    parts, i = [], 0
    while i < n:
        word = choice[i]
        assert word is not None
        parts.append(word)
        i += word.count("_") + 1
    return 1, tuple(parts)


def dotted_module(name: str) -> str | None:
    """The dotted module path behind a kohya-style name, or None when it is not unambiguous.

    Args:
        name: e.g. ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``.

    Returns:
        e.g. ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``; None for an unknown prefix,
        a piece that is no known component, or a name with several possible splits.
    """
    found = split_prefix(name)
    if found is None:
        return None
    _, component, rest = found
    ways, parts = _splits(rest)
    if ways != 1:
        return None
    path = ".".join(parts)
    return f"{component}.{path}" if component else path
