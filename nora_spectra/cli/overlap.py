"""``spectra overlap A B``: how much two adapters share their singular subspaces, module by module.

Per module: the LoRA paper's phi(i, j), the principal angles between the top-k singular subspaces, and
the mean squared cosine of those angles (against k / d, what random subspaces give). The maths is the
library's (:func:`nora_spectra.overlap.overlap`); ``--plot`` writes the phi heat map of one module.
"""

from __future__ import annotations

import sys

import click

from nora_spectra.cli.analyze import format_in_option, write_result
from nora_spectra.render.overlap import OVERLAP_FORMATS

__all__ = ["command"]


@click.command("overlap")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--top-k", type=int, help="Compare the top K directions (default: all, up to the smaller rank).")
@click.option("--labels", metavar="a,b", help="Two comma-separated labels (default: path names).")
@click.option("--format", "fmt", type=click.Choice(OVERLAP_FORMATS), default="table", show_default=True,
              help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the result to FILE (atomically).")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="PNG",
              help="Also write the phi(i, j) heat map of --module (default: the first compared) as PNG.")
@click.option("--module", metavar="NAME", help="The module of --plot.")
@click.option("--adapter", metavar="NAME", help="Use the non-default adapter NAME of both checkpoints.")
@format_in_option
@click.option("-q", "--quiet", is_flag=True, help="No messages or progress bar on stderr.")
def command(
    a: str,
    b: str,
    top_k: int | None,
    labels: str | None,
    fmt: str,
    output: str | None,
    plot: str | None,
    module: str | None,
    adapter: str | None,
    format_in: str | None,
    quiet: bool,
) -> None:
    """Subspace overlap of adapters A and B, module by module (matched by name; ranks may differ).

    1 means the two updates write into (left) or read from (right) the same directions, 0 orthogonal
    ones; chance is what two random subspaces of the same sizes give. Bad input exits with code 2
    and one line on stderr.
    """
    from nora_spectra.errors import UsageError
    from nora_spectra.overlap import overlap
    from nora_spectra.render.overlap import format_overlap

    names = None if labels is None else [s.strip() for s in labels.split(",")]
    if module is not None and plot is None:
        raise UsageError("--module chooses the module of --plot; give --plot FILE.png too")
    result = overlap(a, b, top_k=top_k, labels=names, adapter=adapter, format=format_in,
                     progress=not quiet and sys.stderr.isatty())
    if plot is not None:
        from nora_spectra.outputs import write_output
        from nora_spectra.plots import figure_png

        try:
            fig = result.plot_phi(module)
        except ValueError as exc:
            raise UsageError(f"--module: {exc}") from None
        write_output(plot, figure_png(fig), "plot")
        if not quiet:
            click.echo(f"spectra: wrote {plot}", err=True)
    write_result(format_overlap(result, fmt), output, quiet=quiet)
