"""``spectra compare A B [C ...]``: several checkpoints side by side, module by module.

The first checkpoint is the reference: differences are ``value - reference``. The renderings live in
:mod:`nora_spectra.render.comparison`.
"""

from __future__ import annotations

import click

from nora_spectra._text import one_line

from nora_spectra.cli.analyze import format_in_option, write_result
from nora_spectra.errors import UsageError
from nora_spectra.render.comparison import COMPARISON_FORMATS, format_comparison
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD

__all__ = ["command"]


@click.command("compare")
@click.argument("paths", nargs=-1, required=True, metavar="A B [C ...]")
@click.option("--labels", metavar="a,b,c", help="Comma-separated labels, one per checkpoint (default: path names).")
@click.option("--format", "fmt", type=click.Choice(COMPARISON_FORMATS), default="table", show_default=True, help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the result to FILE (atomically).")
@click.option("--adapter", metavar="NAME", help="Compare the non-default adapter NAME of each checkpoint.")
@format_in_option
@click.option("--collapse-threshold", type=float, default=DEFAULT_COLLAPSE_THRESHOLD, show_default=True,
              help="Flag a layer collapsed when effective_rank / r is below this.")
@click.option("--by-layer", is_flag=True, help="Also summarise by layer index (table and markdown).")
@click.option("-q", "--quiet", is_flag=True, help="No warnings or messages on stderr.")
def command(
    paths: tuple[str, ...],
    labels: str | None,
    fmt: str,
    output: str | None,
    adapter: str | None,
    format_in: str | None,
    collapse_threshold: float,
    by_layer: bool,
    quiet: bool,
) -> None:
    """Compare the spectra of checkpoints A, B, ... module by module; A is the reference.

    Each PATH is an adapter checkpoint or an analysis JSON file from `spectra analyze --format json`.
    Modules are matched by name; effective rank, utilization and sigma_max are shown per checkpoint
    with their differences against A. Modules missing from some checkpoints are listed. Bad input
    exits with code 2 and one line on stderr.
    """
    from nora_spectra.comparison import compare, load_analyses

    analyses = []
    for path in paths:
        analyses.extend(load_analyses(
            path, adapter=adapter, format=format_in, collapse_threshold=collapse_threshold, emit_warnings=False
        ))
    if not quiet:  # once every input is read: a failing command prints its one error line only
        for analysis in analyses:
            for message in analysis.warnings:
                click.echo(one_line(f"spectra: warning: {analysis.display_name}: {message}"), err=True)
    if len(analyses) < 2:
        raise UsageError("compare needs at least two checkpoints")
    names = None if labels is None else [s.strip() for s in labels.split(",")]
    comparison = compare(analyses, labels=names)
    write_result(format_comparison(comparison, fmt, by_layer=by_layer), output, quiet=quiet)
