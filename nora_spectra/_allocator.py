"""``keep_freed_memory()``: let glibc's ``malloc`` reuse the memory of the previous module's factors.

Reading a module allocates its factors in float64 (0.5-22 MB each, Llama shapes at r = 16-256) and
frees them when its spectrum is done, while the next modules are already being read. glibc's default
*dynamic* thresholds hand such blocks back to the operating system when they are freed (``munmap``,
or trimming the top of the heap) and fault them in again, zero-filled, for the next module; with
transparent huge pages that is a 2 MB page cleared per fault. Measured on the bench's r = 16 adapter
(224 modules, 320 MB of float64 factors in all): reading every module took 0.070 s with the defaults
and 0.030 s with the thresholds below; at r = 64 0.20 s against 0.10 s.

Fixed thresholds keep the blocks in the heap: allocations below :data:`MMAP_THRESHOLD` come from it,
and up to :data:`TRIM_THRESHOLD` of free memory at its top is kept for the next allocation instead of
being returned. The settings are process-wide, so only processes that are ours call this: the
``spectra`` console script and the local scan engine's workers (a notebook keeps its allocator as it
is, and may call :func:`keep_freed_memory` itself). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

#: blocks this large and larger are mapped and unmapped on their own (glibc's dynamic maximum, 32 MiB).
MMAP_THRESHOLD = 32 << 20
#: free memory kept at the top of a heap before it is returned to the operating system (64 MiB).
TRIM_THRESHOLD = 64 << 20

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD`.

    Returns:
        True when both were set (a glibc process), False when this C library has no ``mallopt``
        or refused them; the process is then left as it was.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc (macOS, Windows, musl without it)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
