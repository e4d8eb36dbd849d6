"""kohya-style modules (``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``): what the ``kohya`` and
``lycoris`` (LoCon) readers share.

Layout (kohya-ss/sd-scripts ``networks/lora.py``; LyCORIS LoCon writes the same names):

=========================  ==========================================  ==========================================
tensor                     shape                                       meaning
=========================  ==========================================  ==========================================
``<n>.lora_down.weight``   ``(r, d_in)``, conv ``(r, c_in, kh, kw)``   A (conv: the base's kernel, stride, padding)
``<n>.lora_up.weight``     ``(d_out, r)``, conv ``(c_out, r, 1, 1)``   B
``<n>.lora_mid.weight``    ``(r, r, kh, kw)`` (LoCon Tucker conv)       down is then ``(r, c_in, 1, 1)``
``<n>.alpha``              ``()``                                      scale ``alpha / r``; 0 means ``alpha = r``
``<n>.dora_scale``         ``(d_out, 1[, 1, 1])`` or ``(1, c_in[, 1, 1])``  DoRA magnitude (output rows / input
                                                                       columns)
=========================  ==========================================  ==========================================

The update is ``scale * up @ down`` with conv factors flattened, ``(d_out, c_in*kh*kw)``; with a Tucker
``mid`` it is ``scale * up @ M`` with ``M[i, (q, h, w)] = sum_j mid[i, j, h, w] down[j, q]`` (LyCORIS'
``rebuild_tucker``), still of rank ``r``. A module without ``.alpha`` gets ``alpha = r`` (scale 1), the rule
of sd-scripts' loader (``create_network_from_weights``) and of ``resize_lora.py``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping

import numpy as np

from nora_spectra._text import name_list, plural
from nora_spectra.errors import CheckpointError
from nora_spectra.io.checkpoint import ModuleEntry, TensorSource
from nora_spectra.io.factors import (
    alpha_scale,
    check_float,
    check_vector,
    dtype_of,
    plan_pair,
    read_scalar,
    read_vector,
)
from nora_spectra.io.kohya_names import dotted_module
from nora_spectra.io.safetensors_file import TensorInfo
from nora_spectra.updates import LowRankUpdate

__all__ = ["KOHYA_SUFFIXES", "ModuleNames", "alpha_warnings", "dora_axis", "kohya_lora_entry"]

#: suffix -> role of the tensors of a kohya-style LoRA module.
KOHYA_SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".alpha": "alpha",
    ".dora_scale": "dora",
}


class ModuleNames:
    """Dotted module paths for kohya-style names, where the mapping is unambiguous within the file.

    Two names of one file that map to the same path (``lora_te_`` and ``lora_te1_`` both name the first text
    encoder) keep their kohya names.
    """

    def __init__(self, names: list[str]) -> None:
        mapped = {name: dotted_module(name) for name in names}
        counts: dict[str, int] = {}
        for path in mapped.values():
            if path is not None:
                counts[path] = counts.get(path, 0) + 1
        self._names = {name: path if path is not None and counts[path] == 1 else name for name, path in mapped.items()}

    def __getitem__(self, name: str) -> str:
        return self._names[name]

    @property
    def kept(self) -> list[str]:
        """kohya names left as they are (no unambiguous dotted path)."""
        return [name for name, module in self._names.items() if name == module]


def dora_axis(path: str, module: str, info: TensorInfo, rows: int, cols: int) -> str:
    """Which axis a DoRA magnitude (``dora_scale``) normalises: ``"output"`` rows or ``"input"`` columns.

    Args:
        path, module: for messages.
        info: the ``dora_scale`` header entry.
        rows: ``d_out`` of the update.
        cols: ``d_in`` of the update as analysed (conv: ``c_in * kh * kw``).

    Raises:
        CheckpointError: not float, or a shape that is neither ``(rows, 1, ...)`` nor ``(1, c_in, 1, ...)`` with
            ``c_in`` dividing ``cols``.
    """
    check_float(path, module, (info,))
    shape = info.shape
    if shape and shape[0] == rows and info.numel == rows:
        return "output"
    if len(shape) >= 2 and shape[0] == 1 and shape[1] > 0 and info.numel == shape[1] and cols % shape[1] == 0:
        return "input"
    raise CheckpointError(
        path,
        f"module {module!r}: DoRA magnitude {info.name!r} has shape {list(shape)}, expected ({rows}, 1, ...) "
        f"(per output row) or (1, C, ...) with C dividing {cols} (per input column)",
    )


def _tucker_down(down: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """``M[i, (q, h, w)] = sum_j mid[i, j, h, w] down[j, q]``: the Tucker core folded into the down factor."""
    rank = mid.shape[0]
    folded = np.einsum("ij...,jq->iq...", mid, down.reshape(down.shape[0], -1))
    return folded.reshape(rank, -1)


def _read(source: TensorSource, keys: Mapping[str, str], rank: int) -> LowRankUpdate:
    down = source.read(keys["down"])
    up = source.read(keys["up"])
    scale = 1.0 if "alpha" not in keys else alpha_scale(read_scalar(source, keys["alpha"]), rank)
    a = _tucker_down(down, source.read(keys["mid"])) if "mid" in keys else down.reshape(rank, -1)
    return LowRankUpdate(a, up.reshape(up.shape[0], rank), scale)


def kohya_lora_entry(
    path: str, source: TensorSource, prefix: str, keys: Mapping[str, str], module: str
) -> ModuleEntry:
    """Validate one kohya-style LoRA module from its header entries and describe it.

    Args:
        path: the file, for messages.
        source: the opened file.
        prefix: the tensor-key prefix as stored (the kohya name).
        keys: role -> tensor key (roles of :data:`KOHYA_SUFFIXES`).
        module: the module name to report (a dotted path, or the kohya name).

    Raises:
        CheckpointError: a missing ``lora_down`` / ``lora_up``, shapes that do not compose, a non-float factor,
            an ``alpha`` that is not one value, a bad ``dora_scale``.
    """
    if "down" not in keys or "up" not in keys:
        present = ", ".join(sorted(key[len(prefix) + 1 :] for key in keys.values()))
        missing = "lora_up" if "down" in keys else "lora_down"
        raise CheckpointError(path, f"module {prefix!r} has {present} but no {missing}.weight")
    down, up = source.info(keys["down"]), source.info(keys["up"])
    notes: list[str] = []
    if "mid" in keys:
        mid = source.info(keys["mid"])
        check_float(path, prefix, (down, up, mid))
        rank = up.shape[1] if len(up.shape) > 1 else 0
        if (
            len(down.shape) < 3 or len(up.shape) != len(down.shape) or len(mid.shape) != len(down.shape)
            or any(k != 1 for k in (*down.shape[2:], *up.shape[2:]))
            or mid.shape[:2] != (rank, down.shape[0]) or rank == 0
        ):
            raise CheckpointError(
                path,
                f"module {prefix!r}: shapes do not compose, lora_down {list(down.shape)}, lora_mid "
                f"{list(mid.shape)}, lora_up {list(up.shape)} (Tucker: down (r, c_in, 1, 1), mid (r, r, kh, kw), "
                "up (c_out, r, 1, 1))",
            )
        shape = (up.shape[0], down.shape[1] * math.prod(mid.shape[2:]))
        layer_type, dtype = "conv", dtype_of((down, up, mid))
        notes.append("Tucker (lora_mid) folded into the down factor: rank r, exact")
    else:
        plan = plan_pair(path, prefix, down, up)
        rank, shape, layer_type, dtype = plan.rank, plan.shape, plan.layer_type, plan.dtype
    if "alpha" in keys:
        check_vector(path, prefix, source.info(keys["alpha"]), 1, "alpha is one number")
    else:
        notes.append("no .alpha: alpha = r, scale 1")
    read_magnitude = None
    if "dora" in keys:
        axis = dora_axis(path, prefix, source.info(keys["dora"]), shape[0], shape[1])
        if axis == "output":  # the true update (--base) normalises rows; per-column magnitudes stay a proxy
            read_magnitude = partial(read_vector, source, keys["dora"])
        notes.append(f"DoRA magnitude (dora_scale) per {axis} {'row' if axis == 'output' else 'column'}; "
                     "spectrum of the direction update only")
    return ModuleEntry(
        module=module,
        key=prefix,
        kind="lora",
        rank=rank,
        shape=shape,
        layer_type=layer_type,
        dtype=dtype,
        read=partial(_read, source, dict(keys), rank),
        dora="dora" in keys,
        notes=tuple(notes),
        read_magnitude=read_magnitude,
    )


def alpha_warnings(no_alpha: list[str], metadata: Mapping[str, Any]) -> list[str]:
    """The warning about modules without ``.alpha`` (scale 1), with the header's ``ss_network_alpha`` if any."""
    if not no_alpha:
        return []
    message = (
        f"{plural(len(no_alpha), 'module')} without .alpha ({name_list(no_alpha, 3)}): alpha = r, so scale 1 "
        "(what sd-scripts' loader create_network_from_weights and resize_lora.py do too)"
    )
    trained = metadata.get("ss_network_alpha")
    if trained not in (None, "", "None", "Dynamic"):
        message += (
            f"; the header's ss_network_alpha says the training used alpha {trained} (network dim "
            f"{metadata.get('ss_network_dim', '?')}), so the trained scale may have been alpha/r instead"
        )
    return [message]
