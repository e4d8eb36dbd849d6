"""Atomic file and directory writes: write a temporary one beside the target, then rename it.

An interrupted run (Ctrl-C, SIGKILL, a full disk) never leaves a half-written checkpoint or
report behind: readers see either the old file or the complete new one. A directory is written as a
whole (:func:`atomic_directory`): every file inside is complete before the directory gets its name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_directory", "atomic_write", "atomic_write_bytes", "atomic_write_text"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit, fsync it and rename it onto ``path``.

    A symlink at ``path`` is followed (its target is replaced, the link stays). The new file keeps the
    permissions of the file it replaces; a new file gets ``0666 & ~umask``, as ``open()`` would give.

    Args:
        path: final destination. Its parent directory must exist.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).

    Yields:
        The open temporary file. On an exception it is removed and ``path`` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    target = Path(os.path.realpath(path))
    try:
        keep_mode: int | None = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        keep_mode = None
    tmp_name = str(target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp")
    # os.open applies the umask to 0o666 itself (mkstemp would force 0600).
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if keep_mode is not None:
            os.chmod(tmp_name, keep_mode)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def _fsync_directory(path: Path) -> None:
    """Flush a directory's entries to disk (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform dependent
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - platform dependent
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``path``; on a clean exit, rename it onto ``path``.

    Files written inside should be complete (and fsynced: :func:`atomic_write` does it) when the block
    ends; the directory is then fsynced and renamed into place. An existing ``path`` (a directory) is
    first renamed aside and removed only after the new one is in place, so a reader sees the old
    directory, then the new one, and never a partial one (for the instant between the two renames,
    none). On an exception the temporary directory is removed and ``path`` is left untouched.

    Args:
        path: final directory. Its parent must exist.

    Yields:
        The temporary directory (a :class:`~pathlib.Path`).
    """
    target = Path(os.path.realpath(path))
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp)
    try:
        yield tmp
        _fsync_directory(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.{secrets.token_hex(6)}.old"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        _fsync_directory(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
