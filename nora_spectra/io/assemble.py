"""Turn a PEFT-keyed weights container and an optional config into a :class:`Checkpoint`.

Used by the ``peft``, ``nora`` and ``safetensors`` formats: key pairing and shapes come from
:mod:`nora_spectra.io.peft_keys`, scales from :mod:`nora_spectra.io.adapter_config`; each module
becomes a :class:`~nora_spectra.io.checkpoint.ModuleEntry` whose ``read`` returns a
:class:`~nora_spectra.updates.LowRankUpdate`.
"""

from __future__ import annotations

import os
from functools import partial

from nora_spectra._text import name_list, plural
from nora_spectra.errors import CheckpointError
from nora_spectra.io.adapter_config import AdapterSettings
from nora_spectra.io.checkpoint import Checkpoint, ModuleEntry, TensorSource
from nora_spectra.io.factors import read_vector
from nora_spectra.io.peft_keys import PEFT_PREFIX, LayerPlan, dense_module, scan_keys
from nora_spectra.io.safetensors_file import check_readable
from nora_spectra.schema import DORA_PROXY_WARNING
from nora_spectra.updates import LowRankUpdate

__all__ = ["assemble_checkpoint", "machine_memory", "module_memory", "read_pair"]


def machine_memory() -> int | None:
    """The machine's physical memory in bytes, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return None


def module_memory(rank: int, d_out: int, d_in: int) -> int:
    """Bytes a module's analysis holds at its peak, from its header shapes alone (docs/formats.md).

    The factors in float64 (``8 (d_out + d_in) r``; reading adds at most as much again for the stored
    bits) plus the spectrum's work arrays, a few ``k x max(r, k)`` float64 blocks with
    ``k = min(r, d_out, d_in)``.
    """
    k = min(rank, d_out, d_in)
    return 16 * (d_out + d_in) * rank + 8 * 4 * k * max(rank, k)


def read_pair(source: TensorSource, plan: LayerPlan, scale: float) -> LowRankUpdate:
    """Read one module's factors (float64) as the update ``scale * B @ A``.

    Embeddings store A (r, num_embeddings) and B (dim, r) and update by ``(B A)^T = A^T B^T``, so the
    factors are swapped and transposed; conv factors are flattened to (r, d_in*kh*kw) and (d_out, r).
    """
    a = source.read(plan.key_a)
    b = source.read(plan.key_b)
    if plan.layer_type == "embedding":
        a, b = b.T.copy(), a.T.copy()
    elif plan.layer_type == "conv":
        a = a.reshape(plan.rank, -1)
        b = b.reshape(b.shape[0], plan.rank)
    assert a.shape == (plan.rank, plan.shape[1]) and b.shape == (plan.shape[0], plan.rank)
    return LowRankUpdate(a, b, scale)


def _skipped_warning(skipped: list[tuple[str, str]], names: list[str]) -> str:
    """The one warning about skipped tensors: how many tensors (not groups), and which modules and why.

    ``skipped`` holds one (module, reason) per group of dense tensors (``head.weight`` and ``head.bias``
    are one group, ``head``); the tensor count is taken from the file's keys.
    """
    groups = {module for module, _ in skipped}
    tensors = sum(1 for name in names if dense_module(name.removeprefix(PEFT_PREFIX)) in groups)
    tensors = max(tensors, len(skipped))
    shown = name_list([f"{module} ({reason})" for module, reason in skipped], 3, sep="; ")
    return (
        f"skipped {plural(tensors, 'tensor')} of {plural(len(skipped), 'module')} that are not low-rank "
        f"adapter factors: {shown}"
    )


def assemble_checkpoint(
    path: str,
    fmt: str,
    source: TensorSource,
    settings: AdapterSettings | None,
    *,
    warnings: list[str] | None = None,
    adapter: str | None = None,
) -> Checkpoint:
    """Validate keys, shapes and ranks against the config and compute every module's scale.

    Args:
        path: the path the user gave.
        fmt: ``"peft"``, ``"nora"`` or ``"safetensors"``.
        source: the opened weights file.
        settings: the validated adapter config, or None (bare file: scale 1).
        warnings: warnings gathered so far (extended in place).
        adapter: the adapter sub-directory chosen, if any.

    Returns:
        The checkpoint, with no tensor read yet.

    Raises:
        CheckpointError: no LoRA factors, unpaired or mismatched factors, a module whose tensor rank
            differs from the rank its config gives, or an unreadable dtype.
    """
    warnings = [] if warnings is None else warnings
    weights = source.path
    infos = [source.info(name) for name in source.keys()]
    scan = scan_keys(weights, infos, settings.modules_to_save if settings else ())
    if not scan.plans:
        sample = ", ".join(name for name in source.keys()[:3]) or "no tensors"
        raise CheckpointError(
            weights,
            f"no LoRA factors found (expected <module>.lora_A.weight / lora_B.weight keys; found {sample})",
        )
    entries: list[ModuleEntry] = []
    method = settings.kind if settings else "lora"
    memory = machine_memory()
    for plan in scan.plans:
        for key in (plan.key_a, plan.key_b):
            check_readable(weights, source.info(key))
        need = module_memory(plan.rank, *plan.shape)
        if memory is not None and need > memory:
            raise CheckpointError(
                weights,
                f"module {plan.module!r}: analysing its factors (rank {plan.rank}, shape {list(plan.shape)}) needs "
                f"about {need / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB",
            )
        layer_notes = []
        scale = 1.0
        if settings is not None:
            expected = settings.rank_for(plan.module)
            if expected != plan.rank:
                raise CheckpointError(
                    weights,
                    f"module {plan.module!r}: the config gives rank {expected} but the tensors have rank "
                    f"{plan.rank}",
                )
            scale = settings.scale_for(plan.module)
            if settings.fan_in_fan_out and plan.layer_type == "linear":
                layer_notes.append("fan_in_fan_out: base weight stored (d_in, d_out); shape given as (d_out, d_in)")
        if plan.has_bias:
            layer_notes.append("lora_B.bias present: not part of the spectrum")
        if plan.dora:
            layer_notes.append("DoRA: spectrum of the direction update B A; the magnitude vector is not included")
        entries.append(
            ModuleEntry(
                module=plan.module,
                key=plan.key,
                kind=method,
                rank=plan.rank,
                shape=plan.shape,
                layer_type=plan.layer_type,
                dtype=plan.dtype,
                read=partial(read_pair, source, plan, scale),
                dora=plan.dora,
                notes=tuple(layer_notes),
                read_magnitude=None if plan.key_magnitude is None else partial(read_vector, source, plan.key_magnitude),
            )
        )
    if settings is None:
        warnings.append("no adapter_config.json: scale 1 assumed for every layer (alpha/r unknown)")
    else:
        if settings.fan_in_fan_out:
            warnings.append(
                "fan_in_fan_out: the base layers store weights transposed; shapes are reported as (d_out, d_in)"
            )
        if settings.use_dora and not any(plan.dora for plan in scan.plans):
            warnings.append("use_dora is set but no lora_magnitude_vector was found")
    if any(plan.dora for plan in scan.plans):
        warnings.append(DORA_PROXY_WARNING)
    if any(plan.has_bias for plan in scan.plans):
        warnings.append("lora_B.bias tensors are ignored: a bias is not part of the update's spectrum")
    if scan.skipped:
        warnings.append(_skipped_warning(scan.skipped, [info.name for info in infos]))
    return Checkpoint(
        path=path,
        format=fmt,
        method=method,
        config=dict(settings.raw) if settings else None,
        warnings=warnings,
        skipped=scan.skipped,
        weights_path=weights,
        adapter=adapter,
        metadata=dict(source.metadata),
        entries=entries,
    )
