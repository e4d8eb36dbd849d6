"""Exceptions a user can cause. The CLI prints them as one line on stderr and exits with code 2."""

from __future__ import annotations

import os

__all__ = ["SpectraError", "CheckpointError", "UsageError"]


class SpectraError(Exception):
    """Base class of every user-facing error in nora_spectra (exit code 2 in the CLI)."""


class CheckpointError(SpectraError, ValueError):
    """A checkpoint is missing, malformed or of an unknown format.

    Args:
        path: the file or directory at fault; it starts the message.
        problem: what is wrong with it, in a few words.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UsageError(SpectraError, ValueError):
    """Options that do not fit together or name something that does not exist."""
