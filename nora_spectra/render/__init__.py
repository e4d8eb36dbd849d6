"""Renderers of analyses: terminal table, JSON, CSV and Markdown. They format; they never recompute.

``render(analyses, fmt)`` dispatches on the format name used by ``spectra analyze --format``.
Submodules are imported when first used, so the JSON path never imports the table code (and no
renderer here imports pandas or torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.result import Analysis

__all__ = ["FORMATS", "render"]

#: format name -> (module, function)
FORMATS: dict[str, tuple[str, str]] = {
    "table": ("nora_spectra.render.table", "render_table"),
    "json": ("nora_spectra.render.text_formats", "render_json"),
    "csv": ("nora_spectra.render.text_formats", "render_csv"),
    "markdown": ("nora_spectra.render.text_formats", "render_markdown"),
}


def render(analyses: Union["Analysis", Sequence["Analysis"]], fmt: str = "table", **options: Any) -> str:
    """Render one analysis or several in format ``fmt``.

    Args:
        analyses: one :class:`~nora_spectra.analysis.Analysis`, or a list (JSON then nests them under
            ``"checkpoints"``; the table prints them one after the other).
        fmt: ``"table"``, ``"json"``, ``"csv"`` or ``"markdown"``.
        **options: ``effective_rank=True`` focuses the table and Markdown views, ``by_layer=True`` adds
            their per-layer summary (JSON and CSV ignore both); other options go to the renderer.

    Returns:
        The rendered text, newline-terminated.

    Raises:
        ValueError: on an unknown format name.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    module_name, function_name = FORMATS[fmt]
    function = getattr(importlib.import_module(module_name), function_name)
    if fmt == "table":
        items = list(analyses) if isinstance(analyses, (list, tuple)) else [analyses]
        return "\n".join(function(a, **options) for a in items)
    if fmt in ("json", "csv"):
        options.pop("effective_rank", None)
        options.pop("by_layer", None)
    return function(analyses, **options)
