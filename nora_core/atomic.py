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
import sys
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_directory", "atomic_write", "atomic_write_bytes", "atomic_write_text", "fsync_directory", "replace_directory"]


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


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - old glibc or musl without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def replace_directory(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Put the finished directory ``tmp`` at ``final`` as one step; the old ``final`` (if any) is removed.

    Where ``final`` does not exist this is one ``rename``. Where it does, the two directories are swapped
    by one ``renameat2(RENAME_EXCHANGE)`` on Linux, so a reader (or a crash) sees the old directory or the
    new one, never a mix and never none; elsewhere (or on a file system without it) ``final`` is renamed
    aside and ``tmp`` renamed into place, and a crash between the two leaves ``final`` absent (with
    ``.old-*`` beside it), still never a mix. Both names must be in the same directory.
    """
    tmp, final = os.fspath(tmp), os.fspath(final)
    parent = os.path.dirname(os.path.abspath(final))
    if not os.path.lexists(final):
        os.rename(tmp, final)
        fsync_directory(parent)
        return
    if _exchange(tmp, final):
        fsync_directory(parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old directory
        return
    old = os.path.join(parent, f".old-{os.path.basename(final)}-{secrets.token_hex(6)}")
    os.replace(final, old)
    os.replace(tmp, final)
    fsync_directory(parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``path``; on a clean exit, put it at ``path`` in one step.

    Files written inside should be complete (and fsynced: :func:`atomic_write` does it) when the block
    ends; the directory is then fsynced and swapped into place by :func:`replace_directory`, so a reader
    sees the old directory or the new one, never a partial one. On an exception the temporary directory
    is removed and ``path`` is left untouched.

    Args:
        path: final directory. Its parent must exist.

    Yields:
        The temporary directory (a :class:`~pathlib.Path`).
    """
    target = Path(os.path.realpath(path))
    # the .tmp-* prefix of every temporary directory here (run_state.clean_partial removes leftovers)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    try:
        yield tmp
        fsync_directory(tmp)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
