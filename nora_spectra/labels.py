"""Short, unique labels for checkpoints in tables, plots and reports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["analysis_labels", "default_labels"]


def default_labels(names: Sequence[str], adapters: Sequence[str | None] | None = None) -> list[str]:
    """Short, unique labels for checkpoint paths: the last path component, more when names collide.

    Args:
        names: checkpoint paths (as strings).
        adapters: per name, the non-default adapter analysed (or None); it is appended as
            ``/NAME``, so ``multi`` with adapter ``code`` is labelled ``multi/code``.

    Returns:
        One label per name, in order; ``#2``, ``#3``... is appended to identical labels.
    """
    adapters = list(adapters) if adapters is not None else [None] * len(names)
    if len(adapters) != len(names):
        raise ValueError(f"got {len(adapters)} adapters for {len(names)} checkpoints")
    distinct = list(dict.fromkeys(os.path.normpath(name or "checkpoint") for name in names))
    paths = [Path(name) for name in distinct]
    parts = [p.parts[len(p.anchor and [p.anchor]) :] or ("checkpoint",) for p in paths]
    short: dict[str, str] = {}
    for name, p in zip(distinct, parts):
        depth = 1
        while depth < len(p) and sum(1 for q in parts if q[-depth:] == p[-depth:]) > 1:
            depth += 1
        short[name] = "/".join(p[-depth:])
    labels = [
        short[os.path.normpath(name or "checkpoint")] + (f"/{adapter}" if adapter else "")
        for name, adapter in zip(names, adapters)
    ]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def analysis_labels(analyses: Sequence[Any]) -> list[str]:
    """:func:`default_labels` of analyses: their checkpoint paths, with ``/ADAPTER`` for non-default adapters."""
    return default_labels([a.checkpoint for a in analyses], [getattr(a, "adapter", None) for a in analyses])
