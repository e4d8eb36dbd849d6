"""``analyze(source, space=...) -> Analysis``: the one analysis loop, for every space.

The data path reads straight through::

    source --spaces.<space>.prepare--> run --run.layers()--> LayerSpectrum (one layer at a time)
        --records.layer_records--> records (dicts) --summarize(records)--> summary --> Analysis

A space (:mod:`nora_spectra.spaces`) measures; this loop builds the records, drives the progress bar,
gathers the warnings and writes the summary, once for all spaces. Nothing here computes a singular
value or a metric: :mod:`nora_spectra.spectrum` and :mod:`nora_spectra.metrics` do, so the CLI, the
library and the CI gate agree to the last bit. Warnings are data on the result (``Analysis.warnings``,
also in the JSON), so an analysis can run in a worker process and return everything it found; the
library also issues them through :mod:`warnings` unless ``emit_warnings=False`` (the CLI prints them
itself). This module imports neither torch nor pandas.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from nora_spectra._progress import ProgressArg, progress_callback
from nora_spectra._text import name_list, plural
from nora_spectra.errors import UsageError
from nora_spectra.records import layer_records, status_warnings
from nora_spectra.result import Analysis
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD, DEFAULT_PROBE_SAMPLES, LAYER_COLUMNS, layer_index, module_type
from nora_spectra.spaces import open_space
from nora_spectra.summary import summarize

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from nora_spectra.io import Checkpoint
    from nora_spectra.model_loading import LoadedModel

__all__ = [
    "LAYER_COLUMNS",
    "Analysis",
    "AnalysisWarning",
    "activation_spectra",
    "analyze",
    "analyze_many",
    "check_collapse_threshold",
    "layer_index",
    "module_type",
    "probe_spectra",
]

log = logging.getLogger(__name__)


class AnalysisWarning(UserWarning):
    """A checkpoint was analysed, but some layers need the user's attention (NaN, zero, skipped, DoRA)."""


def check_collapse_threshold(value: Any) -> float:
    """``value`` as a float in [0, 1].

    Raises:
        UsageError: it is not a number in [0, 1].
    """
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
        raise UsageError(f"collapse threshold must be a number in [0, 1], got {value!r}")
    return float(value)


def analyze(
    source: "str | os.PathLike[str] | Checkpoint | Any",
    *,
    space: str = "weight",
    adapter: str | None = None,
    format: str | None = None,
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
    progress: ProgressArg = None,
    emit_warnings: bool = True,
    **options: Any,
) -> Analysis:
    """Per-layer singular-value spectra and rank-utilization metrics of one adapter, in one space.

    Weight space (the default): for every adapter module with update ``s * B @ A`` (or another kind of
    :mod:`nora_spectra.updates`), the exact singular values of the update, computed from its factors
    without forming the ``d_out x d_in`` matrix, and the metrics of ``docs/metrics.md``. Activation
    space: the SVD of each branch's centred output over real inputs through a base model (the NoRA
    paper's measurement). Probe space: each branch's response to isotropic Gaussian inputs.

    Args:
        source: a checkpoint directory or file, or an already-loaded :class:`nora_spectra.io.Checkpoint`;
            for activation space also an ``nn.Module`` holding adapter layers.
        space: ``"weight"``, ``"activation"`` or ``"probe"`` (``docs/activation.md``).
        adapter: name of a non-default adapter (its sub-directory); weight and probe space.
        format: a registered checkpoint format to force (``--format-in``); default: detected.
        collapse_threshold: a layer is ``collapsed`` when ``utilization = effective_rank / r`` is below
            this, in [0, 1]; default 0.25.
        progress: None/False for nothing, True for a tqdm bar on stderr, or a callable
            ``progress(done, total, item)`` called as work is done.
        emit_warnings: also issue the collected warnings once each through :func:`warnings.warn`
            (category :class:`AnalysisWarning`). The CLI and worker processes turn this off.
        **options: the space's own options. Weight: ``base`` (a safetensors base model: full fine-tunes
            become ``W_tuned - W_base``, records gain DoRA's true update and the relative size),
            ``top_k`` (leading values of dense updates: an integer, ``"all"``, or None for exact up to
            1024 rows and columns, else 64), ``intruders`` (False), ``intruder_k`` (10),
            ``intruder_eps`` (0.5), ``cache`` (the base-SVD cache: None the default directory, False
            none, or a directory); see :mod:`nora_spectra.spaces.weight`. Activation: ``model``,
            ``data``, ``samples`` (128), ``layers``, ``batch_size`` (8), ``tokenizer``, ``max_length``,
            ``model_class``. Probe: ``probe_scale`` (1.0), ``probe_samples`` (4096), ``seed`` (0), ``layers``.

    Returns:
        The :class:`Analysis`. NaN/Inf factors and all-zero updates are not errors: such layers get the
        status ``"non_finite"`` (null metrics) or ``"zero"`` and a warning.

    Raises:
        CheckpointError: the path is missing, malformed or of an unknown format.
        UsageError: an unknown space, options of another space, ``collapse_threshold`` outside [0, 1],
            or ``progress`` of the wrong type.
    """
    collapse_threshold = check_collapse_threshold(collapse_threshold)
    run = open_space(space, source, {"adapter": adapter, "format": format, **options})
    try:
        work = f"{run.total} adapter modules" if run.unit == "layer" else f"{run.total} {run.unit}s"
        log.debug("%s: format %s, method %s, %s", run.info.checkpoint, run.info.format, run.info.method, work)
        started = time.perf_counter()
        callback, bar = progress_callback(progress, run.total, unit=run.unit, desc=run.desc)
        try:
            # Huge factors (a hostile scale or float64 values near 1e300) overflow in the spectra and
            # sigma**2 in the metrics: the result is an infinite or null field of the record (or the
            # status non_finite), not a numpy warning on stderr.
            with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
                layers = [(layer.identity, layer.sigma, layer.dora) for layer in run.layers(callback)]
                records = layer_records(layers, collapse_threshold=collapse_threshold, columns=run.columns)
        finally:
            if bar is not None:
                bar.close()
    finally:
        close = getattr(run, "close", None)
        if close is not None:
            close()
    log.debug("%s: %d spectra in %.3f s", run.info.checkpoint, len(records), time.perf_counter() - started)

    info = run.info
    messages = list(info.warnings)
    if info.skipped and not any(message.startswith("skipped ") for message in messages):
        # the PEFT-keyed readers word this warning themselves (with the tensor count); others may not
        messages.append(
            f"skipped {plural(len(info.skipped), 'module')} that are not low-rank adapter factors: "
            + name_list([f"{name} ({reason})" for name, reason in info.skipped])
        )
    messages.extend(status_warnings(records, space))
    analysis = Analysis(
        checkpoint=info.checkpoint,
        format=info.format,
        method=info.method,
        records=records,
        summary=summarize(records),
        config=info.config,
        warnings=messages,
        skipped=list(info.skipped),
        metadata=dict(info.metadata),
        collapse_threshold=collapse_threshold,
        adapter=info.adapter,
        space=space,
        **run.fields(),
    )
    for message in messages:
        log.debug("%s: %s", analysis.checkpoint, message)
        if emit_warnings:
            warnings.warn(f"{analysis.checkpoint}: {message}", AnalysisWarning, stacklevel=2)
    return analysis


