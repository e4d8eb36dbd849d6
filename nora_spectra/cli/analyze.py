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

from nora_spectra._text import one_line
from nora_spectra.schema import (
    DEFAULT_COLLAPSE_THRESHOLD,
    DEFAULT_INTRUDER_EPS,
    DEFAULT_INTRUDER_K,
    DEFAULT_PROBE_SAMPLES,
    DEFAULT_TOP_K,
    EXACT_SVD_MAX_DIM,
    MODEL_CLASSES,
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


class TopK(click.ParamType):
    """``--top-k``: a positive integer, or ``all`` for an exact SVD whatever the size."""

    name = "K|all"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, int) or value == "all":
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            self.fail(f"{value!r} is not a positive integer or 'all'", param, ctx)
        return number


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
@click.option(
    "--base",
    metavar="BASE",
    help="Base model (safetensors file, sharded model.safetensors.index.json, or their directory): "
    "a full fine-tune PATH is analysed as W_tuned - W_base; adapters gain DoRA's true update, the size "
    "relative to the base weight and (--intruders) intruder dimensions.",
)
@click.option(
    "--top-k",
    "top_k",
    type=TopK(),
    help=f"Leading singular values of each dense update (full fine-tunes, DoRA's true update), by randomized "
    f"SVD with an error bound; 'all' for an exact SVD [default: exact when min(d_out, d_in) <= "
    f"{EXACT_SVD_MAX_DIM}, else {DEFAULT_TOP_K}].",
)
@click.option(
    "--intruders",
    is_flag=True,
    default=None,
    help="Count intruder dimensions (needs --base): leading left singular vectors of W0 + dW whose largest "
    "|cos| with every left singular vector of W0 is below --intruder-eps.",
)
@click.option(
    "--intruder-k",
    type=click.IntRange(min=1),
    help=f"Leading directions of the tuned matrix tested for intruders [default: {DEFAULT_INTRUDER_K}].",
)
@click.option(
    "--intruder-eps",
    type=click.FloatRange(0, 1, min_open=True),
    help=f"Cosine threshold below which a direction is an intruder [default: {DEFAULT_INTRUDER_EPS}].",
)
@click.option(
    "--no-cache",
    "cache",
    flag_value=False,
    default=None,
    help="Do not read or write the on-disk cache of base-model SVDs ($NORA_SPECTRA_CACHE, "
    "default ~/.cache/nora-spectra).",
)
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
    With --base BASE, a fully fine-tuned model is analysed as its difference from BASE, and every record
    gains its size relative to the base weight (docs/metrics.md).
    With one PATH, --format json prints one object; with several, {"checkpoints": [...]}. Layers with
    NaN/Inf factors or an all-zero update are reported with their status and a warning; the exit code
    stays 0. Bad input exits with code 2 and one line on stderr.
    """
    from nora_spectra.analysis import analyze
    from nora_spectra.render import render

    if space_options.get("intruders") is False:
        space_options["intruders"] = None  # an unset flag is not an option given to another space
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
        analyses.append(analysis)
    if not quiet:  # once every checkpoint is read: a failing command prints its one error line only
        for analysis in analyses:
            for message in analysis.warnings:
                click.echo(one_line(f"spectra: warning: {analysis.display_name}: {message}"), err=True)
    result = analyses[0] if len(analyses) == 1 else analyses
    write_result(render(result, fmt, effective_rank=effective_rank, by_layer=by_layer), output, quiet=quiet)
