"""``one_blas_thread()``: run small or skinny linear algebra on one BLAS thread.

OpenBLAS spreads even a 64 x 64 SVD or an ``n x 64`` by ``64 x k`` product over its threads; on a
machine shared with other jobs those threads spend far longer waiting for each other than computing
(measured on 2 shared cores: a 64 x 64 SVD with vectors 150 ms threaded, 1-2 ms on one thread; an
11008 x 64 by 64 x 20 product 38 ms against 7 ms). ``threadpoolctl`` (a dependency) limits the BLAS
libraries numpy and scipy loaded; without it the context does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

__all__ = ["one_blas_thread"]

_CONTROLLER: Any = None


def one_blas_thread() -> ContextManager[Any]:
    """A context in which BLAS runs on one thread (a no-op without ``threadpoolctl``)."""
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency; stay correct without it
        return contextlib.nullcontext()
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")
