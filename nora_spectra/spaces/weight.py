"""Weight space: the exact spectrum of each module's update (``s * B @ A`` for LoRA and NoRA).

``prepare(source, adapter=None, format="auto")`` opens the checkpoint (validating everything from
headers); :meth:`WeightRun.layers` then reads each module and computes its singular values with
:func:`nora_spectra.spectrum.spectrum`, whatever the kind of update.

Modules are measured by a small pool of threads (one per available core, at most
:data:`MAX_WORKERS`), each reading one module (the safetensors reader opens the file anew at the
tensor's offset and upcasts to float64 block by block) and computing its spectrum while the others
do the same, so reading overlaps arithmetic and a 2-core machine does about twice the work of one
thread. The heavy steps (file reads, casts, the Gram
products, Householder QR) release the GIL. BLAS is limited to one thread for the whole run
(:func:`~nora_spectra.spectrum.blas_threads`): the products are too small to gain from BLAS threads,
and BLAS threads that busy-wait for a core make a loaded machine several times slower. Each module is
computed by one thread with single-threaded BLAS, so the values do not depend on the number of cores
or on scheduling; they are yielded in module order, and the progress callback is called once per
module, in order, from the calling thread. At most ``workers + 1`` modules are in memory at once.

The pool needs a checkpoint whose modules can be read concurrently: a :class:`~nora_spectra.io.Checkpoint`
with its own ``iter_layers`` and ``ModuleEntry.read`` functions that hold no shared mutable state (the
safetensors reader opens the file anew for every tensor). Any other object with ``iter_layers()`` is
measured one module at a time.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

from nora_spectra.io.checkpoint import Checkpoint, ModuleEntry, ModuleUpdate, materialize
from nora_spectra.schema import LAYER_COLUMNS
from nora_spectra.spaces import LayerSpectrum, Report, SourceInfo, source_info
from nora_spectra.spectrum import NonFiniteFactorsError, blas_threads, spectrum

__all__ = ["MAX_WORKERS", "OPTIONS", "WeightRun", "measure", "open_checkpoint", "ordered_map", "prepare", "worker_count"]

#: keyword options of this space.
OPTIONS = ("adapter", "format")

#: At most this many modules are measured at once (each holds its float64 factors in memory).
MAX_WORKERS = 8

_T = TypeVar("_T")
_R = TypeVar("_R")


def open_checkpoint(source: "str | os.PathLike[str] | Checkpoint", adapter: str | None, format: str) -> "Checkpoint":
    """``source`` itself when it is a loaded checkpoint, else :func:`nora_spectra.io.load_checkpoint` of it."""
    if hasattr(source, "iter_layers"):
        return source  # type: ignore[return-value]
    from nora_spectra.io import load_checkpoint

    return load_checkpoint(source, adapter=adapter, format=format)


def worker_count(modules: int) -> int:
    """Threads for ``modules`` modules: the cores this process may run on, at most :data:`MAX_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS, modules))


def measure(layer: ModuleUpdate) -> LayerSpectrum:
    """The :class:`LayerSpectrum` of one read module (``sigma`` None when a factor holds NaN or Inf)."""
    try:
        sigma = spectrum(layer.update).values
    except NonFiniteFactorsError:
        sigma = None
    identity = {
        "module": layer.module,
        "kind": layer.kind,
        "layer_type": layer.layer_type,
        "dtype": layer.dtype,
        "rank": int(layer.rank),
        "scale": float(getattr(layer.update, "scale", 1.0)),
        "shape": layer.shape,
    }
    return LayerSpectrum(identity, sigma, dora=bool(getattr(layer, "dora", False)))


def _read_and_measure(entry: ModuleEntry) -> LayerSpectrum:
    return measure(materialize(entry))


def ordered_map(work: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """``map(work, items)`` on ``workers`` threads, the calling thread being one of them, in order.

    ``workers - 1`` helper threads and the caller take the next item as they become free (the caller
    does, while the result it must yield next is not ready), so a 2-core machine runs one extra thread,
    not two: each thread keeps its own allocator arena and BLAS buffers (about 2 MB). Results are
    yielded in the order of ``items``; an item starts only when it is at most ``workers`` places ahead
    of the next one to yield, so memory stays near ``workers + 1`` results. An exception raised by
    ``work`` is re-raised at its item's turn; when the consumer stops (or an item raised), items not
    started yet never start, and the helpers are joined before this returns.
    """
    if workers <= 1:
        yield from map(work, items)
        return
    pending = enumerate(items)
    cond = threading.Condition()
    results: dict[int, tuple[bool, Any]] = {}
    started = 0  # items taken so far (they are numbered 0, 1, ... in the order taken)
    to_yield = 0  # the next item to yield
    closed = False  # the consumer stopped, or every item was taken

    def take() -> tuple[int, _T] | None:
        """The next item, if one may start now (called holding ``cond``)."""
        nonlocal started, closed
        if closed or started - to_yield > workers:
            return None
        task = next(pending, None)
        if task is None:
            closed = True
            cond.notify_all()
            return None
        started += 1
        return task

    def run(index: int, item: _T) -> None:
        try:
            outcome: tuple[bool, Any] = (True, work(item))
        except BaseException as exc:  # re-raised by the consumer, at this item's turn
            outcome = (False, exc)
        with cond:
            results[index] = outcome
            cond.notify_all()

    def helper() -> None:
        while True:
            with cond:
                task = take()
                while task is None and not closed:
                    cond.wait()
                    task = take()
            if task is None:
                return
            run(*task)

    threads = [threading.Thread(target=helper, name=f"spectra-{n}", daemon=True) for n in range(workers - 1)]
    for thread in threads:
        thread.start()
    try:
        while True:
            with cond:
                while to_yield not in results and not (closed and started == to_yield):
                    task = take()
                    if task is None:
                        if not (closed and started == to_yield):  # take() may just have found the end
                            cond.wait()
                        continue
                    cond.release()  # the next result is not ready: work meanwhile
                    try:
                        run(*task)
                    finally:
                        cond.acquire()
                if to_yield not in results:
                    return  # every item was yielded
                ok, value = results.pop(to_yield)
                to_yield += 1
                cond.notify_all()  # the window moved
            if not ok:
                raise value
            yield value
    finally:
        with cond:
            closed = True
            cond.notify_all()
        for thread in threads:
            thread.join()


class WeightRun:
    """The weight-space measurement of one checkpoint."""

    columns = LAYER_COLUMNS
    unit = "layer"
    desc = "analysing"

    def __init__(self, checkpoint: "Checkpoint") -> None:
        self.checkpoint = checkpoint
        self.info: SourceInfo = source_info(checkpoint)
        self.total = len(checkpoint)

    def _spectra(self) -> Iterator[LayerSpectrum]:
        checkpoint = self.checkpoint
        pooled = isinstance(checkpoint, Checkpoint) and type(checkpoint).iter_layers is Checkpoint.iter_layers
        workers = worker_count(self.total) if pooled else 1
        if workers > 1:
            return ordered_map(_read_and_measure, checkpoint.entries, workers)
        return (measure(layer) for layer in checkpoint.iter_layers())

    def layers(self, report: Report | None) -> Iterator[LayerSpectrum]:
        with blas_threads(1):
            for done, layer in enumerate(self._spectra(), start=1):
                yield layer
                if report is not None:
                    report(done, self.total, layer.identity["module"])

    def fields(self) -> dict[str, Any]:
        return {}


def prepare(source: "str | os.PathLike[str] | Checkpoint", *, adapter: str | None = None, format: str = "auto") -> WeightRun:
    """Open ``source`` (a path or a loaded :class:`~nora_spectra.io.Checkpoint`) for weight-space spectra.

    Raises:
        CheckpointError: the path is missing, malformed or of an unknown format.
    """
    return WeightRun(open_checkpoint(source, adapter, format))
