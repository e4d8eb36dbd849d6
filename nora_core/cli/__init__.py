"""The ``nora`` command (a face over ``nora_core`` and ``nora_spectra``); see :mod:`nora_core.cli.main`."""

from nora_core.cli.main import cli, main

__all__ = ["cli", "main"]
