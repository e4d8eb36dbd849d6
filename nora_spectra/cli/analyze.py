"""``spectra analyze PATH...``: per-layer spectra and rank utilization of adapter checkpoints.

Results go to stdout (or atomically to ``--output``); warnings and the progress bar go to stderr.
User errors raise :class:`~nora_spectra.errors.SpectraError`, which ``spectra`` prints as one line
with exit code 2. The JSON/CSV/Markdown/table paths import neither torch nor pandas. The choice of
space and its options are the library's (:func:`nora_spectra.analysis.analyze`); this command only
forwards the flags that were given.
"""

from __future__ import annotations

import sys

import click

from nora_spectra.model_loading import MODEL_CLASSES
from nora_spectra.schema import (
    DEFAULT_COLLAPSE_THRESHOLD,
    DEFAULT_PROBE_SAMPLES,
    SPACES,
)

__all__ = ["command", "write_result"]


def write_result(text: str, output: str | None, *, quiet: bool) -> None:
    """Print ``text`` to stdout, or write it atomically to ``output`` (missing directories are created).

    Raises:
        UsageError: when ``output`` cannot be written.
    """
    if output is None:
        click.echo(text, nl=False)
        return
    from nora_spectra.outputs import write_output

    write_output(output, text)
    if not quiet:
        click.echo(f"spectra: wrote {output}", err=True)


def format_in_option(command):  # type: ignore[no-untyped-def]
    """``--format-in NAME``: force a registered checkpoint format instead of detecting it."""
    return click.option(
        "--format-in",
        "format_in",
        metavar="NAME",
        help="Read the checkpoints as this registered format instead of detecting it "
        "(docs/formats.md lists the names).",
    )(command)


@click.command("analyze")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--effective-rank", is_flag=True, help="Focus the table on effective rank, utilization and collapse.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv", "markdown"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the result to FILE (atomically).")
@click.option("--adapter", metavar="NAME", help="Analyse the non-default adapter NAME (its sub-directory).")
@format_in_option
@click.option(
    "--collapse-threshold",
    type=float,
    default=DEFAULT_COLLAPSE_THRESHOLD,
    show_default=True,
    help="Flag a layer collapsed when effective_rank / r is below this.",
)
@click.option("--by-layer", is_flag=True, help="Also summarise by layer index (table and markdown).")
@click.option("-q", "--quiet", is_flag=True, help="No warnings, messages or progress bar on stderr.")
@click.option(
    "--space",
    type=click.Choice(SPACES),
    default="weight",
    show_default=True,
    help="weight: sigma(s*B*A) from the factors; activation: SVD of each branch's centred output over "
    "--data through --model (the NoRA paper's measurement); probe: the branch's response to "
    "isotropic Gaussian inputs (no model needed).",
)
@click.option(
    "--model",
    metavar="MODEL",
    type=click.Path(exists=True, file_okay=False),
    help="Base model directory for --space activation: a nora small GPT or a local transformers model.",
)
@click.option(
    "--data",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="JSONL samples for --space activation (text, question/answer, instruction/output, conversations).",
)
@click.option(
    "--model-class",
    type=click.Choice(list(MODEL_CLASSES)),
    help="Load a transformers --model as this class (the one the adapter was trained on) [default: from the "
    "adapter's task_type, else the model config's architectures].",
)
@click.option(
    "--tokenizer",
    metavar="DIR",
    type=click.Path(exists=True, file_okay=False),
    help="Tokenizer directory for --data, when it is not beside --model.",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    help="Longest tokenised sequence, special tokens included [default: the model's maximum].",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per forward pass [default: 8].")
@click.option("--samples", type=click.IntRange(min=1), help="Sequences of --data to run (the first ones) [default: 128].")
@click.option(
    "--layers",
    metavar="SPEC",
    help="Comma-separated layer indices (negative from the end), last:N, or module-name globs "
    "(q_proj, blocks.3.*). Default: every adapter module.",
)
@click.option("--probe-scale", type=float, help="Standard deviation of the Gaussian probe inputs [default: 1.0].")
@click.option(
    "--probe-samples",
    type=click.IntRange(min=2),
    help=f"Gaussian inputs per layer (--space probe); sampling error ~ sqrt(r / N) [default: {DEFAULT_PROBE_SAMPLES}].",
)
@click.option("--seed", type=int, help="Random seed of the probe [default: 0].")
def command(
    paths: tuple[str, ...],
    effective_rank: bool,
    fmt: str,
    output: str | None,
    adapter: str | None,
    format_in: str | None,
    collapse_threshold: float,
    by_layer: bool,
    quiet: bool,
    space: str,
    **space_options: object,
) -> None:
    """Per-layer singular-value spectra and rank utilization of adapter checkpoints.

    PATH is a checkpoint of any registered format (a PEFT or NoRA adapter directory, a bare .safetensors
    file, ...; see docs/formats.md). --space activation measures the adapter branch's outputs on real
    inputs (needs --model and --data), --space probe its response to Gaussian inputs (docs/activation.md).
    With one PATH, --format json prints one object; with several, {"checkpoints": [...]}. Layers with
    NaN/Inf factors or an all-zero update are reported with their status and a warning; the exit code
    stays 0. Bad input exits with code 2 and one line on stderr.
    """
    from nora_spectra.analysis import analyze
    from nora_spectra.render import render

    show_progress = not quiet and sys.stderr.isatty()
    analyses = []
    for path in paths:
        analysis = analyze(
            path,
            space=space,
            adapter=adapter,
            format=format_in,
            collapse_threshold=collapse_threshold,
            progress=show_progress,
            emit_warnings=False,
            **space_options,
        )
        if not quiet:
            for message in analysis.warnings:
                click.echo(f"spectra: warning: {analysis.display_name}: {message}", err=True)
        analyses.append(analysis)
    result = analyses[0] if len(analyses) == 1 else analyses
    write_result(render(result, fmt, effective_rank=effective_rank, by_layer=by_layer), output, quiet=quiet)
