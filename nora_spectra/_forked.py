"""``forked_map``: ``map`` over items shared between this process and forked copies of it (Linux).

A weight-space analysis spends about a third of its time in Python between the GIL-free steps (reads,
casts, Gram products): with threads that third runs one thread at a time, and on the bench's r = 16
adapter two threads measured 0.114 s against 0.118 s for one. Processes share no interpreter: two of
them took 0.078 s per analysis between them. So where this process is ours (the ``spectra`` console
script calls :func:`allow_forking`) and the platform forks cleanly (Linux), the modules are shared
between this process and ``processes - 1`` children forked from it; a library caller (a notebook, a
test) keeps the thread pool, since forking a process whose other threads may hold locks is not ours
to decide.

The items are cut into consecutive chunks, one per process. Each child runs ``work`` on its chunk
and streams each result back through a pipe as soon as it has it (length-prefixed pickles of plain
data, from our own process; the pipe is widened to 1 MiB), then leaves with ``os._exit`` (no atexit
handlers, no flushing of the parent's buffers). The parent runs the first chunk, yielding its results
as they come, then collects the children's in order; whenever the next one is not there yet, it takes
the last item of that chunk that is not taken and measures it itself, so a child slowed down by
another program hands the rest of its chunk back instead of holding the analysis up (the child may
measure an item twice over; only the first result counts, and all are equal). A child that fails at
an item (an exception, a crash, being killed) is not trusted further: the parent measures the rest
of its chunk itself, so an exception is raised in the parent at its item's turn, exactly as without
children. When the consumer stops early, the children are killed and reaped.
"""

from __future__ import annotations

import os
import pickle
import select
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
    """``work(items)`` with the items shared between this process and ``processes - 1`` forked children,
    the results yielded in item order.

    The items are cut into ``processes`` consecutive chunks; this process runs the first (its results
    are yielded as they come) and each child one of the others. Then this process collects the
    children's results in order and, whenever the next one is not ready, takes the last item of that
    child's chunk that neither has started and measures it itself: a child slowed down by another
    program on the machine hands over the rest of its chunk instead of holding everyone back.

    Args:
        work: maps an iterable of items to an iterator of one result per item, in order (it may hold
            a few results back, e.g. to finish them together).
        items: the items.
        processes: how many processes share them, this one included (1: no child).

    Raises:
        Whatever ``work`` raises for an item, at that item's turn.
    """
    count = len(items)
    processes = max(1, min(processes, count))
    bounds = [count * k // processes for k in range(processes + 1)]
    children: list[_Child] = []
    try:
        if count:  # the first item here first: what it imports or loads on first use, the children inherit
            yield from work(items[:1])
        for k in range(1, processes):
            try:
                children.append(_Child(work, items, bounds[k], bounds[k + 1]))
            except OSError:  # no fork here (a sandbox, no memory): this process measures the rest
                break
        yield from work(items[1 : bounds[1]])
        for child in children:
            yield from child.results()
        yield from work(items[bounds[len(children) + 1] :])
    finally:
        for child in children:
            child.close()


class _Child:
    """A forked process measuring ``items[start:stop]``, and what this process took back from its end."""

    def __init__(self, work: Callable[[Iterable[_T]], Iterator[_R]], items: Sequence[_T], start: int, stop: int) -> None:
        """Raises OSError when the process cannot be forked (nothing is left open then)."""
        self.work, self.items, self.start, self.stop = work, items, start, stop
        self.pid, self.fd = _fork_child(work, items[start:stop])

    def results(self) -> Iterator[Any]:
        """The chunk's results in order: the child's while they come in time, the rest measured here."""
        received = self.start  # the next item whose result is due from the child
        taken = self.stop  # items[taken:stop] are measured here, last first
        done: dict[int, tuple[bool, Any]] = {}
        while received < taken:
            if not _ready(self.fd):
                taken -= 1
                done[taken] = _measure_one(self.work, self.items[taken])
                continue
            message = _receive(self.fd)
            if message is None or not message[0]:  # the child failed at `received`, or died: not trusted further
                yield from self.work(self.items[received:taken])
                break
            received += 1
            yield message[1]
        for index in range(taken, self.stop):
            ok, value = done[index]
            if not ok:
                raise value
            yield value

    def close(self) -> None:
        os.close(self.fd)
        try:
            os.kill(self.pid, signal.SIGKILL)  # it may still be measuring items taken back from it
        except ProcessLookupError:  # pragma: no cover - reaped elsewhere
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:  # pragma: no cover - reaped elsewhere
            pass


def _measure_one(work: Callable[[Iterable[_T]], Iterator[_R]], item: _T) -> tuple[bool, Any]:
    """``(True, result)`` of one item, or ``(False, exception)`` to raise at its turn."""
    try:
        return True, next(iter(work([item])))
    except Exception as exc:  # raised at the item's turn; KeyboardInterrupt and the like at once
        return False, exc


def _ready(fd: int) -> bool:
    """Whether the pipe has data (or its end) to read now."""
    return bool(select.select([fd], [], [], 0)[0])


def _fork_child(work: Callable[[Iterable[_T]], Iterator[_R]], share: Sequence[_T]) -> tuple[int, int]:
    """Fork a child that streams ``work(share)`` into a pipe; returns its pid and the pipe's read end."""
    read_end, write_end = os.pipe()
    _widen(write_end)
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # the child: never returns
        status = 1
        try:
            _die_with(parent)
            os.close(read_end)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent handles Ctrl-C and kills us
            with os.fdopen(write_end, "wb") as out:
                sent = 0
                try:
                    for result in work(share):
                        _send(out, (True, result))
                        sent += 1
                except BaseException:  # the parent measures this item itself and raises there
                    _send(out, (False, sent))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def _die_with(parent: int) -> None:
    """Have the kernel kill this child when its parent dies (``PR_SET_PDEATHSIG``): a parent killed by
    SIGTERM or SIGKILL runs no cleanup, and a child holding its results back would otherwise go on,
    keeping the caller's stdout open, until its chunk is done."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux's C library
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _widen(fd: int) -> None:
    """Give the pipe room for a whole chunk's results (1 MiB), so a child rarely waits for the reader."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):  # pragma: no cover - the default size (64 KiB) only costs some waiting
        pass


def _send(out: Any, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def _receive(fd: int) -> Any:
    """One message, or None at the end of the pipe (the child left, or died mid-message)."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    data = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes from the pipe (waiting for them), or None when it ends first."""
    parts = []
    while size:
        part = os.read(fd, size)
        if not part:
            return None
        parts.append(part)
        size -= len(part)
    return b"".join(parts)
