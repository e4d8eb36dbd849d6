"""Baselines of ``spectra check``: read one, write one, and pair each analysis with its entry.

A baseline is exactly the JSON ``spectra analyze --format json`` writes (one analysis object, or
``{"checkpoints": [...]}``) for weight-space analyses.
"""

from __future__ import annotations

import os
from typing import Sequence

from nora_spectra.errors import UsageError
from nora_spectra.outputs import write_output
from nora_spectra.result import Analysis, analyses_to_json, read_analyses

__all__ = ["load_baseline", "match_baseline", "write_baseline"]


def load_baseline(path: str | os.PathLike[str]) -> list[Analysis]:
    """Read a baseline: the JSON ``spectra analyze --format json`` writes (one object, or ``checkpoints``).

    Raises:
        UsageError: the file is missing, not JSON, or not an analysis (the message names the file).
    """
    path = os.fspath(path)
    try:
        analyses = read_analyses(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: baseline not found (create it with --update-baseline)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read baseline: {exc.strerror or exc}") from None
    for analysis in analyses:
        space = analysis.space
        if space != "weight":
            raise UsageError(
                f"{path}: baseline holds {space}-space spectra; spectra check gates weight-space analyses "
                "(write the baseline with plain 'spectra analyze --format json' or --update-baseline)"
            )
    return analyses


def write_baseline(path: str | os.PathLike[str], analyses: Sequence[Analysis]) -> None:
    """Write ``analyses`` atomically as ``spectra analyze --format json`` would (one: the object).

    The baseline's directory is created when missing (as ``--junit`` does for its report).

    Raises:
        UsageError: the baseline cannot be written.
    """
    write_output(path, analyses_to_json(analyses[0] if len(analyses) == 1 else list(analyses)), "baseline")


def match_baseline(
    analyses: Sequence[Analysis], baselines: Sequence[Analysis], notes: list[tuple[str, str]] | None = None
) -> list[Analysis]:
    """Pair each analysis with its baseline.

    Rules, in order: a baseline with one checkpoint serves every analysis; otherwise the baseline entry
    with the same ``checkpoint`` path (both resolved with :func:`os.path.realpath` against the current
    directory, so ``runs/a`` and ``$PWD/runs/a`` pair up) and the same ``adapter`` (None, the default
    adapter, for baselines written before the field existed); otherwise, when both lists have the same
    length, the entry at the same position, with a note in ``notes`` saying so.

    Raises:
        UsageError: an analysis has no baseline entry.
    """
    if len(baselines) == 1:
        return [baselines[0]] * len(analyses)
    by_key = {_baseline_key(b): b for b in baselines}
    matched = []
    for i, analysis in enumerate(analyses):
        key = _baseline_key(analysis)
        if key in by_key:
            matched.append(by_key[key])
        elif len(analyses) == len(baselines):
            matched.append(baselines[i])
            if notes is not None:
                notes.append((
                    analysis.checkpoint,
                    f"no baseline entry with this path; compared by position with entry {i + 1}, "
                    f"{_describe(baselines[i])}",
                ))
        else:
            known = ", ".join(_describe(b) for b in baselines)
            raise UsageError(f"baseline has no entry for checkpoint {_describe(analysis)} (it holds: {known})")
    return matched


def _baseline_key(analysis: Analysis) -> tuple[str, str | None]:
    return os.path.realpath(analysis.checkpoint), getattr(analysis, "adapter", None)


def _describe(analysis: Analysis) -> str:
    adapter = getattr(analysis, "adapter", None)
    return repr(analysis.checkpoint) + (f" (adapter {adapter})" if adapter else "")
