"""``mlx``: an mlx-lm adapter: ``adapters.safetensors`` + ``adapter_config.json`` (the directory, or the file).

Written by ``mlx_lm.lora``: keys are full module paths plus ``.lora_a`` / ``.lora_b`` (no ``.weight``), stored
transposed against PEFT: ``lora_a`` ``(d_in, r)``, ``lora_b`` ``(r, d_out)``, and the update is
``scale * lora_b^T @ lora_a^T`` with ``scale = lora_parameters.scale``, an absolute multiplier (default 20; no
``alpha / r``). The config's ``lora_parameters.rank`` must match the tensors. DoRA (``fine_tune_type: "dora"``,
or the older ``use_dora: true``) adds ``<module>.m``, the magnitude per output feature. MoE layers
(``LoRASwitchLinear``) store every expert's factors stacked, ``lora_a`` ``(E, r, d_in)`` and ``lora_b``
``(E, d_out, r)``; each expert is analysed as its own module, named ``<parent>.experts.<e>.<leaf>`` (its ``key``
is the stored prefix shared by the experts). Embedding LoRA (``LoRAEmbedding``: ``lora_a`` ``(num, r)``,
``lora_b`` ``(r, dims)``, update ``scale * lora_a @ lora_b``) is recognised by the module's name
(``embed_tokens``, ``wte``, ...). mlx-lm writes an ``adapter_config.json`` without ``peft_type``; the PEFT
reader does not claim it.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any

from nora_core.parsing import ParseError, read_json
from nora_spectra.errors import CheckpointError
from nora_spectra.io.checkpoint import Checkpoint, ModuleEntry
from nora_spectra.io.factors import (
    check_float,
    check_vector,
    dtype_of,
    group_keys,
    read_vector,
    skipped_warning,
)
from nora_spectra.io.peft_keys import natural_key
from nora_spectra.io.registry import Format, Probe
from nora_spectra.io.safetensors_file import SafetensorsFile
from nora_spectra.io.signatures import mlx_keys
from nora_spectra.updates import LowRankUpdate

__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "open_mlx"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
_SUFFIXES = {".lora_a": "a", ".lora_b": "b", ".m": "m"}
_EMBEDDINGS = frozenset({"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in"})


def _is_mlx_config(raw: Any) -> bool:
    return isinstance(raw, dict) and "peft_type" not in raw and ("lora_parameters" in raw or "fine_tune_type" in raw)


def _sniff(probe: Probe) -> bool:
    if probe.is_dir:
        return _is_mlx_config(probe.json(os.path.join(probe.path, CONFIG_NAME)))
    if not probe.looks_like_safetensors():
        return False
    if probe.name == WEIGHTS_NAME and _is_mlx_config(probe.json(os.path.join(probe.directory, CONFIG_NAME))):
        return True
    return mlx_keys(probe.safetensors().keys())


def _config(path: str) -> tuple[dict[str, Any], int, float, bool]:
    """(config, rank, scale, dora) from an mlx-lm ``adapter_config.json``."""
    try:
        raw = read_json(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read adapter config: {exc.strerror or exc}") from None
    except ParseError as exc:
        raise CheckpointError(path, f"invalid mlx-lm adapter config: {exc.problem}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, "invalid mlx-lm adapter config: expected a JSON object")
    kind = raw.get("fine_tune_type", "dora" if raw.get("use_dora") is True else "lora")
    if kind == "full":
        raise CheckpointError(path, "fine_tune_type is full: the adapter file holds full weights, not a low-rank adapter")
    if kind not in ("lora", "dora"):
        raise CheckpointError(path, f"unsupported fine_tune_type {kind!r} (supported: lora, dora)")
    params = raw.get("lora_parameters")
    if not isinstance(params, dict):
        raise CheckpointError(path, "invalid mlx-lm adapter config: no lora_parameters object (rank, scale)")
    if "scale" not in params:
        hint = " (it has alpha: mlx-lm now takes an absolute scale instead)" if "alpha" in params else ""
        raise CheckpointError(path, f"invalid mlx-lm adapter config: lora_parameters has no scale{hint}")
    rank, scale = params.get("rank"), params["scale"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CheckpointError(path, f"invalid mlx-lm adapter config: lora_parameters.rank must be a positive integer, got {rank!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise CheckpointError(path, f"invalid mlx-lm adapter config: lora_parameters.scale must be a finite number, got {scale!r}")
    return raw, rank, float(scale), kind == "dora"


def _read_dense(source: SafetensorsFile, key_a: str, key_b: str, scale: float, embedding: bool) -> LowRankUpdate:
    lora_a, lora_b = source.read(key_a), source.read(key_b)  # (d_in, r), (r, d_out)
    if embedding:  # scale * lora_a @ lora_b, (num_embeddings, dims)
        return LowRankUpdate(lora_b, lora_a, scale)
    return LowRankUpdate(lora_a.T, lora_b.T, scale)  # scale * lora_b^T @ lora_a^T (views: BLAS takes them as they are)


def _read_expert(source: SafetensorsFile, key_a: str, key_b: str, scale: float, expert: int) -> LowRankUpdate:
    # lora_a (E, r, d_in), lora_b (E, d_out, r): expert e's update is scale * lora_b[e] @ lora_a[e]
    return LowRankUpdate(source.read_index(key_a, expert), source.read_index(key_b, expert), scale)


def _expert_name(prefix: str, expert: int) -> str:
    parent, _, leaf = prefix.rpartition(".")
    return f"{parent}.experts.{expert}.{leaf}" if parent else f"experts.{expert}.{leaf}"


def open_mlx(probe: Probe, adapter: str | None) -> Checkpoint:
    """Validate an mlx-lm adapter (directory or ``adapters.safetensors``) and describe every module.

    Raises:
        CheckpointError: no ``adapter_config.json``, an invalid config (``fine_tune_type: full``, no
            ``lora_parameters.scale``), no weights file, a ``lora_a`` without ``lora_b``, shapes that do not
            compose, a rank other than the config's, a bad DoRA ``m``.
    """
    if adapter is not None:
        raise CheckpointError(probe.path, "--adapter NAME (adapter=NAME) applies to PEFT adapter directories only")
    directory = probe.directory
    config_path = os.path.join(directory, CONFIG_NAME)
    weights = os.path.join(directory, WEIGHTS_NAME) if probe.is_dir else probe.path
    if not os.path.isfile(config_path):
        raise CheckpointError(
            probe.path, f"an mlx-lm adapter needs the {CONFIG_NAME} mlx_lm.lora writes beside it (lora_parameters.scale)"
        )
    raw, rank, scale, dora = _config(config_path)
    if not os.path.isfile(weights):
        found = [e for e in sorted(os.listdir(directory)) if e.startswith("adapters")]
        hint = f" (found {', '.join(found)}: convert .npz adapters to safetensors)" if found else ""
        raise CheckpointError(directory, f"no {WEIGHTS_NAME}{hint}")
    source = probe.safetensors(weights)
    groups, others = group_keys(weights, source.keys(), _SUFFIXES)
    skipped = [(name, "not a LoRA factor (full tensor or unknown key)") for name in others]
    entries: list[ModuleEntry] = []
    for prefix in sorted(groups, key=natural_key):
        roles = groups[prefix]
        if "a" not in roles and "b" not in roles:
            skipped.extend((key, "not a LoRA factor (no lora_a / lora_b beside it)") for key in roles.values())
            continue
        if "a" not in roles or "b" not in roles:
            have, missing = ("lora_a", "lora_b") if "a" in roles else ("lora_b", "lora_a")
            raise CheckpointError(weights, f"module {prefix!r} has {have} without {missing}")
        a, b = source.info(roles["a"]), source.info(roles["b"])
        check_float(weights, prefix, (a, b))
        dtype = dtype_of((a, b))
        if len(a.shape) == 3 and len(b.shape) == 3:  # MoE: (E, r, d_in), (E, d_out, r)
            experts, r, d_in = a.shape
            if b.shape[0] != experts or b.shape[2] != r:
                raise CheckpointError(weights, f"module {prefix!r}: shapes do not compose, lora_a {list(a.shape)} vs "
                                      f"lora_b {list(b.shape)} (MoE: lora_a (E, r, d_in), lora_b (E, d_out, r))")
            if "m" in roles:
                raise CheckpointError(weights, f"module {prefix!r}: a DoRA magnitude on a MoE layer is not an mlx-lm layout")
            shape = (b.shape[1], d_in)
            for expert in range(experts):
                entries.append(ModuleEntry(
                    module=_expert_name(prefix, expert), key=prefix, kind="lora", rank=r, shape=shape,
                    layer_type="linear", dtype=dtype, read=partial(_read_expert, source, roles["a"], roles["b"], scale, expert),
                    notes=(f"expert {expert} of {experts} (LoRASwitchLinear)",),
                ))
        elif len(a.shape) == 2 and len(b.shape) == 2:  # (d_in, r), (r, d_out)
            r = a.shape[1]
            if b.shape[0] != r:
                raise CheckpointError(weights, f"module {prefix!r}: shapes do not compose, lora_a {list(a.shape)} vs "
                                      f"lora_b {list(b.shape)} (lora_a (d_in, r), lora_b (r, d_out))")
            embedding = prefix.rsplit(".", 1)[-1] in _EMBEDDINGS
            shape = (a.shape[0], b.shape[1]) if embedding else (b.shape[1], a.shape[0])
            read_magnitude, notes = None, ()
            if "m" in roles:
                check_vector(weights, prefix, source.info(roles["m"]), shape[0], "DoRA m: one value per output feature")
                read_magnitude = partial(read_vector, source, roles["m"])
                notes = ("DoRA: spectrum of the direction update; the magnitude m is not included",)
            entries.append(ModuleEntry(
                module=prefix, key=prefix, kind="lora", rank=r, shape=shape,
                layer_type="embedding" if embedding else "linear", dtype=dtype,
                read=partial(_read_dense, source, roles["a"], roles["b"], scale, embedding), dora="m" in roles,
                notes=notes, read_magnitude=read_magnitude,
            ))
        else:
            raise CheckpointError(weights, f"module {prefix!r}: shapes do not compose, lora_a {list(a.shape)} vs "
                                  f"lora_b {list(b.shape)} (2-D, or 3-D stacked experts)")
        if entries[-1].rank != rank:
            raise CheckpointError(weights, f"module {prefix!r}: the config gives rank {rank} but the tensors have rank "
                                  f"{entries[-1].rank}")
    if not entries:
        sample = ", ".join(source.keys()[:3]) or "no tensors"
        raise CheckpointError(weights, f"no mlx-lm LoRA factors found (expected <module>.lora_a / .lora_b; found {sample})")
    warnings = []
    if dora and not any(entry.dora for entry in entries):
        warnings.append("fine_tune_type is dora but no magnitude (m) tensor was found")
    if any(entry.dora for entry in entries):
        warnings.append("DoRA layers: spectra are of the direction update only (magnitude m not included)")
    if skipped:
        warnings.append(skipped_warning(skipped, "LoRA factors"))
    return Checkpoint(
        path=probe.path, format="mlx", method="lora", config=raw, warnings=warnings, skipped=skipped,
        weights_path=weights, metadata=dict(source.metadata), entries=entries,
    )


FORMAT = Format(
    name="mlx",
    summary="mlx-lm adapter: adapters.safetensors (lora_a (d_in, r), lora_b (r, d_out)) + adapter_config.json "
    "(lora_parameters.scale)",
    sniff=_sniff,
    open=open_mlx,
)
