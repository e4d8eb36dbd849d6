"""``spectra report PATH... -o report.html|report.md``: a self-contained report with plots.

A PATH is an adapter checkpoint, an analysis JSON file from ``spectra analyze --format json``, or a
training run directory (``metrics.jsonl``: loss curves and effective-rank trajectories, plus its final
adapter). ``--overlap`` adds the subspace overlap of the first checkpoint with each other one. ``.html`` writes one file with inline CSS and images; ``.md`` writes Markdown and a
``<name>_files/`` folder of PNGs next to it. Every file is written atomically.
"""

from __future__ import annotations

import click

from nora_spectra.cli.analyze import format_in_option
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD

__all__ = ["command"]


@click.command("report")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Report file: .html (self-contained) or .md (plus a folder of PNGs).")
@click.option("--labels", metavar="a,b,c", help="Comma-separated labels, one per PATH (default: path names).")
@click.option("--title", help="Report title.", default=None)
@click.option("--adapter", metavar="NAME", help="Use the non-default adapter NAME of each checkpoint.")
@format_in_option
@click.option("--collapse-threshold", type=float, default=DEFAULT_COLLAPSE_THRESHOLD, show_default=True,
              help="Flag a layer collapsed when effective_rank / r is below this.")
@click.option("--dpi", type=click.IntRange(50, 300), default=100, show_default=True, help="Resolution of the plots.")
@click.option("--overlap", is_flag=True,
              help="Add the subspace overlap of the first checkpoint with each other one (table, bars, phi heat map).")
@click.option("--overlap-module", metavar="NAME", help="The module of the phi heat map (default: the first compared).")
@click.option("-q", "--quiet", is_flag=True, help="No messages on stderr.")
def command(
    paths: tuple[str, ...],
    output: str,
    labels: str | None,
    title: str | None,
    adapter: str | None,
    format_in: str | None,
    collapse_threshold: float,
    dpi: int,
    overlap: bool,
    overlap_module: str | None,
    quiet: bool,
) -> None:
    """Write an HTML or Markdown report of checkpoints and training runs: warnings, summary,
    per-module tables, plots and configs. Bad input exits with code 2 and one line on stderr.
    """
    from nora_spectra.report import report

    names = None if labels is None else [s.strip() for s in labels.split(",")]
    from nora_spectra.errors import UsageError

    if overlap_module is not None and not overlap:
        raise UsageError("--overlap-module needs --overlap")
    options = {"collapse_threshold": collapse_threshold, "dpi": dpi, "overlap": overlap, "overlap_module": overlap_module}
    if adapter is not None:
        options["adapter"] = adapter
    if format_in is not None:
        options["format"] = format_in
    data = report(list(paths), output, labels=names, title=title, **options)
    if not quiet:
        click.echo(
            f"spectra: wrote {output} ({len(data.analyses)} checkpoint(s), {len(data.runs)} run(s), "
            f"{len(data.figures)} plots)",
            err=True,
        )
