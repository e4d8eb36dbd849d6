"""``--engine local``: worker processes on this machine, one adapter at a time each.

Each worker is a fresh interpreter (``python -m nora_spectra.scan.worker``) started with
single-threaded BLAS in its environment (:mod:`~nora_spectra.scan._threads`), so numpy loads with one
thread whatever the parent did. Jobs and results travel over the worker's stdin and stdout
(:mod:`~nora_spectra.scan.worker`); the parent sends a worker its next adapter as soon as it returns
a result, so results come back as they finish and memory stays bounded whatever the number of
adapters.

Workers are plain subprocesses rather than a ``multiprocessing`` pool: no import of the caller's
``__main__`` in the workers (a ``spawn`` pool re-imports the calling script), an environment fixed
before the interpreter starts, and a worker that dies (the out-of-memory killer, a crash in a native
library) is known to have been holding exactly one adapter: that adapter gets a row with status
``error`` (with the worker's exit status and last line of stderr) and a new worker takes the next one.
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
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, env=env, close_fds=True)
        self.item: ScanItem | None = None

    def send(self, item: ScanItem, settings: AnalysisSettings) -> bool:
        """Give the worker ``item``; False when it is already dead."""
        self.item = item
        try:
            write_message(self.process.stdin, pickle.dumps((item, settings), protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, OSError):
            return False
        return True

    def receive(self) -> ItemResult | None:
        """The result of the held adapter, or None when the worker died before sending it."""
        message = read_message(self.process.stdout)
        return None if message is None else pickle.loads(message)

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
        pool.remove(worker)
        worker.stop(kill=True)
        fresh = _Worker(spec, env)
        pool.append(fresh)
        return fresh

    def start_next(worker: _Worker) -> None:
        """Send the next queued adapter (to a new worker if this one died while idle)."""
        if not queue:
            return
        item = queue.popleft()
        if not worker.send(item, settings):
            worker = replace(worker)
            if not worker.send(item, settings):
                emit(error_result(item, f"no worker process could take it ({worker.death()})"))
                return start_next(replace(worker))
        selector.register(worker.process.stdout, selectors.EVENT_READ, worker)

    try:
        for _ in range(min(workers, len(queue))):
            pool.append(_Worker(spec, env))
        for worker in list(pool):
            start_next(worker)
        while selector.get_map():
            for key, _ in selector.select():
                worker: _Worker = key.data
                selector.unregister(key.fileobj)
                item = worker.item
                result = worker.receive()
                if result is None:
                    emit(error_result(item, f"the worker process analysing it died ({worker.death()})"))
                    if queue:
                        start_next(replace(worker))
                    continue
                emit(result)
                start_next(worker)
    finally:
        kill = bool(selector.get_map())  # interrupted: the workers still busy are ended
        for worker in pool:
            worker.stop(kill=kill)
        selector.close()
