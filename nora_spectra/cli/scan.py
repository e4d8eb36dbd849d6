"""``spectra scan ROOT... -o OUT_DIR``: analyse every adapter under the roots into Parquet tables.

The work is the library's (:func:`nora_spectra.scan.scan`); this command forwards the options, draws
one progress bar of adapters on a terminal and prints one summary line at the end. A bad adapter is a
row with status ``error``, never a failure of the command; bad input to the scan (a missing root, an
empty one, a bad manifest, an output directory holding another scan, Ray missing) is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import sys

import click

from nora_spectra.cli.analyze import format_in_option
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD

__all__ = ["command"]


@click.command("scan")
@click.argument("roots", nargs=-1, metavar="[ROOT]...")
@click.option("-o", "--output-dir", "output", required=True, type=click.Path(file_okay=False),
              help="Directory of the tables (adapters.parquet, layers.parquet); created when missing.")
@click.option("--manifest", type=click.Path(dir_okay=False),
              help="CSV or JSONL file of adapter paths ('path' column) with optional metadata columns.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool on this machine; ray: a Ray Data pipeline (pip install 'nora-spectra[ray]').")
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker processes (local), CPUs of the local Ray cluster, or adapters at once on a joined "
              "Ray cluster [default: the cores; a joined cluster: its CPUs].")
@click.option("--ray-address", metavar="ADDRESS",
              help="Ray cluster to join (ray.init(address=...)); default RAY_ADDRESS, else a new local cluster.")
@click.option("--resume", is_flag=True, help="Continue the scan in OUT_DIR: skip adapters already done (same content key).")
@click.option("--overwrite", is_flag=True, help="Replace the scan in OUT_DIR.")
@click.option("--retry-errors", is_flag=True, help="With --resume, analyse again the adapters that failed.")
@click.option("--csv", "csv_too", is_flag=True, help="Also write adapters.csv and layers.csv.")
@format_in_option
@click.option("--collapse-threshold", type=float, default=DEFAULT_COLLAPSE_THRESHOLD, show_default=True,
              help="Flag a layer collapsed when effective_rank / r is below this.")
@click.option("--part-size", type=click.IntRange(min=1), default=100, show_default=True,
              help="Commit results to OUT_DIR every N adapters (and at least every 30 s).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary line on stderr.")
def command(
    roots: tuple[str, ...],
    output: str,
    manifest: str | None,
    engine: str,
    workers: int | None,
    ray_address: str | None,
    resume: bool,
    overwrite: bool,
    retry_errors: bool,
    csv_too: bool,
    format_in: str | None,
    collapse_threshold: float,
    part_size: int,
    quiet: bool,
) -> None:
    """Analyse every adapter under ROOT... (and/or in --manifest) into OUT_DIR/adapters.parquet (one row
    per adapter: status ok or error, summary metrics, content key) and OUT_DIR/layers.parquet (one row per
    module, the columns of spectra analyze). Adapters are found by every registered format's detector.
    A killed scan continues with --resume. Load the tables with nora_spectra.load_scan(OUT_DIR).
    """
    from nora_spectra.scan import scan

    summary = scan(
        roots,
        output=output,
        manifest=manifest,
        engine=engine,
        workers=workers,
        ray_address=ray_address,
        resume=resume,
        overwrite=overwrite,
        retry_errors=retry_errors,
        csv=csv_too,
        format=format_in,
        collapse_threshold=collapse_threshold,
        part_size=part_size,
        progress=not quiet and sys.stderr.isatty(),
    )
    if not quiet:
        click.echo(f"spectra: {summary.line()}", err=True)
