"""``full``: a fully fine-tuned model, analysed as its difference from the base model (needs ``--base``).

A full fine-tune has no adapter factors: every weight may have changed. Given the base model
(``load_checkpoint(path, base=BASE)``, ``spectra analyze TUNED --base BASE``), each weight matrix
present in both models becomes one module whose update is the dense difference

    dW = W_tuned - W_base        (read one tensor at a time, float64, exact for bf16/fp16/fp32 inputs)

analysed through :class:`~nora_spectra.updates.DenseUpdate` (a randomized top-k spectrum with an error
bound for large matrices: ``docs/metrics.md``). Both models are safetensors, one file or sharded
(:mod:`nora_spectra.io.model_weights`).

The format claims a path only in a base-aware analysis: a safetensors model (file, sharded index, or a
directory with ``model.safetensors[.index.json]`` and no ``adapter_config.json``) whose tensor names
hold no adapter factor (``lora``, ``hada_``, ``lokr_``, ...). Without a base nothing claims such a
path and the adapter readers say why it is not an adapter.

Not analysed (listed in ``skipped`` with the reason): tensors with fewer than two dimensions (biases,
norm scales), non-float tensors (quantized weights), vocabulary embeddings and output heads (their
rows change only for the tokens seen in training, and they are the largest matrices of the model),
and tensors absent from the base. A tensor whose shape differs from the base's is an error naming
both files.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np

from nora_spectra._text import name_list, plural
from nora_spectra.errors import CheckpointError
from nora_spectra.io.checkpoint import Checkpoint, ModuleEntry
from nora_spectra.io.model_weights import (
    ModelWeights,
    is_float_matrix,
    is_model_layout,
    open_model_weights,
)
from nora_spectra.io.peft_keys import natural_key
from nora_spectra.io.registry import Format, Probe
from nora_spectra.io.safetensors_file import FLOAT_DTYPES
from nora_spectra.updates import DenseUpdate

__all__ = ["EMBEDDING_MODULES", "FORMAT", "has_adapter_keys", "read_difference"]

#: last module-name components of vocabulary embeddings and output heads (skipped).
EMBEDDING_MODULES = frozenset(
    {
        "embed_tokens", "embed_positions", "lm_head", "wte", "wpe", "word_embeddings", "position_embeddings",
        "token_type_embeddings", "embed_in", "embed_out", "tok_embeddings", "shared",
    }
)

#: substrings of tensor names that only adapter checkpoints use (PEFT, kohya, diffusers, LyCORIS, mlx, torchtune).
_ADAPTER_MARKERS = ("lora", "hada_", "lokr_", "dora_scale", "oft_", "boft_")


def has_adapter_keys(names: list[str]) -> bool:
    """True when a tensor name looks like an adapter factor (``lora_A``, ``lora_down``, ``hada_w1_a``, ...)."""
    return any(marker in name.lower() for name in names for marker in _ADAPTER_MARKERS)


def _sniff(probe: Probe) -> bool:
    if probe.base is None:
        return False
    if probe.is_dir:
        return is_model_layout(probe.path)
    if probe.path.endswith(".safetensors.index.json"):
        return True
    if not probe.looks_like_safetensors():
        return False
    header = probe.safetensors()
    names = header.keys()
    return not has_adapter_keys(names) and any(is_float_matrix(header.info(name)) for name in names)


def read_difference(tuned: ModelWeights, base: ModelWeights, name: str, base_name: str, shape: tuple[int, int]) -> DenseUpdate:
    """``W_tuned - W_base`` of one tensor, as a dense ``(rows, cols)`` update (conv kernels flattened).

    Holds one float64 copy of the matrix (the base is subtracted in place, chunk by chunk).
    """
    delta = tuned.read(name)
    base.subtract_from(base_name, delta)
    return DenseUpdate(delta.reshape(shape))


def read_tuned(tuned: ModelWeights, name: str, shape: tuple[int, int]) -> np.ndarray:
    """``W_tuned`` of one tensor as a float64 ``(rows, cols)`` matrix (conv kernels flattened)."""
    return tuned.read(name).reshape(shape)


def _module_name(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _skip_reason(tuned: ModelWeights, base: ModelWeights, name: str) -> tuple[str | None, str | None]:
    """``(reason to skip, None)`` or ``(None, base tensor name)`` for one tensor of the tuned model."""
    info = tuned.info(name)
    module = _module_name(name)
    if len(info.shape) < 2:
        return "fewer than 2 dimensions (bias or norm scale), not a matrix", None
    if info.dtype not in FLOAT_DTYPES:
        return f"non-float dtype {info.dtype} (a quantized weight?)", None
    if math.prod(info.shape) == 0:
        return "empty tensor", None
    if module.rsplit(".", 1)[-1] in EMBEDDING_MODULES:
        return "vocabulary embedding or output head, not analysed", None
    base_name = name if name in base else base.resolve(module)
    if base_name is None:
        return "not in the base model", None
    if base.info(base_name).dtype not in FLOAT_DTYPES:
        return f"the base tensor {base_name!r} has non-float dtype {base.info(base_name).dtype}", None
    return None, base_name


def _open(probe: Probe, adapter: str | None) -> Checkpoint:
    if adapter is not None:
        raise CheckpointError(probe.path, "--adapter NAME (adapter=NAME) does not apply to a full fine-tune")
    base = probe.base
    if base is None:
        raise CheckpointError(
            probe.path, "a full fine-tune is analysed against its base model: pass --base BASE (base=BASE in Python)"
        )
    tuned = open_model_weights(probe.path)
    names = sorted(tuned.keys(), key=natural_key)
    if has_adapter_keys(names):
        sample = name_list([n for n in names if has_adapter_keys([n])])
        raise CheckpointError(probe.path, f"not a full model: it holds adapter factors ({sample})")
    entries: list[ModuleEntry] = []
    skipped: list[tuple[str, str]] = []
    used_base: set[str] = set()
    for name in names:
        reason, base_name = _skip_reason(tuned, base, name)
        if reason is not None or base_name is None:
            skipped.append((name, reason or "not in the base model"))
            continue
        info, base_info = tuned.info(name), base.info(base_name)
        if tuple(base_info.shape) != tuple(info.shape):
            raise CheckpointError(
                tuned.file_of(name),
                f"tensor {name!r} has shape {list(info.shape)} but the base's {base_name!r} in "
                f"{base.file_of(base_name)} has shape {list(base_info.shape)}",
            )
        used_base.add(base_name)
        shape = (int(info.shape[0]), int(math.prod(info.shape[1:])))
        dtype = info.dtype_name if info.dtype == base_info.dtype else f"{info.dtype_name}/{base_info.dtype_name}"
        module = _module_name(name)
        entries.append(
            ModuleEntry(
                module=module,
                key=module,
                kind="full",
                rank=min(shape),
                shape=shape,
                layer_type="linear" if len(info.shape) == 2 else "conv",
                dtype=dtype,
                read=partial(read_difference, tuned, base, name, base_name, shape),
                read_tuned=partial(read_tuned, tuned, name, shape),
                notes=(f"dW = W_tuned - W_base ({base_name} of {base.file_of(base_name)})",),
            )
        )
    if not entries:
        raise CheckpointError(
            probe.path, f"no weight matrix shared with the base model {base.path}: nothing to compare"
        )
    warnings = []
    if skipped:
        by_reason: dict[str, list[str]] = {}
        for name, reason in skipped:
            by_reason.setdefault(reason, []).append(name)
        detail = "; ".join(f"{reason}: {name_list(group)}" for reason, group in by_reason.items())
        warnings.append(f"skipped {plural(len(skipped), 'tensor')} not compared with the base: {detail}")
    missing = [
        name for name in base.keys()
        if name not in used_base and is_float_matrix(base.info(name))
        and _module_name(name).rsplit(".", 1)[-1] not in EMBEDDING_MODULES
    ]
    if missing:
        matrices = "weight matrix" if len(missing) == 1 else "weight matrices"
        warnings.append(f"{len(missing)} {matrices} of the base model not in the tuned one: {name_list(missing)}")
    return Checkpoint(
        path=probe.path,
        format="full",
        method="full",
        config=None,
        warnings=warnings,
        skipped=skipped,
        weights_path=tuned.index_path or tuned.files[0].path,
        metadata=dict(tuned.metadata),
        entries=entries,
    )


FORMAT = Format(
    name="full",
    summary="a full fine-tune (safetensors model, sharded or not), analysed as W_tuned - W_base: needs --base",
    sniff=_sniff,
    open=_open,
)
