"""A local scan worker: ``python -m nora_spectra.scan.worker [--task MODULE:FUNCTION]``.

Reads jobs from stdin and writes results to stdout, each message an 8-byte little-endian length then
a pickle: a job is ``(ScanItem, AnalysisSettings)``, a result the task's
:class:`~nora_spectra.scan.task.ItemResult`. The process exits at the end of its input. The pickles
come only from the scan that started this process through its private pipes (never from a user's
file). The results keep the original stdout descriptor; file descriptor 1 is pointed at stderr, so
nothing the analysis code prints (Python or a C library) can corrupt them.

The parent (:mod:`~nora_spectra.scan.local_engine`) starts it with single-threaded BLAS in its
environment, so numpy loads with one thread.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from typing import BinaryIO, Callable

__all__ = ["DEFAULT_TASK", "main", "read_message", "write_message"]

#: the function a worker runs per job unless ``--task`` names another.
DEFAULT_TASK = "nora_spectra.scan.task:analyse_item"

_HEADER = 8


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes, fewer only at the end of the stream (a raw pipe returns what it has)."""
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(stream: BinaryIO) -> bytes | None:
    """The next message's bytes, or None at the end of the stream (or a message cut short).

    The parent reads unbuffered pipes (a buffered reader could pull a second message into its buffer,
    where ``select`` would not see it).
    """
    header = _read_exactly(stream, _HEADER)
    if len(header) < _HEADER:
        return None
    size = int.from_bytes(header, "little")
    data = _read_exactly(stream, size)
    return data if len(data) == size else None


def write_message(stream: BinaryIO, data: bytes) -> None:
    """Write one message (length, then ``data``) whole, and flush."""
    view = memoryview(len(data).to_bytes(_HEADER, "little") + data)
    while view:
        written = stream.write(view)
        view = view[written if written is not None else len(view):]
    stream.flush()


def _task(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    target = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def main(argv: list[str] | None = None) -> int:
    """Serve jobs until stdin ends; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    spec = args[1] if len(args) == 2 and args[0] == "--task" else DEFAULT_TASK
    jobs = sys.stdin.buffer
    sys.stdout.flush()
    results = os.fdopen(os.dup(1), "wb")  # results get a descriptor of their own ...
    os.dup2(2, 1)  # ... and whatever prints to stdout (Python or C code) goes to stderr
    from nora_spectra.scan.task import warm_up

    warm_up()  # the imports are paid now, not in the first adapter's ``seconds``
    task = _task(spec)
    while (message := read_message(jobs)) is not None:
        item, settings = pickle.loads(message)
        write_message(results, pickle.dumps(task(item, settings), protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    from nora_spectra._allocator import keep_freed_memory

    keep_freed_memory()  # a process of ours: the factors' memory is reused from module to module
    sys.exit(main())
