"""Weight space: the exact spectrum of each module's update (``s * B @ A`` for LoRA and NoRA).

``prepare(source, adapter=None, format="auto")`` opens the checkpoint (validating everything from
headers); :meth:`WeightRun.layers` then reads each module and computes its singular values with
:func:`nora_spectra.spectrum.spectrum`, whatever the kind of update.

Modules are measured by a small pool of threads (one per available core, at most
:data:`MAX_WORKERS`), each reading one module (the safetensors reader opens the file anew at the
tensor's offset and upcasts to float64 block by block) and computing its Gram matrices while the
others do the same; the ``r x r`` work of plain low-rank modules is then finished
:data:`FINISH_BATCH` modules at a time (:func:`~nora_spectra.spectrum.core_singular_values`). The
heavy steps (file reads, casts, the Gram products) release the GIL, the Python between them does not.
In the ``spectra`` console script's own process the modules are shared instead between processes
forked from it (:mod:`nora_spectra._forked`, Linux), which share no GIL. BLAS
is limited to one thread for the whole run (:func:`~nora_spectra.spectrum.blas_threads`): the
products are too small to gain from BLAS threads, and BLAS threads that busy-wait for a core make a
loaded machine several times slower. Each module is computed by one thread with single-threaded BLAS,
so the values do not depend on the number of cores or on scheduling; they are yielded in module
order, and the progress callback is called once per module, in order, from the calling thread. At
most ``workers + 1`` modules are in memory at once.

The pool needs a checkpoint whose modules can be read concurrently: a :class:`~nora_spectra.io.Checkpoint`
with its own ``iter_layers`` and ``ModuleEntry.read`` functions that hold no shared mutable state (the
safetensors reader opens the file anew for every tensor). Any other object with ``iter_layers()``, and
every base-aware analysis (which reads base tensors and keeps a cache), is measured one module at a
time.

With ``base=BASE`` the analysis is base-aware (:mod:`nora_spectra.spaces.base_aware`): a model that is no
adapter is read as a full fine-tune (``W_tuned - W_base``), DoRA modules get their true update, and
every record gains the base tensor and the update's size relative to it (and, with ``intruders=True``,
its intruder dimensions). Dense updates above :data:`~nora_spectra.schema.EXACT_SVD_MAX_DIM` get only
their leading ``top_k`` singular values (default :data:`~nora_spectra.schema.DEFAULT_TOP_K`), with the
captured energy and an error bound in the record.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from nora_spectra._forked import forked_map, forking_allowed
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.io.checkpoint import Checkpoint, ModuleEntry, materialize
from nora_spectra.schema import (
    BASE_COLUMNS,
    DEFAULT_INTRUDER_EPS,
    DEFAULT_INTRUDER_K,
    DORA_PROXY_WARNING_PREFIX,
    INTRUDER_COLUMNS,
    LAYER_COLUMNS,
    SPECTRUM_COLUMNS,
)
from nora_spectra.spaces import LayerSpectrum, Report, SourceInfo, source_info
from nora_spectra.spectrum import (
    GramPair,
    NonFiniteFactorsError,
    blas_threads,
    core_singular_values,
    gram_pair,
    spectrum,
)
from nora_spectra.updates import DenseUpdate, LowRankUpdate

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.io.model_weights import ModelWeights
    from nora_spectra.spaces.base_aware import BaseAware
    from nora_spectra.svd_cache import SvdCache

__all__ = [
    "FINISH_BATCH",
    "MAX_WORKERS",
    "OPTIONS",
    "WeightRun",
    "check_intruder_options",
    "check_top_k",
    "open_checkpoint",
    "ordered_map",
    "prepare",
    "worker_count",
]

#: keyword options of this space.
OPTIONS = ("adapter", "format", "base", "top_k", "intruders", "intruder_k", "intruder_eps", "cache")

#: the warning that replaces the reader's DoRA proxy warning when the base gives the true update.
DORA_TRUE_WARNING = (
    "DoRA layers: spectra are of the true update m * (W0 + s B A) / ||W0 + s B A|| - W0, with W0 from the base"
)


#: a NoRA branch is s * B act(A x): the base-aware fields describe its linear skeleton s * B @ A.
NORA_SKELETON_WARNING = (
    "NoRA layers: W0 + s B A is the linear skeleton of the tuned layer (the activation sits between A and B); "
    "relative size and intruder dimensions describe that skeleton"
)

#: At most this many modules are measured at once (each holds its float64 factors in memory).
MAX_WORKERS = 8

_T = TypeVar("_T")
_R = TypeVar("_R")


def open_checkpoint(
    source: "str | os.PathLike[str] | Checkpoint",
    adapter: str | None,
    format: str,
    base: "ModelWeights | None" = None,
) -> "Checkpoint":
    """``source`` itself when it is a loaded checkpoint, else :func:`nora_spectra.io.load_checkpoint` of it."""
    if hasattr(source, "iter_layers"):
        return source  # type: ignore[return-value]
    from nora_spectra.io import load_checkpoint

    return load_checkpoint(source, adapter=adapter, format=format, base=base)


def worker_count(modules: int) -> int:
    """Threads for ``modules`` modules: the cores this process may run on, at most :data:`MAX_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS, modules))


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
    """The weight-space measurement of one checkpoint.

    Args:
        checkpoint: the opened checkpoint.
        base_aware: the base-model measurements, or None.
        top_k: ``--top-k`` as validated (an integer, ``"all"`` or None for the default policy).
        truncating: dense spectra may be truncated (a base, ``top_k`` or a full fine-tune): records get
            :data:`SPECTRUM_COLUMNS` and large dense updates the default ``top_k``.
    """

    unit = "layer"
    desc = "analysing"

    def __init__(
        self,
        checkpoint: "Checkpoint",
        base_aware: "BaseAware | None" = None,
        *,
        top_k: "int | str | None" = None,
        truncating: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.info: SourceInfo = source_info(checkpoint)
        self.total = len(checkpoint)
        self.base_aware = base_aware
        self.top_k = top_k
        self.truncating = truncating
        columns = LAYER_COLUMNS + (SPECTRUM_COLUMNS if truncating else ())
        if base_aware is not None:
            columns += BASE_COLUMNS + (INTRUDER_COLUMNS if base_aware.intruders else ())
            self._dora_warning()
            if any(getattr(entry, "kind", None) == "nora" for entry in getattr(checkpoint, "entries", None) or []):
                self.info.warnings.append(NORA_SKELETON_WARNING)
        self.columns = columns

    def _dora_warning(self) -> None:
        """With a base, DoRA modules whose magnitude the reader can read are analysed by their true update."""
        entries = getattr(self.checkpoint, "entries", None) or []
        dora = [entry for entry in entries if entry.dora]
        proxy = [i for i, text in enumerate(self.info.warnings) if text.startswith(DORA_PROXY_WARNING_PREFIX)]
        if not dora or not proxy:
            return
        unread = [entry.module for entry in dora if entry.read_magnitude is None]
        if not unread:  # every reader's wording of the proxy warning (PEFT's is DORA_PROXY_WARNING)
            self.info.warnings[proxy[0]] = DORA_TRUE_WARNING

    def _spectra(self) -> Iterator[LayerSpectrum]:
        """Each module's spectrum, in order; on the thread pool when the checkpoint allows it."""
        checkpoint = self.checkpoint
        pooled = (
            self.base_aware is None
            and isinstance(checkpoint, Checkpoint)
            and type(checkpoint).iter_layers is Checkpoint.iter_layers
        )
        if pooled:
            workers = worker_count(self.total)
            if workers > 1 and forking_allowed():
                return forked_map(self._measured, checkpoint.entries, workers)
            return self._finished(ordered_map(self._read_and_measure, checkpoint.entries, workers))
        if self.base_aware is not None and isinstance(checkpoint, Checkpoint):
            if type(checkpoint).iter_layers is Checkpoint.iter_layers:
                return (self._read_against_base(entry) for entry in checkpoint.entries)
        return (self._measure(layer) for layer in checkpoint.iter_layers())

    def _measured(self, entries: Iterable[ModuleEntry]) -> Iterator[LayerSpectrum]:
        """``entries`` read and measured one after the other (a process's share of :func:`forked_map`)."""
        return self._finished(map(self._read_and_measure, entries))

    def _read_and_measure(self, entry: ModuleEntry) -> "LayerSpectrum | _Pending":
        """One module read and measured; a plain low-rank one only as far as its Gram matrices (a
        :class:`_Pending`, finished with others by :meth:`_finished`), its factors then dropped."""
        layer = materialize(entry)
        update = layer.update
        if not self.truncating and type(update) is LowRankUpdate and math.isfinite(update.scale):
            A, B = update.A, update.B
            if 0 < A.shape[0] <= min(B.shape[0], A.shape[1]):  # else the small product is formed
                pair = gram_pair(A, B, update.scale, factors=lambda: _factors_of(entry))
                if pair is not None:
                    return _Pending(self._identity(layer, update), pair, bool(getattr(layer, "dora", False)))
        return self._measure(layer)

    def _finished(self, results: "Iterable[LayerSpectrum | _Pending]") -> Iterator[LayerSpectrum]:
        """``results`` in order, every :class:`_Pending` finished: up to :data:`FINISH_BATCH` of them at
        once, by :func:`~nora_spectra.spectrum.core_singular_values` (the ``r x r`` work of many modules
        in a few stacked numpy calls, instead of about 30 small calls each holding the GIL)."""
        held: list[LayerSpectrum | _Pending] = []
        pending = 0
        iterator = iter(results)
        while True:
            try:
                result = next(iterator)
            except StopIteration:
                break
            except Exception:  # a module failed: the ones before it are yielded first, as without batches
                yield from _finish(held)
                raise
            held.append(result)
            pending += isinstance(result, _Pending)
            if pending >= FINISH_BATCH:
                yield from _finish(held)
                held, pending = [], 0
        yield from _finish(held)

    def _read_against_base(self, entry: ModuleEntry) -> LayerSpectrum:
        """A base-aware module: a difference against the base (``read_tuned``) is formed from the ``W0``
        read for the base-aware fields, so the base tensor is read once, not twice."""
        assert self.base_aware is not None
        if entry.read_tuned is None:
            return self._measure(materialize(entry))
        plan = self.base_aware.plan(entry.module, entry.layer_type, tuple(entry.shape))
        if plan.transposed or tuple(plan.shape) != tuple(entry.shape):
            return self._measure(materialize(entry))
        base, key = self.base_aware.load(plan)
        delta = entry.read_tuned()
        with np.errstate(invalid="ignore", over="ignore"):  # as materialize: NaN/Inf become a status
            np.subtract(delta, base, out=delta)
        layer = materialize(dataclasses.replace(entry, read=lambda: DenseUpdate(delta)))
        return self._measure(layer, loaded=(plan, base, key))

    def layers(self, report: Report | None) -> Iterator[LayerSpectrum]:
        try:
            with blas_threads(1):
                for done, layer in enumerate(self._spectra(), start=1):
                    yield layer
                    if report is not None:
                        report(done, self.total, layer.identity["module"])
        finally:
            if self.base_aware is not None:
                self.info.warnings.extend(self.base_aware.warnings())

    @staticmethod
    def _identity(layer: Any, update: Any) -> dict[str, Any]:
        """The record's identity fields of a read module."""
        return {
            "module": layer.module,
            "key": layer.key,
            "kind": layer.kind,
            "layer_type": layer.layer_type,
            "dtype": layer.dtype,
            "rank": int(layer.rank),
            "scale": float(getattr(update, "scale", 1.0)),
            "shape": layer.shape,
        }

    def _measure(self, layer: Any, loaded: "tuple[Any, np.ndarray, str | None] | None" = None) -> LayerSpectrum:
        """The spectrum and fields of one read module (``loaded``: its base plan, ``W0`` and key, if read)."""
        update = layer.update
        dora = bool(getattr(layer, "dora", False))
        identity = self._identity(layer, update)
        base_aware, plan, base, key = self.base_aware, None, None, None
        if base_aware is not None:
            if loaded is None:
                plan = base_aware.plan(layer.module, layer.layer_type, tuple(layer.shape))
                base, key = base_aware.load(plan)
            else:
                plan, base, key = loaded
            read_magnitude = getattr(layer, "read_magnitude", None)
            if dora and read_magnitude is not None:
                update = base_aware.true_dora(update, base, read_magnitude(), layer.layer_type)
                dora = False
        if self.truncating:
            from nora_spectra.spaces.base_aware import spectrum_fields, with_top_k

            update = with_top_k(update, self.top_k)
        try:
            spec = spectrum(update)
        except NonFiniteFactorsError:
            spec = None
        if self.truncating:
            fields = spectrum_fields(spec, update)
            identity.update(fields)
            if layer.kind == "full" and fields["top_k"] is not None:
                identity["rank"] = fields["top_k"]  # no rank budget: the values analysed
        if base_aware is not None and plan is not None and base is not None:
            identity.update(base_aware.fields(plan, base, key, update, spec))
        return LayerSpectrum(identity, None if spec is None else spec.values, dora=dora)

    def fields(self) -> dict[str, Any]:
        if self.base_aware is None and not self.truncating:
            return {}
        out: dict[str, Any] = {"base": None, "top_k": self.top_k, "intruder_k": None, "intruder_eps": None}
        if self.base_aware is not None:
            out["base"] = self.base_aware.base.path
            if self.base_aware.intruders:
                out.update(intruder_k=self.base_aware.intruder_k, intruder_eps=self.base_aware.intruder_eps)
        return out


def check_top_k(value: Any) -> int | str | None:
    """Validate ``top_k``: None, ``"all"`` or an integer >= 1.

    Raises:
        UsageError: anything else.
    """
    if value is None or value == "all":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"--top-k must be a positive integer or 'all', got {value!r}")
    return int(value)


def check_intruder_options(k: Any, eps: Any) -> tuple[int, float]:
    """Validate the intruder options: ``k`` an integer >= 1, ``eps`` a number in (0, 1].

    Raises:
        UsageError: either is out of range.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"--intruder-k must be a positive integer, got {k!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < float(eps) <= 1:
        raise UsageError(f"--intruder-eps must be a number in (0, 1], got {eps!r}")
    return int(k), float(eps)


def prepare(
    source: "str | os.PathLike[str] | Checkpoint",
    *,
    adapter: str | None = None,
    format: str = "auto",
    base: "str | os.PathLike[str] | ModelWeights | None" = None,
    top_k: "int | str | None" = None,
    intruders: bool = False,
    intruder_k: int | None = None,
    intruder_eps: float | None = None,
    cache: "bool | str | os.PathLike[str] | SvdCache | None" = None,
) -> WeightRun:
    """Open ``source`` (a path or a loaded :class:`~nora_spectra.io.Checkpoint`) for weight-space spectra.

    Args:
        source: the checkpoint.
        adapter, format: as for :func:`nora_spectra.io.load_checkpoint`.
        base: a safetensors base model (file, sharded index or directory): a base-aware analysis.
        top_k: leading singular values of each dense update: an integer, ``"all"`` (exact SVD), or None
            (exact up to ``min(d_out, d_in) = 1024``, else 64).
        intruders: count intruder dimensions (needs ``base``).
        intruder_k, intruder_eps: their ``k`` (10) and ``epsilon`` (0.5).
        cache: the on-disk cache of base SVDs: None/True the default directory (``$NORA_SPECTRA_CACHE``,
            ``~/.cache/nora-spectra``), False none, or a directory.

    Raises:
        CheckpointError: the path or the base is missing, malformed or of an unknown format; a module
            the base lacks or whose shape does not fit it.
        UsageError: an invalid ``top_k``, intruder options without ``intruders``, or ``intruders``
            without ``base``.
    """
    top_k = check_top_k(top_k)
    if not isinstance(intruders, bool):
        raise UsageError(f"intruders must be true or false, got {intruders!r}")
    if not intruders and (intruder_k is not None or intruder_eps is not None):
        given = "--intruder-k" if intruder_k is not None else "--intruder-eps"
        raise UsageError(f"{given} applies only with --intruders")
    k, eps = check_intruder_options(
        DEFAULT_INTRUDER_K if intruder_k is None else intruder_k,
        DEFAULT_INTRUDER_EPS if intruder_eps is None else intruder_eps,
    )
    if intruders and base is None:
        raise UsageError("--intruders needs the base model: --base BASE (base=BASE in Python)")
    if base is None:
        checkpoint = open_checkpoint(source, adapter, format)
        truncating = top_k is not None or getattr(checkpoint, "format", None) == "full"
        return WeightRun(checkpoint, top_k=top_k, truncating=truncating)
    from nora_spectra.io.model_weights import open_model_weights
    from nora_spectra.spaces.base_aware import BaseAware
    from nora_spectra.svd_cache import open_cache

    if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
        raise CheckpointError(os.fspath(source), "no such file or directory")  # the checkpoint before its base
    weights = open_model_weights(base)
    checkpoint = open_checkpoint(source, adapter, format, weights)
    base_aware = BaseAware(
        weights, checkpoint, cache=open_cache(cache), intruders=intruders, intruder_k=k, intruder_eps=eps
    )
    return WeightRun(checkpoint, base_aware, top_k=top_k, truncating=True)


#: plain low-rank modules whose ``r x r`` work is finished together (memory: two ``r x r`` Gram
#: matrices each; progress is reported in steps of this many modules).
FINISH_BATCH = 32


@dataclasses.dataclass(frozen=True, eq=False)
class _Pending:
    """A plain low-rank module read as far as its Gram matrices."""

    identity: dict[str, Any]
    pair: GramPair
    dora: bool


def _finish(held: "list[LayerSpectrum | _Pending]") -> Iterator[LayerSpectrum]:
    """``held`` in order, each :class:`_Pending` finished by one :func:`core_singular_values` call.

    When that call fails (the Householder route could not read a module's factors again: the file
    changed), the modules are finished one at a time instead, so the error is raised at its module's
    turn, after the modules before it.
    """
    waiting = [item for item in held if isinstance(item, _Pending)]
    try:
        values = iter(core_singular_values([item.pair for item in waiting]) if waiting else [])
    except Exception:
        values = (core_singular_values([item.pair])[0] for item in waiting)
    for item in held:
        yield LayerSpectrum(item.identity, next(values), dora=item.dora) if isinstance(item, _Pending) else item


def _factors_of(entry: ModuleEntry) -> tuple[np.ndarray, np.ndarray]:
    """A plain low-rank module's factors read again (the Householder route of its spectrum needs them)."""
    update = materialize(entry).update
    return np.asarray(update.A, dtype=np.float64), np.asarray(update.B, dtype=np.float64)
