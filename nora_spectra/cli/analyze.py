"""``spectra analyze PATH...``: per-layer spectra and rank utilization of adapter checkpoints.

Results go to stdout (or atomically to ``--output``); warnings and the progress bar go to stderr.
User errors raise :class:`~nora_spectra.errors.SpectraError`, which ``spectra`` prints as one line
with exit code 2. The JSON/CSV/Markdown/table paths import neither torch nor pandas.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from nora_spectra.cli._space_options import add_space_options, run_space
from nora_spectra.errors import UsageError

__all__ = ["command", "write_result"]


def write_result(text: str, output: str | None, *, quiet: bool) -> None:
    """Print ``text`` to stdout, or write it atomically to ``output`` (its directory must exist).

    Raises:
        UsageError: when ``output`` cannot be written.
    """
    if output is None:
        click.echo(text, nl=False)
        return
    from nora_core.atomic import atomic_write_text

    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise UsageError(f"{output}: cannot write the output: directory {parent} does not exist")
    if os.path.isdir(output):
        raise UsageError(f"{output}: cannot write the output: it is a directory")
    try:
        atomic_write_text(output, text)
    except OSError as exc:
        raise UsageError(f"{output}: cannot write the output: {exc.strerror or exc}") from None
    if not quiet:
        click.echo(f"spectra: wrote {output}", err=True)


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
@click.option(
    "--collapse-threshold",
    type=float,
    default=0.25,
    show_default=True,
    help="Flag a layer collapsed when effective_rank / r is below this.",
)
@click.option("--by-layer", is_flag=True, help="Also summarise by layer index (table and markdown).")
@click.option("-q", "--quiet", is_flag=True, help="No warnings, messages or progress bar on stderr.")
@add_space_options
def command(
    paths: tuple[str, ...],
    effective_rank: bool,
    fmt: str,
    output: str | None,
    adapter: str | None,
    collapse_threshold: float,
    by_layer: bool,
    quiet: bool,
    **space_opts: Any,
) -> None:
    """Per-layer singular-value spectra and rank utilization of adapter checkpoints.

    PATH is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors or .bin) or a
    bare .safetensors file. --space activation measures the adapter branch's outputs on real inputs
    (needs --model and --data), --space probe its response to Gaussian inputs (docs/activation.md).
    With one PATH, --format json prints one object; with several,
    {"checkpoints": [...]}. Layers with NaN/Inf factors or an all-zero update are reported with their
    status and a warning; the exit code stays 0. Bad input exits with code 2 and one line on stderr.
    """
    from nora_spectra.render import render

    show_progress = not quiet and sys.stderr.isatty()
    analyses = []
    for path in paths:
        analysis = run_space(
            path=path,
            adapter=adapter,
            collapse_threshold=collapse_threshold,
            progress=show_progress,
            emit_warnings=False,
            **space_opts,
        )
        if not quiet:
            for message in analysis.warnings:
                click.echo(f"spectra: warning: {analysis.display_name}: {message}", err=True)
        analyses.append(analysis)
    result = analyses[0] if len(analyses) == 1 else analyses
    write_result(render(result, fmt, effective_rank=effective_rank, by_layer=by_layer), output, quiet=quiet)