def analyze_many(paths: Iterable["str | os.PathLike[str]"], **options: Any) -> list[Analysis]:
    """:func:`analyze` each path in turn with the same options (stops at the first user error)."""
    return [analyze(path, **options) for path in paths]


def activation_spectra(
    adapted: "str | os.PathLike[str] | nn.Module",
    *,
    model: "str | os.PathLike[str] | nn.Module | LoadedModel | None" = None,
    data: Any,
    samples: int = 128,
    layers: Sequence[Any] | str | None = None,
    batch_size: int = 8,
    tokenizer: Any | None = None,
    max_length: int | None = None,
    model_class: str | None = None,
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
    progress: bool | Callable[[int, int, str], None] | None = None,
) -> Analysis:
    """Activation-space spectra of every adapter branch over real inputs (the NoRA paper's measurement).

    The same as ``analyze(adapted, space="activation", model=model, data=data, ...)``; the options are
    those of :func:`nora_spectra.spaces.activation.prepare`.

    Returns:
        An :class:`~nora_spectra.result.Analysis` with ``space == "activation"``, one record per
        measured module.
    """
    if model is None and isinstance(adapted, (str, os.PathLike)):
        raise UsageError("activation space needs the base model (--model MODEL)")
    return analyze(
        adapted, space="activation", model=model, data=data, samples=samples, layers=layers,
        batch_size=batch_size, tokenizer=tokenizer, max_length=max_length, model_class=model_class,
        collapse_threshold=collapse_threshold, progress=progress, emit_warnings=False,
    )


def probe_spectra(
    checkpoint: "str | os.PathLike[str] | Checkpoint",
    *,
    probe_scale: float = 1.0,
    samples: int = DEFAULT_PROBE_SAMPLES,
    seed: int = 0,
    layers: Sequence[Any] | str | None = None,
    adapter: str | None = None,
    collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
    progress: bool | Callable[[int, int, str], None] | None = None,
) -> Analysis:
    """Probe-space spectra of every adapter branch of a checkpoint (no model, no data).

    The same as ``analyze(checkpoint, space="probe", probe_samples=samples, ...)``; the options are those
    of :func:`nora_spectra.spaces.probe.prepare`.

    Returns:
        An :class:`~nora_spectra.result.Analysis` with ``space == "probe"``; singular values are
        normalised by ``sqrt(samples - 1)``.
    """
    return analyze(
        checkpoint, space="probe", adapter=adapter, probe_scale=probe_scale, probe_samples=samples, seed=seed,
        layers=layers, collapse_threshold=collapse_threshold, progress=progress, emit_warnings=False,
    )
