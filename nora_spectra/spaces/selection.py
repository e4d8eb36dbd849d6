"""Which adapter modules an activation- or probe-space measurement covers (``--layers``)."""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

from nora_spectra.errors import UsageError
from nora_spectra.schema import layer_index, module_type

__all__ = ["select_layers"]


def select_layers(names: Sequence[str], layers: Sequence[Any] | str | None) -> list[str]:
    """The adapter modules to measure.

    Args:
        names: adapter module names, in model order.
        layers: None (all); or a sequence (or comma-separated string) of items, each an int layer
            index (negative counts from the end of the indices present, so ``-1`` is the last
            block), ``"last:N"`` (the last N layer indices, the paper's setting is ``last:5``), or a
            glob matched against the full module name and its last component (``"q_proj"``,
            ``"*.v_proj"``). A module is kept when it matches any item.

    Returns:
        The selected names, in model order.

    Raises:
        UsageError: an item is malformed or nothing is selected.
    """
    if layers is None:
        return list(names)
    items = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
    items = [i for i in items if i != ""]
    indices = sorted({i for i in (layer_index(n) for n in names) if i is not None})
    wanted_idx: set[int] = set()
    patterns: list[str] = []
    for item in items:
        if isinstance(item, bool):
            raise UsageError(f"--layers: not a layer index or pattern: {item!r}")
        text = str(item)
        if isinstance(item, int) or _is_int(text):
            i = int(text)
            if i < 0:
                if -i > len(indices):
                    raise UsageError(f"--layers: {i} but the model has only {len(indices)} adapted layer indices")
                i = indices[i]
            wanted_idx.add(i)
        elif text.startswith("last:"):
            count = text[5:]
            if not _is_int(count) or int(count) < 1:
                raise UsageError(f"--layers: expected last:N with N >= 1, got {text!r}")
            wanted_idx.update(indices[-int(count) :])
        else:
            patterns.append(text)
    selected = [
        n
        for n in names
        if layer_index(n) in wanted_idx
        or any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(module_type(n), p) for p in patterns)
    ]
    if not selected:
        raise UsageError(f"--layers {layers!r} selects no adapter module (modules: {', '.join(names[:4])}, ...)")
    return selected


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()
