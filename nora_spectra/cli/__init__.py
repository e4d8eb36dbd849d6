"""The ``spectra`` command line: a thin click group; each command lives in its own module."""

__all__ = ["main"]


def main() -> None:  # pragma: no cover - thin re-export for ``python -m nora_spectra.cli``
    from nora_spectra.cli.main import run

    run()
