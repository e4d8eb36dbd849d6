"""Find every adapter under a set of roots by asking the reader registry's sniffers.

Nothing here knows a format: a path is an adapter when a registered format claims it
(:func:`nora_spectra.io.registry.detect_format`), so a format added under ``io/formats/`` is found
without a change here. The walk follows symbolic links but visits each directory once (by device and
inode), so a link back to an ancestor neither loops nor counts an adapter twice.

Rules, for a directory ``D`` met on the walk:

* ``D`` claimed by a format is one adapter (a PEFT directory), and the files directly inside it are
  its own parts, not adapters of their own; its sub-directories are still walked (PEFT's named
  adapters live in sub-directories and are adapters of their own). Exception: a claimed ``D`` none
  of whose files is claimed by ``D``'s own format, but one of whose sub-directories is claimed, is a
  container of adapters (PEFT's layout of named adapters without a default, or a tree of adapter
  directories with loose adapter files beside them), not an adapter itself: it is treated as
  unclaimed.
* ``D`` not claimed (or a container): every file directly inside it that a format claims is an adapter (a bare
  ``.safetensors`` file).
* A path a sniffer cannot judge because it is broken (a corrupt safetensors header, two formats
  claiming it) is an adapter that will fail: it becomes a row with status ``error`` and the reader's
  message, not a silent omission.
* So is a directory holding ``adapter_config.json`` (PEFT's layout, shared by several formats) that
  no format claims, typically because the config is not valid JSON.
* An entry that cannot be examined at all (a symbolic link loop, a dangling link, a directory that
  cannot be listed) is a row with status ``error`` and what was wrong (``problem``).
* The same file reached twice (two links, or a weights file that is also the target of a link inside
  an adapter directory, as in a Hugging Face cache) is one adapter: the first path in sorted order.

Roots are walked in sorted order and the result is sorted by path, so two scans of one tree list the
same adapters in the same order.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from typing import Iterable

from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.io.peft import CONFIG_NAME
from nora_spectra.io.registry import detect_format, formats

__all__ = ["Found", "discover"]


@dataclasses.dataclass(frozen=True)
class Found:
    """A path to analyse.

    Attributes:
        path: absolute path (links not resolved: the path as it appears under the root).
        is_dir: it is a directory adapter (its content key covers the files directly inside it).
        problem: why the path cannot even be examined (a link loop, ...), or None.
    """

    path: str
    is_dir: bool = False
    problem: str | None = None


class _Walker:
    def __init__(self, skip: Iterable[str]) -> None:
        self.skip = {os.path.realpath(p) for p in skip}
        self.visited: set[tuple[int, int]] = set()  # per root (a root inside another is walked again)
        self.claims: dict[str, "str | CheckpointError | None"] = {}
        self.listings: dict[str, list[str]] = {}  # directory -> its entries, as listed on the walk

    def claim(self, path: str) -> "str | CheckpointError | None":
        """The format claiming ``path``, None, or the CheckpointError a sniffer raised (cached per path)."""
        if path not in self.claims:
            try:
                self.claims[path] = detect_format(path)
            except CheckpointError as exc:
                self.claims[path] = exc
            except (OSError, RecursionError, ValueError) as exc:  # a sniffer that should not have raised
                self.claims[path] = CheckpointError(path, f"cannot be examined: {exc}")
        return self.claims[path]

    def walk(self, root: str) -> list[Found]:
        found: list[Found] = []
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                info = os.stat(directory)
            except OSError as exc:
                found.append(Found(directory, problem=_stat_problem(directory, exc)))
                continue
            if (info.st_dev, info.st_ino) in self.visited or os.path.realpath(directory) in self.skip:
                continue
            self.visited.add((info.st_dev, info.st_ino))
            try:
                entries = self.listings[directory] = sorted(os.listdir(directory))
            except OSError as exc:
                found.append(Found(directory, is_dir=True, problem=f"cannot list the directory: {exc.strerror or exc}"))
                continue
            subdirs, files = [], []
            for name in entries:
                path = os.path.join(directory, name)
                try:
                    mode = os.stat(path).st_mode
                except OSError as exc:
                    found.append(Found(path, problem=_stat_problem(path, exc)))
                    continue
                if stat.S_ISDIR(mode):
                    subdirs.append(path)
                elif stat.S_ISREG(mode):
                    files.append(path)
                # FIFOs, sockets and devices are never adapters (and opening a FIFO would block)
            found.extend(self._classify(directory, files, subdirs))
            stack.extend(reversed(subdirs))
        return found

    def _classify(self, directory: str, files: list[str], subdirs: list[str]) -> list[Found]:
        own = self.claim(directory)
        if own is not None:
            own_files = [f for f in files if self.claim(f) == own or isinstance(own, CheckpointError)]
            container = not own_files and any(self.claim(s) is not None for s in subdirs)
            if not container:
                return [Found(directory, is_dir=True)]
        out = [Found(f) for f in files if self.claim(f) is not None]
        if own is None and not out and CONFIG_NAME in {os.path.basename(f) for f in files}:
            return [Found(directory, is_dir=True)]  # an unclaimed PEFT-layout directory: its reader says why
        return out


def _stat_problem(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"dangling symbolic link (to {os.readlink(path)})"
    return f"cannot be examined: {exc.strerror or exc}"


def discover(roots: Iterable["str | os.PathLike[str]"], *, skip: Iterable[str] = ()) -> list[Found]:
    """Every adapter under ``roots`` (files and directories), each once, sorted by path.

    Args:
        roots: directories to walk, or adapter files/directories themselves.
        skip: directories never to enter (the scan's own output directory).

    Returns:
        The adapters found, including those that will fail (``problem`` set, or a path whose sniffing
        raised: its analysis reports the reader's error).

    Raises:
        UsageError: a root does not exist, or holds no adapter of any registered format.
    """
    walker = _Walker(skip)
    found: list[Found] = []
    for root in sorted({os.path.abspath(os.fspath(r)) for r in roots}):
        if not os.path.lexists(root):
            raise UsageError(f"{root}: no such file or directory")
        if os.path.isdir(root):
            walker.visited = set()
            here = walker.walk(root)
        elif os.path.isfile(root):
            here = [Found(root)] if walker.claim(root) is not None else []
        else:
            try:
                os.stat(root)
                problem = "not a regular file or directory"
            except OSError as exc:
                problem = _stat_problem(root, exc)
            raise UsageError(f"{root}: {problem}")
        if not here:
            raise UsageError(f"{root}: no adapter found (formats looked for: {', '.join(formats())})")
        found.extend(here)
    return _unique(found, walker.listings)


def _unique(found: list[Found], listings: dict[str, list[str]]) -> list[Found]:
    """One entry per adapter: by path, then by the real file behind a file adapter (a file that is a part
    of a directory adapter, or reached by a second link, is not an adapter of its own)."""
    ordered = sorted({f.path: f for f in found}.values(), key=lambda f: f.path)
    files = {item.path: os.path.realpath(item.path) for item in ordered if not item.is_dir and item.problem is None}
    wanted = set(files.values())
    inside_dirs: set[str] = set()
    for item in ordered if wanted else ():
        if item.is_dir and item.problem is None:
            try:
                names = listings[item.path] if item.path in listings else os.listdir(item.path)
            except OSError:
                continue
            real_dir = os.path.realpath(item.path)
            for name in names:
                member = os.path.join(item.path, name)
                real = os.path.realpath(member) if os.path.islink(member) else os.path.join(real_dir, name)
                if real in wanted:
                    inside_dirs.add(real)
    out, seen = [], set()
    for item in ordered:
        if item.path not in files:
            out.append(item)
            continue
        real = files[item.path]
        if real in seen or real in inside_dirs:
            continue
        seen.add(real)
        out.append(item)
    return out
