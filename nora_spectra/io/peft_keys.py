"""Tensor keys -> one plan per adapted module, validated from shapes alone (no tensor is read).

Recognised keys (PEFT's on-disk layout; the ``base_model.model.`` prefix is optional and stripped, an
adapter-name segment such as ``.default`` after the factor name is accepted):

| key | meaning |
|---|---|
| ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` | linear (2-D) or conv (>= 3-D) factors |
| ``<module>.lora_B.bias`` | LoRA bias (``lora_bias=True``): not part of the spectrum, noted |
| ``<module>.lora_embedding_A`` / ``lora_embedding_B`` | embedding factors, update ``(B A)^T`` |
| ``<module>.lora_magnitude_vector`` | DoRA magnitude: the layer is marked ``dora`` |

Everything else (``modules_to_save`` copies, saved embedding matrices, base biases, trainable-token
deltas) is a full tensor, not a low-rank update, and is skipped with a reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from nora_spectra.errors import CheckpointError
from nora_spectra.io.safetensors_file import FLOAT_DTYPES, TensorInfo

__all__ = ["KeyScan", "LayerPlan", "PEFT_PREFIX", "dense_module", "has_factor_keys", "natural_key", "scan_keys"]

PEFT_PREFIX = "base_model.model."
_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class LayerPlan:
    """One adapted module as found in the keys: where its factors are and what they mean.

    Attributes:
        module: base-model module name (no ``base_model.model.`` prefix).
        key: the tensor-key prefix as stored (``base_model.model.<module>``, or ``<module>``).
        layer_type: ``"linear"``, ``"embedding"`` or ``"conv"``.
        key_a: tensor key of the stored A factor.
        key_b: tensor key of the stored B factor.
        rank: r, from the tensors.
        shape: (rows, cols) of the update as analysed: (d_out, d_in) for linear, (d_out, d_in * prod(k))
            for conv, (num_embeddings, embedding_dim) for embeddings.
        dtype: stored dtype name of the factors, e.g. ``"bfloat16"`` (``"float32/bfloat16"`` if A and B
            differ).
        dora: a DoRA magnitude vector exists.
        has_bias: a ``lora_B.bias`` exists.
        key_magnitude: tensor key of the DoRA magnitude vector, or None.
    """

    module: str
    key: str
    layer_type: str
    key_a: str
    key_b: str
    rank: int
    shape: tuple[int, int]
    dtype: str
    dora: bool = False
    has_bias: bool = False
    key_magnitude: str | None = None


@dataclass
class KeyScan:
    """The result of :func:`scan_keys`.

    Attributes:
        plans: one :class:`LayerPlan` per adapted module, natural-sorted by module name.
        skipped: (name, reason) for every tensor group that is not a low-rank factor.
    """

    plans: list[LayerPlan] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Parts:
    prefix: str  # the tensor-key prefix as stored, e.g. "base_model.model.<module>"
    keys: dict[str, str] = field(default_factory=dict)  # "lora_A.weight" etc. -> tensor key


def natural_key(name: str) -> list[object]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name) if tok]


def scan_keys(path: str, infos: list[TensorInfo], modules_to_save: tuple[str, ...] = ()) -> KeyScan:
    """Group tensor keys into per-module factor pairs and validate their shapes.

    Args:
        path: the weights file, for error messages.
        infos: header information of every tensor in the file.
        modules_to_save: the config's ``modules_to_save`` (only used to word skip reasons).

    Returns:
        The plans and the skipped tensors.

    Raises:
        CheckpointError: a factor lacks its partner (naming the module), shapes do not fit together,
            a factor is not a float tensor, a key appears twice, or the file mixes several adapter names.
    """
    by_key = {info.name: info for info in infos}
    modules: dict[str, _Parts] = {}
    dense: dict[str, list[TensorInfo]] = {}
    adapter_names: set[str] = set()
    for info in infos:
        name = info.name.removeprefix(PEFT_PREFIX)
        parsed = _parse_factor_key(name)
        if parsed is None:
            dense.setdefault(dense_module(name), []).append(info)
            continue
        module, part, adapter = parsed
        if adapter is not None:
            adapter_names.add(adapter)
        parts = modules.setdefault(module, _Parts(info.name[: len(info.name) - len(name)] + module))
        if part in parts.keys:
            raise CheckpointError(path, f"module {module!r} has two {part} tensors ({parts.keys[part]!r}, {info.name!r})")
        parts.keys[part] = info.name
    if len(adapter_names) > 1:
        raise CheckpointError(
            path, f"the file mixes several adapters ({', '.join(sorted(adapter_names))}); save them separately"
        )
    scan = KeyScan()
    for module in sorted(modules, key=natural_key):
        scan.plans.append(_plan(path, module, modules[module], by_key))
    for module in sorted(dense, key=natural_key):
        scan.skipped.append((module, _skip_reason(module, dense[module], modules_to_save)))
    return scan


def has_factor_keys(names: list[str]) -> bool:
    """True when any tensor key is a PEFT factor key (``<module>.lora_A.weight``, ``lora_embedding_B``, ...)."""
    return any(_parse_factor_key(name.removeprefix(PEFT_PREFIX)) is not None for name in names)


def _parse_factor_key(name: str) -> tuple[str, str, str | None] | None:
    """``x.lora_A.default.weight`` -> ("x", "lora_A.weight", "default"); None for non-factor keys."""
    tokens = name.split(".")
    index = next((i for i, tok in enumerate(tokens) if tok in _FACTORS), None)
    if index is None or index == 0:
        return None
    module, factor, rest = ".".join(tokens[:index]), tokens[index], tokens[index + 1 :]
    adapter = None
    if rest and rest[-1] in _PARAMS:
        param = rest.pop()
    else:
        param = None
    if len(rest) == 1:
        adapter = rest[0]
    elif rest:
        return None
    if factor in ("lora_A", "lora_B"):
        if param == "weight" or (factor == "lora_B" and param == "bias"):
            return module, f"{factor}.{param}", adapter
        return None
    if param == "bias":
        return None
    return module, factor, adapter  # embedding factors and the magnitude vector: no (or an ignored) .weight


def _plan(path: str, module: str, found: _Parts, by_key: dict[str, TensorInfo]) -> LayerPlan:
    parts = found.keys
    has_linear = "lora_A.weight" in parts or "lora_B.weight" in parts
    has_embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    if has_linear and has_embedding:
        raise CheckpointError(path, f"module {module!r} has both lora_A/lora_B and lora_embedding_A/B factors")
    if has_embedding:
        key_a, key_b = parts.get("lora_embedding_A"), parts.get("lora_embedding_B")
        names = ("lora_embedding_A", "lora_embedding_B")
    else:
        key_a, key_b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        names = ("lora_A", "lora_B")
    if key_a is None and key_b is None:
        present = ", ".join(sorted(parts))
        raise CheckpointError(path, f"module {module!r} has {present} but no lora_A/lora_B factors")
    if key_b is None:
        raise CheckpointError(path, f"module {module!r} has {names[0]} without {names[1]}")
    if key_a is None:
        raise CheckpointError(path, f"module {module!r} has {names[1]} without {names[0]}")
    a, b = by_key[key_a], by_key[key_b]
    for info in (a, b):
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(path, f"module {module!r}: {info.name!r} has non-float dtype {info.dtype}")

    def mismatch(detail: str = "") -> CheckpointError:
        return CheckpointError(
            path,
            f"module {module!r}: mismatched shapes, {names[0]} {list(a.shape)} vs {names[1]} {list(b.shape)}"
            + (f" ({detail})" if detail else ""),
        )

    if has_embedding:
        layer_type = "embedding"
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise mismatch("embedding factors must be 2-D")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise mismatch(f"rank {rank} vs {b.shape[1]}")
        shape = (a.shape[1], b.shape[0])  # delta = (B A)^T: (num_embeddings, embedding_dim)
    else:
        if len(a.shape) != len(b.shape) or len(a.shape) < 2:
            raise mismatch("expected two 2-D (linear) or two N-D (conv) factors")
        layer_type = "linear" if len(a.shape) == 2 else "conv"
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise mismatch(f"rank {rank} vs {b.shape[1]}")
        if layer_type == "conv" and any(k != 1 for k in b.shape[2:]):
            raise mismatch("conv lora_B must have a 1x1 kernel")
        shape = (b.shape[0], math.prod(a.shape[1:]))
    if rank == 0:
        raise CheckpointError(path, f"module {module!r}: factors have rank 0")
    if 0 in shape or 0 in a.shape or 0 in b.shape:
        raise CheckpointError(
            path, f"module {module!r}: a factor has an empty dimension ({names[0]} {list(a.shape)}, {names[1]} {list(b.shape)})"
        )
    dtype = a.dtype_name if a.dtype == b.dtype else f"{a.dtype_name}/{b.dtype_name}"
    key_magnitude = parts.get("lora_magnitude_vector")
    if key_magnitude is not None:
        # one value per output feature; an embedding's per embedding-dim column (the update is (B A)^T)
        size = shape[1] if layer_type == "embedding" else shape[0]
        magnitude = by_key[key_magnitude]
        if magnitude.dtype not in FLOAT_DTYPES or magnitude.numel != size:
            raise CheckpointError(
                path,
                f"module {module!r}: DoRA magnitude {key_magnitude!r} is {magnitude.dtype} {list(magnitude.shape)}, "
                f"expected {size} float values",
            )
    return LayerPlan(
        module=module,
        key=found.prefix,
        layer_type=layer_type,
        key_a=key_a,
        key_b=key_b,
        rank=rank,
        shape=shape,
        dtype=dtype,
        dora=key_magnitude is not None,
        has_bias="lora_B.bias" in parts,
        key_magnitude=key_magnitude,
    )


def dense_module(name: str) -> str:
    """``head.modules_to_save.default.weight`` -> ``head``; ``head.weight`` -> ``head``."""
    name = re.sub(r"\.modules_to_save\.[^.]+(?=\.)", "", name)
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _skip_reason(module: str, infos: list[TensorInfo], modules_to_save: tuple[str, ...]) -> str:
    shapes = ", ".join(f"{info.name.rsplit('.', 1)[-1]} {list(info.shape)}" for info in infos)
    last = module.rsplit(".", 1)[-1]
    if "trainable_tokens" in module:
        why = "trainable-token delta"
    elif any(module == m or module.endswith("." + m) for m in modules_to_save):
        why = "modules_to_save: full dense weights"
    elif last in ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out"):
        why = "saved embedding layer: full dense weights"
    else:
        why = "full dense tensor (modules_to_save, saved embedding or trained bias)"
    return f"{why} ({shapes}), not a low-rank update"
