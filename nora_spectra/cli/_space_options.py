"""``--space weight|activation|probe`` and its options for ``spectra analyze``.

:func:`add_space_options` decorates a click command with ``--space``, ``--model``, ``--data``,
``--samples``, ``--layers``, ``--probe-scale``, ``--probe-samples`` and ``--seed``; the command passes
them on unchanged to :func:`run_space`, which validates the combination (a
:class:`~nora_spectra.errors.UsageError`, exit code 2, when it does not fit) and returns an
Analysis-like result for the same renderers. torch is imported only for ``--space activation``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import click

from nora_spectra.errors import UsageError

__all__ = ["SPACES", "SPACE_OPTION_NAMES", "add_space_options", "run_space"]

SPACES = ("weight", "activation", "probe")

#: keyword names the options add to the command's callback (all forwarded to :func:`run_space`).
SPACE_OPTION_NAMES = ("space", "model", "data", "samples", "layers", "probe_scale", "probe_samples", "seed")

F = TypeVar("F", bound=Callable[..., Any])


def add_space_options(command: F) -> F:
    """Add the space options to a click command (apply below ``@click.command``).

    Returns:
        The decorated callback.
    """
    options = [
        click.option(
            "--space",
            type=click.Choice(SPACES),
            default="weight",
            show_default=True,
            help="weight: sigma(s*B*A) from the factors; activation: SVD of each branch's centred output over "
            "--data through --model (the NoRA paper's measurement); probe: the branch's response to "
            "isotropic Gaussian inputs (no model needed).",
        ),
        click.option(
            "--model",
            metavar="MODEL",
            type=click.Path(exists=True, file_okay=False),
            help="Base model directory for --space activation: a nora small GPT or a local transformers model.",
        ),
        click.option(
            "--data",
            metavar="FILE",
            type=click.Path(exists=True, dir_okay=False),
            help="JSONL samples for --space activation (text, question/answer, instruction/output, conversations).",
        ),
        click.option(
            "--samples",
            type=click.IntRange(min=1),
            default=128,
            show_default=True,
            help="Sequences of --data to run (the first ones).",
        ),
        click.option(
            "--layers",
            metavar="SPEC",
            help="Comma-separated layer indices (negative from the end), last:N, or module-name globs "
            "(q_proj, blocks.3.*). Default: every adapter module.",
        ),
        click.option(
            "--probe-scale",
            type=float,
            default=1.0,
            show_default=True,
            help="Standard deviation of the Gaussian probe inputs (--space probe).",
        ),
        click.option(
            "--probe-samples",
            type=click.IntRange(min=2),
            default=4096,
            show_default=True,
            help="Gaussian inputs per layer (--space probe); sampling error ~ sqrt(r / N).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the probe."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_space(
    space: str,
    path: "str | os.PathLike[str]",
    *,
    model: str | None = None,
    data: str | None = None,
    samples: int = 128,
    layers: str | None = None,
    probe_scale: float = 1.0,
    probe_samples: int = 4096,
    seed: int = 0,
    adapter: str | None = None,
    collapse_threshold: float = 0.25,
    progress: bool = False,
    emit_warnings: bool = False,
) -> Any:
    """Analyse one checkpoint in the chosen space.

    Args:
        space: ``"weight"``, ``"activation"`` or ``"probe"``.
        path: the adapter checkpoint.
        model, data, samples, layers: activation-space inputs (``layers`` also applies to probe and,
            for weight space, is refused).
        probe_scale, probe_samples, seed: probe-space inputs.
        adapter, collapse_threshold, progress, emit_warnings: as :func:`nora_spectra.analysis.analyze`.

    Returns:
        An :class:`~nora_spectra.analysis.Analysis` (weight) or
        :class:`~nora_spectra.activation.ActivationAnalysis` (activation, probe).

    Raises:
        UsageError: options that do not fit the space (e.g. activation without --model or --data).
        CheckpointError: a bad checkpoint or model path.
    """
    if space not in SPACES:
        raise UsageError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
    if space != "activation" and (model is not None or data is not None):
        raise UsageError("--model and --data only apply to --space activation")
    if space == "weight":
        if layers is not None:
            raise UsageError("--layers applies to --space activation and probe")
        from nora_spectra.analysis import analyze

        return analyze(
            path, adapter=adapter, collapse_threshold=collapse_threshold, progress=progress, emit_warnings=emit_warnings
        )
    if space == "probe":
        from nora_spectra.probe import probe_spectra

        return probe_spectra(
            path,
            probe_scale=probe_scale,
            samples=probe_samples,
            seed=seed,
            layers=layers,
            adapter=adapter,
            collapse_threshold=collapse_threshold,
            progress=progress,
        )
    if model is None or data is None:
        raise UsageError("--space activation needs --model MODEL and --data FILE")
    if adapter is not None:
        raise UsageError("--adapter is not supported with --space activation; pass the adapter's sub-directory")
    from nora_spectra.activation import analyze_activation

    return analyze_activation(
        path,
        model=model,
        data=data,
        samples=samples,
        layers=layers,
        collapse_threshold=collapse_threshold,
        progress=progress,
    )
