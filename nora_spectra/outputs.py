"""The one rule for every file a command writes (``-o``, ``--output``, ``--junit``, baselines, reports).

Missing parent directories are created; the file is written atomically (a temporary file in the same
directory, fsync, then rename), so an interrupted or failed command never leaves a half-written file
and never touches an existing one; a failure is a :class:`~nora_spectra.errors.UsageError` naming the
path (one line, exit code 2 in the CLI). Large files are streamed into the temporary file
(:func:`output_stream`); a directory (a resized adapter) is written whole in a temporary directory
and renamed into place (:func:`output_directory`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator

from nora_core.atomic import atomic_directory, atomic_write, atomic_write_bytes, atomic_write_text
from nora_spectra.errors import UsageError

__all__ = ["check_writable", "output_directory", "output_stream", "write_output"]


def check_writable(path: "str | os.PathLike[str]", what: str = "output") -> Path:
    """Refuse early a target that can never be written (a directory), before any work is done.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UsageError: ``path`` is an existing directory.
    """
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{os.fspath(path)}: cannot write the {what}: it is a directory")
    return target


@contextlib.contextmanager
def _wrapped(path: "str | os.PathLike[str]", what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise UsageError(f"{os.fspath(path)}: cannot write the {what}: {exc.strerror or exc}") from None


def write_output(path: "str | os.PathLike[str]", data: "str | bytes", what: str = "output") -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path``: parents created, atomically.

    Args:
        path: the target file.
        data: its whole content.
        what: how the file is named in an error message (``output``, ``baseline``, ``JUnit report``).

    Raises:
        UsageError: the file cannot be written (the message names it and the reason).
    """
    target = check_writable(path, what)
    with _wrapped(path, what):
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            atomic_write_bytes(target, data)
        else:
            atomic_write_text(target, data)


@contextlib.contextmanager
def output_stream(path: "str | os.PathLike[str]", what: str = "output") -> Iterator[IO[bytes]]:
    """An open binary file that becomes ``path`` when the block ends cleanly (parents created, atomic).

    Raises:
        UsageError: the file cannot be written (the message names it and the reason); an exception in
            the block leaves ``path`` untouched.
    """
    target = check_writable(path, what)
    with _wrapped(path, what):
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, "wb") as handle:
            yield handle


@contextlib.contextmanager
def output_directory(path: "str | os.PathLike[str]", what: str = "output") -> Iterator[Path]:
    """A temporary directory that becomes the directory ``path`` when the block ends cleanly.

    Missing parents are created; an existing directory at ``path`` is replaced only once the new one is
    complete (:func:`nora_core.atomic.atomic_directory`).

    Raises:
        UsageError: ``path`` is an existing file, or the directory cannot be written.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{os.fspath(path)}: cannot write the {what}: it is a file, not a directory")
    with _wrapped(path, what):
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(target) as tmp:
            yield tmp
