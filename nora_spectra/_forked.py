"""``forked_map``: ``map`` over items shared between this process and forked copies of it (Linux).

A weight-space analysis spends about a third of its time in Python between the GIL-free steps (reads,
casts, Gram products): with threads that third runs one thread at a time, and on the bench's r = 16
adapter two threads measured 0.114 s against 0.118 s for one. Processes share no interpreter: two of
them took 0.078 s per analysis between them. So where this process is ours (the ``spectra`` console
script calls :func:`allow_forking`) and the platform forks cleanly (Linux), the modules are shared
between this process and ``processes - 1`` children forked from it; a library caller (a notebook, a
test) keeps the thread pool, since forking a process whose other threads may hold locks is not ours
to decide.

Each child takes every ``processes``-th item, runs ``work`` on its share, and streams each result
back through a pipe as soon as it has it (length-prefixed pickles; results are plain data), then
leaves with ``os._exit`` (no atexit handlers, no flushing of the parent's buffers). The parent runs
its own share and yields every result in item order. A child that fails at an item (an exception, a
crash, being killed) is not trusted further: the parent computes the rest of that child's share
itself, so an exception is raised in the parent at the item's turn, exactly as without children. When
the consumer stops early, the children are killed and reaped.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

__all__ = ["allow_forking", "forked_map", "forking_allowed"]

_T = TypeVar("_T")
_R = TypeVar("_R")

_ALLOWED = False
_HEADER = struct.Struct("<Q")


def allow_forking() -> None:
    """Let :func:`forking_allowed` say yes in this process (the console script's own process)."""
    global _ALLOWED
    _ALLOWED = True


def forking_allowed() -> bool:
    """Whether :func:`forked_map` may be used here: allowed by this process's owner, Linux, and no torch
    loaded (a legacy ``.bin`` checkpoint is read with torch, whose OpenMP thread pool does not survive
    a fork: a child that used it could hang)."""
    return _ALLOWED and sys.platform.startswith("linux") and hasattr(os, "fork") and "torch" not in sys.modules


def forked_map(work: Callable[[Iterable[_T]], Iterator[_R]], items: Sequence[_T], processes: int) -> Iterator[_R]:
    """``work(items)`` with the items shared round-robin between this process and ``processes - 1``
    forked children, the results yielded in item order.

    Args:
        work: maps an iterable of items to an iterator of one result per item, in order (it may hold
            a few results back, e.g. to finish them together).
        items: the items.
        processes: how many processes share them, this one included (1: no child).

    Raises:
        Whatever ``work`` raises for an item, at that item's turn.
    """
    shares = [items[k::processes] for k in range(processes)]
    children: dict[int, tuple[int, int]] = {}  # share -> (pid, read end of its pipe)
    try:
        for k in range(1, min(processes, len(items))):
            children[k] = _fork_child(work, shares[k])
        streams: dict[int, Iterator[Any]] = {0: iter(work(shares[0]))}
        for k, (pid, fd) in children.items():
            streams[k] = _from_child(fd, pid, work, shares[k])
        for index in range(len(items)):
            yield next(streams[index % processes])
    finally:
        for pid, fd in children.values():
            os.close(fd)
            try:
                os.kill(pid, signal.SIGKILL)  # no-op for a child that already left
            except ProcessLookupError:  # pragma: no cover - reaped elsewhere
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # pragma: no cover - reaped elsewhere
                pass


def _fork_child(work: Callable[[Iterable[_T]], Iterator[_R]], share: Sequence[_T]) -> tuple[int, int]:
    """Fork a child that streams ``work(share)`` into a pipe; returns its pid and the pipe's read end."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.close(read_end)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent handles Ctrl-C and kills us
            with os.fdopen(write_end, "wb") as out:
                sent = 0
                try:
                    for result in work(share):
                        _send(out, (True, result))
                        sent += 1
                except BaseException:  # the parent computes this item itself and raises there
                    _send(out, (False, sent))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def _send(out: Any, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def _from_child(fd: int, pid: int, work: Callable[[Iterable[_T]], Iterator[_R]], share: Sequence[_T]) -> Iterator[_R]:
    """The child's results in order; from the first item it did not deliver, the parent's own."""
    received = 0
    with os.fdopen(os.dup(fd), "rb") as stream:
        while received < len(share):
            message = _receive(stream)
            if message is None or not message[0]:
                break
            received += 1
            yield message[1]
    yield from work(share[received:])


def _receive(stream: Any) -> Any:
    """One message, or None at the end of the stream (the child left, or died mid-message)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)
