"""The ``nora`` command: ``nora train``, ``nora pretrain`` and ``nora demo``.

Logs and the progress bar go to stderr, results to stdout. A user error (bad option, missing or
malformed file, a non-finite loss) is one line on stderr and exit code 2. Each command lives in its
own module of this package; this one holds the group and the entry point. The ``nora`` command is a
face: it may wire ``nora_core`` and ``nora_spectra`` together (spectral tracking, the demo's report);
the ``nora_core`` library below it never imports ``nora_spectra``.
"""

from __future__ import annotations

import logging
import sys

import click

from nora_core.cli._common import one_line, user_errors, with_config

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="-v: progress messages, -vv: debug.")
def cli(verbose: int) -> None:
    """nora: fine-tune LoRA and NoRA adapters, and track their spectra while training."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="nora: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors exit with code 2 and one line on stderr."""
    try:
        cli.main(args=argv, prog_name="nora", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:  # plain `nora`: the help, as click prints it
        exc.show()
        sys.exit(2)
    except click.ClickException as exc:
        # click's usage errors (missing option, bad value, unknown option) print usage, a hint and the
        # error on four lines; a user error of `nora` is one line
        click.echo(f"nora: error: {with_config(one_line(exc.format_message()), getattr(exc, 'ctx', None))}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        click.echo(
            "nora: error: nora needs torch, which is not installed: pip install 'nora-spectra[torch]' "
            "(the CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu)",
            err=True,
        )
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(130)
    except user_errors() as exc:
        click.echo(f"nora: error: {one_line(str(exc))}", err=True)
        sys.exit(2)




def _register() -> None:
    from nora_core.cli.demo import demo_command
    from nora_core.cli.pretrain import pretrain_command
    from nora_core.cli.train import train_command

    for command in (train_command, pretrain_command, demo_command):
        cli.add_command(command)


_register()
