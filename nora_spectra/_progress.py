"""The ``progress`` argument of long calls: None/False, True (a tqdm bar on stderr) or a callback."""

from __future__ import annotations

from typing import Any, Callable, Union

from nora_spectra.errors import UsageError

__all__ = ["ProgressArg", "progress_callback"]

ProgressArg = Union[None, bool, Callable[[int, int, str], None]]


def progress_callback(
    progress: ProgressArg, total: int, *, unit: str = "layer", desc: str = "analysing"
) -> tuple[Callable[[int, int, str], None] | None, Any]:
    """Turn a ``progress`` argument into a callback ``(done, total, item)`` and the tqdm bar to close, if any.

    Args:
        progress: None/False (nothing), True (a tqdm bar on stderr) or a callable ``(done, total, item)``.
        total: the number of units of work.
        unit, desc: the bar's unit and description.

    Raises:
        UsageError: ``progress`` is of another type.
    """
    if progress is None or progress is False:
        return None, None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit=unit, desc=desc, leave=False, dynamic_ncols=True)
        return (lambda done, _total, _item: bar.update(done - bar.n)), bar
    if callable(progress):
        return progress, None
    raise UsageError(f"progress must be None, a bool or a callable, got {type(progress).__name__}")
