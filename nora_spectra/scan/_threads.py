"""Single-threaded BLAS in scan workers: one adapter per core, not one adapter on every core.

A worker process analyses one adapter at a time and the engines run one worker per core, so a BLAS
library starting its own thread pool in every worker would oversubscribe the cores. The thread-count
variables are read once, when the BLAS library loads, so they are put in the worker's environment
before its interpreter starts (local engine: the worker's ``env``; Ray: the job's ``runtime_env``).
"""

from __future__ import annotations

import os
from typing import Mapping

__all__ = ["BLAS_THREAD_VARIABLES", "worker_environment"]

#: the variables OpenBLAS, OpenMP, MKL, BLIS, Apple Accelerate and numexpr read for their thread count.
BLAS_THREAD_VARIABLES: tuple[str, ...] = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def worker_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with every BLAS thread count set to 1."""
    env = dict(os.environ if base is None else base)
    env.update({name: "1" for name in BLAS_THREAD_VARIABLES})
    return env
