"""Entry point of ``spectra``: a click group whose sub-commands are imported only when invoked.

Keeping imports lazy makes ``spectra --help`` fast (no torch, pandas or matplotlib). Every command
module exposes a ``command`` attribute (a ``click.Command``). User errors (``SpectraError``) become
one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import sys

import click

from nora_spectra._text import one_line
from nora_spectra.errors import SpectraError

__all__ = ["GC_THRESHOLD", "cli", "main", "run"]

#: sub-command name -> (module, one-line help shown by ``spectra --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("nora_spectra.cli.analyze", "Per-layer spectra and rank utilization of adapter checkpoints."),
    "compare": ("nora_spectra.cli.compare", "Compare the spectra of several checkpoints module by module."),
    "report": ("nora_spectra.cli.report", "Write a self-contained HTML or Markdown report with plots."),
    "check": ("nora_spectra.cli.check", "CI gate: fail when rank utilization drops below limits."),
    "resize": ("nora_spectra.cli.resize", "Write a smaller adapter: each module's best rank-k approximation."),
    "suggest": ("nora_spectra.cli.suggest", "Suggest a rank and a per-module rank_pattern for the next run."),
    "overlap": ("nora_spectra.cli.overlap", "Subspace overlap of two adapters, module by module (LoRA paper's phi)."),
    "scan": ("nora_spectra.cli.scan", "Analyse every adapter under some directories into Parquet tables."),
    "census": ("nora_spectra.cli.census", "Write an HTML census (utilization by r, module type, base model) of a scan."),
    "demo": ("nora_spectra.cli.demo", "Build small LoRA and NoRA checkpoints and analyse them (no downloads)."),
}


class LazyGroup(click.Group):
    """A click group that imports a sub-command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, short_help = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        command = module.command
        command.short_help = command.short_help or short_help
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (module, help_) in COMMANDS.items() if importlib.util.find_spec(module)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nora-spectra")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages to stderr.")
def cli(verbose: bool) -> None:
    """spectra: how much of the rank you paid for does your adapter really use?"""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="spectra: %(message)s")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors exit with code 2 and one line on stderr."""
    try:
        code = cli.main(args=argv, prog_name="spectra", standalone_mode=False)
    except SpectraError as exc:
        click.echo(f"spectra: error: {one_line(str(exc))}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # bad option or argument: one line, like every user error
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"spectra: error: {one_line(exc.format_message())}{where}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)


#: the console script's collector thresholds (:func:`gc.set_threshold`; Python's default is (700, 10, 10)).
GC_THRESHOLD = (50_000, 20, 100)


def run() -> None:
    """The ``spectra`` console script: :func:`main` in a process of its own that ends right after it.

    Five process-wide settings that :func:`main` called in-process (a test, a notebook) does not make:

    - OpenBLAS starts without a thread pool (``OPENBLAS_NUM_THREADS=1`` unless the variable is already
      set, before numpy loads): spectra parallelizes across modules itself and runs BLAS on one
      thread during every analysis, so the pool's threads would only spin, taking a core from the
      analysis (96 ms of CPU in a 0.26 s ``spectra analyze`` at r = 16). torch's threads (OpenMP,
      MKL) are left alone;
    - glibc keeps freed factor memory for the next module instead of returning it to the operating
      system and faulting it back in (:func:`nora_spectra._allocator.keep_freed_memory`);
    - the weight space may share modules between processes forked from this one, which runs no code
      of anyone else's (:func:`nora_spectra._forked.allow_forking`; the only other thread it may have,
      tqdm's monitor, is never touched by a child);
    - the cyclic garbage collector runs after 50,000 allocations instead of 700
      (:data:`GC_THRESHOLD`): nearly every object here is either long-lived (modules, classes) or
      freed by reference counting (arrays, records), yet the default ran 63 young and 6 older
      collections during one ``spectra analyze`` (11 ms);
    - before the process exits, every object still alive is frozen (``gc.freeze()``), so interpreter
      shutdown does not walk and free, cycle by cycle, the classes, functions and modules that the
      operating system reclaims anyway: 25-45 ms of a 0.35 s ``spectra analyze`` at r = 16
      (``bench/analyze_vs_gradience.py``). Output is written and flushed by then; atexit handlers
      still run.
    """
    import os

    from nora_spectra._allocator import keep_freed_memory
    from nora_spectra._forked import allow_forking

    if "numpy" not in sys.modules:  # read once, when OpenBLAS loads
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    keep_freed_memory()
    allow_forking()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        main()
    finally:
        gc.freeze()
