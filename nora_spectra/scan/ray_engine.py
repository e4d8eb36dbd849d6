"""``--engine ray``: the same analysis as a Ray Data pipeline, on a local or a remote Ray cluster.

The pipeline is ``ray.data.from_items`` over the adapters (one block each, so every adapter is a task
Ray can place on any node), ``map_batches`` running :func:`~nora_spectra.scan.task.analyse_items` (the
function the local engine runs), and the results streamed back to this process, which writes them
into the scan's Parquet parts exactly as the local engine's (:mod:`~nora_spectra.scan.store`): one
writer, so ``--resume`` and the atomic commits work the same whatever the engine. Items and results
cross Ray as pickled bytes, a column of one fixed type, so Ray never has to unify the schemas of
adapter rows.

``ray.init(address=...)`` finds the cluster (``--ray-address``, else ``RAY_ADDRESS``, else a new local
cluster with ``--workers`` CPUs). Every node reads the adapters by the same path (shared storage),
and needs nora-spectra installed. A Ray worker that dies is retried by Ray; an adapter whose task
still fails gets a row with status ``error``. Workers run single-threaded BLAS (``runtime_env``).
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Callable, Sequence

from nora_spectra.errors import UsageError
from nora_spectra.scan._threads import BLAS_THREAD_VARIABLES
from nora_spectra.scan.task import AnalysisSettings, ItemResult, ScanItem, analyse_items, error_result

__all__ = ["RAY_MISSING", "import_ray", "run_ray"]

#: the one line a missing Ray gets.
RAY_MISSING = "--engine ray needs Ray: pip install 'nora-spectra[ray]'"

#: Ray's own chatter (progress bars, per-dataset log lines) is off: the scan draws one progress bar.
_QUIET_ENVIRONMENT = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def import_ray() -> Any:
    """``ray`` with ``ray.data``.

    Raises:
        UsageError: Ray (or Ray Data) is not installed: :data:`RAY_MISSING`.
    """
    for name, value in _QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def _analyse_batch(batch: dict[str, Any], settings: AnalysisSettings) -> dict[str, list[bytes]]:
    """The ``map_batches`` function: pickled items in, pickled :class:`ItemResult`\\ s out."""
    items = [pickle.loads(blob) for blob in batch["item"]]
    return {"result": [pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL) for result in analyse_items(items, settings)]}


def run_ray(
    items: Sequence[ScanItem],
    settings: AnalysisSettings,
    emit: Callable[[ItemResult], None],
    *,
    workers: int | None,
    address: str | None = None,
) -> None:
    """Analyse ``items`` with Ray Data; ``emit`` gets every result in this process.

    Args:
        items: the adapters to analyse.
        settings: the analysis options.
        emit: called once per item with its :class:`ItemResult`.
        workers: CPUs of the local cluster started when there is none to join (default: the cores);
            with an existing cluster, at most this many adapters at once (None: as many as its CPUs).
        address: the cluster to join (``ray.init(address=...)``), or None for ``RAY_ADDRESS`` or a new
            local cluster.

    Raises:
        UsageError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = import_ray()
    started_here = not ray.is_initialized()
    joining = address is not None or bool(os.environ.get("RAY_ADDRESS"))
    local_cluster = started_here and not joining  # a cluster of our own, sized by ``workers``
    if started_here:
        try:
            ray.init(
                address=address,
                num_cpus=workers if local_cluster else None,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                runtime_env={"env_vars": {name: "1" for name in BLAS_THREAD_VARIABLES}},
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or os.environ.get("RAY_ADDRESS") or "a local cluster"
            raise UsageError(f"cannot start or reach the Ray cluster ({where}): {' '.join(str(exc).split())}") from None
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.max_errored_blocks = -1  # a task that fails for good loses its block, not the scan
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        rows = [{"item": pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)} for item in items]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        options: dict[str, Any] = {"batch_size": 1, "num_cpus": 1, "batch_format": "numpy",
                                   "fn_kwargs": {"settings": settings}}
        if workers is not None and not local_cluster:
            options["concurrency"] = workers
        dataset = dataset.map_batches(_analyse_batch, **options)
        pending = {item.path: item for item in items}
        for batch in dataset.iter_batches(batch_size=1, batch_format="numpy"):
            for blob in batch["result"]:
                result: ItemResult = pickle.loads(blob)
                if pending.pop(result.adapter["path"], None) is not None:
                    emit(result)
        for item in pending.values():
            emit(error_result(item, "no result came back from Ray (its task failed, or its worker died)"))
    finally:
        if started_here:
            ray.shutdown()
