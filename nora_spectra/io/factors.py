"""What the low-rank readers share: keys grouped by suffix, factor pairs validated from headers, reads.

Every format stores a module's tensors under one key prefix and a few format-specific suffixes
(``.lora_down.weight``, ``.lora_a``, ``.hada_w1_a``, ``.alpha``, ...). :func:`group_keys` splits a file's
keys into ``prefix -> {role: key}`` groups by those suffixes; :func:`plan_pair` validates one ``down``/``up``
pair from the header shapes alone (no tensor is read) and :func:`read_low_rank` reads it as a
:class:`~nora_spectra.updates.LowRankUpdate`. Scalars (``alpha``) and DoRA magnitude vectors are read by
:func:`read_scalar` and :func:`read_vector`, only when a module is analysed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from nora_spectra._text import name_list, plural
from nora_spectra.errors import CheckpointError
from nora_spectra.io.checkpoint import TensorSource
from nora_spectra.io.safetensors_file import FLOAT_DTYPES, TensorInfo
from nora_spectra.updates import LowRankUpdate

__all__ = [
    "skipped_warning",
    "PairPlan",
    "alpha_scale",
    "check_float",
    "check_vector",
    "dtype_of",
    "group_keys",
    "plan_pair",
    "read_low_rank",
    "read_scalar",
    "read_vector",
]


def group_keys(
    path: "str | os.PathLike[str]", names: Iterable[str], suffixes: Mapping[str, str]
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group tensor keys by their prefix, naming each by the role of its suffix.

    Args:
        path: the file, for the message.
        names: the file's tensor keys.
        suffixes: suffix (``".lora_down.weight"``) -> role (``"down"``); the longest matching suffix wins.

    Returns:
        ``(groups, others)``: ``prefix -> {role: key}`` in first-seen order, and the keys no suffix matched.

    Raises:
        CheckpointError: two keys of one prefix have the same role (cannot happen with distinct suffixes
            unless two suffixes share a role).
    """
    ordered = sorted(suffixes, key=len, reverse=True)
    groups: dict[str, dict[str, str]] = {}
    others: list[str] = []
    for name in names:
        suffix = next((s for s in ordered if name.endswith(s) and len(name) > len(s)), None)
        if suffix is None:
            others.append(name)
            continue
        prefix, role = name[: -len(suffix)], suffixes[suffix]
        group = groups.setdefault(prefix, {})
        if role in group:
            raise CheckpointError(os.fspath(path), f"{group[role]!r} and {name!r} are both the {role} of {prefix!r}")
        group[role] = name
    return groups, others


def check_float(path: str, module: str, infos: Iterable[TensorInfo]) -> None:
    """Refuse a factor whose dtype is not a float type (an integer ``lora_down`` is not a weight)."""
    for info in infos:
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(path, f"module {module!r}: {info.name!r} has non-float dtype {info.dtype}")


def dtype_of(infos: Iterable[TensorInfo]) -> str:
    """The stored dtype name of a module's factors, ``"a/b"`` when they differ (first-seen order)."""
    names: list[str] = []
    for info in infos:
        if info.dtype_name not in names:
            names.append(info.dtype_name)
    return "/".join(names)


@dataclass(frozen=True)
class PairPlan:
    """A validated ``down``/``up`` pair: what its update is, from the header shapes.

    Attributes:
        rank: r.
        shape: ``(d_out, d_in)`` (conv: ``(d_out, d_in*prod(kernel))``).
        layer_type: ``"linear"`` or ``"conv"``.
        dtype: stored dtype name(s).
    """

    rank: int
    shape: tuple[int, int]
    layer_type: str
    dtype: str


def plan_pair(
    path: str, module: str, down: TensorInfo, up: TensorInfo, names: tuple[str, str] = ("lora_down", "lora_up")
) -> PairPlan:
    """Validate ``down`` (r, d_in[, *kernel]) and ``up`` (d_out, r[, 1, ...]) from their shapes.

    Args:
        path: the file, for messages.
        module: the module, for messages.
        down: the A factor's header entry.
        up: the B factor's header entry.
        names: how the file calls the two factors, for messages.

    Raises:
        CheckpointError: a non-float factor, factors that are not both 2-D (linear) or both N-D (conv),
            ranks that differ, a conv ``up`` whose kernel is not 1x1, or rank 0.
    """
    check_float(path, module, (down, up))

    def mismatch(detail: str) -> CheckpointError:
        return CheckpointError(
            path,
            f"module {module!r}: shapes do not compose, {names[0]} {list(down.shape)} vs {names[1]} "
            f"{list(up.shape)} ({detail})",
        )

    if len(down.shape) != len(up.shape) or len(down.shape) < 2:
        raise mismatch("expected two 2-D (linear) or two N-D (conv) factors")
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise mismatch(f"rank {rank} vs {up.shape[1]}")
    layer_type = "linear" if len(down.shape) == 2 else "conv"
    if layer_type == "conv" and any(k != 1 for k in up.shape[2:]):
        raise mismatch(f"a conv {names[1]} must have a 1x1 kernel")
    if rank == 0:
        raise CheckpointError(path, f"module {module!r}: factors have rank 0")
    return PairPlan(rank, (up.shape[0], math.prod(down.shape[1:])), layer_type, dtype_of((down, up)))


def read_low_rank(source: TensorSource, key_down: str, key_up: str, scale: float) -> LowRankUpdate:
    """``scale * up @ down`` with conv factors flattened to (r, d_in*prod(k)) and (d_out, r)."""
    down = source.read(key_down)
    up = source.read(key_up)
    rank = down.shape[0]
    return LowRankUpdate(down.reshape(rank, -1), up.reshape(up.shape[0], rank), scale)


def read_scalar(source: TensorSource, key: str) -> float:
    """A 0-d (or one-element) tensor such as kohya's ``.alpha``, as a Python float."""
    value = source.read(key)
    return float(value.reshape(-1)[0])


def read_vector(source: TensorSource, key: str) -> np.ndarray:
    """A DoRA magnitude vector, flattened to 1-D float64 (``(1, d_out, 1, 1)`` -> ``(d_out,)``)."""
    return source.read(key).reshape(-1)


def check_vector(path: str, module: str, info: TensorInfo, size: int, what: str) -> None:
    """Refuse a magnitude vector (or a scalar, ``size`` 1) that is not float or has the wrong size."""
    check_float(path, module, (info,))
    if info.numel != size:
        raise CheckpointError(
            path, f"module {module!r}: {info.name!r} has shape {list(info.shape)}, expected {size} values ({what})"
        )


def alpha_scale(alpha: float, rank: int) -> float:
    """``alpha / rank``, with kohya's and LyCORIS' rule that an alpha of 0 means ``alpha = rank`` (scale 1)."""
    return 1.0 if alpha == 0 else alpha / rank


def skipped_warning(skipped: list[tuple[str, str]], what: str = "LoRA factors") -> str | None:
    """The one warning about tensors a reader skipped: ``skipped N tensors (not WHAT): a, b, c, ...``.

    Returns:
        The warning, or None when nothing was skipped.
    """
    if not skipped:
        return None
    return f"skipped {plural(len(skipped), 'tensor')} (not {what}): " + name_list([name for name, _ in skipped], 3)
