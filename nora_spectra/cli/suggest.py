"""``spectra suggest CKPT``: a uniform r and a per-module rank_pattern for the next run, with the evidence.

Prints the per-module table (energy rank, saturated, collapsed, suggested rank), a ready-to-paste PEFT
``LoraConfig`` fragment (JSON) and ``spectra check`` thresholds (TOML). The rules are the library's
(:func:`nora_spectra.suggest.suggest`).
"""

from __future__ import annotations

import click

from nora_spectra.cli.analyze import format_in_option, write_result
from nora_spectra.render.suggest import SUGGEST_FORMATS
from nora_spectra.schema import DEFAULT_COLLAPSE_THRESHOLD

__all__ = ["command"]


@click.command("suggest")
@click.argument("checkpoint", metavar="CKPT")
@click.option("--energy", type=float, default=0.9, show_default=True,
              help="A module needs the smallest k keeping this share of ||dW||_F^2, in (0, 1].")
@click.option("--coverage", type=float, default=0.9, show_default=True,
              help="Share of the modules the uniform r must cover, in (0, 1].")
@click.option("--format", "fmt", type=click.Choice(SUGGEST_FORMATS), default="table", show_default=True,
              help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the result to FILE (atomically).")
@click.option("--adapter", metavar="NAME", help="Use the non-default adapter NAME (its sub-directory).")
@format_in_option
@click.option("--collapse-threshold", type=float, default=DEFAULT_COLLAPSE_THRESHOLD, show_default=True,
              help="Flag a layer collapsed when effective_rank / r is below this.")
@click.option("-q", "--quiet", is_flag=True, help="No warnings or messages on stderr.")
def command(
    checkpoint: str,
    energy: float,
    coverage: float,
    fmt: str,
    output: str | None,
    adapter: str | None,
    format_in: str | None,
    collapse_threshold: float,
    quiet: bool,
) -> None:
    """Suggest ranks for the next training run from CKPT's spectra.

    CKPT is a checkpoint or an analysis JSON file of one checkpoint. A module needs its energy rank
    k@q; it is saturated when that reaches its budget (it may want more rank) and collapsed when it
    uses little of it. The suggested uniform r covers --coverage of the modules; rank_pattern holds
    the rest; alphas keep every module's scale. Bad input exits with code 2 and one line on stderr.
    """
    from nora_spectra.render.suggest import format_suggestion
    from nora_spectra.suggest import suggest

    options = {"collapse_threshold": collapse_threshold}
    if adapter is not None:
        options["adapter"] = adapter
    if format_in is not None:
        options["format"] = format_in
    result = suggest(checkpoint, energy=energy, coverage=coverage, **options)
    if not quiet:
        for message in result.analysis.warnings:
            click.echo(f"spectra: warning: {result.checkpoint}: {message}", err=True)
    write_result(format_suggestion(result, fmt), output, quiet=quiet)
