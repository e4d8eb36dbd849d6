"""The one rule for every file a command writes (``-o``, ``--output``, ``--junit``, baselines, reports).

Missing parent directories are created; the file is written atomically (a temporary file in the same
directory, fsync, then rename), so an interrupted or failed command never leaves a half-written file
and never touches an existing one; a failure is a :class:`~nora_spectra.errors.UsageError` naming the
path (one line, exit code 2 in the CLI).
"""

from __future__ import annotations

import os
from pathlib import Path

from nora_core.atomic import atomic_write_bytes, atomic_write_text
from nora_spectra.errors import UsageError

__all__ = ["check_writable", "write_output"]


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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            atomic_write_bytes(target, data)
        else:
            atomic_write_text(target, data)
    except OSError as exc:
        raise UsageError(f"{os.fspath(path)}: cannot write the {what}: {exc.strerror or exc}") from None
