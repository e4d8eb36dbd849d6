"""Resize writers of the PEFT-keyed formats: ``peft`` (a directory), ``safetensors`` (a bare file), ``nora``.

**peft**: a new adapter directory, ``adapter_config.json`` + ``adapter_model.safetensors``, that PEFT
loads unchanged. Every module's rank comes from ``r`` or, where it differs, an exact ``rank_pattern``
entry (the module name, regex-escaped); the old ``rank_pattern`` / ``alpha_pattern`` are replaced.
Each module keeps its scale: its new alpha is

.. math:: \\alpha' = \\alpha \\, k / r \\quad (\\text{rsLoRA: } \\alpha \\sqrt{k / r}),

so ``alpha' / k`` (``alpha' / sqrt(k)``) equals the old ``alpha / r`` (``alpha / sqrt(r)``) and the new
factors carry the kept singular values split evenly between them (``sqrt(sigma_i / |s|)`` each);
``lora_alpha`` is the most common new alpha, the others go to ``alpha_pattern``. Other config fields
are kept as they were. Tensors that are not resized (unchanged modules, ``lora_B.bias``,
``modules_to_save`` copies) are copied byte for byte; the header metadata is kept (``format: pt``
added when absent). A legacy ``adapter_model.bin`` input is written as ``adapter_model.safetensors``.

**safetensors**: a bare file with the same keys; scale 1 (there is no config), so the new factors are
the truncated update itself split evenly; header metadata kept.

**nora**: refused. A NoRA branch ``s * B * SiLU(A x)`` is not a linear map of ``x``: there is no
``d_out x d_in`` update whose best rank-``k`` approximation Eckart-Young would give.

DoRA layers are refused by every writer: their update ``m * (W0 + s B A) / ||W0 + s B A||_col - W0``
depends on the base weight, so truncating ``B A`` is not its best rank-``k`` approximation.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import IO, Any, Sequence

from nora_core.jsonable import integral_number
from nora_spectra.errors import CheckpointError
from nora_spectra.io.adapter_config import (
    CONFIG_NAME,
    AdapterSettings,
    match_pattern,
    read_adapter_config,
)
from nora_spectra.io.checkpoint import Checkpoint, TensorSource
from nora_spectra.io.peft import SAFETENSORS_NAME
from nora_spectra.io.peft_keys import LayerPlan, natural_key, scan_keys
from nora_spectra.io.safetensors_file import SafetensorsFile
from nora_spectra.io.writing import (
    OutTensor,
    ResizedModule,
    ResizeWriter,
    WriteResult,
    encode,
    raw_tensor,
    write_safetensors,
)

__all__ = ["NORA_RESIZE", "PEFT_RESIZE", "SAFETENSORS_RESIZE", "resized_config"]


def _open_source(checkpoint: Checkpoint) -> TensorSource:
    path = checkpoint.weights_path
    if path.endswith(".bin"):
        from nora_spectra.io.torch_bin import TorchBinFile

        return TorchBinFile(path)
    return SafetensorsFile(path)


def _check_peft_keyed(checkpoint: Checkpoint) -> None:
    """Refuse DoRA layers (their update needs the base weight)."""
    dora = [entry.module for entry in checkpoint.entries if entry.dora]
    if dora:
        raise CheckpointError(
            checkpoint.path,
            f"module {dora[0]!r} is a DoRA layer: its update m * (W0 + s B A) / ||W0 + s B A|| - W0 depends "
            "on the base weight, so truncating B A is not its best rank-k approximation; DoRA adapters "
            "cannot be resized",
        )


def _check_nora(checkpoint: Checkpoint) -> None:
    raise CheckpointError(
        checkpoint.path,
        "a NoRA adapter cannot be resized: its branch s * B * SiLU(A x) is not linear in x, so no update "
        "matrix has a best rank-k approximation (Eckart-Young holds for LoRA's s * B @ A only)",
    )


def _factor_tensors(plan: LayerPlan, source: TensorSource, module: ResizedModule, dtype: str | None) -> list[OutTensor]:
    """The two stored tensors of a resized module, in the file's orientation and shapes.

    Maths orientation (``nora_spectra.updates``): ``A`` (k, d_in), ``B`` (d_out, k). Embeddings store
    ``lora_embedding_A`` (k, num_embeddings) = ``B^T`` and ``lora_embedding_B`` (dim, k) = ``A^T``; conv
    stores ``A`` as (k, c_in, kh, kw) and ``B`` as (c_out, k, 1, 1).
    """
    info_a, info_b = source.info(plan.key_a), source.info(plan.key_b)
    k = module.rank
    a, b = module.A, module.B
    assert a is not None and b is not None
    if plan.layer_type == "embedding":
        stored_a, stored_b = b.T, a.T
        shape_a, shape_b = (k, info_a.shape[1]), (info_b.shape[0], k)
    else:
        stored_a, stored_b = a, b
        shape_a = (k, *info_a.shape[1:])
        shape_b = (info_b.shape[0], k, *info_b.shape[2:])
    out = []
    for name, info, values, shape in ((plan.key_a, info_a, stored_a, shape_a), (plan.key_b, info_b, stored_b, shape_b)):
        tag = dtype or info.dtype
        out.append(OutTensor(name, tag, tuple(shape), encode(values.reshape(shape), tag)))
    return out


def _pattern_keys(names: Sequence[str]) -> list[str]:
    """Module names in the order their escaped keys must take: deeper names first (first match wins)."""
    return sorted(names, key=lambda name: (-name.count("."), natural_key(name)))


def resized_config(raw: dict[str, Any], settings: AdapterSettings, ranks: dict[str, int]) -> tuple[dict[str, Any], list[str]]:
    """The adapter config of a resized PEFT adapter: every module keeps its scale at its new rank.

    Args:
        raw: the old config as read (unknown fields are kept).
        settings: its validated form (old ranks, alphas, rsLoRA).
        ranks: module -> new rank ``k``, every module of the adapter.

    Returns:
        ``(config, notes)``. ``r`` and ``lora_alpha`` are the most common new rank and alpha; every
        module whose rank or alpha differs gets an exact (regex-escaped) ``rank_pattern`` /
        ``alpha_pattern`` entry. If a module name is a dotted suffix of another (both would match one
        key), every module gets explicit entries.
    """
    alphas: dict[str, float] = {}
    for module, k in ranks.items():
        r, alpha = settings.rank_for(module), settings.alpha_for(module)
        if k == r:
            alphas[module] = alpha
        else:
            alphas[module] = alpha * (math.sqrt(k / r) if settings.use_rslora else k / r)
    order = list(ranks)
    default_r = Counter(ranks[m] for m in order).most_common(1)[0][0]
    default_alpha = Counter(alphas[m] for m in order).most_common(1)[0][0]
    names = set(order)
    nested = any(name.split(".", i)[-1] in names for name in order for i in range(1, name.count(".") + 1))
    rank_pattern = {re.escape(m): ranks[m] for m in _pattern_keys(order) if nested or ranks[m] != default_r}
    alpha_pattern = {re.escape(m): integral_number(alphas[m]) for m in _pattern_keys(order)
                     if nested or alphas[m] != default_alpha}
    config = dict(raw)
    config.update(r=default_r, lora_alpha=integral_number(default_alpha), rank_pattern=rank_pattern,
                  alpha_pattern=alpha_pattern)
    for module in order:  # PEFT's own rule must give every module its new rank and its old scale
        key_r, key_a = match_pattern(rank_pattern, module), match_pattern(alpha_pattern, module)
        got_r = default_r if key_r is None else rank_pattern[key_r]
        got_alpha = default_alpha if key_a is None else alpha_pattern[key_a]
        assert got_r == ranks[module] and got_alpha == integral_number(alphas[module]), module
    notes = [
        "alpha per module = old alpha * k / r" + (" (rsLoRA: * sqrt(k / r))" if settings.use_rslora else "")
        + ", so every module keeps its scale; rank_pattern / alpha_pattern hold the modules that differ "
        f"from r = {default_r}, lora_alpha = {integral_number(default_alpha)}"
    ]
    return config, notes


def _metadata(source: TensorSource, peft: bool) -> dict[str, str]:
    metadata = dict(source.metadata)
    if peft:
        metadata.setdefault("format", "pt")
    return metadata


class _PeftKeyedSink:
    """Collects resized modules of a PEFT-keyed checkpoint; writes a PEFT directory or a bare file.

    New factors are encoded (to the output dtype) as each module arrives; every other tensor is copied
    from the input when the file is written, in the input's key order.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: str | None, *, directory: bool) -> None:
        self._checkpoint = checkpoint
        self._dtype = dtype
        self._directory = directory
        self._source = _open_source(checkpoint)
        scan = scan_keys(self._source.path, [self._source.info(name) for name in self._source.keys()])
        self._plans = {plan.module: plan for plan in scan.plans}
        self._replaced: dict[str, OutTensor] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._ranks: dict[str, int] = {}

    def add(self, module: ResizedModule) -> None:
        plan = self._plans[module.module]
        before = self._source.info(plan.key_a).nbytes + self._source.info(plan.key_b).nbytes
        self._ranks[module.module] = module.rank
        if module.unchanged:
            self._sizes[module.module] = (before, before)
            return
        tensors = _factor_tensors(plan, self._source, module, self._dtype)
        for tensor in tensors:
            self._replaced[tensor.name] = tensor
        self._sizes[module.module] = (before, sum(tensor.nbytes for tensor in tensors))

    def _tensors(self) -> list[OutTensor]:
        return [self._replaced.get(name) or raw_tensor(self._source, name) for name in self._source.keys()]

    def write(self, target: "Path | IO[bytes]") -> WriteResult:
        if not self._directory:
            assert not isinstance(target, Path)
            write_safetensors(target, self._tensors(), _metadata(self._source, peft=False))
            return WriteResult(None, self._sizes, ["no config: scale 1, the new factors hold the truncated update"])
        assert isinstance(target, Path)
        checkpoint = self._checkpoint
        settings = read_adapter_config(os.path.join(os.path.dirname(checkpoint.weights_path), CONFIG_NAME))
        config, notes = resized_config(dict(checkpoint.config or {}), settings, self._ranks)
        with open(target / SAFETENSORS_NAME, "wb") as handle:
            write_safetensors(handle, self._tensors(), _metadata(self._source, peft=True))
            handle.flush()
            os.fsync(handle.fileno())
        with open(target / CONFIG_NAME, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(config, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return WriteResult(SAFETENSORS_NAME, self._sizes, notes)


def _open_peft(checkpoint: Checkpoint, dtype: str | None) -> _PeftKeyedSink:
    return _PeftKeyedSink(checkpoint, dtype, directory=True)


def _open_bare(checkpoint: Checkpoint, dtype: str | None) -> _PeftKeyedSink:
    return _PeftKeyedSink(checkpoint, dtype, directory=False)


PEFT_RESIZE = ResizeWriter(
    output="directory",
    check=_check_peft_keyed,
    open=_open_peft,
    summary="a PEFT directory (adapter_config.json with rank_pattern/alpha_pattern keeping every scale, "
    "adapter_model.safetensors)",
)

SAFETENSORS_RESIZE = ResizeWriter(
    output="file",
    check=_check_peft_keyed,
    open=_open_bare,
    summary="a bare .safetensors file with the same keys (scale 1 folded into the factors)",
)

NORA_RESIZE = ResizeWriter(
    output="directory",
    check=_check_nora,
    open=_open_peft,
    summary="refused: a NoRA branch is not linear, so it has no Eckart-Young optimum",
)
