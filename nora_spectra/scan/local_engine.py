"""``--engine local``: worker processes on this machine, one adapter at a time each.

Each worker is a fresh interpreter (``python -m nora_spectra.scan.worker``) started with
single-threaded BLAS in its environment (:mod:`~nora_spectra.scan._threads`), so numpy loads with one
thread whatever the parent did. Jobs and results travel over the worker's stdin and stdout
(:mod:`~nora_spectra.scan.worker`); each worker has up to :data:`PREFETCH` adapters queued (the one it
analyses and the next ones), so it does not wait for the parent to be scheduled or to finish a commit,
results come back as they finish, and memory stays bounded whatever the number of adapters.

Workers are plain subprocesses rather than a ``multiprocessing`` pool: no import of the caller's
``__main__`` in the workers (a ``spawn`` pool re-imports the calling script), an environment fixed
before the interpreter starts, and a worker that dies (the out-of-memory killer, a crash in a native
library) was analysing the first adapter it held: that adapter gets a row with status ``error`` (with
the worker's exit status and last line of stderr), those queued behind it go back to the queue, and
a new worker takes over.
If the parent is killed, the workers see their input end and exit.
"""

from __future__ import annotations

import collections
import os
import pickle
import selectors
import subprocess
import sys
import tempfile
from typing import IO, Callable, Deque, Sequence

from nora_spectra.scan._threads import worker_environment
from nora_spectra.scan.task import AnalysisSettings, ItemResult, ScanItem, analyse_item, error_result
from nora_spectra.scan.worker import DEFAULT_TASK, read_message, write_message

__all__ = ["default_workers", "run_local"]

Task = Callable[[ScanItem, AnalysisSettings], ItemResult]

#: adapters queued in each worker: the next ones are already in its pipe when it finishes one, so a busy
#: machine's delay in scheduling this process (or a commit's fsyncs) does not leave the worker idle.
PREFETCH = 4

#: bytes of a dead worker's stderr quoted in the error row (its last line).
_STDERR_TAIL = 4096


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _task_spec(task: Task) -> str:
    return f"{task.__module__}:{task.__qualname__}"


class _Worker:
    """One worker process and the adapter it holds."""

    def __init__(self, spec: str, env: dict[str, str]) -> None:
        self.stderr: IO[bytes] = tempfile.TemporaryFile()
        command = [sys.executable, "-m", "nora_spectra.scan.worker"]
        if spec != DEFAULT_TASK:
            command += ["--task", spec]
        # unbuffered: results are read as select() reports them, none hidden in a reader's buffer
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, env=env, close_fds=True, bufsize=0)
        self.inflight: Deque[ScanItem] = collections.deque()  # sent, no result yet; the first is being analysed
        self.sent = 0

    def send(self, item: ScanItem, settings: AnalysisSettings) -> bool:
        """Queue ``item`` in the worker; False (and nothing queued) when it is already dead."""
        try:
            write_message(self.process.stdin, pickle.dumps((item, settings), protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, OSError):
            return False
        self.inflight.append(item)
        self.sent += 1
        return True

    def receive(self) -> ItemResult | None:
        """The result of the first adapter in flight, or None when the worker died before sending it."""
        message = read_message(self.process.stdout)
        if message is None:
            return None
        self.inflight.popleft()
        return pickle.loads(message)

    def death(self) -> str:
        """How the worker died: exit status and the last line it wrote to stderr."""
        code = self.process.wait()
        status = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - _STDERR_TAIL))
        lines = [line.strip() for line in self.stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return status + (f": {lines[-1]}" if lines else "")

    def stop(self, *, kill: bool = False) -> None:
        if kill and self.process.poll() is None:
            self.process.kill()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.process.wait()  # its input closed, a worker exits at once (a timed wait would poll)
        self.stderr.close()


def run_local(
    items: Sequence[ScanItem],
    settings: AnalysisSettings,
    emit: Callable[[ItemResult], None],
    *,
    workers: int,
    task: Task = analyse_item,
) -> None:
    """Analyse ``items`` on ``workers`` processes; ``emit`` gets every result in the calling thread.

    Args:
        items: the adapters to analyse.
        settings: the analysis options.
        emit: called once per item with its :class:`ItemResult` (order of completion).
        workers: worker processes (at least 1; never more than items).
        task: the function a worker runs per item: a module-level function importable by the worker
            (tests substitute one).
    """
    queue: Deque[ScanItem] = collections.deque(items)
    spec = _task_spec(task)
    env = worker_environment()
    if spec != DEFAULT_TASK:  # a task outside the package: the worker imports it like this process does
        env["PYTHONPATH"] = os.pathsep.join([p or os.getcwd() for p in sys.path])
    pool: list[_Worker] = []
    selector = selectors.DefaultSelector()

    def replace(worker: _Worker) -> _Worker:
        if worker.inflight:
            selector.unregister(worker.process.stdout)
        pool.remove(worker)
        worker.stop(kill=True)
        fresh = _Worker(spec, env)
        pool.append(fresh)
        return fresh

    def fill(worker: _Worker) -> None:
        """Keep :data:`PREFETCH` adapters queued in the worker (a new worker replaces one found dead)."""
        while queue and len(worker.inflight) < PREFETCH:
            item = queue.popleft()
            if worker.send(item, settings):
                if len(worker.inflight) == 1:
                    selector.register(worker.process.stdout, selectors.EVENT_READ, worker)
                continue
            if worker.inflight:
                queue.appendleft(item)  # its death shows when the adapters it holds come back
                return
            if worker.sent:  # it died idle: a new worker takes the adapter
                queue.appendleft(item)
            else:  # a new worker that could not take its first adapter: no endless restarts
                emit(error_result(item, f"no worker process could take it ({worker.death()})"))
            worker = replace(worker)

    try:
        for _ in range(min(workers, len(queue))):
            pool.append(_Worker(spec, env))
        for worker in list(pool):
            fill(worker)
        while selector.get_map():
            for key, _ in selector.select():
                worker: _Worker = key.data
                item = worker.inflight[0]
                result = worker.receive()
                if result is None:  # it died analysing ``item``; the adapters queued behind it go back
                    emit(error_result(item, f"the worker process analysing it died ({worker.death()})"))
                    queue.extendleft(reversed(list(worker.inflight)[1:]))
                    worker = replace(worker)
                    fill(worker)
                    continue
                emit(result)
                if not worker.inflight:
                    selector.unregister(worker.process.stdout)
                fill(worker)
    finally:
        kill = bool(selector.get_map())  # interrupted: the workers still busy are ended
        for worker in pool:
            worker.stop(kill=kill)
        selector.close()
