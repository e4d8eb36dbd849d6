"""``spectra census OUT_DIR -o census.html``: the field's picture from a scan, as one HTML file.

Utilization and effective rank against r (box plots), by module type and by base model, the share of
collapsed modules, the slowest and the failed adapters (:func:`nora_spectra.scan.census.write_census`).
"""

from __future__ import annotations

import click

__all__ = ["command"]


@click.command("census")
@click.argument("scan_dir", metavar="OUT_DIR")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The census file (.html, self-contained).")
@click.option("--title", default=None, help="Page title.")
@click.option("--dpi", type=click.IntRange(50, 300), default=100, show_default=True, help="Resolution of the plots.")
@click.option("-q", "--quiet", is_flag=True, help="No message on stderr.")
def command(scan_dir: str, output: str, title: str | None, dpi: int, quiet: bool) -> None:
    """Write a self-contained HTML census of the scan in OUT_DIR (written by spectra scan)."""
    from nora_spectra.scan.census import write_census

    data = write_census(scan_dir, output, title=title, dpi=dpi)
    if not quiet:
        c = data.counts
        click.echo(f"spectra: wrote {output} ({c['adapters']} adapters, {c['modules']} modules, "
                   f"{len(data.figures)} plots)", err=True)
