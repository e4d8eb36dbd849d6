"""``--engine local``: a pool of worker processes on this machine, one adapter per task.

Workers are started with ``spawn`` (a fresh interpreter: nothing of the parent's threads or state)
and set single-threaded BLAS before anything loads numpy (:mod:`nora_spectra.scan._threads`). At
most two tasks per worker are in flight, so results come back as they finish and memory stays
bounded whatever the number of adapters.

A worker that dies (killed by the out-of-memory killer, a crash in a native library) breaks the
pool. The adapters that were in flight are then run again one at a time, each in a fresh
one-worker pool: one that kills its worker again gets a row with status ``error``; the others
get their results; the scan goes on with a new pool.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Deque, Sequence

from nora_spectra.scan._threads import single_threaded
from nora_spectra.scan.task import AnalysisSettings, ItemResult, ScanItem, analyse_item, error_result

__all__ = ["TASKS_PER_WORKER", "default_workers", "run_local"]

#: tasks submitted per worker ahead of the results (keeps every worker busy, bounds what is in flight).
TASKS_PER_WORKER = 2

#: the module whose ``warm_up()`` a new worker runs.
WARM_UP = "nora_spectra.scan.task"

Task = Callable[[ScanItem, AnalysisSettings], ItemResult]


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _run_pool(
    queue: Deque[ScanItem], settings: AnalysisSettings, workers: int, emit: Callable[[ItemResult], None], task: Task
) -> list[ScanItem]:
    """Run the queued items in one pool; return the items in flight if the pool broke ([] when all ran)."""
    context = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=single_threaded,
                                   initargs=(WARM_UP,))
    inflight: dict[cf.Future, ScanItem] = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < TASKS_PER_WORKER * workers:
                item = queue.popleft()
                inflight[pool.submit(task, item, settings)] = item
            done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: inflight[f].path):
                item = inflight.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    inflight[future] = item
                    raise
                except Exception as exc:  # the task could not be sent or its result not returned
                    result = error_result(item, f"internal error: {type(exc).__name__}: {exc}")
                emit(result)
    except BrokenProcessPool:
        suspects = []
        for future, item in sorted(inflight.items(), key=lambda pair: pair[1].path):
            if future.done() and future.exception() is None:
                emit(future.result())
            else:
                suspects.append(item)
        pool.shutdown(wait=True, cancel_futures=True)
        return suspects
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return []


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
        workers: worker processes (at least 1).
        task: the function a worker runs per item (tests substitute one; it must be importable).
    """
    queue: Deque[ScanItem] = collections.deque(items)
    while queue:
        suspects = _run_pool(queue, settings, min(workers, len(queue)), emit, task)
        for item in suspects:  # each alone: the one that breaks a pool by itself is the culprit
            if _run_pool(collections.deque([item]), settings, 1, emit, task):
                emit(error_result(item, "the worker process analysing it died (killed by a signal, or out of memory)"))
