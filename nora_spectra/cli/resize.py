"""``spectra resize CKPT -o OUT --energy 0.9``: a smaller adapter of the same format (Eckart-Young per module).

The report (per module: old and new rank, energy kept, sigma_{k+1}, relative Frobenius error, bytes) goes to
stdout; the resized adapter is written atomically to OUT. The maths and the writers are the library's
(:func:`nora_spectra.resize.resize`); this command only forwards the flags.
"""

from __future__ import annotations

import sys

import click

from nora_spectra.cli.analyze import format_in_option
from nora_spectra.io.writing import TAG_OF_NAME
from nora_spectra.render.resize import RESIZE_FORMATS

__all__ = ["command"]


@click.command("resize")
@click.argument("checkpoint", metavar="CKPT")
@click.option("-o", "--output", type=click.Path(), help="The resized checkpoint: a directory (PEFT) or a file (bare .safetensors).")
@click.option("--rank", type=int, help="Uniform rank K (never above a module's current rank).")
@click.option("--energy", type=float, help="Per module, the smallest k keeping this share of ||dW||_F^2, in (0, 1].")
@click.option("--sv-ratio", "sv_ratio", type=float, help="Per module, keep sigma_i >= sigma_1 / R (R >= 1).")
@click.option("--threshold", type=click.Choice(["optimal"]),
              help="Gavish-Donoho optimal hard threshold (assumes white noise of unknown level; docs/resize.md).")
@click.option("--dtype", type=click.Choice(["same", *TAG_OF_NAME]), default="same", show_default=True,
              help="dtype of the new factors (same: each tensor's stored dtype).")
@click.option("--format", "fmt", type=click.Choice(RESIZE_FORMATS), default="table", show_default=True,
              help="Format of the report on stdout.")
@click.option("--adapter", metavar="NAME", help="Resize the non-default adapter NAME (its sub-directory).")
@format_in_option
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option("--dry-run", is_flag=True, help="Report what would be kept and lost; write nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No warnings, messages or progress bar on stderr.")
def command(
    checkpoint: str,
    output: str | None,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    threshold: str | None,
    dtype: str,
    fmt: str,
    adapter: str | None,
    format_in: str | None,
    overwrite: bool,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Write a smaller adapter: each module's update s*B@A replaced by its best rank-k approximation.

    Choose one policy: --rank K, --energy Q, --sv-ratio R or --threshold optimal. Every module keeps at
    least rank 1; a module whose k equals its rank is copied byte for byte. PEFT directories are
    written with rank_pattern/alpha_pattern (every module keeps its scale) and load in PEFT unchanged;
    bare .safetensors files stay bare files (scale 1). NoRA adapters and DoRA layers are refused. The
    input is never modified; OUT appears only when everything succeeded. Bad input exits with code 2
    and one line on stderr.
    """
    from nora_spectra.render.resize import format_resize
    from nora_spectra.resize import resize

    result = resize(
        checkpoint, output, rank=rank, energy=energy, sv_ratio=sv_ratio, threshold=threshold, adapter=adapter,
        format=format_in, dtype=dtype, overwrite=overwrite, dry_run=dry_run,
        progress=not quiet and sys.stderr.isatty(),
    )
    if not quiet:
        for message in result.summary["warnings"]:
            click.echo(f"spectra: warning: {checkpoint}: {message}", err=True)
    click.echo(format_resize(result, fmt), nl=False)
    if not quiet and result.output is not None:
        click.echo(f"spectra: wrote {result.output}", err=True)
