"""Single-threaded BLAS in scan workers: one adapter per core, not one adapter on every core.

A worker process analyses one adapter at a time and the engines run one worker per core, so a BLAS
library starting its own thread pool in every worker would oversubscribe the cores. The thread-count
variables are read once, when the BLAS library loads: :func:`single_threaded` must run before numpy is
imported in the worker, which is why this module imports nothing but ``os`` (the local engine's
process-pool initializer, imported and run before the analysis code).
"""

from __future__ import annotations

import importlib
import os

__all__ = ["BLAS_THREAD_VARIABLES", "single_threaded"]

#: the variables OpenBLAS, OpenMP, MKL, BLIS, Apple Accelerate and numexpr read for their thread count.
BLAS_THREAD_VARIABLES: tuple[str, ...] = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def single_threaded(warm_up: str | None = None) -> None:
    """Set every BLAS thread-count variable to 1 in this process (a process-pool initializer).

    Args:
        warm_up: then import this module and call its ``warm_up()``, so the imports an analysis needs are
            paid when the worker starts, not in the first adapter's ``seconds``.
    """
    for name in BLAS_THREAD_VARIABLES:
        os.environ[name] = "1"
    if warm_up is not None:
        importlib.import_module(warm_up).warm_up()
