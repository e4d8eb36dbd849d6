"""``one_blas_thread()`` / ``blas_limit(n)``: run small or skinny linear algebra on few BLAS threads.

OpenBLAS spreads even a 64 x 64 SVD or an ``n x 64`` by ``64 x k`` product over its threads; on a
machine shared with other jobs those threads spend far longer waiting for each other than computing
(measured on 2 shared cores: a 64 x 64 SVD with vectors 150 ms threaded, 1-2 ms on one thread; an
11008 x 64 by 64 x 20 product 38 ms against 7 ms). ``threadpoolctl`` (a dependency) limits the BLAS
libraries numpy and scipy loaded; without it the contexts do nothing.

One ``ThreadpoolController`` is kept (building one scans the loaded libraries, about 0.5 ms; entering
its ``limit`` costs about 10 us). It sees only the libraries loaded when it was built, so a caller that
has just loaded another BLAS (scipy's) asks for a fresh one with ``refresh=True``.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

__all__ = ["blas_limit", "one_blas_thread"]

_CONTROLLER: Any = None


def blas_limit(limit: int, *, refresh: bool = False) -> ContextManager[Any]:
    """A context in which every loaded BLAS library runs on at most ``limit`` threads, restored on exit.

    Args:
        limit: the number of BLAS threads.
        refresh: rescan the loaded libraries first (after loading one the kept controller may not see).

    Returns:
        The context (a no-op without ``threadpoolctl``).
    """
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency; stay correct without it
        return contextlib.nullcontext()
    if _CONTROLLER is None or refresh:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=limit, user_api="blas")


def one_blas_thread() -> ContextManager[Any]:
    """A context in which BLAS runs on one thread (a no-op without ``threadpoolctl``)."""
    return blas_limit(1)
